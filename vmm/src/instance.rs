//! Templates loaded once and instances restored from them, reset in place between
//! invocations: the objects a long-running invoker (`vmm serve`) keeps.
//!
//! * A [`Template`] is a function template read from the store once: every page verified
//!   against its id and laid out as the 2 MiB regions of guest RAM that hold data, plus
//!   the decoded vCPU state and the guest's pending stdin read. It is immutable,
//!   `Send + Sync` and shared by `Arc` among all instances of the template.
//! * An [`Instance`] owns a VM (its vCPU and guest RAM) restored from a template and
//!   stopped at the function's pending read of stdin. [`Instance::invoke`] serves one
//!   request; [`Instance::reset`] then puts the instance back into the template's exact
//!   state in place: every 2 MiB region that holds template data is copied again from the
//!   template, every other region the guest touched is zeroed (the pages stay resident, so
//!   no zero fill and no new host page faults), and the whole vCPU state is written again.
//!   Nothing a request left behind survives a reset. An instance whose invocation failed
//!   (timeout, guest fault) is not reset: the caller drops it.
//! * A request that changed the guest's page tables (under wasmtime, a linear memory that
//!   grew maps new pages) is not reset in place: under shadow paging (PVM) KVM does not see
//!   the host's copy of the template's page-table pages, so pages the request mapped would
//!   stay reachable. [`Instance::reset`] compares the template's page-table pages (found
//!   when the template is loaded) and, if one differs, replaces the VM with a fresh restore.

use crate::error::{Error, ErrorKind};
use crate::memory::GuestMemory;
use crate::persist::VcpuState;
use crate::run::{self, ms, RunLimits};
use crate::vm::{Hostcall, Output, Vm};
use snapshot_store::{Frame, Store, PAGE_SIZE};
use std::sync::Arc;
use std::time::Instant;
use vmm_abi::{layout, GuestRange, Op};

const PAGE: u64 = PAGE_SIZE as u64;
const REGION: u64 = layout::HUGE_PAGE_SIZE;
/// Template data pages in a 2 MiB region below which the region gets 4 KiB host pages.
const SPARSE_REGION_PAGES: u64 = 64;

/// A function template loaded from the store, verified, ready to instantiate.
pub struct Template {
    engine: Arc<crate::engine::Engine>,
    name: String,
    created_unix_ms: u64,
    mem_size: u64,
    /// Runs of consecutive data frames: (first frame, pages).
    runs: Vec<(u64, u64)>,
    /// Per 2 MiB region of guest RAM: the range of `runs` that lies in it (empty: none).
    region_runs: Vec<std::ops::Range<usize>>,
    /// The verified image at guest offsets in a memory file (sparse: only data pages take
    /// memory), which [`Sharing::Shared`] instances map copy-on-write, and a read-only view
    /// of it that copies and resets read from.
    image: (std::fs::File, memmap2::Mmap),
    state: VcpuState,
    stdin_buf: GuestRange,
    data_pages: u64,
    /// Guest-physical addresses of the template's page-table pages.
    page_tables: Vec<u64>,
}

/// Most page-table pages a template may have (a real one has a few dozen).
const MAX_PAGE_TABLE_PAGES: usize = 8192;

/// The page-table pages reachable from the root at `layout::PML4_GPA` (where
/// `VcpuState::validate` pins CR3) in `image`, the template's memory: every table page
/// once, whatever its level. Entries that point outside guest RAM are skipped (the guest
/// faults on them; the host never writes there); a template with more than
/// [`MAX_PAGE_TABLE_PAGES`] table pages is refused.
fn page_table_pages(image: &[u8]) -> Result<Vec<u64>, String> {
    use vmm_abi::pte::{ADDR_MASK as ADDR, HUGE, PRESENT};
    let entry = |table: u64, i: usize| -> u64 {
        let at = table as usize + i * 8;
        image
            .get(at..at + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut level = vec![layout::PML4_GPA];
    // PML4 -> PDPT -> PD -> PT; a large-page bit ends the walk at the PDPT and PD levels.
    for depth in 0..4 {
        let mut next = Vec::new();
        for table in level {
            if table as usize + PAGE_SIZE > image.len() || !seen.insert(table) {
                continue;
            }
            if seen.len() > MAX_PAGE_TABLE_PAGES {
                return Err(format!(
                    "its page tables have more than {MAX_PAGE_TABLE_PAGES} pages"
                ));
            }
            if depth == 3 {
                continue; // a page table: its entries map pages, not tables
            }
            for i in 0..512 {
                let e = entry(table, i);
                if e & PRESENT != 0 && (depth == 0 || e & HUGE == 0) {
                    next.push(e & ADDR);
                }
            }
        }
        level = next;
    }
    Ok(seen.into_iter().collect())
}

/// Adds data frame `gfn` (greater than every frame in `runs`) to `runs`, the runs of
/// consecutive data frames: (first frame, pages). A run never crosses a 2 MiB region
/// boundary (resets work region by region).
fn push_run(runs: &mut Vec<(u64, u64)>, gfn: u64) {
    match runs.last_mut() {
        Some((first, n)) if *first + *n == gfn && !(gfn * PAGE).is_multiple_of(REGION) => *n += 1,
        _ => runs.push((gfn, 1)),
    }
}

/// Per 2 MiB region of `n_regions`: the range of `runs` (sorted, built by [`push_run`])
/// that lies in it (empty: none).
fn region_runs(runs: &[(u64, u64)], n_regions: usize) -> Vec<std::ops::Range<usize>> {
    let mut region_runs = vec![0..0; n_regions];
    let mut i = 0;
    while i < runs.len() {
        let r = (runs[i].0 * PAGE / REGION) as usize;
        let start = i;
        while i < runs.len() && (runs[i].0 * PAGE / REGION) as usize == r {
            i += 1;
        }
        region_runs[r] = start..i;
    }
    region_runs
}

/// Whether a region whose data frames are `runs` is sparse (see [`Template::sparse`]).
fn sparse_runs(runs: &[(u64, u64)]) -> bool {
    let pages: u64 = runs.iter().map(|&(_, n)| n).sum();
    pages < SPARSE_REGION_PAGES
}

/// What loading a template cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadStats {
    pub load_ms: f64,
    pub data_pages: u64,
    pub data_regions: u64,
}

impl Template {
    /// Read `name` from `store`, verify every page and lay it out in memory.
    pub fn load(
        engine: Arc<crate::engine::Engine>,
        store: &Store,
        name: &str,
    ) -> Result<(Template, LoadStats), Error> {
        let t0 = Instant::now();
        let step = "load template";
        let tmpl = store.load(name).map_err(|e| match e {
            snapshot_store::LoadError::NotFound { .. } => Error::new(ErrorKind::NotFound, step, e),
            e => Error::new(ErrorKind::Damaged, step, e),
        })?;
        // The same checks as `vmm restore` and `vmm-store verify`: everything a restore
        // would trip over is refused before a VM exists.
        let damaged = |e: crate::checks::CheckError| Error::new(ErrorKind::Damaged, step, e);
        let (state, device) = crate::checks::check_states(&tmpl).map_err(damaged)?;
        let parent = tmpl
            .parent
            .as_ref()
            .and_then(|p| store.load(p.as_str()).ok())
            .map(|pt| crate::checks::decode_device(&pt).map(|pd| (pt, pd)))
            .transpose()
            .map_err(damaged)?;
        crate::checks::check_layering(&tmpl, &device, parent.as_ref().map(|(t, d)| (t, d)))
            .map_err(damaged)?;
        if device.pending_op != Op::ReadStdin as u64 {
            return Err(Error::new(
                ErrorKind::BadRequest,
                step,
                format!("{name} is a runtime base: it waits for a function, not a request"),
            ));
        }
        let stdin_buf = GuestRange::checked(
            "stdin buffer",
            device.buf_gpa,
            device.buf_len,
            tmpl.mem_size,
            tmpl.mem_size,
        )
        .map_err(|e| Error::new(ErrorKind::Damaged, step, e.to_string()))?;
        let resolved = tmpl
            .resolve(store)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        let n_regions = tmpl.mem_size.div_ceil(REGION) as usize;
        let mut frames: Vec<u64> = resolved.data_frames().collect();
        frames.sort_unstable();
        let host = |e: std::io::Error| Error::new(ErrorKind::Host, step, e);
        let (file, mut image) = memory_file(name, tmpl.mem_size).map_err(host)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut data_pages = 0u64;
        for gfn in frames {
            let frame = resolved
                .frame_verified(gfn)
                .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
            let Some(Frame::Data(p)) = frame else {
                continue;
            };
            if gfn * PAGE >= tmpl.mem_size {
                return Err(Error::new(ErrorKind::Damaged, step, "frame past guest RAM"));
            }
            let at = (gfn * PAGE) as usize;
            image
                .get_mut(at..at + PAGE_SIZE)
                .ok_or_else(|| Error::new(ErrorKind::Damaged, step, "frame past guest RAM"))?
                .copy_from_slice(p);
            data_pages += 1;
            push_run(&mut runs, gfn);
        }
        let page_tables =
            page_table_pages(&image).map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        let image = (file, image.make_read_only().map_err(host)?);
        let region_runs = region_runs(&runs, n_regions);
        let stats = LoadStats {
            load_ms: ms(t0.elapsed()),
            data_pages,
            data_regions: region_runs.iter().filter(|r| !r.is_empty()).count() as u64,
        };
        Ok((
            Template {
                engine,
                name: name.to_string(),
                created_unix_ms: tmpl.created_unix_ms,
                mem_size: tmpl.mem_size,
                runs,
                region_runs,
                image,
                state,
                stdin_buf,
                data_pages,
                page_tables,
            },
            stats,
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the template was created (a template replaced under the same name differs).
    pub fn created_unix_ms(&self) -> u64 {
        self.created_unix_ms
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Host memory the template's verified image holds.
    pub fn image_bytes(&self) -> u64 {
        self.data_pages * PAGE
    }

    /// Regions of guest RAM that hold template data.
    pub fn data_regions(&self) -> u64 {
        self.region_runs.iter().filter(|r| !r.is_empty()).count() as u64
    }

    /// Whether region `r` holds so little data that it is backed by 4 KiB host pages: a
    /// 2 MiB host page would cost an instance 2 MiB of memory for a handful of pages.
    fn sparse(&self, r: usize) -> bool {
        sparse_runs(&self.runs[self.region_runs[r].clone()])
    }

    /// Write the template's data pages of region `r` into `mem`. With `resident` (a reset),
    /// also zero every other page of the region that is resident in the host (the guest may
    /// have written it; a page never touched is still zero).
    fn write_region(
        &self,
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
        for &(gfn, n) in &self.runs[self.region_runs[r].clone()] {
            zero_until(cursor, gfn)?;
            let (from, to) = ((gfn * PAGE) as usize, ((gfn + n) * PAGE) as usize);
            mem.write(gfn * PAGE, &self.image.1[from..to])?;
            cursor = gfn + n;
        }
        zero_until(cursor, end)
    }

    /// Restore a new instance of this template, stopped at its pending read of stdin,
    /// with its own copy of the template's memory.
    pub fn instantiate(self: &Arc<Self>) -> Result<Instance, Error> {
        Instance::new(self.clone(), Sharing::Copy)
    }

    /// [`Template::instantiate`] with the memory `sharing` asked for.
    pub fn instantiate_with(self: &Arc<Self>, sharing: Sharing) -> Result<Instance, Error> {
        Instance::new(self.clone(), sharing)
    }
}

/// How an instance holds the template's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Its own copy in 2 MiB host pages: no exits on first touches, ~2 MiB per region.
    #[default]
    Copy,
    /// A copy-on-write mapping of the template's memory file, shared by all instances:
    /// an instance holds privately only the pages its guest wrote (reset copies just
    /// those back, found in /proc/self/pagemap); 4 KiB host pages, so each page's first
    /// touch in an instance's life costs an exit.
    Shared,
}

/// A sparse memory file (memfd) of `mem_size` bytes for the template's image, and a
/// writable shared mapping of it to fill (pages never written take no memory).
fn memory_file(name: &str, mem_size: u64) -> std::io::Result<(std::fs::File, memmap2::MmapMut)> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(format!("vmm-template-{name}")).unwrap_or_default();
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(mem_size)?;
    // SAFETY: a shared mapping of a memory file nothing else has; it is filled here and
    // then made read-only before any instance maps the file.
    let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
    Ok((file, map))
}

/// What one invocation produced. Output written before a failure is kept.
#[derive(Debug)]
pub struct Response {
    /// The function's exit code, or why the guest produced no response.
    pub result: Result<i32, Error>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Whether the guest's output went past the output cap and was cut.
    pub truncated: crate::vm::Truncated,
    pub timings: InvokeTimings,
}

/// Timing of one invocation inside an instance.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InvokeTimings {
    /// From writing the request into the guest to the guest's exit.
    pub run_ms: f64,
    pub exits: u64,
}

/// Timing of one reset.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResetStats {
    pub reset_ms: f64,
    /// The request changed the guest's page tables: the VM was replaced by a fresh restore
    /// instead of being reset in place.
    pub restored: bool,
    /// Of which rewriting the vCPU state.
    pub vcpu_ms: f64,
    pub regions_copied: u64,
    pub regions_zeroed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Stopped at the template's pending read of stdin, in the template's exact state.
    Ready,
    /// Served a request: must be reset before the next one.
    Used,
    /// Failed in a way that leaves it unusable; drop it.
    Broken,
}

/// A VM restored from a [`Template`].
pub struct Instance {
    template: Arc<Template>,
    sharing: Sharing,
    /// /proc/self/pagemap, to find the pages a shared instance's guest wrote.
    pagemap: Option<std::fs::File>,
    /// Reused by every reset: one flag per page, and mincore's buffer.
    resident: Vec<bool>,
    scratch: Vec<u8>,
    vm: Vm,
    status: Status,
    invocations: u64,
}

impl Instance {
    fn new(template: Arc<Template>, sharing: Sharing) -> Result<Instance, Error> {
        let step = "create instance";
        let host =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::new(ErrorKind::Host, step, e);
        let mem = GuestMemory::new(template.mem_size as usize).map_err(|e| host(e.into()))?;
        // Fill RAM before KVM sees it (registered memory is filled ~10x slower).
        let mut pagemap = None;
        for r in 0..template.region_runs.len() {
            if template.region_runs[r].is_empty() {
                continue;
            }
            if sharing == Sharing::Shared {
                use std::os::fd::AsFd;
                let len = REGION.min(mem.size() - r as u64 * REGION);
                mem.map_file_range(r as u64 * REGION, len, template.image.0.as_fd())
                    .map_err(|e| host(e.into()))?;
                continue;
            }
            {
                if template.sparse(r) {
                    mem.advise_small_pages(r as u64 * REGION, REGION);
                }
                template
                    .write_region(&mem, r, None)
                    .map_err(|e| host(e.into()))?;
            }
        }
        if sharing == Sharing::Shared {
            pagemap = Some(std::fs::File::open("/proc/self/pagemap").map_err(|e| host(e.into()))?);
        }
        let parts = template.engine.vm_parts().map_err(|e| host(e.into()))?;
        parts.prepare_restore().map_err(|e| host(e.into()))?;
        template
            .state
            .apply(&parts.vm, &parts.vcpu, parts.cpu)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        let vm = parts.with_memory(mem);
        vm.register_memory().map_err(|e| host(e.into()))?;
        template
            .state
            .apply_backend_msrs(&vm.vcpu, vm.backend)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        Ok(Instance {
            template,
            sharing,
            pagemap,
            resident: Vec::new(),
            scratch: Vec::new(),
            vm,
            status: Status::Ready,
            invocations: 0,
        })
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    /// Whether the instance can serve a request now (it is in the template's state).
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

    /// Serve one request: write `stdin` where the guest's pending read expects it, resume,
    /// and run to the function's exit (or failure). The instance must be ready; afterwards
    /// it must be [reset](Instance::reset) (or dropped, if the invocation failed).
    pub fn invoke(&mut self, stdin: &[u8], limits: &RunLimits) -> Response {
        let fail = |e: Error| Response {
            result: Err(e),
            stdout: vec![],
            stderr: vec![],
            truncated: Default::default(),
            timings: InvokeTimings::default(),
        };
        if self.status != Status::Ready {
            return fail(Error::new(
                ErrorKind::Host,
                "invoke",
                "the instance was not reset after its last request",
            ));
        }
        self.status = Status::Used;
        self.invocations += 1;
        let t0 = Instant::now();
        let exits_before = self.vm.exits;
        let mut out = Output::new(limits.max_output);
        let result = run::serve_from(
            &mut self.vm,
            Some(Hostcall::ReadStdin {
                buf: self.template.stdin_buf,
            }),
            &[],
            stdin,
            &mut out,
            limits,
        )
        .map_err(|e| {
            self.status = Status::Broken;
            Error::from_run("run the function", e)
        });
        let timings = InvokeTimings {
            run_ms: ms(t0.elapsed()),
            exits: self.vm.exits - exits_before,
        };
        Response {
            result,
            stdout: out.stdout,
            stderr: out.stderr,
            truncated: out.truncated,
            timings,
        }
    }

    /// Put the instance back into its template's exact state: guest RAM and vCPU.
    pub fn reset(&mut self) -> Result<ResetStats, Error> {
        let step = "reset instance";
        if self.status == Status::Broken {
            return Err(Error::new(
                ErrorKind::Host,
                step,
                "the instance failed and cannot be reset",
            ));
        }
        let t0 = Instant::now();
        if self.page_tables_changed() {
            let fresh = Instance::new(self.template.clone(), self.sharing);
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
        let r = self.reset_memory_and_vcpu();
        match r {
            Ok((copied, zeroed, vcpu_ms)) => {
                self.status = Status::Ready;
                Ok(ResetStats {
                    reset_ms: ms(t0.elapsed()),
                    vcpu_ms,
                    regions_copied: copied,
                    regions_zeroed: zeroed,
                    restored: false,
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
    fn page_tables_changed(&self) -> bool {
        let image = &self.template.image.1;
        self.template.page_tables.iter().any(|&gpa| {
            let at = gpa as usize;
            match (self.vm.mem.slice(gpa, PAGE), image.get(at..at + PAGE_SIZE)) {
                (Ok(now), Some(then)) => now != then,
                _ => true,
            }
        })
    }

    fn reset_memory_and_vcpu(&mut self) -> Result<(u64, u64, f64), Error> {
        let step = "reset instance";
        let host =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::new(ErrorKind::Host, step, e);
        let per_region = (REGION / PAGE) as usize;
        let t = &self.template;
        let n_regions = t.region_runs.len();
        // Which pages are resident, asked only where it is needed: not in regions mapped
        // from the template's file (there pagemap says what was written), one mincore per
        // run of other regions.
        let mut resident = std::mem::take(&mut self.resident);
        resident.clear();
        resident.resize((self.vm.mem.size() / PAGE) as usize, false);
        let mut scratch = std::mem::take(&mut self.scratch);
        let file_mapped =
            |r: usize| self.sharing == Sharing::Shared && !t.region_runs[r].is_empty();
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
            self.vm.mem.resident_range(
                from as u64 * PAGE,
                (to - from) as u64 * PAGE,
                &mut scratch,
                &mut resident[from..to],
            );
        }
        self.scratch = scratch;
        let (mut copied, mut zeroed) = (0, 0);
        let mut private = Vec::new();
        for r in 0..t.region_runs.len() {
            if self.sharing == Sharing::Shared && !t.region_runs[r].is_empty() {
                // Mapped from the template's file: only pages the guest wrote are private;
                // copy the template's bytes back into those (they stay private and mapped).
                let Some(pm) = &self.pagemap else { continue };
                let gpa = r as u64 * REGION;
                let len = REGION.min(self.vm.mem.size() - gpa);
                self.vm
                    .mem
                    .private_pages(pm, gpa, len, &mut private)
                    .map_err(|e| host(e.into()))?;
                for (i, _) in private.iter().enumerate().filter(|(_, &p)| p) {
                    let at = gpa + i as u64 * PAGE;
                    let src = t
                        .image
                        .1
                        .get(at as usize..(at + PAGE) as usize)
                        .ok_or_else(|| {
                            Error::new(ErrorKind::Host, step, "page outside the template image")
                        })?;
                    self.vm.mem.write(at, src).map_err(|e| host(e.into()))?;
                    copied += 1;
                }
                continue;
            }
            let pages = resident.get(r * per_region..((r + 1) * per_region).min(resident.len()));
            let touched = pages.is_none_or(|p| p.iter().any(|&x| x));
            if !t.region_runs[r].is_empty() {
                copied += 1;
            } else if touched {
                zeroed += 1;
            } else {
                continue;
            }
            t.write_region(&self.vm.mem, r, Some(&resident))
                .map_err(|e| host(e.into()))?;
        }
        self.resident = resident;
        let tv = Instant::now();
        let state = &self.template.state;
        state
            .apply(&self.vm.vm, &self.vm.vcpu, self.vm.cpu)
            .map_err(|e| host(e.into()))?;
        state
            .apply_backend_msrs(&self.vm.vcpu, self.vm.backend)
            .map_err(|e| host(e.into()))?;
        Ok((copied, zeroed, ms(tv.elapsed())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_abi::pte::{HUGE, PRESENT, TABLE};

    /// Frames per 2 MiB region.
    const R: u64 = REGION / PAGE;

    /// Zeroed guest memory of `pages` pages.
    fn image(pages: u64) -> Vec<u8> {
        vec![0; (pages * PAGE) as usize]
    }

    /// Sets entry `i` of the table page at `table` to `value`.
    fn set(image: &mut [u8], table: u64, i: u64, value: u64) {
        let at = (table + i * 8) as usize;
        image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn page_tables_are_walked_from_the_root_to_the_page_tables() {
        let mut m = image(16);
        let (pml4, pdpt, pd, pt, data) = (layout::PML4_GPA, 0x3000, 0x4000, 0x6000, 0x8000);
        // The address is masked out of the entry (here with the no-execute bit set).
        set(&mut m, pml4, 0, pdpt | TABLE | (1 << 63));
        // Not present: not followed, whatever its address.
        set(&mut m, pml4, 1, 0x9000);
        set(&mut m, pdpt, 0, pd | TABLE);
        // A 1 GiB page and a 2 MiB page: their addresses are not tables.
        set(&mut m, pdpt, 1, 0x5000 | TABLE | HUGE);
        set(&mut m, pd, 0, pt | TABLE);
        set(&mut m, pd, 1, 0x7000 | TABLE | HUGE);
        // Two directory entries sharing one page table: listed once.
        set(&mut m, pd, 511, pt | TABLE);
        // A page table's entries map pages, never tables.
        set(&mut m, pt, 0, data | TABLE);
        set(&mut m, data, 0, 0xa000 | TABLE);
        assert_eq!(page_table_pages(&m).unwrap(), vec![pml4, pdpt, pd, pt]);
    }

    #[test]
    fn the_large_page_bit_is_ignored_in_the_root() {
        let mut m = image(8);
        set(&mut m, layout::PML4_GPA, 0, 0x3000 | TABLE | HUGE);
        set(&mut m, 0x3000, 0, 0x4000 | PRESENT);
        assert_eq!(
            page_table_pages(&m).unwrap(),
            vec![layout::PML4_GPA, 0x3000, 0x4000]
        );
    }

    #[test]
    fn entries_outside_guest_ram_are_skipped() {
        let mut m = image(8);
        set(&mut m, layout::PML4_GPA, 0, 0x3000 | TABLE);
        set(&mut m, layout::PML4_GPA, 1, (1 << 40) | TABLE);
        // The last page's table would end one byte past guest RAM if it started one page
        // later.
        set(&mut m, 0x3000, 0, 0x7000 | TABLE);
        set(&mut m, 0x3000, 1, 0x8000 | TABLE);
        assert_eq!(
            page_table_pages(&m).unwrap(),
            vec![layout::PML4_GPA, 0x3000, 0x7000]
        );
        // Guest RAM that ends before the root: no tables at all.
        assert_eq!(
            page_table_pages(&image(layout::PML4_GPA / PAGE)).unwrap(),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn cycles_end_and_list_each_table_once() {
        let mut m = image(8);
        let pml4 = layout::PML4_GPA;
        set(&mut m, pml4, 0, 0x3000 | TABLE);
        set(&mut m, pml4, 1, pml4 | TABLE);
        set(&mut m, 0x3000, 0, pml4 | TABLE);
        set(&mut m, 0x3000, 1, 0x4000 | TABLE);
        set(&mut m, 0x4000, 0, 0x3000 | TABLE);
        set(&mut m, 0x4000, 1, 0x4000 | TABLE);
        assert_eq!(page_table_pages(&m).unwrap(), vec![pml4, 0x3000, 0x4000]);
    }

    /// Guest memory whose page tables are the root, one PDPT, as many page directories as
    /// needed and `n` page tables: `n + n.div_ceil(512) + 2` table pages.
    fn tree(n: u64) -> Vec<u8> {
        let dirs = n.div_ceil(512);
        let (pdpt, first_dir) = (0x3000, 0x4000);
        let first_table = first_dir + dirs * PAGE;
        let mut m = image(first_table / PAGE + n);
        set(&mut m, layout::PML4_GPA, 0, pdpt | TABLE);
        for d in 0..dirs {
            set(&mut m, pdpt, d, (first_dir + d * PAGE) | TABLE);
        }
        for t in 0..n {
            let dir = first_dir + t / 512 * PAGE;
            set(&mut m, dir, t % 512, (first_table + t * PAGE) | TABLE);
        }
        m
    }

    #[test]
    fn at_most_max_page_table_pages() {
        // 8174 + 16 + 2 = 8192 table pages: accepted, every one listed.
        let found = page_table_pages(&tree(8174)).unwrap();
        assert_eq!(found.len(), MAX_PAGE_TABLE_PAGES);
        assert!(found.windows(2).all(|w| w[0] < w[1]));
        // One more: refused.
        let e = page_table_pages(&tree(8175)).unwrap_err();
        assert!(e.contains("more than 8192 pages"), "{e}");
    }

    fn runs_of(frames: &[u64]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        for &g in frames {
            push_run(&mut runs, g);
        }
        runs
    }

    #[test]
    fn runs_are_consecutive_frames_inside_one_region() {
        let frames = [0, 1, 2, 5, R - 2, R - 1, R, R + 1, 2 * R + 9];
        let runs = runs_of(&frames);
        assert_eq!(
            runs,
            vec![(0, 3), (5, 1), (R - 2, 2), (R, 2), (2 * R + 9, 1)]
        );
        assert_eq!(region_runs(&runs, 3), vec![0..3, 3..4, 4..5]);
        // Regions without data have an empty range.
        let runs = runs_of(&[1, 3 * R + 4, 3 * R + 5]);
        assert_eq!(region_runs(&runs, 4), vec![0..1, 0..0, 0..0, 1..2]);
    }

    #[test]
    fn a_region_is_sparse_below_64_data_pages() {
        // 63 pages in three runs, in region 1.
        let frames: Vec<u64> = (R..R + 20)
            .chain(R + 100..R + 140)
            .chain(2 * R - 3..2 * R)
            .collect();
        let runs = runs_of(&frames);
        let regions = region_runs(&runs, 2);
        assert!(regions[0].is_empty());
        assert_eq!(regions[1], 0..3);
        assert!(sparse_runs(&runs[regions[1].clone()]));
        // One page more (in a fourth run): not sparse.
        let mut frames: Vec<u64> = frames.iter().copied().chain([R + 300]).collect();
        frames.sort_unstable();
        let runs = runs_of(&frames);
        assert_eq!(runs.len(), 4);
        assert!(!sparse_runs(&runs));
        assert!(sparse_runs(&[]));
    }
}
