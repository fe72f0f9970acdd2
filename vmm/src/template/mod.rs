//! Templates: snapshots of a guest taken where it waits in a hostcall, stored as page diffs
//! in the content-addressed store ([`create`]), and loaded once ([`Template::load`]) to
//! instantiate from.
//!
//! * A **runtime base** is taken at the guest's `GetFunction` hostcall: kernel booted,
//!   module compiled and instantiated, runtime initialised.
//! * A **function template** is taken at the function's first `ReadStdin` hostcall, as a
//!   diff against its base, with the working set a trial request touched.
//!
//! Loading is the one prologue every restore goes through: the manifest and its parent
//! are read and checked ([`checks`]: vCPU and device state, layering), the pages are
//! located (the template's own location records, not every pack index of the store) but
//! not read: an instance's [`Backing`](crate::instance::Backing) reads the ones it needs,
//! each re-hashed against its id. A verified image of the whole memory ([`Template::image`])
//! is built on first need (shared instances map it, resets copy from it) and kept.

pub mod checks;
pub mod create;
pub mod device;

use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::persist::VcpuState;
use crate::vm::Hostcall;
use device::DeviceState;
use snapshot_store::{Frame, LoadError, Resolved, Store, PAGE_SIZE};
use std::sync::{Arc, OnceLock};
use vmm_abi::{layout, GuestRange, Op};

pub(crate) const PAGE: u64 = PAGE_SIZE as u64;
pub(crate) const REGION: u64 = layout::HUGE_PAGE_SIZE;
/// Template data pages in a 2 MiB region below which the region gets 4 KiB host pages: a
/// huge page costs a 2 MiB zero fill and 2 MiB of memory for a handful of pages.
pub(crate) const SPARSE_REGION_PAGES: u64 = 64;

/// A template loaded from the store and checked, ready to instantiate. Immutable and
/// `Send + Sync`: shared by `Arc` among all its instances.
pub struct Template {
    /// The store it was loaded from (its image cache, when `cached_image`).
    store: Arc<Store>,
    cached_image: bool,
    /// Restores fill memory on threads of their own ([`Config::parallel_restore`]).
    parallel_restore: bool,
    name: String,
    manifest: snapshot_store::Template,
    state: VcpuState,
    device: DeviceState,
    /// The hostcall the guest waits in, its buffer range-checked.
    pending: Hostcall,
    resolved: Resolved,
    /// Runs of consecutive data frames: (first frame, pages).
    runs: Vec<(u64, u64)>,
    /// Per 2 MiB region of guest RAM: the range of `runs` that lies in it (empty: none).
    region_runs: Vec<std::ops::Range<usize>>,
    data_pages: u64,
    /// Guest-physical addresses of the template's page-table pages.
    page_tables: Vec<u64>,
    /// The guest's grant map (`vmm_abi::layout::GRANT_MAP_GPA`): the regions its
    /// instances get memory slots for when restored (checked to lie in guest RAM). None:
    /// the page holds nothing (not a template this guest kernel made): all of guest RAM.
    grant_map: Option<Vec<u8>>,
    /// The verified memory image, built on first use.
    image: OnceLock<Image>,
    /// The working set learned from real requests since the template was created (None:
    /// none yet, or its record could not be used: the manifest's stands).
    learned: Option<snapshot_store::LearnedWorkingSet>,
    /// Calls of [`Template::learn`] that reported frames.
    learn_calls: std::sync::atomic::AtomicU32,
}

/// Requests whose touched frames are merged into a template's learned working set, at
/// most (only requests that touched frames beyond it count): REAP (ASPLOS '21) found a
/// function's working set >97% stable after its first requests.
pub const LEARN_REQUESTS: u32 = 10;

/// A template's whole memory in a file, every data page verified, every other page zero:
/// shared instances map it copy-on-write; copies and resets read from the mapping.
pub(crate) struct Image {
    pub(crate) file: std::fs::File,
    pub(crate) map: memmap2::Mmap,
}

/// What loading a template cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadStats {
    pub load_ms: f64,
    pub data_pages: u64,
    pub data_regions: u64,
}

/// Most page-table pages a template may have (a real one has a few dozen).
const MAX_PAGE_TABLE_PAGES: usize = 8192;

/// The page-table pages reachable from the root at `layout::PML4_GPA` (where
/// `VcpuState::validate` pins CR3) in guest memory of `mem_size` bytes whose 8-byte word at
/// a guest address `entry` reads (0 where there is no data): every table page once,
/// whatever its level. Entries that point outside guest RAM are skipped (the guest faults
/// on them; the host never writes there); more than [`MAX_PAGE_TABLE_PAGES`] table pages
/// are refused.
fn page_table_pages(
    mem_size: u64,
    mut entry: impl FnMut(u64) -> Result<u64, String>,
) -> Result<Vec<u64>, String> {
    use vmm_abi::pte::{ADDR_MASK as ADDR, HUGE, PRESENT};
    let mut seen = std::collections::BTreeSet::new();
    let mut level = vec![layout::PML4_GPA];
    // PML4 -> PDPT -> PD -> PT; a large-page bit ends the walk at the PDPT and PD levels.
    for depth in 0..4 {
        let mut next = Vec::new();
        for table in level {
            if table.saturating_add(PAGE) > mem_size || !seen.insert(table) {
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
                let e = entry(table + i * 8)?;
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
        if let Some(slot) = region_runs.get_mut(r) {
            *slot = start..i;
        }
    }
    region_runs
}

/// Whether a region whose data frames are `runs` is sparse (see [`SPARSE_REGION_PAGES`]).
fn sparse_runs(runs: &[(u64, u64)]) -> bool {
    let pages: u64 = runs.iter().map(|&(_, n)| n).sum();
    pages < SPARSE_REGION_PAGES
}

/// A template that may be what the caller asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A function template (waits for a request).
    Function,
    /// A runtime base (waits for a function).
    Base,
}

impl Template {
    /// Read `name` from `store` and check it (see the module's documentation); `kind` is
    /// what the caller needs: the other kind is refused as a bad request. `config` says
    /// where the memory image comes from and how restores fill memory.
    pub(crate) fn load(
        store: Arc<Store>,
        config: &Config,
        name: &str,
        kind: Kind,
    ) -> Result<(Template, LoadStats), Error> {
        let t0 = std::time::Instant::now();
        let step = "load template";
        let manifest = store.load(name).map_err(|e| match e {
            LoadError::NotFound { .. } => Error::new(
                ErrorKind::NotFound,
                step,
                format!("template {name:?} does not exist"),
            ),
            e => Error::new(ErrorKind::Damaged, step, e),
        })?;
        // The same checks as `vmm-store verify`: everything a restore would trip over is
        // refused before a VM exists.
        let damaged = |e: checks::CheckError| Error::new(ErrorKind::Damaged, step, e);
        let (state, device) = checks::check_states(&manifest).map_err(damaged)?;
        // The parent as it is now (if it does not load, resolving says why).
        let parent = manifest
            .parent
            .as_ref()
            .and_then(|p| store.load(p.as_str()).ok())
            .map(|pt| checks::decode_device(&pt).map(|pd| (pt, pd)))
            .transpose()
            .map_err(damaged)?;
        checks::check_layering(&manifest, &device, parent.as_ref().map(|(t, d)| (t, d)))
            .map_err(damaged)?;
        let is_base = device.pending_op == Op::GetFunction as u64;
        match (kind, is_base) {
            (Kind::Function, true) => {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    step,
                    format!("{name} is a runtime base: it waits for a function, not a request"),
                ))
            }
            (Kind::Base, false) => {
                return Err(Error::new(
                    ErrorKind::BadRequest,
                    step,
                    format!(
                        "{name} is a function template: it waits for a request, so nothing can be layered on it"
                    ),
                ))
            }
            _ => {}
        }
        let mem_size = manifest.mem_size;
        let buf = GuestRange::checked(
            "pending buffer",
            device.buf_gpa,
            device.buf_len,
            mem_size,
            mem_size,
        )
        .map_err(|e| Error::new(ErrorKind::Damaged, step, e.to_string()))?;
        let pending = if is_base {
            Hostcall::GetFunction { buf }
        } else {
            Hostcall::ReadStdin { buf }
        };
        let resolved = manifest
            .resolve(&store)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        if let Some(why) = resolved.location_fallback() {
            // Same pages, found the slower way (old store, or records outdated by gc).
            tracing::debug!(
                template = name,
                "located the pages by the pack indexes: {why}"
            );
        }
        let mut frames: Vec<u64> = resolved.data_frames().collect();
        frames.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &gfn in &frames {
            if gfn * PAGE >= mem_size {
                return Err(Error::new(ErrorKind::Damaged, step, "frame past guest RAM"));
            }
            push_run(&mut runs, gfn);
        }
        let data_pages = frames.len() as u64;
        let region_runs = region_runs(&runs, mem_size.div_ceil(REGION) as usize);
        // The page tables, read from the verified pages that hold them.
        let mut table: (u64, Option<&[u8; PAGE_SIZE]>) = (u64::MAX, None);
        let mut entry = |gpa: u64| {
            let gfn = gpa / PAGE;
            if table.0 != gfn {
                table = match resolved.frame_verified(gfn).map_err(|e| e.to_string())? {
                    Some(Frame::Data(p)) => (gfn, Some(p)),
                    _ => (gfn, None),
                };
            }
            let at = (gpa % PAGE) as usize;
            Ok(table.1.map_or(0, |p| {
                u64::from_le_bytes(p[at..at + 8].try_into().unwrap_or_default())
            }))
        };
        let page_tables = page_table_pages(mem_size, &mut entry)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        // W^X: what the guest may write it may not execute; its page tables it writes only
        // through its alias window (hostile store input is refused here, before any restore).
        checks::check_w_xor_x(mem_size, &mut entry)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        // The grant map, read from its verified page.
        let map_gfn = vmm_abi::layout::GRANT_MAP_GPA / PAGE;
        let grant_map = match resolved.frame_verified(map_gfn) {
            Ok(Some(Frame::Data(p))) => {
                let at = (vmm_abi::layout::GRANT_MAP_GPA % PAGE) as usize;
                Some(p[at..at + vmm_abi::layout::GRANT_MAP_BYTES].to_vec())
            }
            Ok(_) => None,
            Err(e) => return Err(Error::new(ErrorKind::Damaged, step, e.to_string())),
        };
        if let Some(map) = &grant_map {
            crate::vm::Grants::none(mem_size)
                .add_map(map)
                .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        }
        let learned = match store.learned_working_set(&manifest) {
            Ok(l) => l,
            Err(why) => {
                // A hint only: the manifest's working set stands.
                tracing::debug!(template = name, "learned working set not used: {why}");
                None
            }
        };
        let stats = LoadStats {
            load_ms: crate::stats::ms(t0.elapsed()),
            data_pages,
            data_regions: region_runs.iter().filter(|r| !r.is_empty()).count() as u64,
        };
        Ok((
            Template {
                store,
                cached_image: config.cached_images,
                parallel_restore: config.parallel_restore,
                name: name.to_string(),
                manifest,
                state,
                device,
                pending,
                resolved,
                runs,
                region_runs,
                data_pages,
                page_tables,
                grant_map,
                image: OnceLock::new(),
                learned,
                learn_calls: Default::default(),
            },
            stats,
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the template was created (a template replaced under the same name differs).
    pub fn created_unix_ms(&self) -> u64 {
        self.manifest.created_unix_ms
    }

    pub fn mem_size(&self) -> u64 {
        self.manifest.mem_size
    }

    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Host memory the template's verified image holds (once built).
    pub fn image_bytes(&self) -> u64 {
        self.data_pages * PAGE
    }

    /// Regions of guest RAM that hold template data.
    pub fn data_regions(&self) -> u64 {
        self.region_runs.iter().filter(|r| !r.is_empty()).count() as u64
    }

    /// What the guest recorded beside its memory (pending hostcall, runtime, provenance).
    pub fn device(&self) -> &DeviceState {
        &self.device
    }

    pub(crate) fn state(&self) -> &VcpuState {
        &self.state
    }

    pub(crate) fn pending(&self) -> Hostcall {
        self.pending
    }

    pub(crate) fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// The frames requests touch, in first-touch order: the ones learned from real
    /// requests (which begin with the trial's), or else the ones the trial request of
    /// `template create` touched.
    pub(crate) fn working_set(&self) -> &[u64] {
        match &self.learned {
            Some(l) => &l.frames,
            None => &self.manifest.working_set,
        }
    }

    /// Whether requests on this template's instances are still worth learning from: fewer
    /// than [`LEARN_REQUESTS`] have added frames, and this loaded template has reported
    /// fewer than that many (a long-running invoker stops asking the store).
    pub(crate) fn learning(&self) -> bool {
        self.learned_requests() < LEARN_REQUESTS
            && self.learn_calls.load(std::sync::atomic::Ordering::Relaxed) < LEARN_REQUESTS
    }

    /// Requests that have added frames to the learned working set (0: nothing learned).
    pub fn learned_requests(&self) -> u32 {
        self.learned.as_ref().map_or(0, |l| l.observations)
    }

    /// Merge `touched` (frames a request on an instance of this template touched) into the
    /// template's learned working set in the store, unless [`LEARN_REQUESTS`] requests
    /// have added frames already or nothing is new; later loads prefetch it. Returns the
    /// frames the learned set now has (None: nothing written). This template keeps the
    /// set it was loaded with.
    pub fn learn(&self, touched: &[u64]) -> Result<Option<usize>, Error> {
        if touched.is_empty() || !self.learning() {
            return Ok(None);
        }
        self.learn_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.store
            .learn_working_set(&self.manifest, touched, LEARN_REQUESTS)
            .map(|l| l.map(|l| l.frames.len()))
            .map_err(|e| Error::new(ErrorKind::Host, "record the learned working set", e))
    }

    /// The guest's grant map (see the field).
    pub(crate) fn grant_map(&self) -> Option<&[u8]> {
        self.grant_map.as_deref()
    }

    /// Bytes of guest RAM its instances get memory slots for when restored.
    pub fn granted_bytes(&self) -> u64 {
        match &self.grant_map {
            Some(map) => {
                let mut g = crate::vm::Grants::fixed(self.mem_size());
                // Checked at load.
                let _ = g.add_map(map);
                g.bytes()
            }
            None => self.mem_size(),
        }
    }

    pub(crate) fn page_tables(&self) -> &[u64] {
        &self.page_tables
    }

    pub(crate) fn regions(&self) -> usize {
        self.region_runs.len()
    }

    /// The runs of data frames in region `r`.
    pub(crate) fn runs_in(&self, r: usize) -> &[(u64, u64)] {
        self.region_runs
            .get(r)
            .and_then(|range| self.runs.get(range.clone()))
            .unwrap_or(&[])
    }

    /// Whether region `r` holds so little data that it is backed by 4 KiB host pages.
    pub(crate) fn sparse(&self, r: usize) -> bool {
        sparse_runs(self.runs_in(r))
    }

    /// The verified memory image, built on first call: from the store's image cache
    /// (`<store>/cache/`, checked against the page ids, shared by processes) when the
    /// template was loaded so, else in a private memory file.
    pub(crate) fn image(&self) -> Result<&Image, Error> {
        if let Some(i) = self.image.get() {
            return Ok(i);
        }
        let image = self.build_image()?;
        // Two first uses at once: one image wins, the other is dropped.
        Ok(self.image.get_or_init(|| image))
    }

    /// Verify every page now and build the memory image that shared instances map and
    /// resets copy from (otherwise built on first need). A long-running invoker calls
    /// this once per template, off the request path.
    pub fn prepare(&self) -> Result<(), Error> {
        self.image().map(|_| ())
    }

    /// Whether restores fill memory on threads of their own.
    pub(crate) fn parallel_restore(&self) -> bool {
        self.parallel_restore
    }

    /// The verified memory image, if it has been built.
    pub(crate) fn built_image(&self) -> Option<&Image> {
        self.image.get()
    }

    fn build_image(&self) -> Result<Image, Error> {
        let step = "build the template's memory image";
        let host = |e: std::io::Error| Error::new(ErrorKind::Host, step, e);
        if self.cached_image {
            let image = self
                .store
                .memory_image(&self.manifest, &self.resolved)
                .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
            if let Some(why) = &image.rejected {
                eprintln!(
                    "vmm: warning: the cached memory image {} did not match template {} ({why}); rebuilt it from the store's verified pages",
                    image.path.display(),
                    self.name
                );
            }
            // SAFETY: a read-only shared mapping of a file the store replaces only by
            // rename (never in place), so its bytes do not change while mapped.
            let map = unsafe { memmap2::Mmap::map(&image.file) }.map_err(host)?;
            return Ok(Image {
                file: image.file,
                map,
            });
        }
        let (file, mut map) = memory_file(&self.name, self.mem_size()).map_err(host)?;
        for &(first, n) in &self.runs {
            for gfn in first..first + n {
                let Some(Frame::Data(p)) = self
                    .resolved
                    .frame_verified(gfn)
                    .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?
                else {
                    continue;
                };
                let at = (gfn * PAGE) as usize;
                map.get_mut(at..at + PAGE_SIZE)
                    .ok_or_else(|| Error::new(ErrorKind::Damaged, step, "frame past guest RAM"))?
                    .copy_from_slice(p);
            }
        }
        Ok(Image {
            file,
            map: map.make_read_only().map_err(host)?,
        })
    }
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

    /// The page-table pages of guest memory `m`.
    fn walk(m: &[u8]) -> Result<Vec<u64>, String> {
        page_table_pages(m.len() as u64, |gpa| {
            let at = gpa as usize;
            Ok(u64::from_le_bytes(m[at..at + 8].try_into().unwrap()))
        })
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
        assert_eq!(walk(&m).unwrap(), vec![pml4, pdpt, pd, pt]);
    }

    #[test]
    fn the_large_page_bit_is_ignored_in_the_root() {
        let mut m = image(8);
        set(&mut m, layout::PML4_GPA, 0, 0x3000 | TABLE | HUGE);
        set(&mut m, 0x3000, 0, 0x4000 | PRESENT);
        assert_eq!(walk(&m).unwrap(), vec![layout::PML4_GPA, 0x3000, 0x4000]);
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
        assert_eq!(walk(&m).unwrap(), vec![layout::PML4_GPA, 0x3000, 0x7000]);
        // Guest RAM that ends before the root: no tables at all.
        assert_eq!(
            walk(&image(layout::PML4_GPA / PAGE)).unwrap(),
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
        assert_eq!(walk(&m).unwrap(), vec![pml4, 0x3000, 0x4000]);
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
        let found = walk(&tree(8174)).unwrap();
        assert_eq!(found.len(), MAX_PAGE_TABLE_PAGES);
        assert!(found.windows(2).all(|w| w[0] < w[1]));
        // One more: refused.
        let e = walk(&tree(8175)).unwrap_err();
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
