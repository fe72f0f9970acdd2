//! Template creation, a library operation over [`Instance`]s: boot the function cold (or
//! restore its runtime base), snapshot the runtime base where the guest asks for its
//! function, give it the function, snapshot the function template where it first reads
//! its request, then restore that template with every page arriving on demand and serve a
//! trial request to record the pages it touches (the working set a prefetching restore
//! copies up front).
//!
//! A layer is stored as a diff against its parent: only frames whose bytes differ from the
//! parent's are stored (found by comparing against the parent's pages; frames the host
//! never made resident are zero). Dirty logging would miss the VMM's own writes into guest
//! memory, and the comparison costs a few ms for the ~10k resident pages of a QuickJS
//! guest.

use super::checks::{self, CheckError};
use super::device::{runtime_name, BaseRef, DeviceState, Provenance, DEVICE_STATE_VERSION};
use crate::engine::Engine;
use crate::error::{Error, ErrorKind};
use crate::guest::{FunctionSpec, RunLimits};
use crate::instance::{Backing, Instance};
use crate::stats::{ms, ArtifactCache, Stats};
use crate::vm::Hostcall;
use snapshot_store::{Frame, LoadError, Store, TemplateName, WriteError, PAGE_SIZE};
use std::time::Instant;
use vmm_abi::{GuestRange, Op};

const PAGE: u64 = PAGE_SIZE as u64;

/// Name of the runtime base for a module: it depends on the module, the runtime, the
/// engine (wasmtime or wasmi) and the guest kernel (a new kernel must not restore an old
/// base), and on the device state version, so that bases which do not record their
/// provenance (version 1) are never picked up again.
pub fn runtime_base_name(spec: &FunctionSpec, mem_mib: u64) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&spec.module);
    h.update(&super::device::kernel_hash().to_le_bytes());
    h.update(&mem_mib.to_le_bytes());
    h.update(&vmm_abi::ABI_VERSION.to_le_bytes());
    h.update(spec.engine.name().as_bytes());
    h.update(&DEVICE_STATE_VERSION.to_le_bytes());
    let rt = runtime_name(spec.runtime);
    format!("base-{rt}-{:016x}", h.digest())
}

/// What `template create` did.
#[derive(Debug, serde::Serialize)]
pub struct CreateReport {
    pub name: String,
    pub base: String,
    pub base_created: bool,
    pub base_new_pages: u64,
    pub new_pages: u64,
    pub reused_pages: u64,
    pub working_set_pages: usize,
    /// Compiling the module on the host for the guest's wasmtime (0 when the base was
    /// reused, or for wasmi).
    pub aot_compile_ms: f64,
    /// Whether the base's compiled module came from the store's cache.
    pub artifact_cache: ArtifactCache,
    pub create_ms: f64,
}

/// Errors of the store while writing a layer.
fn store_error(step: &'static str) -> impl Fn(WriteError) -> Error {
    move |e| {
        let kind = match &e {
            WriteError::AlreadyExists { .. } => ErrorKind::BadRequest,
            _ => ErrorKind::Host,
        };
        Error::new(kind, step, e)
    }
}

fn load_error(step: &'static str) -> impl Fn(LoadError) -> Error {
    move |e| match e {
        LoadError::NotFound { .. } => Error::new(ErrorKind::NotFound, step, e),
        e => Error::new(ErrorKind::Damaged, step, e),
    }
}

fn check_error(step: &'static str) -> impl Fn(CheckError) -> Error {
    move |e| {
        let kind = match &e {
            CheckError::BaseMismatch { .. } | CheckError::UnrecordedBase { .. } => {
                ErrorKind::BadRequest
            }
            _ => ErrorKind::Damaged,
        };
        Error::new(kind, step, e)
    }
}

/// A layer read from an instance: its vCPU state and the frames that differ from its
/// parent's (`None`: now zero).
struct Captured {
    state: crate::persist::VcpuState,
    mem_size: u64,
    changed: Vec<(u64, Option<Box<[u8; PAGE_SIZE]>>)>,
}

/// Read `inst`'s layer over `parent` (the parent's pages; `None`: no parent).
fn capture_layer(
    inst: &mut Instance,
    parent: Option<&snapshot_store::Resolved>,
    step: &'static str,
) -> Result<Captured, Error> {
    let state = inst.capture()?;
    let mem = inst.memory();
    let host = |e: crate::memory::MemoryError| Error::new(ErrorKind::Host, step, e);
    let mut changed = Vec::new();
    let resident = mem.resident_pages();
    let mut cur = [0u8; PAGE_SIZE];
    for gfn in 0..mem.size() / PAGE {
        let parent_page = parent.and_then(|r| match r.frame(gfn) {
            Some(Frame::Data(p)) => Some(p),
            _ => None,
        });
        if !resident.get(gfn as usize).copied().unwrap_or(true) {
            if parent_page.is_some() {
                changed.push((gfn, None));
            }
            continue;
        }
        mem.read_into(gfn * PAGE, &mut cur).map_err(host)?;
        let zero = cur.iter().all(|&b| b == 0);
        match parent_page {
            Some(p) if p[..] == cur[..] => {}
            Some(_) if zero => changed.push((gfn, None)),
            None if zero => {}
            _ => changed.push((gfn, Some(Box::new(cur)))),
        }
    }
    Ok(Captured {
        state,
        mem_size: mem.size(),
        changed,
    })
}

/// Write a captured layer as template `name` over `parent`, with `device`.
fn write_captured(
    store: &mut Store,
    name: &str,
    parent: Option<&str>,
    captured: &Captured,
    device: &DeviceState,
    step: &'static str,
) -> Result<snapshot_store::CommitInfo, Error> {
    let write = store_error(step);
    let mut w = store
        .begin_template(name, parent, captured.mem_size)
        .map_err(&write)?;
    for (gfn, page) in &captured.changed {
        match page {
            None => w.set_zero(*gfn).map_err(&write)?,
            Some(p) => w.put_page(*gfn, p).map_err(&write)?,
        }
    }
    w.set_vcpu_state(captured.state.encode());
    w.set_device_state(device.encode());
    w.commit().map_err(&write)
}

/// Store `inst`'s memory as layer `name` over `parent` (or a whole snapshot without one),
/// with the vCPU state and `device`.
fn write_layer(
    store: &mut Store,
    name: &str,
    parent: Option<&str>,
    inst: &mut Instance,
    device: &DeviceState,
) -> Result<snapshot_store::CommitInfo, Error> {
    let step = "write the template";
    let parent_tmpl = match parent {
        Some(p) => Some(store.load(p).map_err(load_error(step))?),
        None => None,
    };
    let resolved = match &parent_tmpl {
        Some(t) => Some(t.resolve(store).map_err(load_error(step))?),
        None => None,
    };
    let captured = capture_layer(inst, resolved.as_ref(), step)?;
    drop(resolved);
    write_captured(store, name, parent, &captured, device, step)
}

/// A function layered on a loaded runtime base by [`layer_on`], not yet stored: its
/// instance serves the function's first request meanwhile, and [`Layered::write`] stores
/// the layer as it was before that request.
pub struct Layered {
    name: String,
    base: String,
    captured: Captured,
    device: DeviceState,
}

impl Layered {
    /// Store the layer as function template `name` on its base (no working set is
    /// recorded: pooled instances do not use one; `vmm restore --memory prefetch` of it
    /// learns one from its requests).
    pub fn write(self, store: &mut Store) -> Result<snapshot_store::CommitInfo, Error> {
        write_captured(
            store,
            &self.name,
            Some(&self.base),
            &self.captured,
            &self.device,
            "write the template",
        )
    }

    /// Pages the layer holds of its own (differing from the base).
    pub fn changed_pages(&self) -> usize {
        self.captured.changed.len()
    }
}

/// SEUSS's cold start: give the function `spec` to a new instance of runtime base `base`
/// (loaded, and checked to be made from what `spec` asks for), run it to its first read of
/// stdin and capture that state as layer `name` in memory. The instance is returned ready
/// to serve this first request ([`Instance::invoke`]; it cannot be reset, drop it after);
/// the layer is stored later with [`Layered::write`], off the request's path.
pub fn layer_on(
    base: &std::sync::Arc<super::Template>,
    name: &str,
    spec: &FunctionSpec,
    limits: &RunLimits,
) -> Result<(Instance, Layered), Error> {
    let step = "check the runtime base";
    let bad_name = |e: snapshot_store::NameError| Error::new(ErrorKind::BadRequest, step, e);
    let tname = TemplateName::new(name).map_err(bad_name)?;
    let base_tname = TemplateName::new(base.name()).map_err(bad_name)?;
    if base.device().pending_op != Op::GetFunction as u64 {
        return Err(Error::new(
            ErrorKind::BadRequest,
            step,
            format!("template {:?} waits for a request, so nothing can be layered on it; use its runtime base", base.name()),
        ));
    }
    let ours = Provenance::of(spec, limits.mem_mib);
    checks::check_provenance(
        &tname,
        &base_tname,
        &ours,
        base.device().provenance.as_ref(),
    )
    .map_err(check_error(step))?;
    let mut lt = Instant::now();
    let mut inst = base.instantiate_with(Backing::Eager)?;
    lap(&mut lt, "base instance");
    let (stdin_buf, _) = run_to_request(&mut inst, spec, limits)?;
    lap(&mut lt, "function init");
    let device = device_state(
        Op::ReadStdin,
        stdin_buf,
        spec,
        spec.args.clone(),
        &ours,
        Some(BaseRef {
            name: base.name().to_string(),
            created_unix_ms: base.created_unix_ms(),
        }),
    );
    let captured = capture_layer(
        &mut inst,
        Some(base.resolved()),
        "capture the function's layer",
    )?;
    lap(&mut lt, "capture layer");
    inst.take_first_request();
    Ok((
        inst,
        Layered {
            name: name.to_string(),
            base: base.name().to_string(),
            captured,
            device,
        },
    ))
}

/// Give the guest waiting for its function `spec` and run it to its first read of stdin:
/// the buffer that read waits on.
fn run_to_request(
    inst: &mut Instance,
    spec: &FunctionSpec,
    limits: &RunLimits,
) -> Result<(GuestRange, crate::vm::Output), Error> {
    let step = "layer the function";
    let config = spec.config_blob();
    let (stop, out) = inst.resume_to_call(Some(&config), limits);
    match stop? {
        Hostcall::ReadStdin { buf } => Ok((buf, out)),
        Hostcall::Exit { code } => Err(Error::new(
            ErrorKind::BadRequest,
            step,
            format!(
                "the function exited (code {code}) before reading its request, so there is no point to snapshot; a function template must read stdin. Its stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        )),
        Hostcall::GetFunction { .. } => Err(unexpected(step, "asked for its function twice".into())),
    }
}

/// The device state of a template taken at hostcall `pending` (buffer `buf`).
fn device_state(
    pending: Op,
    buf: GuestRange,
    spec: &FunctionSpec,
    args: Vec<String>,
    provenance: &Provenance,
    base: Option<BaseRef>,
) -> DeviceState {
    DeviceState {
        version: DEVICE_STATE_VERSION,
        pending_op: pending as u64,
        buf_gpa: buf.gpa,
        buf_len: buf.len,
        runtime: runtime_name(spec.runtime).into(),
        module_name: spec.module_name.clone(),
        args,
        provenance: Some(provenance.clone()),
        base,
    }
}

/// Log how long a step of template creation took (`RUST_LOG=debug`), and restart the clock.
fn lap(t: &mut Instant, step: &str) {
    tracing::debug!(step, ms = ms(t.elapsed()), "template create");
    *t = Instant::now();
}

fn unexpected(step: &'static str, what: String) -> Error {
    Error::new(ErrorKind::GuestFault, step, format!("the guest {what}"))
}

/// Create (or reuse) the runtime base and layer function template `name` on it, written
/// through `store` (the engine's store directory, opened for writing); then record its
/// working set with `trial_input`. An existing base is used only if it was made from what
/// `spec` and `limits` ask for (module, runtime, engine, memory size, guest kernel and
/// ABI); otherwise the error names each option that differs.
pub fn create_template(
    engine: &Engine,
    store: &mut Store,
    name: &str,
    spec: &FunctionSpec,
    base: Option<&str>,
    trial_input: &[u8],
    limits: &RunLimits,
) -> Result<CreateReport, Error> {
    let t0 = Instant::now();
    let step = "check the runtime base";
    let bad_name = |e: snapshot_store::NameError| Error::new(ErrorKind::BadRequest, step, e);
    let tname = TemplateName::new(name).map_err(bad_name)?;
    let base_tname = match base {
        Some(b) => TemplateName::new(b),
        None => TemplateName::new(&runtime_base_name(spec, limits.mem_mib)),
    }
    .map_err(bad_name)?;
    let base_name = base_tname.as_str().to_string();
    let ours = Provenance::of(spec, limits.mem_mib);
    // The base as it is now, checked against what this layer asks for before anything runs.
    let base_exists = match store.load(&base_name) {
        Ok(t) => {
            let device = checks::decode_device(&t).map_err(check_error(step))?;
            if device.pending_op != Op::GetFunction as u64 {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    step,
                    format!("template {base_name:?} waits for a request, so nothing can be layered on it; use its runtime base"),
                ));
            }
            checks::check_base_for_layer(&tname, &ours, &t, &device).map_err(check_error(step))?;
            true
        }
        Err(LoadError::NotFound { .. }) => false,
        Err(e) => return Err(load_error(step)(e)),
    };
    let mut report = CreateReport {
        name: name.into(),
        base: base_name.clone(),
        base_created: false,
        base_new_pages: 0,
        new_pages: 0,
        reused_pages: 0,
        working_set_pages: 0,
        aot_compile_ms: 0.0,
        artifact_cache: ArtifactCache::Off,
        create_ms: 0.0,
    };

    let mut lt = Instant::now();
    // An instance stopped where the guest asks for its function, and the base it is.
    let (mut inst, made_on) = if base_exists {
        let base = engine.load_base(&base_name)?;
        // What was loaded may have replaced the base checked above.
        checks::check_provenance(
            &tname,
            &base_tname,
            &ours,
            base.device().provenance.as_ref(),
        )
        .map_err(check_error(step))?;
        let made_on = BaseRef {
            name: base_name.clone(),
            created_unix_ms: base.created_unix_ms(),
        };
        (base.instantiate_with(Backing::Eager)?, made_on)
    } else {
        let step = "create the runtime base";
        let base_limits = RunLimits {
            eager_compile: true,
            ..limits.clone()
        };
        let mut reuse = true;
        let (mut inst, buf) = loop {
            let mut stats = Stats::default();
            let mut inst = Instance::boot(spec, &base_limits, Some(&*store), reuse, &mut stats)?;
            report.aot_compile_ms = stats.aot_compile_ms;
            report.artifact_cache = stats.artifact_cache;
            let (stop, out) = inst.resume_to_call(None, limits);
            let wrote = !out.stdout.is_empty() || !out.stderr.is_empty();
            if reuse
                && crate::guest::cached_artifact_refused(
                    stop.as_ref().err(),
                    stats.artifact_cache,
                    wrote,
                )
            {
                reuse = false;
                continue;
            }
            match stop? {
                Hostcall::GetFunction { buf } => break (inst, buf),
                Hostcall::ReadStdin { .. } => {
                    return Err(unexpected(
                        step,
                        "read its request before asking for its function".into(),
                    ))
                }
                Hostcall::Exit { code } => {
                    return Err(unexpected(
                        step,
                        format!("exited (code {code}) before asking for its function"),
                    ))
                }
            }
        };
        let device = device_state(Op::GetFunction, buf, spec, vec![], &ours, None);
        match write_layer(store, &base_name, None, &mut inst, &device) {
            Ok(info) => {
                report.base_created = true;
                report.base_new_pages = info.new_pages;
            }
            // A concurrent `template create` wrote the same base first: layer on theirs (the
            // function layer is a diff against whatever the parent holds) if it was made
            // from the same things.
            Err(e)
                if e.find::<WriteError>()
                    .is_some_and(|w| matches!(w, WriteError::AlreadyExists { .. })) =>
            {
                let theirs = store.load(&base_name).map_err(load_error(step))?;
                let device = checks::decode_device(&theirs).map_err(check_error(step))?;
                checks::check_base_for_layer(&tname, &ours, &theirs, &device)
                    .map_err(check_error(step))?;
            }
            Err(e) => return Err(e),
        }
        let made_on = BaseRef {
            name: base_name.clone(),
            created_unix_ms: store
                .load(&base_name)
                .map_err(load_error(step))?
                .created_unix_ms,
        };
        (inst, made_on)
    };

    lap(&mut lt, "base instance");
    // The function layer: give the guest its function and run it to its first read of
    // stdin.
    let (stdin_buf, _) = run_to_request(&mut inst, spec, limits)?;
    lap(&mut lt, "function init");
    let device = device_state(
        Op::ReadStdin,
        stdin_buf,
        spec,
        spec.args.clone(),
        &ours,
        Some(made_on),
    );
    let commit = write_layer(store, name, Some(&base_name), &mut inst, &device)?;
    lap(&mut lt, "write layer");
    drop(inst);
    report.new_pages = commit.new_pages;
    report.reused_pages = commit.reused_pages;

    // Record the working set: a trial invocation with every page arriving on demand.
    let template = engine.load_template(name)?;
    let mut trial = template.instantiate_with(Backing::Lazy)?;
    let resp = trial.invoke(trial_input, limits);
    // A trial that failed still touched what it touched; a host failure is an error.
    if let Err(e) = &resp.result {
        if matches!(e.kind(), ErrorKind::Host | ErrorKind::Damaged) {
            return Err(Error::new(
                e.kind(),
                "record the working set",
                e.to_string(),
            ));
        }
    }
    let touched = trial.take_touched();
    lap(&mut lt, "trial");
    drop(trial);
    report.working_set_pages = touched.len();
    store
        .set_working_set(name, touched)
        .map_err(|e| Error::new(ErrorKind::Host, "record the working set", e))?;
    lap(&mut lt, "working set");
    report.create_ms = ms(t0.elapsed());
    Ok(report)
}
