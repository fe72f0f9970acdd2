//! Filling a restored VM's RAM from a resolved template: the `--memory` strategies, the
//! installer that copies pages before the vCPU runs, and the userfaultfd server that
//! brings the rest on demand. Every page is re-hashed against its id on the way in.

use crate::memory::GuestMemory;
use crate::snapshot::TemplateError;
use crate::uffd::{Uffd, UffdError, Waker};
use snapshot_store::{Frame, Resolved, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vmm_abi::layout;

const PAGE: u64 = PAGE_SIZE as u64;

/// How guest RAM is filled on restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryStrategy {
    /// Copy every non-zero page before the vCPU runs.
    Eager,
    /// Copy the template's recorded working set before the vCPU runs (whole 2 MiB regions
    /// where it is dense, only its pages where it is sparse); the rest arrives on demand
    /// through userfaultfd.
    Prefetch,
    /// Nothing up front: every page arrives on demand through userfaultfd.
    Lazy,
    /// A copy-on-write mapping of the template's memory image, cached in the store's
    /// `cache/` directory and shared by all instances through the page cache: nothing is
    /// copied, the working set is mapped before the vCPU runs, written pages are copied on
    /// first write.
    Shared,
}

impl MemoryStrategy {
    /// The strategy's name as `vmm restore --memory` and `--json` spell it.
    pub fn name(self) -> &'static str {
        match self {
            MemoryStrategy::Eager => "eager",
            MemoryStrategy::Prefetch => "prefetch",
            MemoryStrategy::Lazy => "lazy",
            MemoryStrategy::Shared => "shared",
        }
    }
}

/// Data frames in a 2 MiB region below which `eager` maps the region with 4 KiB pages: a
/// huge page costs a 2 MiB zero fill, which is not worth it for a handful of pages.
const SPARSE_REGION_PAGES: usize = 32;

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
    /// Copy every data frame (the region becomes one huge page).
    Region(u64),
    /// Map the region with small pages and copy these frames (sorted, in the region).
    Frames(u64, Vec<u64>),
}

/// The regions `strategy` installs before the vCPU runs (none for `lazy` and `shared`).
fn plan(resolved: &Resolved, strategy: MemoryStrategy, working_set: &[u64]) -> Vec<Fill> {
    let per_region = layout::HUGE_PAGE_SIZE / PAGE;
    match strategy {
        MemoryStrategy::Lazy | MemoryStrategy::Shared => Vec::new(),
        MemoryStrategy::Eager => {
            let mut regions: Vec<u64> = resolved.data_frames().map(|g| g / per_region).collect();
            regions.sort_unstable();
            regions.dedup();
            regions.into_iter().map(Fill::Region).collect()
        }
        MemoryStrategy::Prefetch => {
            let mut ws: Vec<u64> = working_set
                .iter()
                .copied()
                .filter(|&g| g < resolved.frame_count())
                .collect();
            ws.sort_unstable();
            ws.dedup();
            ws.chunk_by(|a, b| a / per_region == b / per_region)
                .map(|frames| {
                    let r = frames[0] / per_region;
                    let data = (r * per_region..((r + 1) * per_region).min(resolved.frame_count()))
                        .filter(|&g| matches!(resolved.frame(g), Some(Frame::Data(_))))
                        .count();
                    if frames.len() * SPARSE_WS_COST < data + SPARSE_HUGE_FILL {
                        Fill::Frames(r, frames.to_vec())
                    } else {
                        // With MADV_HUGEPAGE, touching one page of a region makes the whole
                        // region present (zero-filled), so all its data pages are copied.
                        Fill::Region(r)
                    }
                })
                .collect()
        }
    }
}

/// Fill `mem` from `resolved` according to `strategy`; returns pages copied. Every page is
/// re-hashed against its id on the way. The regions are split between two threads.
pub(crate) fn install(
    mem: &GuestMemory,
    resolved: &Resolved,
    strategy: MemoryStrategy,
    working_set: &[u64],
) -> Result<u64, TemplateError> {
    let per_region = layout::HUGE_PAGE_SIZE / PAGE;
    if strategy == MemoryStrategy::Shared {
        // Map the working set's pages from the page cache (runs of frames at once).
        let mut frames = working_set.to_vec();
        frames.sort_unstable();
        frames.dedup();
        for run in frames.chunk_by(|a, b| *b == *a + 1) {
            mem.populate_read(run[0] * PAGE, run.len() as u64 * PAGE);
        }
        return Ok(0);
    }
    let plan = plan(resolved, strategy, working_set);
    // Sparse regions may use small pages only where nothing is left to userfaultfd.
    let allow_sparse = strategy == MemoryStrategy::Eager;
    let fill = |part: usize| -> Result<u64, TemplateError> {
        let mut copied = 0;
        for f in plan.iter().skip(part).step_by(2) {
            let mut pages = Vec::with_capacity(per_region as usize);
            match f {
                Fill::Region(r) => {
                    let frames = r * per_region..((r + 1) * per_region).min(resolved.frame_count());
                    for gfn in frames {
                        if let Some(Frame::Data(p)) = resolved.frame_verified(gfn)? {
                            pages.push((gfn, p));
                        }
                    }
                    if allow_sparse && pages.len() < SPARSE_REGION_PAGES {
                        mem.advise_small_pages(r * layout::HUGE_PAGE_SIZE, layout::HUGE_PAGE_SIZE);
                    }
                }
                Fill::Frames(r, frames) => {
                    mem.advise_small_pages(r * layout::HUGE_PAGE_SIZE, layout::HUGE_PAGE_SIZE);
                    for &gfn in frames {
                        match resolved.frame_verified(gfn)? {
                            Some(Frame::Data(p)) => pages.push((gfn, p)),
                            // A zero frame the function touches: make it present now rather
                            // than through a userfaultfd round trip (~70 µs) later.
                            _ => mem.zero(gfn * PAGE, PAGE)?,
                        }
                    }
                }
            }
            for (gfn, p) in pages {
                mem.write(gfn * PAGE, p)?;
                copied += 1;
            }
        }
        Ok(copied)
    };
    std::thread::scope(|scope| {
        let other = scope.spawn(|| fill(1));
        let mine = fill(0);
        let theirs = other.join().unwrap_or(Err(TemplateError::Internal(
            "a memory installer thread panicked",
        )));
        Ok(mine? + theirs?)
    })
}

/// Frames `prefetch` installs per fault: the run of absent frames around the faulting one
/// inside its aligned group of this many. A fault costs ~70 µs here and the code a
/// function touches beyond its recorded working set comes in runs: a Python template
/// whose trial request differed from the request served took 54 faults with single
/// pages, 29 with groups of 16, 29 with 32 or 64 (the rest lie apart), 9.4 vs 8.9 ms total.
pub(crate) const FAULT_GROUP: u64 = 16;

/// Serves userfaultfd faults from the store until `stop` is set, recording the order in
/// which frames were first touched.
pub(crate) struct FaultServer<'a> {
    pub(crate) uffd: &'a Uffd,
    pub(crate) base: *mut u8,
    pub(crate) resolved: &'a Resolved,
    pub(crate) wake: Waker,
    /// Frames installed per fault: 1 (only the faulting frame, so `touched` records
    /// exactly what the guest touched), or [`FAULT_GROUP`].
    pub(crate) group: u64,
    pub(crate) faults: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) touched: Mutex<Vec<u64>>,
    /// The first damaged page met, if any.
    pub(crate) corrupt: Mutex<Option<snapshot_store::LoadError>>,
}

// SAFETY: `base` is the start of guest RAM, which outlives the server (scoped thread);
// it is only used to compute fault addresses handed to UFFDIO_COPY/ZEROPAGE and mincore.
unsafe impl Sync for FaultServer<'_> {}

impl FaultServer<'_> {
    pub(crate) fn serve(&self) -> Result<(), UffdError> {
        let (mut buf, mut residency) = (Vec::new(), Vec::new());
        while let Some(addr) = self.uffd.next_fault(&self.wake)? {
            let off = (addr - self.base as u64) & !(PAGE - 1);
            let gfn = off / PAGE;
            if self.group <= 1 || !self.serve_group(gfn, &mut buf, &mut residency)? {
                self.serve_one(gfn)?;
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut t) = self.touched.lock() {
                t.push(gfn);
            }
        }
        Ok(())
    }

    /// The page of frame `gfn` (None: a zero frame), re-hashed against its id. A damaged
    /// page is served as zeros so the guest does not hang; the restore reports the damage.
    fn page(&self, gfn: u64) -> Option<&[u8; PAGE_SIZE]> {
        match self.resolved.frame_verified(gfn) {
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
        // SAFETY: `gfn` lies inside guest RAM: the kernel only reports faults in the
        // registered range, which is exactly guest RAM.
        let dst = unsafe { self.base.add((gfn * PAGE) as usize) };
        match self.page(gfn) {
            Some(p) => {
                // SAFETY: `dst` is the faulting page of guest RAM, which is registered
                // with this userfaultfd; the host holds no reference into guest RAM
                // while the vCPU runs (GuestMemory reads and writes through copies).
                unsafe { self.uffd.copy(dst, p)? };
                self.bytes.fetch_add(PAGE, Ordering::Relaxed);
            }
            // SAFETY: as for the copy above.
            None => unsafe { self.uffd.zeropage(dst, PAGE as usize)? },
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
        let end = (first + self.group).min(self.resolved.frame_count());
        if gfn >= end {
            return Ok(false);
        }
        let n = (end - first) as usize;
        residency.clear();
        residency.resize(n, 0);
        // SAFETY: frames [first, end) lie inside guest RAM (end is clamped to its frame
        // count), page aligned; `residency` has one byte per page as mincore requires.
        let r = unsafe {
            libc::mincore(
                self.base.add((first * PAGE) as usize).cast(),
                n * PAGE_SIZE,
                residency.as_mut_ptr(),
            )
        };
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
        buf.clear();
        buf.resize((b - a) * PAGE_SIZE, 0);
        let mut data = 0;
        for (k, dst) in (a..b).zip(buf.chunks_exact_mut(PAGE_SIZE)) {
            if let Some(p) = self.page(first + k as u64) {
                dst.copy_from_slice(p);
                data += 1;
            }
        }
        // SAFETY: the run lies inside guest RAM (registered with this userfaultfd) and was
        // absent a moment ago; only this thread installs pages while the vCPU runs, and a
        // page that appeared since stops the copy, after which the caller installs `gfn`
        // alone (EEXIST tolerated). No Rust reference covers guest RAM meanwhile.
        let dst = unsafe { self.base.add(((first + a as u64) * PAGE) as usize) };
        // SAFETY: as above.
        if !unsafe { self.uffd.copy_all(dst, buf)? } {
            return Ok(false);
        }
        self.bytes.fetch_add(data * PAGE, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot_store::fixtures::{page, TempDir};
    use snapshot_store::Store;

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
        assert!(plan(&r, MemoryStrategy::Lazy, &ws).is_empty());
        assert!(plan(&r, MemoryStrategy::Shared, &ws).is_empty());
    }

    #[test]
    fn eager_plans_each_region_with_data_once_in_order() {
        let dir = TempDir::new();
        let s = store_with(&dir, 4, &layout4());
        let r = resolved(&s, "t");
        // The working set plays no part in eager's plan.
        for ws in [vec![], vec![2 * R + 1, 5]] {
            assert_eq!(
                shown(&plan(&r, MemoryStrategy::Eager, &ws)),
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
            shown(&plan(&r, MemoryStrategy::Eager, &[])),
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
        // Region 2: no data, so small pages while ws × 8 < 256, i.e. ws ≤ 31.
        let sparse2: Vec<u64> = (2 * R + 100..2 * R + 131).collect();
        let dense2: Vec<u64> = (2 * R + 100..2 * R + 132).collect();

        let ws: Vec<u64> = [&sparse0[..], &sparse1, &sparse2].concat();
        assert_eq!(
            shown(&plan(&r, MemoryStrategy::Prefetch, &ws)),
            vec![
                (0, Some(sparse0.clone())),
                (1, Some(sparse1.clone())),
                (2, Some(sparse2.clone())),
            ],
        );
        let ws: Vec<u64> = [&dense0[..], &dense1, &dense2].concat();
        assert_eq!(
            shown(&plan(&r, MemoryStrategy::Prefetch, &ws)),
            vec![(0, None), (1, None), (2, None)],
        );
        // Regions outside the working set are not planned (region 3 holds data).
        let ws: Vec<u64> = [&dense0[..], &sparse2].concat();
        assert_eq!(
            shown(&plan(&r, MemoryStrategy::Prefetch, &ws)),
            vec![(0, None), (2, Some(sparse2))],
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
            shown(&plan(&parent, MemoryStrategy::Prefetch, &ws)),
            vec![(0, Some(ws.clone()))],
        );
        assert_eq!(
            shown(&plan(&child, MemoryStrategy::Prefetch, &ws)),
            vec![(0, None)],
        );
        assert_eq!(
            shown(&plan(&child, MemoryStrategy::Prefetch, &ws[..44])),
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
            shown(&plan(&r, MemoryStrategy::Prefetch, &ws)),
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
            shown(&plan(&r, MemoryStrategy::Prefetch, &twice)),
            vec![(0, Some(once))],
        );
    }
}
