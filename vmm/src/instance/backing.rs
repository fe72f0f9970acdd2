//! How an instance's guest RAM gets the template's pages ([`Backing`]): the fill plan, the
//! installer that copies pages before the vCPU runs, and the userfaultfd server that
//! brings the rest on demand on a thread the instance owns ([`Faults`], stopped on drop).
//! Every page read from the store is re-hashed against its id on the way in.

use super::Template;
use crate::error::{Error, ErrorKind};
use crate::memory::GuestMemory;
use crate::template::{PAGE, REGION};
use crate::uffd::{Uffd, UffdError, Waker};
use snapshot_store::{Frame, LoadError, Resolved, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How an instance's guest RAM is filled from its template.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Its own copy of every data page before the vCPU runs (2 MiB host pages where the
    /// template is dense): no exits on first touches, ~2 MiB per region.
    #[default]
    Eager,
    /// Copy the template's recorded working set before the vCPU runs (whole 2 MiB regions
    /// where it is dense, only its pages where it is sparse); the rest arrives on demand
    /// through userfaultfd.
    Prefetch,
    /// Nothing up front: every page arrives on demand through userfaultfd (and the pages
    /// the guest touches are recorded: a template's working set).
    Lazy,
    /// A copy-on-write mapping of the template's verified memory image, shared by all
    /// instances: an instance holds privately only the pages its guest wrote; the working
    /// set is mapped before the vCPU runs; 4 KiB host pages, so each other page's first
    /// touch costs an exit.
    Shared,
}

impl Backing {
    /// The name `vmm restore --memory` and `--json` use.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Eager => "eager",
            Backing::Prefetch => "prefetch",
            Backing::Lazy => "lazy",
            Backing::Shared => "shared",
        }
    }

    /// Whether pages arrive on demand through userfaultfd.
    pub(crate) fn on_demand(self) -> bool {
        matches!(self, Backing::Prefetch | Backing::Lazy)
    }
}

/// `prefetch` maps a region with 4 KiB pages and copies only its working-set frames when
/// `working set × SPARSE_WS_COST < data frames + SPARSE_HUGE_FILL`; otherwise the region is
/// one huge page with every data frame copied. A huge page costs a 2 MiB zero fill (about
/// `SPARSE_HUGE_FILL` small-page installs) and a copy of each data frame, and no guest exits;
/// a small page costs a 4 KiB fault, its copy and a guest exit on first touch (~4 µs here),
/// about `SPARSE_WS_COST` data-frame copies. Measured on the Python hello template (compiled
/// CPython code in 14 full regions, 2-144 working-set frames each; 4 regions of 3-8 data
/// frames), median of 11 restores: all regions huge 9.4 ms total, 6,838 pages installed;
/// this rule with a fill of 0 / 128 / 256 / 512: 7.1 / 6.5 / 6.1 / 6.9 ms (2,568 / 2,083 /
/// 1,658 / 1,057 pages).
const SPARSE_WS_COST: usize = 8;
const SPARSE_HUGE_FILL: usize = 256;

/// What the installer does with one 2 MiB region.
enum Fill {
    /// Copy every data frame (the region becomes one huge page, unless sparse).
    Region(u64),
    /// Map the region with small pages and copy these frames (sorted, in the region).
    Frames(u64, Vec<u64>),
}

/// The regions `backing` installs before the vCPU runs (none for `lazy` and `shared`).
fn plan(resolved: &Resolved, backing: Backing, working_set: &[u64]) -> Vec<Fill> {
    let per_region = REGION / PAGE;
    match backing {
        Backing::Lazy | Backing::Shared => Vec::new(),
        Backing::Eager => {
            let mut regions: Vec<u64> = resolved.data_frames().map(|g| g / per_region).collect();
            regions.sort_unstable();
            regions.dedup();
            regions.into_iter().map(Fill::Region).collect()
        }
        Backing::Prefetch => {
            let mut ws: Vec<u64> = working_set
                .iter()
                .copied()
                .filter(|&g| g < resolved.frame_count())
                .collect();
            ws.sort_unstable();
            ws.dedup();
            ws.chunk_by(|a, b| a / per_region == b / per_region)
                .filter_map(|frames| {
                    let r = frames[0] / per_region;
                    let data = (r * per_region..((r + 1) * per_region).min(resolved.frame_count()))
                        .filter(|&g| matches!(resolved.frame(g), Some(Frame::Data(_))))
                        .count();
                    // A region without template data is fresh memory, which the kernel
                    // zero-fills on first touch (in 2 MiB pages): nothing to install.
                    if data == 0 {
                        None
                    } else if frames.len() * SPARSE_WS_COST < data + SPARSE_HUGE_FILL {
                        Some(Fill::Frames(r, frames.to_vec()))
                    } else {
                        // With MADV_HUGEPAGE, touching one page of a region makes the whole
                        // region present (zero-filled), so all its data pages are copied.
                        Some(Fill::Region(r))
                    }
                })
                .collect()
        }
    }
}

/// Where installed pages come from: the template's verified image when it has been built
/// (no hashing again), else the store's packs, each page re-hashed against its id.
fn page<'a>(
    template: &'a Template,
    image: Option<&'a [u8]>,
    gfn: u64,
) -> Result<Option<&'a [u8; PAGE_SIZE]>, LoadError> {
    let resolved = template.resolved();
    let Some(image) = image else {
        return Ok(match resolved.frame_verified(gfn)? {
            Some(Frame::Data(p)) => Some(p),
            _ => None,
        });
    };
    if !matches!(resolved.frame(gfn), Some(Frame::Data(_))) {
        return Ok(None);
    }
    let at = (gfn * PAGE) as usize;
    Ok(image
        .get(at..at + PAGE_SIZE)
        .and_then(|p| p.try_into().ok()))
}

/// Fill `mem` from `template` as `backing` asks before the vCPU runs; returns the pages
/// copied. The regions are split between this thread and one more, unless the template's
/// restores run on one thread ([`Config::parallel_restore`](crate::config::Config)).
pub(crate) fn install(
    mem: &GuestMemory,
    template: &Template,
    backing: Backing,
) -> Result<u64, Error> {
    let step = "fill guest memory";
    let host = |e: crate::memory::MemoryError| Error::new(ErrorKind::Host, step, e);
    if backing == Backing::Shared {
        use std::os::fd::AsFd;
        let image = template.image()?;
        // Map the regions that hold data from the image. Populating the working set's pages
        // up front did not pay: for QuickJS hello no faster (13.6 vs 13.4 ms, 5 alternating
        // one-shot restores); for a function allocating 48 MiB per request, served with a
        // restore per request, 65-75 vs 52-58 ms per run (populating the anonymous regions
        // maps the zero page, which the guest's writes must then replace).
        for r in 0..template.regions() {
            if template.runs_in(r).is_empty() {
                continue;
            }
            let gpa = r as u64 * REGION;
            let len = REGION.min(mem.size() - gpa);
            mem.map_file_range(gpa, len, image.file.as_fd())
                .map_err(host)?;
        }
        return Ok(0);
    }
    let resolved = template.resolved();
    let plan = plan(resolved, backing, template.working_set());
    let image = template.built_image().map(|i| &i.map[..]);
    let per_region = REGION / PAGE;
    // Sparse regions may use small pages only where nothing is left to userfaultfd.
    let allow_sparse = backing == Backing::Eager;
    let damaged = |e: LoadError| Error::new(ErrorKind::Damaged, step, e);
    let fill = |part: usize| -> Result<u64, Error> {
        let mut copied = 0;
        for f in plan.iter().skip(part).step_by(2) {
            let mut pages = Vec::with_capacity(per_region as usize);
            match f {
                Fill::Region(r) => {
                    if allow_sparse && template.sparse(*r as usize) {
                        mem.advise_small_pages(r * REGION, REGION);
                    }
                    for &(first, n) in template.runs_in(*r as usize) {
                        // From the verified image: each run with one copy.
                        let run = image.and_then(|i| {
                            i.get((first * PAGE) as usize..((first + n) * PAGE) as usize)
                        });
                        if let Some(run) = run {
                            mem.write(first * PAGE, run).map_err(host)?;
                            copied += n;
                            continue;
                        }
                        for gfn in first..first + n {
                            if let Some(p) = page(template, image, gfn).map_err(damaged)? {
                                pages.push((gfn, p));
                            }
                        }
                    }
                }
                Fill::Frames(r, frames) => {
                    mem.advise_small_pages(r * REGION, REGION);
                    for &gfn in frames {
                        match page(template, image, gfn).map_err(damaged)? {
                            Some(p) => pages.push((gfn, p)),
                            // A zero frame the function touches: make it present now rather
                            // than through a userfaultfd round trip (~70 µs) later.
                            None => mem.zero(gfn * PAGE, PAGE).map_err(host)?,
                        }
                    }
                }
            }
            for (gfn, p) in pages {
                mem.write(gfn * PAGE, p).map_err(host)?;
                copied += 1;
            }
        }
        Ok(copied)
    };
    if plan.len() < 2 || !template.parallel_restore() {
        return fill(0).and_then(|a| Ok(a + fill(1)?));
    }
    std::thread::scope(|scope| {
        let other = scope.spawn(|| fill(1));
        let mine = fill(0);
        let theirs = other.join().unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Host,
                step,
                "a memory installer thread panicked",
            ))
        });
        Ok(mine? + theirs?)
    })
}

/// Frames `prefetch` installs per fault: the run of absent frames around the faulting one
/// inside its aligned group of this many. A fault costs ~70 µs here and the code a
/// function touches beyond its recorded working set comes in runs: a Python template
/// whose trial request differed from the request served took 54 faults with single
/// pages, 29 with groups of 16, 29 with 32 or 64 (the rest lie apart), 9.4 vs 8.9 ms total.
const FAULT_GROUP: u64 = 16;

/// Faults in one 2 MiB region after which `prefetch` installs all of the region's absent
/// frames at once: a request that keeps faulting there uses the region well beyond the
/// working set, and a whole region costs about as much as ten faults.
const REGION_FAULTS: u32 = 4;

/// The guest-physical spans of consecutive 2 MiB regions that hold template data, clamped
/// to guest RAM of `size` bytes.
fn data_region_spans(template: &Template, size: u64) -> Vec<std::ops::Range<u64>> {
    let mut spans: Vec<std::ops::Range<u64>> = Vec::new();
    for r in (0..template.regions()).filter(|&r| !template.runs_in(r).is_empty()) {
        let (start, end) = (r as u64 * REGION, ((r as u64 + 1) * REGION).min(size));
        match spans.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ if start < end => spans.push(start..end),
            _ => {}
        }
    }
    spans
}

/// The userfaultfd server of one instance: a thread that serves its guest RAM's missing
/// pages from the template until the instance is dropped.
pub(crate) struct Faults {
    server: Arc<FaultServer>,
    thread: Option<std::thread::JoinHandle<Result<(), UffdError>>>,
}

/// What [`Faults`] did so far.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FaultCounts {
    pub(crate) faults: u64,
    pub(crate) bytes: u64,
}

impl Faults {
    /// Register `mem` (filled as far as the backing fills it up front: our own writes into
    /// a registered, missing page would wait for a fault handler) and start serving it.
    pub(crate) fn start(
        mem: &GuestMemory,
        template: Arc<Template>,
        backing: Backing,
    ) -> Result<Faults, Error> {
        let step = "serve guest memory on demand";
        let uffd_err = |e: UffdError| Error::new(ErrorKind::Host, step, e);
        let uffd = Uffd::new().map_err(uffd_err)?;
        // Only regions that hold template data go through userfaultfd: the others are
        // fresh memory (zero in the template), which the kernel zero-fills on first touch
        // in 2 MiB pages, as in a cold run. A fault there would cost ~70 µs per 16 frames;
        // a function that allocates 48 MiB took 741 of them (113 ms against 15 ms).
        for range in data_region_spans(&template, mem.size()) {
            uffd.register(
                mem.host_addr().wrapping_add(range.start as usize),
                (range.end - range.start) as usize,
            )
            .map_err(uffd_err)?;
        }
        let server = Arc::new(FaultServer {
            uffd,
            base: mem.host_addr() as usize,
            size: mem.size(),
            template,
            wake: Waker::new().map_err(uffd_err)?,
            // Lazy records exactly what the guest touched: one frame per fault.
            group: if backing == Backing::Prefetch {
                FAULT_GROUP
            } else {
                1
            },
            faults: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            touched: Mutex::new(Vec::new()),
            corrupt: Mutex::new(None),
        });
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-faults".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Faults);
                s.serve()
            })
            .map_err(|e| Error::new(ErrorKind::Host, step, e))?;
        Ok(Faults {
            server,
            thread: Some(thread),
        })
    }

    pub(crate) fn counts(&self) -> FaultCounts {
        FaultCounts {
            faults: self.server.faults.load(Ordering::Relaxed),
            bytes: self.server.bytes.load(Ordering::Relaxed),
        }
    }

    /// The first damaged page served (as zeros, so the guest did not hang), if any.
    pub(crate) fn take_corrupt(&self) -> Option<LoadError> {
        self.server.corrupt.lock().ok().and_then(|mut c| c.take())
    }

    /// The frames the guest touched so far, in first-touch order.
    pub(crate) fn take_touched(&self) -> Vec<u64> {
        self.server
            .touched
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    /// Whether the server stopped on an error (the guest would wait for a page forever:
    /// the watchdog stops it); says why.
    pub(crate) fn failed(&mut self) -> Option<Error> {
        let finished = self.thread.as_ref().is_some_and(|t| t.is_finished());
        if !finished {
            return None;
        }
        let step = "serve guest memory on demand";
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => Some(Error::new(ErrorKind::Host, step, e)),
            Some(Err(_)) => Some(Error::new(
                ErrorKind::Host,
                step,
                "the page fault server panicked",
            )),
            _ => None,
        }
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        self.server.wake.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves userfaultfd faults from the template until woken, recording the order in which
/// frames were first touched.
struct FaultServer {
    uffd: Uffd,
    /// The host address of guest RAM, which outlives the server: the instance that owns
    /// the guest RAM stops the server (drops [`Faults`]) before it unmaps it.
    base: usize,
    size: u64,
    template: Arc<Template>,
    wake: Waker,
    /// Frames installed per fault: 1 (only the faulting frame, so `touched` records
    /// exactly what the guest touched), or [`FAULT_GROUP`].
    group: u64,
    faults: AtomicU64,
    bytes: AtomicU64,
    touched: Mutex<Vec<u64>>,
    /// The first damaged page met, if any.
    corrupt: Mutex<Option<LoadError>>,
}

impl FaultServer {
    fn serve(&self) -> Result<(), UffdError> {
        let (mut buf, mut residency) = (Vec::new(), Vec::new());
        let per_region = REGION / PAGE;
        // Faults per 2 MiB region so far.
        let mut region_faults = vec![0u32; self.size.div_ceil(REGION) as usize];
        while let Some(addr) = self.uffd.next_fault(&self.wake)? {
            let off = addr.wrapping_sub(self.base as u64) & !(PAGE - 1);
            if off >= self.size {
                continue; // not ours: the kernel reports only the registered range
            }
            let gfn = off / PAGE;
            self.record(gfn..gfn + 1, u64::MAX);
            let faults = region_faults.get_mut((gfn / per_region) as usize);
            let dense = faults.is_some_and(|n| {
                *n += 1;
                *n > REGION_FAULTS
            });
            if self.group > 1 && dense {
                // The request uses this region far beyond the working set: bring all
                // of it in at once rather than a fault at a time.
                let first = gfn / per_region * per_region;
                let end = (first + per_region).min(self.template.resolved().frame_count());
                self.install_absent(first, end, gfn, &mut buf, &mut residency)?;
                // Installed and woken above, unless a run's copy stopped before it: then
                // now (a page present already is not an error).
                self.serve_one(gfn)?;
            } else if self.group <= 1 || !self.serve_group(gfn, &mut buf, &mut residency)? {
                self.serve_one(gfn)?;
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Record `frames` but `except` as touched: frames installed together with a faulting
    /// one count as touched too (the guest touches them in the same stride more often than
    /// not; recording only the faulting frame made a learned working set take ten requests
    /// to cover what one request touched).
    fn record(&self, frames: std::ops::Range<u64>, except: u64) {
        if let Ok(mut t) = self.touched.lock() {
            t.extend(frames.filter(|&f| f != except));
        }
    }

    fn at(&self, gfn: u64) -> *mut u8 {
        (self.base + (gfn * PAGE) as usize) as *mut u8
    }

    /// The page of frame `gfn` (None: a zero frame), re-hashed against its id. A damaged
    /// page is served as zeros so the guest does not hang; the invocation reports the
    /// damage.
    fn page(&self, gfn: u64) -> Option<&[u8; PAGE_SIZE]> {
        match self.template.resolved().frame_verified(gfn) {
            Ok(Some(Frame::Data(p))) => Some(p),
            Ok(_) => None,
            Err(e) => {
                if let Ok(mut c) = self.corrupt.lock() {
                    c.get_or_insert(e);
                }
                None
            }
        }
    }

    fn serve_one(&self, gfn: u64) -> Result<(), UffdError> {
        let dst = self.at(gfn);
        match self.page(gfn) {
            Some(p) => {
                // SAFETY: `dst` is the faulting page of guest RAM (checked to lie inside
                // it), which is registered with this userfaultfd; the host holds no
                // reference into guest RAM while the vCPU runs (GuestMemory reads and
                // writes through copies).
                unsafe { self.uffd.copy(dst, p)? };
                self.bytes.fetch_add(PAGE, Ordering::Relaxed);
            }
            // SAFETY: as for the copy above.
            None => unsafe { self.uffd.zeropage(dst, PAGE as usize)? },
        }
        Ok(())
    }

    /// The pages of frames `[first, first + n)` into `buf` (zeros for zero frames);
    /// returns how many hold data.
    fn gather(&self, first: u64, n: usize, buf: &mut Vec<u8>) -> u64 {
        buf.clear();
        buf.resize(n * PAGE_SIZE, 0);
        let mut data = 0;
        for (gfn, dst) in (first..).zip(buf.chunks_exact_mut(PAGE_SIZE)) {
            if let Some(p) = self.page(gfn) {
                dst.copy_from_slice(p);
                data += 1;
            }
        }
        data
    }

    /// Installs every absent frame of `[first, end)` (inside guest RAM), a run per
    /// UFFDIO_COPY. A frame that appeared meanwhile ends its run's copy early.
    fn install_absent(
        &self,
        first: u64,
        end: u64,
        except: u64,
        buf: &mut Vec<u8>,
        residency: &mut Vec<u8>,
    ) -> Result<(), UffdError> {
        let n = end.saturating_sub(first) as usize;
        residency.clear();
        residency.resize(n, 0);
        // SAFETY: frames [first, end) lie inside guest RAM (the caller clamps `end` to its
        // frame count), page aligned; `residency` has one byte per page as mincore requires.
        let r =
            unsafe { libc::mincore(self.at(first).cast(), n * PAGE_SIZE, residency.as_mut_ptr()) };
        if r != 0 {
            return Ok(());
        }
        let mut a = 0;
        while a < n {
            if residency[a] & 1 != 0 {
                a += 1;
                continue;
            }
            let mut b = a + 1;
            while b < n && residency[b] & 1 == 0 {
                b += 1;
            }
            let data = self.gather(first + a as u64, b - a, buf);
            // SAFETY: the run lies inside guest RAM, in a region registered with this
            // userfaultfd (the caller's faulting frame's region), and was absent a moment
            // ago; only this thread installs pages while the vCPU runs. No Rust reference
            // covers guest RAM meanwhile.
            if unsafe { self.uffd.copy_all(self.at(first + a as u64), buf)? } {
                self.bytes.fetch_add(data * PAGE, Ordering::Relaxed);
            }
            self.record(first + a as u64..first + b as u64, except);
            a = b;
        }
        Ok(())
    }

    /// Installs the run of absent frames around `gfn` inside its aligned group of
    /// `self.group` frames with one UFFDIO_COPY. Returns false (nothing to report) when
    /// that could not be done, so the caller installs `gfn` alone.
    fn serve_group(
        &self,
        gfn: u64,
        buf: &mut Vec<u8>,
        residency: &mut Vec<u8>,
    ) -> Result<bool, UffdError> {
        let first = gfn / self.group * self.group;
        let end = (first + self.group).min(self.template.resolved().frame_count());
        if gfn >= end {
            return Ok(false);
        }
        let n = (end - first) as usize;
        residency.clear();
        residency.resize(n, 0);
        // SAFETY: frames [first, end) lie inside guest RAM (end is clamped to its frame
        // count), page aligned; `residency` has one byte per page as mincore requires.
        let r =
            unsafe { libc::mincore(self.at(first).cast(), n * PAGE_SIZE, residency.as_mut_ptr()) };
        let absent = |k: usize| residency[k] & 1 == 0;
        let i = (gfn - first) as usize;
        if r != 0 || !absent(i) {
            return Ok(false);
        }
        let (mut a, mut b) = (i, i + 1);
        while a > 0 && absent(a - 1) {
            a -= 1;
        }
        while b < n && absent(b) {
            b += 1;
        }
        let data = self.gather(first + a as u64, b - a, buf);
        let dst = self.at(first + a as u64);
        // SAFETY: the run lies inside guest RAM (registered with this userfaultfd) and was
        // absent a moment ago; only this thread installs pages while the vCPU runs, and a
        // page that appeared since stops the copy, after which the caller installs `gfn`
        // alone (EEXIST tolerated). No Rust reference covers guest RAM meanwhile.
        if !unsafe { self.uffd.copy_all(dst, buf)? } {
            return Ok(false);
        }
        self.bytes.fetch_add(data * PAGE, Ordering::Relaxed);
        self.record(first + a as u64..first + b as u64, gfn);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot_store::fixtures::{page, TempDir};
    use snapshot_store::Store;
    use vmm_abi::layout;

    /// Frames per 2 MiB region.
    const R: u64 = layout::HUGE_PAGE_SIZE / PAGE;

    /// A plan in a comparable form: (region, None) for `Fill::Region`, (region, Some(frames))
    /// for `Fill::Frames`.
    fn shown(plan: &[Fill]) -> Vec<(u64, Option<Vec<u64>>)> {
        plan.iter()
            .map(|f| match f {
                Fill::Region(r) => (*r, None),
                Fill::Frames(r, frames) => (*r, Some(frames.clone())),
            })
            .collect()
    }

    /// A store at `dir` holding `name`, a base template of `regions` 2 MiB regions whose
    /// data frames are `data` (each a distinct non-zero page) and every other frame zero.
    fn store_with(dir: &TempDir, regions: u64, data: &[u64]) -> Store {
        let mut s = Store::create_or_open(dir.path()).unwrap();
        let mut w = s
            .begin_template("t", None, regions * layout::HUGE_PAGE_SIZE)
            .unwrap();
        for &g in data {
            w.put_page(g, &page(g + 1)).unwrap();
        }
        w.commit().unwrap();
        s
    }

    fn resolved(s: &Store, name: &str) -> Resolved {
        s.load(name).unwrap().resolve(s).unwrap()
    }

    /// Four regions: 0 holds 400 data frames, 1 holds 8, 2 none, 3 holds 300.
    fn layout4() -> Vec<u64> {
        (0..400)
            .chain(R + 100..R + 108)
            .chain(3 * R + 10..3 * R + 310)
            .collect()
    }

    #[test]
    fn lazy_and_shared_plan_nothing() {
        let dir = TempDir::new();
        let s = store_with(&dir, 4, &layout4());
        let r = resolved(&s, "t");
        let ws: Vec<u64> = (0..600).collect();
        assert!(plan(&r, Backing::Lazy, &ws).is_empty());
        assert!(plan(&r, Backing::Shared, &ws).is_empty());
    }

    #[test]
    fn eager_plans_each_region_with_data_once_in_order() {
        let dir = TempDir::new();
        let s = store_with(&dir, 4, &layout4());
        let r = resolved(&s, "t");
        // The working set plays no part in eager's plan.
        for ws in [vec![], vec![2 * R + 1, 5]] {
            assert_eq!(
                shown(&plan(&r, Backing::Eager, &ws)),
                vec![(0, None), (1, None), (3, None)],
            );
        }
    }

    #[test]
    fn eager_follows_the_parent_chain() {
        let dir = TempDir::new();
        let mut s = store_with(&dir, 4, &layout4());
        // The child zeroes every data frame of region 1 and writes one frame in region 2.
        let mut w = s
            .begin_template("child", Some("t"), 4 * layout::HUGE_PAGE_SIZE)
            .unwrap();
        for g in R + 100..R + 108 {
            w.set_zero(g).unwrap();
        }
        w.put_page(2 * R + 7, &page(9999)).unwrap();
        w.commit().unwrap();
        let r = resolved(&s, "child");
        assert_eq!(
            shown(&plan(&r, Backing::Eager, &[])),
            vec![(0, None), (2, None), (3, None)],
        );
    }

    #[test]
    fn prefetch_sparse_and_dense_regions() {
        let dir = TempDir::new();
        let s = store_with(&dir, 4, &layout4());
        let r = resolved(&s, "t");
        // Region 0: 400 data frames, so small pages while ws × 8 < 400 + 256, i.e. ws ≤ 81.
        let sparse0: Vec<u64> = (0..81).map(|i| i * 5).collect();
        let dense0: Vec<u64> = (0..82).map(|i| i * 5).collect();
        // Region 1: 8 data frames, so small pages while ws × 8 < 8 + 256, i.e. ws ≤ 32
        // (working-set frames need not hold data).
        let sparse1: Vec<u64> = (R..R + 32).collect();
        let dense1: Vec<u64> = (R..R + 33).collect();
        // Region 2: no data: fresh memory that the kernel zero-fills, never planned,
        // however many of its frames the working set has.
        let sparse2: Vec<u64> = (2 * R + 100..2 * R + 131).collect();
        let dense2: Vec<u64> = (2 * R..3 * R).collect();

        let ws: Vec<u64> = [&sparse0[..], &sparse1, &sparse2].concat();
        assert_eq!(
            shown(&plan(&r, Backing::Prefetch, &ws)),
            vec![(0, Some(sparse0.clone())), (1, Some(sparse1.clone()))],
        );
        let ws: Vec<u64> = [&dense0[..], &dense1, &dense2].concat();
        assert_eq!(
            shown(&plan(&r, Backing::Prefetch, &ws)),
            vec![(0, None), (1, None)],
        );
        // Regions outside the working set are not planned (region 3 holds data).
        let ws: Vec<u64> = [&dense0[..], &sparse1].concat();
        assert_eq!(
            shown(&plan(&r, Backing::Prefetch, &ws)),
            vec![(0, None), (1, Some(sparse1))],
        );
    }

    #[test]
    fn prefetch_counts_data_frames_of_the_resolved_chain() {
        // Region 0 of `t` holds 400 data frames: 45 working-set frames leave it sparse
        // (45 × 8 = 360 < 400 + 256). The child zeroes 300 of them, so 100 are left and
        // the same 45 frames make it dense (360 ≥ 100 + 256), while 44 stay sparse (352).
        let dir = TempDir::new();
        let mut s = store_with(&dir, 4, &layout4());
        let mut w = s
            .begin_template("child", Some("t"), 4 * layout::HUGE_PAGE_SIZE)
            .unwrap();
        for g in 100..400 {
            w.set_zero(g).unwrap();
        }
        w.commit().unwrap();
        let ws: Vec<u64> = (0..45).collect();
        let parent = resolved(&s, "t");
        let child = resolved(&s, "child");
        assert_eq!(
            shown(&plan(&parent, Backing::Prefetch, &ws)),
            vec![(0, Some(ws.clone()))],
        );
        assert_eq!(
            shown(&plan(&child, Backing::Prefetch, &ws)),
            vec![(0, None)],
        );
        assert_eq!(
            shown(&plan(&child, Backing::Prefetch, &ws[..44])),
            vec![(0, Some(ws[..44].to_vec()))],
        );
    }

    #[test]
    fn prefetch_sorts_dedups_and_ignores_frames_past_the_template() {
        let dir = TempDir::new();
        let s = store_with(&dir, 4, &layout4());
        let r = resolved(&s, "t");
        let frames = r.frame_count();
        assert_eq!(frames, 4 * R);
        // First-touch order, repeats, and frames beyond guest RAM (in a region that would
        // be the fifth, and far away).
        let ws = [
            3 * R + 20,
            7,
            3,
            7,
            R + 101,
            3,
            frames,
            frames + 1,
            1 << 40,
            R + 100,
        ];
        assert_eq!(
            shown(&plan(&r, Backing::Prefetch, &ws)),
            vec![
                (0, Some(vec![3, 7])),
                (1, Some(vec![R + 100, R + 101])),
                (3, Some(vec![3 * R + 20])),
            ],
        );
        // Repeats do not count towards density: 81 distinct frames of region 0, each
        // twice, stay sparse (162 distinct frames would not).
        let once: Vec<u64> = (0..81).map(|i| i * 3).collect();
        let twice: Vec<u64> = once.iter().chain(once.iter()).copied().collect();
        assert_eq!(
            shown(&plan(&r, Backing::Prefetch, &twice)),
            vec![(0, Some(once))],
        );
    }
}
