//! Templates: snapshots taken where the guest waits, stored as page diffs in the
//! content-addressed store, and restored into a fresh VM.
//!
//! * A **runtime base** is taken at the guest's `GetFunction` hostcall: kernel booted,
//!   module compiled and instantiated, runtime initialised.
//! * A **function template** is taken at the function's first `ReadStdin` hostcall, as a
//!   diff against its parent: only frames whose bytes differ from the parent's are stored
//!   (found by comparing against the parent's pages; frames the host never made resident
//!   are zero). Dirty logging would miss the VMM's own writes into guest memory and the
//!   comparison costs a few ms for the ~10k resident pages of a QuickJS guest.
//! * Restore fills guest RAM with one of several strategies, applies the vCPU state,
//!   writes the request where the guest's pending `ReadStdin` expects it, and resumes.

use crate::checks::{self, BaseRef, CheckError, Provenance};
pub use crate::fill::MemoryStrategy;
use crate::fill::{install, FaultServer};
use crate::memory::GuestMemory;
use crate::persist::{PersistError, VcpuState};
use crate::run::{self, boot_vm, ms, FunctionSpec, RunLimits, RunReport, Stats};
use crate::uffd::{Uffd, UffdError, Waker};
use crate::vm::{GuestError, Hostcall, Output, RunError, Vm, VmError};
use snapshot_store::{Frame, Resolved, Store, TemplateName, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use vmm_abi::{layout, GuestRange, Op};

const PAGE: u64 = PAGE_SIZE as u64;
/// Version 2 added `provenance` and `base`; version 1 states still decode (without them).
pub const DEVICE_STATE_VERSION: u32 = 2;
const MAX_DEVICE_STATE_BYTES: usize = 1 << 20;

/// What the guest was waiting for when the template was taken, and how it was set up.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct DeviceState {
    pub version: u32,
    /// `Op::GetFunction` (runtime base) or `Op::ReadStdin` (function template).
    pub pending_op: u64,
    pub buf_gpa: u64,
    pub buf_len: u64,
    pub runtime: String,
    pub module_name: String,
    /// The function's arguments (empty for a runtime base), for `template ls`.
    pub args: Vec<String>,
    /// What the runtime base under this template was made from (version 2 on).
    pub provenance: Option<Provenance>,
    /// Function templates: the runtime base they were made on (version 2 on).
    pub base: Option<BaseRef>,
}

/// The version 1 encoding: the fields up to `args` (also the start of every later one).
#[derive(bincode::Encode, bincode::Decode)]
struct DeviceStateV1 {
    version: u32,
    pending_op: u64,
    buf_gpa: u64,
    buf_len: u64,
    runtime: String,
    module_name: String,
    args: Vec<String>,
}

/// A device state that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{0}")]
    Damaged(String),
    #[error("version {0}, from a newer vmm")]
    Newer(u32),
}

impl DeviceState {
    /// The encoding of `self.version` (version 1 without the fields it did not have).
    pub fn encode(&self) -> Vec<u8> {
        let cfg = bincode::config::standard();
        if self.version == 1 {
            let v1 = DeviceStateV1 {
                version: 1,
                pending_op: self.pending_op,
                buf_gpa: self.buf_gpa,
                buf_len: self.buf_len,
                runtime: self.runtime.clone(),
                module_name: self.module_name.clone(),
                args: self.args.clone(),
            };
            return bincode::encode_to_vec(v1, cfg).unwrap_or_default();
        }
        bincode::encode_to_vec(self, cfg).unwrap_or_default()
    }

    /// Decode a version 1 or 2 state (bounded: at most 1 MiB is decoded).
    pub fn decode(b: &[u8]) -> Result<Self, DeviceStateError> {
        let cfg = bincode::config::standard().with_limit::<MAX_DEVICE_STATE_BYTES>();
        let damaged = |e: bincode::error::DecodeError| {
            DeviceStateError::Damaged(checks::decode_error_text(&e))
        };
        let trailing = |used: usize| {
            DeviceStateError::Damaged(format!("{} bytes follow its end", b.len() - used))
        };
        let (v1, used): (DeviceStateV1, usize) =
            bincode::decode_from_slice(b, cfg).map_err(damaged)?;
        match v1.version {
            1 if used == b.len() => Ok(DeviceState {
                version: 1,
                pending_op: v1.pending_op,
                buf_gpa: v1.buf_gpa,
                buf_len: v1.buf_len,
                runtime: v1.runtime,
                module_name: v1.module_name,
                args: v1.args,
                provenance: None,
                base: None,
            }),
            1 => Err(trailing(used)),
            DEVICE_STATE_VERSION => {
                let (d, used): (DeviceState, usize) =
                    bincode::decode_from_slice(b, cfg).map_err(damaged)?;
                if used != b.len() {
                    return Err(trailing(used));
                }
                Ok(d)
            }
            v if v > DEVICE_STATE_VERSION => Err(DeviceStateError::Newer(v)),
            v => Err(DeviceStateError::Damaged(format!("version {v}"))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("open the template store: {0}")]
    Open(#[from] snapshot_store::OpenError),
    #[error("load template: {0}")]
    Load(#[from] snapshot_store::LoadError),
    #[error("write template: {0}")]
    Write(#[from] snapshot_store::WriteError),
    #[error("template {0:?} does not exist (see `vmm template ls`)")]
    Missing(String),
    #[error("template {0:?} is a runtime base: it waits for a function, not a request; create a function template on it with `vmm template create NAME --base {0}`")]
    IsBase(String),
    #[error("template {0:?} waits for a request, so nothing can be layered on it; use its runtime base as --base")]
    NotABase(String),
    #[error(transparent)]
    Name(#[from] snapshot_store::NameError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("the template is damaged: {0}; run `vmm-store verify` and recreate it")]
    Damaged(String),
    /// A bug in this VMM, not a problem of the template or the request.
    #[error("internal error: {0} (a bug in vmm; please report it)")]
    Internal(&'static str),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("the function exited (code {code}) before reading its request, so there is no point to snapshot; a function template must read stdin. Its stderr: {stderr}")]
    NoStdinRead { code: i32, stderr: String },
    #[error("the guest asked for its function twice")]
    UnexpectedHostcall,
    #[error("memory image for --memory shared: {0}")]
    Cache(snapshot_store::CacheError),
}

impl From<VmError> for TemplateError {
    fn from(e: VmError) -> Self {
        TemplateError::Run(RunError::Vm(e))
    }
}
impl From<crate::memory::MemoryError> for TemplateError {
    fn from(e: crate::memory::MemoryError) -> Self {
        TemplateError::Run(e.into())
    }
}

/// Name of the runtime base for a module: it depends on the module, the runtime, the
/// engine (wasmtime or wasmi) and the guest kernel (a new kernel must not restore an old base), and on the
/// device state version, so that bases which do not record their provenance (version 1)
/// are never picked up again.
pub fn runtime_base_name(spec: &FunctionSpec, mem_mib: u64) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&spec.module);
    h.update(&checks::kernel_hash().to_le_bytes());
    h.update(&mem_mib.to_le_bytes());
    h.update(&vmm_abi::ABI_VERSION.to_le_bytes());
    h.update(spec.engine.name().as_bytes());
    h.update(&DEVICE_STATE_VERSION.to_le_bytes());
    let rt = checks::runtime_name(spec.runtime);
    format!("base-{rt}-{:016x}", h.digest())
}

/// Which frames of guest RAM are resident in the host (others were never touched: zero).
fn resident(mem: &GuestMemory) -> Vec<bool> {
    let n = (mem.size() / PAGE) as usize;
    let mut vec = vec![0u8; n];
    // SAFETY: the range is exactly the guest mapping (page aligned); `vec` has one byte
    // per page as mincore requires.
    let r = unsafe {
        libc::mincore(
            mem.host_addr().cast(),
            mem.size() as usize,
            vec.as_mut_ptr(),
        )
    };
    if r != 0 {
        return vec![true; n]; // unknown: compare every frame
    }
    vec.iter().map(|b| b & 1 == 1).collect()
}

fn is_zero(p: &[u8]) -> bool {
    p.iter().all(|&b| b == 0)
}

/// Store `vm`'s memory as a layer over `parent` (or a full snapshot without one).
fn write_layer(
    store: &mut Store,
    name: &str,
    parent: Option<&str>,
    vm: &Vm,
    state: &VcpuState,
    device: &DeviceState,
    replace: bool,
) -> Result<snapshot_store::CommitInfo, TemplateError> {
    let parent_tmpl = match parent {
        Some(p) => Some(store.load(p)?),
        None => None,
    };
    // Collect the changed frames first (borrowing the parent's pages), then write.
    let mut changed: Vec<(u64, bool)> = Vec::new(); // (frame, now zero)
    {
        let resolved = match &parent_tmpl {
            Some(t) => Some(t.resolve(store)?),
            None => None,
        };
        let res = resident(&vm.mem);
        for gfn in 0..vm.mem.size() / PAGE {
            let parent_page = resolved.as_ref().and_then(|r| match r.frame(gfn) {
                Some(Frame::Data(p)) => Some(p),
                _ => None,
            });
            if !res[gfn as usize] {
                if parent_page.is_some() {
                    changed.push((gfn, true));
                }
                continue;
            }
            let cur = vm.mem.slice(gfn * PAGE, PAGE)?;
            let zero = is_zero(cur);
            match parent_page {
                Some(p) if p.as_slice() == cur => {}
                Some(_) => changed.push((gfn, zero)),
                None if !zero => changed.push((gfn, false)),
                None => {}
            }
        }
    }
    let mut w = if replace {
        store.begin_template_replacing(name, parent, vm.mem.size())?
    } else {
        store.begin_template(name, parent, vm.mem.size())?
    };
    for (gfn, zero) in changed {
        if zero {
            w.set_zero(gfn)?;
        } else {
            let page: &[u8; PAGE_SIZE] = vm
                .mem
                .slice(gfn * PAGE, PAGE)?
                .try_into()
                .map_err(|_| TemplateError::Internal("a guest page is not 4096 bytes"))?;
            w.put_page(gfn, page)?;
        }
    }
    w.set_vcpu_state(state.encode());
    w.set_device_state(device.encode());
    Ok(w.commit()?)
}

/// The template's memory image for `--memory shared`, from the store's image cache
/// (`<store>/cache/`): checked against the template's page ids before it is mapped (every
/// data page re-hashed, every other page zero), rebuilt from verified pages when missing or
/// when it does not match. It is derived data: deleting `cache/` is always safe.
fn memory_image(
    store: &Store,
    tmpl: &snapshot_store::Template,
    resolved: &Resolved,
) -> Result<std::fs::File, TemplateError> {
    let image = store.memory_image(tmpl, resolved).map_err(|e| match e {
        snapshot_store::CacheError::Load(e) => TemplateError::Load(e),
        e => TemplateError::Cache(e),
    })?;
    if let Some(why) = &image.rejected {
        eprintln!(
            "vmm: warning: the cached memory image {} did not match template {} ({why}); rebuilt it from the store's verified pages",
            image.path.display(),
            tmpl.name
        );
    }
    Ok(image.file)
}

/// Counters of one restore.
#[derive(Debug, Default, serde::Serialize, Clone)]
pub struct RestoreStats {
    pub strategy: Option<MemoryStrategy>,
    pub load_ms: f64,
    pub install_ms: f64,
    pub vm_restore_ms: f64,
    /// VM creation, memory install and vCPU restore (the last two overlap).
    pub setup_ms: f64,
    pub run_ms: f64,
    pub pages_installed: u64,
    pub uffd_faults: u64,
    pub bytes_from_store: u64,
}

/// A restored VM, stopped at its pending hostcall.
pub struct Restored {
    pub vm: Vm,
    pub device: DeviceState,
    /// When the restored template was created.
    pub created_unix_ms: u64,
}

/// Restore `name` and run `body` on the restored VM while faults are being served.
fn with_restored<T>(
    store: &Store,
    name: &str,
    strategy: MemoryStrategy,
    stats: &mut RestoreStats,
    touched: Option<&mut Vec<u64>>,
    body: impl FnOnce(&mut Restored) -> T,
) -> Result<T, TemplateError> {
    with_restored_keep(store, name, strategy, stats, touched, None, body)
}

/// [`with_restored`] that can hand the finished VM to the caller (`keep`), so that tearing
/// it down (unmapping guest RAM, destroying the KVM VM: ~1 ms) happens after the response.
fn with_restored_keep<T>(
    store: &Store,
    name: &str,
    strategy: MemoryStrategy,
    stats: &mut RestoreStats,
    touched: Option<&mut Vec<u64>>,
    keep: Option<&mut Option<Vm>>,
    body: impl FnOnce(&mut Restored) -> T,
) -> Result<T, TemplateError> {
    let t0 = Instant::now();
    let tmpl = store.load(name).map_err(|e| match e {
        snapshot_store::LoadError::NotFound { .. } => TemplateError::Missing(name.into()),
        e => e.into(),
    })?;
    // Everything restore would trip over is refused before a VM exists.
    let (state, device) = checks::check_states(&tmpl)?;
    // The parent as it is now (if it does not load, resolving says why).
    let parent = tmpl
        .parent
        .as_ref()
        .and_then(|p| store.load(p.as_str()).ok());
    let resolved = tmpl.resolve(store)?;
    if let Some(why) = resolved.location_fallback() {
        // Same pages, found the slower way (old store, or records outdated by gc).
        tracing::debug!(
            template = name,
            "located the pages by the pack indexes: {why}"
        );
    }
    let parent = parent
        .map(|pt| checks::decode_device(&pt).map(|pd| (pt, pd)))
        .transpose()?;
    checks::check_layering(&tmpl, &device, parent.as_ref().map(|(t, d)| (t, d)))?;
    stats.load_ms = ms(t0.elapsed());
    stats.strategy = Some(strategy);

    // Create the VM, then fill its memory on a second thread while this one writes the
    // vCPU state: the two do not touch each other (the vCPU does not run until both end).
    let t1 = Instant::now();
    let mem = match strategy {
        MemoryStrategy::Shared => {
            let image = memory_image(store, &tmpl, &resolved)?;
            GuestMemory::from_file_private(&image, tmpl.mem_size as usize)?
        }
        _ => GuestMemory::new(tmpl.mem_size as usize)?,
    };
    let working_set = &tmpl.working_set;
    let resolved_ref = &resolved;
    let mem_ref = &mem;
    let (installed, parts) = std::thread::scope(|scope| {
        let installer = scope.spawn(move || {
            let t = Instant::now();
            let pages = install(mem_ref, resolved_ref, strategy, working_set)?;
            // Register for faults only after the copies: our own writes into a registered,
            // missing page would otherwise wait for a fault handler.
            let uffd = match strategy {
                MemoryStrategy::Eager | MemoryStrategy::Shared => None,
                _ => {
                    let u = Uffd::new()?;
                    u.register(mem_ref.host_addr(), mem_ref.size() as usize)?;
                    Some(u)
                }
            };
            Ok::<_, TemplateError>((pages, uffd, ms(t.elapsed())))
        });
        let t2 = Instant::now();
        let parts = crate::vm::VmParts::create()
            .map_err(TemplateError::from)
            .and_then(|p| {
                p.prepare_restore().map_err(TemplateError::from)?;
                state.apply(&p.vm, &p.vcpu, p.cpu)?;
                Ok((p, ms(t2.elapsed())))
            });
        let installed = installer.join().unwrap_or(Err(TemplateError::Internal(
            "the memory installer panicked",
        )));
        (installed, parts)
    });
    let (parts, vcpu_ms) = parts?;
    let vm = parts.with_memory(mem);
    let (pages, uffd, install_ms) = installed?;
    stats.vm_restore_ms = vcpu_ms;
    vm.register_memory()?;
    state.apply_backend_msrs(&vm.vcpu, vm.backend)?;
    stats.install_ms = install_ms;
    stats.pages_installed = pages;
    stats.bytes_from_store = pages * PAGE;
    stats.setup_ms = ms(t1.elapsed());
    let base = vm.mem.host_addr();

    let server = match &uffd {
        Some(u) => Some(FaultServer {
            uffd: u,
            base,
            resolved: &resolved,
            wake: Waker::new()?,
            group: match strategy {
                MemoryStrategy::Prefetch => crate::fill::FAULT_GROUP,
                _ => 1,
            },
            faults: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            touched: Mutex::new(Vec::new()),
            corrupt: Mutex::new(None),
        }),
        None => None,
    };
    std::thread::scope(|scope| {
        let handle = server.as_ref().map(|s| scope.spawn(move || s.serve()));
        let mut restored = Restored {
            vm,
            device,
            created_unix_ms: tmpl.created_unix_ms,
        };
        let t3 = Instant::now();
        let result = body(&mut restored);
        stats.run_ms = ms(t3.elapsed());
        if let Some(s) = &server {
            s.wake.wake();
        }
        let served = handle.map(|h| h.join());
        if let Some(s) = &server {
            stats.uffd_faults = s.faults.load(Ordering::Relaxed);
            stats.bytes_from_store += s.bytes.load(Ordering::Relaxed);
            if let (Some(t), Ok(rec)) = (touched, s.touched.lock()) {
                t.clone_from(&rec);
            }
        }
        if let Some(Some(e)) = server
            .as_ref()
            .and_then(|s| s.corrupt.lock().ok().map(|mut c| c.take()))
        {
            return Err(TemplateError::Load(e));
        }
        if let Some(k) = keep {
            *k = Some(restored.vm);
        }
        match served {
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(TemplateError::Internal("the page fault server panicked")),
            _ => Ok(result),
        }
    })
}

/// Restore a function template and serve one request.
pub fn restore_and_run(
    store: &Store,
    name: &str,
    strategy: MemoryStrategy,
    stdin: &[u8],
    limits: &RunLimits,
) -> Result<(RunReport, RestoreStats, crate::vm::Finished), TemplateError> {
    let t0 = Instant::now();
    let mut rs = RestoreStats::default();
    let mut vm = None;
    let report = with_restored_keep(store, name, strategy, &mut rs, None, Some(&mut vm), |r| {
        run_restored(r, name, stdin, limits)
    })??;
    let mut report = report;
    report.stats.total_ms = ms(t0.elapsed());
    report.stats.vm_create_ms = rs.load_ms + rs.setup_ms;
    report.stats.restore = Some(rs.clone());
    Ok((report, rs, crate::vm::Finished(vm)))
}

fn run_restored(
    r: &mut Restored,
    name: &str,
    stdin: &[u8],
    limits: &RunLimits,
) -> Result<RunReport, TemplateError> {
    if r.device.pending_op != Op::ReadStdin as u64 {
        return Err(TemplateError::IsBase(name.into()));
    }
    let vm = &mut r.vm;
    let buf = pending_buffer(name, &r.device, vm.mem.size())?;
    let mut out = Output::new(limits.max_output);
    let exits_before = vm.exits;
    // The function's time is its work after the request arrives: the start the guest
    // recorded belongs to the template's creation (another time, maybe another machine).
    let resumed_at = vm.backend.guest_tsc(&vm.vcpu);
    if let Some(tsc) = resumed_at {
        vm.mem.write_u64(
            layout::MAILBOX_GPA + vmm_abi::offsets::FUNCTION_START as u64,
            tsc,
        )?;
    }
    let result = run::serve_from(
        vm,
        Some(Hostcall::ReadStdin { buf }),
        &[],
        stdin,
        &mut out,
        limits,
    );
    let mut stats = Stats {
        mode: "restore",
        backend: format!("{:?}", vm.backend).to_lowercase(),
        ..Default::default()
    };
    stats.exits = vm.exits - exits_before;
    if let Ok(mb) = vm.read_mailbox() {
        if resumed_at.is_some() {
            stats.function_ms =
                run::tsc_ms(mb.stats.function_start, mb.stats.function_end, vm.tsc_khz);
        }
        stats.hostcalls = mb.stats.hostcalls;
        stats.cpu = Some(run::CpuReport::new(vm.cpu, &mb, &[]));
    }
    Ok(RunReport {
        result,
        stdout: out.stdout,
        stderr: out.stderr,
        truncated: out.truncated,
        stats,
    })
}

/// The buffer of the hostcall a restored template waits in (already range-checked by
/// `checks::check_states`; checked again here because guest memory is indexed with it).
fn pending_buffer(name: &str, d: &DeviceState, mem_size: u64) -> Result<GuestRange, TemplateError> {
    GuestRange::checked("pending buffer", d.buf_gpa, d.buf_len, mem_size, mem_size).map_err(|e| {
        match TemplateName::new(name) {
            Ok(template) => CheckError::Device {
                template,
                reason: e.to_string(),
            }
            .into(),
            Err(e) => e.into(),
        }
    })
}

/// Snapshot the vCPU of `vm`, stopped at hostcall `pending` whose buffer is `buf`; the
/// template records `provenance` and, for a function template, the `base` it is made on.
fn capture(
    vm: &mut Vm,
    pending: Op,
    buf: GuestRange,
    spec: &FunctionSpec,
    args: Vec<String>,
    provenance: &Provenance,
    base: Option<BaseRef>,
) -> Result<(VcpuState, DeviceState), TemplateError> {
    vm.settle()?;
    let state = VcpuState::capture(&vm.kvm, &vm.vm, &vm.vcpu, vm.cpu, vm.tsc_khz)?;
    let device = DeviceState {
        version: DEVICE_STATE_VERSION,
        pending_op: pending as u64,
        buf_gpa: buf.gpa,
        buf_len: buf.len,
        runtime: checks::runtime_name(spec.runtime).into(),
        module_name: spec.module_name.clone(),
        args,
        provenance: Some(provenance.clone()),
        base,
    };
    Ok((state, device))
}

fn unexpected(what: &str) -> TemplateError {
    TemplateError::Run(RunError::Guest(GuestError::UnexpectedExit(format!(
        "the guest {what}"
    ))))
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
    pub artifact_cache: run::ArtifactCache,
    pub create_ms: f64,
}

/// Create (or reuse) the runtime base and layer a function template on it. An existing
/// base is used only if it was made from what `spec` and `limits` ask for (module,
/// runtime, engine, memory size, guest kernel and ABI); otherwise the error names each
/// option that differs.
pub fn create_template(
    store: &mut Store,
    name: &str,
    spec: &FunctionSpec,
    base: Option<&str>,
    trial_input: &[u8],
    limits: &RunLimits,
) -> Result<CreateReport, TemplateError> {
    let t0 = Instant::now();
    let tname = TemplateName::new(name)?;
    let base_tname = match base {
        Some(b) => TemplateName::new(b)?,
        None => TemplateName::new(&runtime_base_name(spec, limits.mem_mib))?,
    };
    let base_name = base_tname.as_str().to_string();
    let ours = Provenance::of(spec, limits.mem_mib);
    // The base as it is now, checked against what this layer asks for before anything runs.
    let base_exists = match store.load(&base_name) {
        Ok(t) => {
            let device = checks::decode_device(&t)?;
            if device.pending_op != Op::GetFunction as u64 {
                return Err(TemplateError::NotABase(base_name));
            }
            checks::check_base_for_layer(&tname, &ours, &t, &device)?;
            true
        }
        Err(snapshot_store::LoadError::NotFound { .. }) => false,
        Err(e) => return Err(e.into()),
    };
    let mut base_created = false;
    let mut base_new_pages = 0;
    let mut aot_compile_ms = 0.0;
    let mut artifact_cache = run::ArtifactCache::Off;
    let config = spec.config_blob();
    let mut out = Output::new(limits.max_output);

    // The function layer, from a live VM stopped at GetFunction: give it the function
    // and run it to its first read of stdin.
    let mut layer = |vm: &mut Vm,
                     buf: GuestRange,
                     store: &mut Store,
                     made_on: BaseRef|
     -> Result<snapshot_store::CommitInfo, TemplateError> {
        let mut given = false;
        let stop = run::drive(
            vm,
            Some(Hostcall::GetFunction { buf }),
            &mut out,
            limits,
            |vm, call| match *call {
                Hostcall::GetFunction { buf } if !given => {
                    given = true;
                    if config.len() as u64 <= buf.len {
                        vm.mem.write(buf.gpa, &config)?;
                    }
                    vm.complete(config.len() as u64, 0, true)?;
                    Ok(run::Next::Continue)
                }
                _ => Ok(run::Next::Stop),
            },
        )?;
        let stdin_buf = match stop {
            Hostcall::ReadStdin { buf } => buf,
            Hostcall::Exit { code } => {
                return Err(TemplateError::NoStdinRead {
                    code,
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                })
            }
            Hostcall::GetFunction { .. } => return Err(TemplateError::UnexpectedHostcall),
        };
        let (state, device) = capture(
            vm,
            Op::ReadStdin,
            stdin_buf,
            spec,
            spec.args.clone(),
            &ours,
            Some(made_on),
        )?;
        write_layer(store, name, Some(&base_name), vm, &state, &device, false)
    };

    let commit = if base_exists {
        // Restore the base eagerly (no fault server: the VM outlives the restore) and
        // keep the VM for the function layer, written through `store` once the restore,
        // which reads the store, has returned.
        let mut rs = RestoreStats::default();
        let mut vm = None;
        let (buf, made_on) = with_restored_keep(
            store,
            &base_name,
            MemoryStrategy::Eager,
            &mut rs,
            None,
            Some(&mut vm),
            |r| {
                // What was restored may have replaced the base checked above.
                if r.device.pending_op != Op::GetFunction as u64 {
                    return Err(TemplateError::NotABase(base_name.clone()));
                }
                checks::check_provenance(&tname, &base_tname, &ours, r.device.provenance.as_ref())?;
                let made_on = BaseRef {
                    name: base_name.clone(),
                    created_unix_ms: r.created_unix_ms,
                };
                let buf = pending_buffer(&base_name, &r.device, r.vm.mem.size())?;
                Ok((buf, made_on))
            },
        )??;
        let mut vm = vm.ok_or(TemplateError::Internal("the restored base VM was not kept"))?;
        layer(&mut vm, buf, store, made_on)?
    } else {
        let base_limits = RunLimits {
            eager_compile: true,
            ..limits.clone()
        };
        let mut reuse = true;
        let (mut vm, stop) = loop {
            let module = run::guest_module_with(spec, &base_limits, Some(&*store), reuse)?;
            aot_compile_ms = module.aot_ms;
            artifact_cache = module.cache;
            let mut vm = boot_vm(&module.bytes, spec.runtime, spec.engine, &base_limits)?;
            drop(module);
            let mut boot_out = Output::new(limits.max_output);
            let stop = run::drive(&mut vm, None, &mut boot_out, limits, |_, _| {
                Ok(run::Next::Stop)
            });
            let wrote = !boot_out.stdout.is_empty() || !boot_out.stderr.is_empty();
            if reuse && run::cached_artifact_refused(&stop, artifact_cache, wrote) {
                reuse = false;
                continue;
            }
            break (vm, stop?);
        };
        let buf = match stop {
            Hostcall::GetFunction { buf } => buf,
            Hostcall::ReadStdin { .. } => {
                return Err(unexpected(
                    "read its request before asking for its function",
                ))
            }
            Hostcall::Exit { code } => {
                return Err(unexpected(&format!(
                    "exited (code {code}) before asking for its function"
                )))
            }
        };
        let (state, device) = capture(&mut vm, Op::GetFunction, buf, spec, vec![], &ours, None)?;
        match write_layer(store, &base_name, None, &vm, &state, &device, false) {
            Ok(info) => {
                base_created = true;
                base_new_pages = info.new_pages;
            }
            // A concurrent `template create` wrote the same base first: layer on theirs (the
            // function layer is a diff against whatever the parent holds) if it was made
            // from the same things.
            Err(TemplateError::Write(snapshot_store::WriteError::AlreadyExists { .. })) => {
                let theirs = store.load(&base_name)?;
                let device = checks::decode_device(&theirs)?;
                checks::check_base_for_layer(&tname, &ours, &theirs, &device)?;
            }
            Err(e) => return Err(e),
        }
        let made_on = BaseRef {
            name: base_name.clone(),
            created_unix_ms: store.load(&base_name)?.created_unix_ms,
        };
        layer(&mut vm, buf, store, made_on)?
    };

    // Record the working set: a trial invocation with every page arriving on demand.
    let mut touched = Vec::new();
    let mut rs = RestoreStats::default();
    let _ = with_restored(
        store,
        name,
        MemoryStrategy::Lazy,
        &mut rs,
        Some(&mut touched),
        |r| run_restored(r, name, trial_input, limits),
    )?;
    let ws = touched.len();
    store.set_working_set(name, touched)?;
    Ok(CreateReport {
        name: name.into(),
        base: base_name,
        base_created,
        base_new_pages,
        new_pages: commit.new_pages,
        reused_pages: commit.reused_pages,
        working_set_pages: ws,
        aot_compile_ms,
        artifact_cache,
        create_ms: ms(t0.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(base: Option<BaseRef>) -> DeviceState {
        DeviceState::decode(&checks::fixtures::states(64 << 20, base).1).unwrap()
    }

    fn damaged(b: &[u8]) -> String {
        match DeviceState::decode(b) {
            Err(DeviceStateError::Damaged(why)) => why,
            other => panic!("expected a damaged state, got {other:?}"),
        }
    }

    #[test]
    fn version_2_reads_back() {
        let mut d = state(Some(BaseRef {
            name: "rt".into(),
            created_unix_ms: 7,
        }));
        d.args = vec!["a".into(), "b c".into()];
        let back = DeviceState::decode(&d.encode()).unwrap();
        assert_eq!(back.version, DEVICE_STATE_VERSION);
        assert_eq!(back.pending_op, Op::ReadStdin as u64);
        assert_eq!((back.buf_gpa, back.buf_len), (d.buf_gpa, d.buf_len));
        assert_eq!((back.runtime, back.module_name), (d.runtime, d.module_name));
        assert_eq!(back.args, d.args);
        assert_eq!(back.provenance, d.provenance);
        assert_eq!(back.base, d.base);
    }

    #[test]
    fn version_1_reads_back_without_provenance_or_base() {
        let mut d = state(None);
        d.version = 1;
        let b = d.encode();
        // Shorter than version 2's encoding of the same state.
        d.version = DEVICE_STATE_VERSION;
        assert!(b.len() < d.encode().len());
        let back = DeviceState::decode(&b).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.module_name, d.module_name);
        assert_eq!((back.buf_gpa, back.buf_len), (d.buf_gpa, d.buf_len));
        assert!(back.provenance.is_none() && back.base.is_none());
    }

    #[test]
    fn other_versions_and_damaged_encodings_are_refused() {
        let mut d = state(None);
        d.version = DEVICE_STATE_VERSION + 1;
        assert!(matches!(
            DeviceState::decode(&d.encode()),
            Err(DeviceStateError::Newer(v)) if v == DEVICE_STATE_VERSION + 1
        ));
        d.version = 0;
        assert_eq!(damaged(&d.encode()), "version 0");
        // Bytes after the end, in either version.
        for version in [1, DEVICE_STATE_VERSION] {
            d.version = version;
            let mut b = d.encode();
            b.extend_from_slice(&[0, 0, 0]);
            assert_eq!(damaged(&b), "3 bytes follow its end");
        }
        // Cut short.
        d.version = DEVICE_STATE_VERSION;
        let b = d.encode();
        assert!(damaged(&b[..b.len() - 1]).contains("too early"));
        assert!(damaged(&[]).contains("too early"));
        // A length past the 1 MiB limit is not allocated.
        d.args = vec!["x".repeat(MAX_DEVICE_STATE_BYTES + 1)];
        assert!(damaged(&d.encode()).contains("size limit"));
    }
}
