//! Instances: a VM with one vCPU and its guest RAM, either booted cold from a function
//! ([`Engine::boot`](crate::engine::Engine::boot)) or restored from a [`Template`]
//! ([`Template::instantiate`]) with its memory filled the way a [`Backing`] says.
//!
//! * [`Instance::invoke`] serves one request: the request is written where the guest's
//!   pending read of stdin expects it (a cold instance first gets its function), the guest
//!   runs to its exit, and the [`Response`] carries its output and one [`Stats`].
//! * [`Instance::reset`] then puts a restored instance back into the template's exact
//!   state in place: every 2 MiB region that holds template data is copied again from the
//!   template's verified image, every other region the guest touched is zeroed (the pages
//!   stay resident, so no zero fill and no new host page faults), and the whole vCPU state
//!   is written again. Nothing a request left behind survives a reset. An instance whose
//!   invocation failed (timeout, guest fault) is not reset: the caller drops it.
//! * A request that changed the guest's page tables (under wasmtime, a linear memory that
//!   grew maps new pages): under shadow paging (PVM) KVM does not see the host's copy of
//!   the template's page-table pages, so pages the request mapped would stay reachable.
//!   [`Instance::reset`] compares the template's page-table pages and, if one differs,
//!   resets in place and then makes KVM forget every mapping it built
//!   ([`Vm::forget_mappings`]). An instance whose pages arrive on demand is replaced by a
//!   fresh restore instead.
//! * [`Instance::learn`] reports what requests touched beyond the template's working set
//!   (see [`Template::learn`]).
//! * Template creation drives an instance hostcall by hostcall ([`Instance::resume_to_call`])
//!   and snapshots it where it waits ([`Instance::capture`]).

pub mod backing;

pub use backing::Backing;

use crate::error::{Error, ErrorKind};
use crate::guest::{self, FunctionSpec, RunLimits};
use crate::memory::{GuestMemory, PageState};
use crate::persist::VcpuState;
use crate::stats::{ms, tsc_ms, CpuReport, RestoreStats, Stats};
use crate::template::{Template, PAGE, REGION};
use crate::vm::{GuestError, Hostcall, Output, Vm};
use backing::Faults;
use snapshot_store::PAGE_SIZE;
use std::sync::Arc;
use std::time::Instant;
use vmm_abi::layout;

/// What one invocation produced. Output written before a failure is kept.
#[derive(Debug)]
pub struct Response {
    /// The function's exit code, or why the guest produced no response.
    pub result: Result<i32, Error>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Whether the guest's output went past the output cap and was cut.
    pub truncated: crate::vm::Truncated,
    pub stats: Stats,
}

impl Response {
    /// A response without output: the invocation failed before the guest ran.
    pub fn failed(e: Error, stats: Stats) -> Response {
        Response {
            result: Err(e),
            stdout: vec![],
            stderr: vec![],
            truncated: Default::default(),
            stats,
        }
    }
}

/// Timing of one reset.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResetStats {
    pub reset_ms: f64,
    /// The VM was replaced by a fresh restore instead of being reset in place (the
    /// instance's pages arrive on demand).
    pub restored: bool,
    /// The request changed the guest's page tables: reset in place, and KVM made to
    /// forget its mappings of guest memory.
    pub mappings_dropped: bool,
    /// Of which rewriting the vCPU state.
    pub vcpu_ms: f64,
    pub regions_copied: u64,
    pub regions_zeroed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Waits for a request (a restored instance: in the template's exact state).
    Ready,
    /// Served a request: must be reset before the next one.
    Used,
    /// Failed in a way that leaves it unusable; drop it.
    Broken,
}

/// A VM booted cold or restored from a [`Template`].
pub struct Instance {
    /// The page fault server, if pages arrive on demand: declared first, so it is stopped
    /// before guest RAM (in `vm`) is unmapped.
    faults: Option<Faults>,
    template: Option<Arc<Template>>,
    backing: Backing,
    /// /proc/self/pagemap (one descriptor for the whole process), to find the pages a
    /// shared instance's guest wrote.
    pagemap: Option<&'static std::fs::File>,
    /// Reused by every reset: one flag per page, and mincore's buffer.
    resident: Vec<bool>,
    /// Frames a shared instance's requests touched, found by its last reset (for the
    /// learned working set).
    touched: Vec<u64>,
    scratch: Vec<u8>,
    vm: Vm,
    /// The hostcall the guest waits in (None: a cold instance that has not run yet).
    pending: Option<Hostcall>,
    /// The function a cold instance's guest gets when it asks for it.
    function: Option<Vec<u8>>,
    /// How the instance came to be (cold boot phases, restore counters): the start of
    /// every response's stats.
    origin: Stats,
    /// The CPU features its module was compiled for (a cold wasmtime instance).
    compiled_for: Vec<&'static str>,
    status: Status,
    invocations: u64,
    /// Restored from a runtime base and given its function: waits for a request although
    /// its template waits for a function (see [`Instance::take_first_request`]).
    layered: bool,
}

impl Template {
    /// Restore a new instance of this template with its own copy of the template's memory
    /// ([`Backing::Eager`]), stopped in the hostcall the template was taken in.
    pub fn instantiate(self: &Arc<Self>) -> Result<Instance, Error> {
        Instance::restore(self.clone(), Backing::Eager)
    }

    /// [`Template::instantiate`] with its memory filled as `backing` says.
    pub fn instantiate_with(self: &Arc<Self>, backing: Backing) -> Result<Instance, Error> {
        Instance::restore(self.clone(), backing)
    }
}

impl Instance {
    /// Restore `template`: fill guest RAM (and start the fault server if pages arrive on
    /// demand) and create the VM and write the vCPU state: on two threads at once (they do
    /// not touch each other; the vCPU does not run until both end), or one after the other
    /// on this thread ([`Config::parallel_restore`](crate::config::Config)).
    pub(crate) fn restore(template: Arc<Template>, backing: Backing) -> Result<Instance, Error> {
        let step = "restore instance";
        let host =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::new(ErrorKind::Host, step, e);
        let t1 = Instant::now();
        let mem = GuestMemory::new(template.mem_size() as usize).map_err(|e| host(e.into()))?;
        let fill = || {
            let t = Instant::now();
            let pages = backing::install(&mem, &template, backing)?;
            // Registered for faults only after the copies: our own writes into a
            // registered, missing page would otherwise wait for a fault handler.
            let faults = match backing.on_demand() {
                true => Some(Faults::start(&mem, template.clone(), backing)?),
                false => None,
            };
            Ok((pages, faults, ms(t.elapsed())))
        };
        let make_vm = || {
            let t = Instant::now();
            crate::vm::VmParts::create()
                .and_then(|p| p.prepare_restore().map(|()| p))
                .map_err(|e| host(e.into()))
                .and_then(|p| {
                    template
                        .state()
                        .apply(&p.vm, &p.vcpu, p.cpu)
                        .map_err(|e| Error::new(state_error_kind(&e), step, e))?;
                    Ok((p, ms(t.elapsed())))
                })
        };
        let (installed, parts) = if template.parallel_restore() {
            std::thread::scope(|scope| {
                let installer = scope.spawn(fill);
                let parts = make_vm();
                let installed = installer.join().unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Host,
                        step,
                        "the memory installer panicked",
                    ))
                });
                (installed, parts)
            })
        } else {
            // Memory first: KVM's MMU notifiers make filling slower once a VM exists.
            let installed = fill();
            (installed, make_vm())
        };
        let (parts, vcpu_ms) = parts?;
        let (pages, faults, install_ms) = installed?;
        // Moving the mapping's owner into the VM does not move the mapping the fault
        // server serves.
        let mut vm = parts.with_memory(mem);
        // Slots for what the template's guest was granted, no more: the guest asks for
        // the rest as it grows.
        match template.grant_map() {
            Some(map) => vm
                .grant_initial_map(map)
                .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?,
            None => vm.grant_initial(0, template.mem_size()),
        }
        let t_slots = Instant::now();
        vm.register_memory().map_err(|e| host(e.into()))?;
        let slots_ms = ms(t_slots.elapsed());
        template
            .state()
            .apply_backend_msrs(&vm.vcpu, vm.backend)
            .map_err(|e| Error::new(state_error_kind(&e), step, e))?;
        let pagemap = match backing {
            Backing::Shared => Some(crate::memory::pagemap().map_err(|e| host(e.into()))?),
            _ => None,
        };
        let origin = Stats {
            mode: "restore",
            backend: vm.backend.name(),
            restore: Some(RestoreStats {
                strategy: Some(backing.name()),
                install_ms,
                vm_restore_ms: vcpu_ms,
                slots_ms,
                setup_ms: ms(t1.elapsed()),
                pages_installed: pages,
                bytes_from_store: if template.built_image().is_some() {
                    0
                } else {
                    pages * PAGE
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(Instance {
            faults,
            pending: Some(template.pending()),
            template: Some(template),
            backing,
            pagemap,
            resident: Vec::new(),
            touched: Vec::new(),
            scratch: Vec::new(),
            vm,
            function: None,
            origin,
            compiled_for: vec![],
            status: Status::Ready,
            invocations: 0,
            layered: false,
        })
    }

    /// Boot `spec` cold: its module compiled (or taken from `cache`, the store's
    /// compiled-module cache; with `reuse` false a cached artifact is compiled again and
    /// replaced), the guest kernel loaded, nothing run yet. `stats` gets the host's part.
    pub(crate) fn boot(
        spec: &FunctionSpec,
        limits: &RunLimits,
        cache: Option<&snapshot_store::Store>,
        reuse: bool,
        stats: &mut Stats,
    ) -> Result<Instance, Error> {
        let t0 = Instant::now();
        stats.mode = "cold";
        stats.engine = spec.engine.name();
        let module = guest::guest_module_with(spec, limits, cache, reuse)
            .map_err(|e| Error::from_run("prepare the module", e))?;
        stats.aot_compile_ms = module.aot_ms;
        stats.artifact_cache = module.cache;
        let vm = guest::boot_vm(&module.bytes, spec.runtime, spec.engine, limits)
            .map_err(|e| Error::from_run("boot the guest", e))?;
        stats.backend = vm.backend.name();
        stats.vm_create_ms = ms(t0.elapsed()) - stats.aot_compile_ms;
        Ok(Instance {
            faults: None,
            template: None,
            backing: Backing::Eager,
            pagemap: None,
            resident: Vec::new(),
            touched: Vec::new(),
            scratch: Vec::new(),
            vm,
            pending: None,
            function: Some(spec.config_blob()),
            origin: stats.clone(),
            compiled_for: module.features,
            status: Status::Ready,
            invocations: 0,
            layered: false,
        })
    }

    /// The template this instance was restored from (None: booted cold).
    pub fn template(&self) -> Option<&Arc<Template>> {
        self.template.as_ref()
    }

    /// How the instance's memory is filled.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Bytes of guest RAM covered by the instance's KVM memory slots (what KVM sizes its
    /// per-slot metadata by) and the number of slots.
    pub fn slot_bytes(&self) -> (u64, usize) {
        (self.vm.grants().bytes(), self.vm.grants().slots())
    }

    /// Whether the instance can serve a request now.
    pub fn is_ready(&self) -> bool {
        self.status == Status::Ready
    }

    /// Whether the instance failed and must be dropped.
    pub fn is_broken(&self) -> bool {
        self.status == Status::Broken
    }

    /// Requests served by this instance so far.
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    /// The guest's CPU: the model the VMM set, what the guest saw, what its module was
    /// compiled for (None if the guest's mailbox cannot be read).
    pub fn cpu_report(&self) -> Option<CpuReport> {
        let mb = self.vm.read_mailbox().ok()?;
        Some(CpuReport::new(self.vm.cpu, &mb, &self.compiled_for))
    }

    /// The frames the guest touched since the last call, in first-touch order (recorded
    /// only by [`Backing::Lazy`], which installs one page per fault).
    pub fn take_touched(&mut self) -> Vec<u64> {
        self.faults
            .as_ref()
            .map(Faults::take_touched)
            .unwrap_or_default()
    }

    /// Report the frames this instance's requests touched beyond its template's working set
    /// (seen by the fault server of an instance whose pages arrive on demand, or by the
    /// last reset of a shared instance, in the pages it maps from the template) to the
    /// template's learned working set in the store ([`Template::learn`]), so that later
    /// restores prefetch them. Call after the response is out: it may write the store.
    /// Returns the frames of the learned set (None: nothing written).
    pub fn learn(&mut self) -> Result<Option<usize>, Error> {
        let Some(t) = self.template.clone() else {
            return Ok(None);
        };
        if t.device().pending_op != vmm_abi::Op::ReadStdin as u64 {
            return Ok(None);
        }
        let mut touched = self.take_touched();
        touched.append(&mut self.touched);
        t.learn(&touched)
    }

    /// Serve one request: write `stdin` where the guest's pending read expects it (a cold
    /// instance first gets its function), resume, and run to the function's exit (or
    /// failure). The instance must be ready; afterwards it must be
    /// [reset](Instance::reset) (or dropped, if the invocation failed).
    pub fn invoke(&mut self, stdin: &[u8], limits: &RunLimits) -> Response {
        let mut stats = self.origin.clone();
        if self.status != Status::Ready {
            let e = Error::new(
                ErrorKind::Host,
                "invoke",
                "the instance was not reset after its last request",
            );
            return Response::failed(e, stats);
        }
        if self.template.as_ref().is_some_and(|t| {
            !self.layered && t.device().pending_op != vmm_abi::Op::ReadStdin as u64
        }) {
            let e = Error::new(
                ErrorKind::BadRequest,
                "invoke",
                "a runtime base waits for a function, not a request",
            );
            return Response::failed(e, stats);
        }
        self.status = Status::Used;
        self.invocations += 1;
        let t0 = Instant::now();
        let exits_before = self.vm.exits;
        // A restored function's time is its work after the request arrives: the start the
        // guest recorded belongs to the template's creation (another time, maybe another
        // machine). Read for an instance's first request only (a one-shot restore): the
        // KVM_GET_MSRS costs ~0.01 ms, which a pooled request, ~0.1 ms in all, should not pay
        // for a figure its server does not report.
        let resumed_at = match self.template {
            Some(_) if self.invocations == 1 => self.vm.backend.guest_tsc(&self.vm.vcpu),
            _ => None,
        };
        if let Some(tsc) = resumed_at {
            let at = layout::MAILBOX_GPA + vmm_abi::offsets::FUNCTION_START as u64;
            if let Err(e) = self.vm.mem().write_u64(at, tsc) {
                self.status = Status::Broken;
                return Response::failed(Error::new(ErrorKind::Host, "invoke", e), stats);
            }
        }
        let mut out = Output::new(limits.max_output);
        let function = self.function.take();
        let ran = guest::resume(
            &mut self.vm,
            &mut self.pending,
            function.as_deref(),
            Some(stdin),
            &mut out,
            limits,
        );
        let ran = match ran {
            Ok(Hostcall::Exit { code }) => Ok(code),
            Ok(other) => Err(GuestError::UnexpectedExit(format!("stopped at {other:?}")).into()),
            Err(e) => Err(e),
        };
        let ran = guest::name_the_model(ran, self.vm.cpu, &self.compiled_for);
        let mut result = ran.map_err(|e| Error::from_run("run the function", e));
        stats.run_ms = ms(t0.elapsed());
        stats.exits = self.vm.exits - exits_before;
        stats.memory_slots = self.vm.grants().slots() as u64;
        stats.slot_bytes = self.vm.grants().bytes();
        if let Ok(mb) = self.vm.read_mailbox() {
            match (&self.template, resumed_at) {
                (None, _) => {
                    crate::stats::apply_guest_stats(&mut stats, &mb.stats, self.vm.tsc_khz)
                }
                (Some(_), resumed) => {
                    if resumed.is_some() {
                        stats.function_ms = tsc_ms(
                            mb.stats.function_start,
                            mb.stats.function_end,
                            self.vm.tsc_khz,
                        );
                    }
                    stats.hostcalls = mb.stats.hostcalls;
                }
            }
        }
        if let Some(f) = &mut self.faults {
            let counts = f.counts();
            if let Some(r) = &mut stats.restore {
                r.uffd_faults = counts.faults;
                r.bytes_from_store += counts.bytes;
            }
            let failed = f
                .take_corrupt()
                .map(|e| Error::new(ErrorKind::Damaged, "serve guest memory on demand", e))
                .or_else(|| f.failed());
            if let Some(e) = failed {
                result = Err(e);
            }
        }
        if let Some(r) = &mut stats.restore {
            r.run_ms = stats.run_ms;
        }
        if result.is_err() {
            self.status = Status::Broken;
        }
        Response {
            result,
            stdout: out.stdout,
            stderr: out.stderr,
            truncated: out.truncated,
            stats,
        }
    }

    /// Run from the hostcall the guest waits in, giving it `function` if it asks for one,
    /// until it waits in a hostcall this cannot answer (its function again, or a request)
    /// or exits. For template creation: the caller snapshots where it stopped.
    pub(crate) fn resume_to_call(
        &mut self,
        function: Option<&[u8]>,
        limits: &RunLimits,
    ) -> (Result<Hostcall, Error>, Output) {
        let mut out = Output::new(limits.max_output);
        let r = guest::resume(
            &mut self.vm,
            &mut self.pending,
            function,
            None,
            &mut out,
            limits,
        )
        .map_err(|e| {
            self.status = Status::Broken;
            Error::from_run("run the guest", e)
        });
        (r, out)
    }

    /// Let [`Instance::invoke`] serve a request on an instance of a runtime base whose
    /// guest was given its function and now waits for its request (template creation
    /// serves a function's first request on the instance it snapshotted). Its reset would
    /// go back to the base: it is dropped after that request.
    pub(crate) fn take_first_request(&mut self) {
        self.layered = true;
    }

    /// The vCPU state, with the guest stopped in a hostcall (for a snapshot).
    pub(crate) fn capture(&mut self) -> Result<VcpuState, Error> {
        let step = "snapshot the vCPU";
        self.vm
            .settle()
            .map_err(|e| Error::new(ErrorKind::Host, step, e))?;
        VcpuState::capture(
            &self.vm.kvm,
            &self.vm.vm,
            &self.vm.vcpu,
            self.vm.cpu,
            self.vm.tsc_khz,
        )
        .map_err(|e| Error::new(ErrorKind::Host, step, e))
    }

    /// Guest RAM, with the vCPU stopped (for a snapshot).
    pub(crate) fn memory(&self) -> &GuestMemory {
        self.vm.mem()
    }

    /// Put the instance back into its template's exact state: guest RAM and vCPU.
    pub fn reset(&mut self) -> Result<ResetStats, Error> {
        let step = "reset instance";
        if self.layered {
            return Err(Error::new(
                ErrorKind::BadRequest,
                step,
                "an instance that served a function's first request on its runtime base is not reset (it would go back to the base): drop it",
            ));
        }
        if self.status == Status::Broken {
            return Err(Error::new(
                ErrorKind::Host,
                step,
                "the instance failed and cannot be reset",
            ));
        }
        let t0 = Instant::now();
        let Some(template) = self.template.clone() else {
            return Err(Error::new(
                ErrorKind::BadRequest,
                step,
                "a cold-booted instance has no template to reset to",
            ));
        };
        // Pages arriving on demand would have to be fetched again to be overwritten: restore
        // anew.
        if self.backing.on_demand() {
            let fresh = Instance::restore(template, self.backing);
            return match fresh {
                Ok(fresh) => {
                    let invocations = self.invocations;
                    *self = fresh;
                    self.invocations = invocations;
                    Ok(ResetStats {
                        reset_ms: ms(t0.elapsed()),
                        restored: true,
                        ..Default::default()
                    })
                }
                Err(e) => {
                    self.status = Status::Broken;
                    Err(e)
                }
            };
        }
        // A request that changed the page tables must not keep what it mapped: after the
        // memory (page-table pages included) is the template's again, KVM drops every
        // mapping it built. The host memory stays: the next request's touches cost an
        // exit each, but no host page fault, copy or zero fill (a fresh restore cost all
        // of those, and a new VM).
        let tables_changed = self.page_tables_changed(&template);
        let r = self.reset_memory_and_vcpu(&template).and_then(|done| {
            if tables_changed {
                self.vm
                    .forget_mappings()
                    .map_err(|e| Error::new(ErrorKind::Host, step, e))?;
            }
            // The grant map is the template's again; the instance may have more slots
            // (granted to earlier requests): say so, so that the guest does not ask again.
            self.vm
                .write_grant_map()
                .map_err(|e| Error::new(ErrorKind::Host, step, e))?;
            Ok(done)
        });
        match r {
            Ok((copied, zeroed, vcpu_ms)) => {
                self.status = Status::Ready;
                // The guest waits in the template's hostcall again.
                self.pending = Some(template.pending());
                Ok(ResetStats {
                    reset_ms: ms(t0.elapsed()),
                    vcpu_ms,
                    regions_copied: copied,
                    regions_zeroed: zeroed,
                    restored: false,
                    mappings_dropped: tables_changed,
                })
            }
            Err(e) => {
                self.status = Status::Broken;
                Err(e)
            }
        }
    }

    /// Whether a page-table page of the guest differs from the template's (the guest mapped
    /// or unmapped something since it was restored or reset).
    fn page_tables_changed(&self, template: &Template) -> bool {
        let Ok(image) = template.image() else {
            return true;
        };
        let mut now = [0u8; PAGE_SIZE];
        template.page_tables().iter().any(|&gpa| {
            let at = gpa as usize;
            match (
                self.vm.mem().read_into(gpa, &mut now),
                image.map.get(at..at + PAGE_SIZE),
            ) {
                (Ok(()), Some(then)) => now[..] != *then,
                _ => true,
            }
        })
    }

    fn reset_memory_and_vcpu(&mut self, t: &Template) -> Result<(u64, u64, f64), Error> {
        let step = "reset instance";
        let host =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::new(ErrorKind::Host, step, e);
        let per_region = (REGION / PAGE) as usize;
        let image = &t.image()?.map;
        let n_regions = t.regions();
        // Which pages are resident, asked only where it is needed: not in regions mapped
        // from the template's file (there pagemap says what was written), one mincore per
        // run of other regions.
        let mut resident = std::mem::take(&mut self.resident);
        resident.clear();
        resident.resize((self.vm.mem().size() / PAGE) as usize, false);
        let mut scratch = std::mem::take(&mut self.scratch);
        let file_mapped = |r: usize| self.backing == Backing::Shared && !t.runs_in(r).is_empty();
        let mut r = 0;
        while r < n_regions {
            if file_mapped(r) {
                r += 1;
                continue;
            }
            let first = r;
            while r < n_regions && !file_mapped(r) {
                r += 1;
            }
            let (from, to) = (first * per_region, (r * per_region).min(resident.len()));
            self.vm.mem().resident_range(
                from as u64 * PAGE,
                (to - from) as u64 * PAGE,
                &mut scratch,
                &mut resident[from..to],
            );
        }
        self.scratch = scratch;
        let (mut copied, mut zeroed) = (0, 0);
        let mut states = Vec::new();
        // Frames the requests so far touched in the file-mapped regions (mappings are kept
        // across resets: this is their union), for the learned working set.
        let learning = t.learning();
        if learning {
            self.touched.clear();
        }
        for r in 0..n_regions {
            if file_mapped(r) {
                // Mapped from the template's file: only pages the guest wrote are private;
                // copy the template's bytes back into those (they stay private and mapped).
                let Some(pm) = self.pagemap else { continue };
                let gpa = r as u64 * REGION;
                let len = REGION.min(self.vm.mem().size() - gpa);
                self.vm
                    .mem()
                    .page_states(pm, gpa, len, &mut states)
                    .map_err(|e| host(e.into()))?;
                if learning {
                    let first = gpa / PAGE;
                    self.touched.extend(
                        (0..states.len() as u64)
                            .filter(|&i| states[i as usize] != PageState::Absent)
                            .map(|i| first + i),
                    );
                }
                let written = states
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| p == PageState::Private);
                for (i, _) in written {
                    let at = gpa + i as u64 * PAGE;
                    let src = image
                        .get(at as usize..(at + PAGE) as usize)
                        .ok_or_else(|| {
                            Error::new(ErrorKind::Host, step, "page outside the template image")
                        })?;
                    self.vm.mem().write(at, src).map_err(|e| host(e.into()))?;
                    copied += 1;
                }
                continue;
            }
            let pages = resident.get(r * per_region..((r + 1) * per_region).min(resident.len()));
            let touched = pages.is_none_or(|p| p.iter().any(|&x| x));
            if !t.runs_in(r).is_empty() {
                copied += 1;
            } else if touched {
                zeroed += 1;
            } else {
                continue;
            }
            write_region(t, image, self.vm.mem(), r, Some(&resident))
                .map_err(|e| host(e.into()))?;
        }
        self.resident = resident;
        let tv = Instant::now();
        let state = t.state();
        state
            .apply(&self.vm.vm, &self.vm.vcpu, self.vm.cpu)
            .map_err(|e| host(e.into()))?;
        state
            .apply_backend_msrs(&self.vm.vcpu, self.vm.backend)
            .map_err(|e| host(e.into()))?;
        Ok((copied, zeroed, ms(tv.elapsed())))
    }
}

/// What a vCPU state that cannot be applied is: a refusal by KVM is the host's failure; a
/// state that is damaged, or made for another host (back end, CPU model), is the
/// template's (unusable here, whatever the request).
fn state_error_kind(e: &crate::persist::PersistError) -> ErrorKind {
    use crate::persist::PersistError as P;
    match e {
        P::Save { .. } | P::Restore { .. } | P::Msr { .. } => ErrorKind::Host,
        P::MadeOn(_) | P::Damaged(_) | P::Invalid { .. } | P::Version(_) => ErrorKind::Damaged,
    }
}

/// Write template `t`'s data pages (from its verified `image`) of region `r` into `mem`. With `resident` (a reset),
/// also zero every other page of the region that is resident in the host (the guest may
/// have written it; a page never touched is still zero).
fn write_region(
    t: &Template,
    image: &[u8],
    mem: &GuestMemory,
    r: usize,
    resident: Option<&[bool]>,
) -> Result<(), crate::memory::MemoryError> {
    let first = r as u64 * REGION / PAGE;
    let end = ((r as u64 + 1) * REGION).min(mem.size()) / PAGE;
    let zero_until = |from: u64, to: u64| -> Result<(), crate::memory::MemoryError> {
        let Some(res) = resident else { return Ok(()) };
        let mut f = from;
        while f < to {
            if !res.get(f as usize).copied().unwrap_or(true) {
                f += 1;
                continue;
            }
            let start = f;
            while f < to && res.get(f as usize).copied().unwrap_or(true) {
                f += 1;
            }
            mem.zero(start * PAGE, (f - start) * PAGE)?;
        }
        Ok(())
    };
    let mut cursor = first;
    for &(gfn, n) in t.runs_in(r) {
        zero_until(cursor, gfn)?;
        let (from, to) = ((gfn * PAGE) as usize, ((gfn + n) * PAGE) as usize);
        mem.write(gfn * PAGE, &image[from..to])?;
        cursor = gfn + n;
    }
    zero_until(cursor, end)
}
