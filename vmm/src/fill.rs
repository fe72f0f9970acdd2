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
    /// Copy the 2 MiB regions holding the template's recorded working set before the vCPU
    /// runs; the rest arrives on demand through userfaultfd.
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

/// Fill `mem` from `resolved` according to `strategy`; returns pages copied. Every page is
/// re-hashed against its id on the way. The regions are split between two threads.
pub(crate) fn install(
    mem: &GuestMemory,
    resolved: &Resolved,
    strategy: MemoryStrategy,
    working_set: &[u64],
) -> Result<u64, TemplateError> {
    let per_region = layout::HUGE_PAGE_SIZE / PAGE;
    let mut regions: Vec<u64> = match strategy {
        MemoryStrategy::Lazy => return Ok(0),
        MemoryStrategy::Shared => {
            // Map the working set's pages from the page cache (runs of frames at once).
            let mut frames = working_set.to_vec();
            frames.sort_unstable();
            frames.dedup();
            let mut i = 0;
            while i < frames.len() {
                let mut j = i + 1;
                while j < frames.len() && frames[j] == frames[j - 1] + 1 {
                    j += 1;
                }
                mem.populate_read(frames[i] * PAGE, (j - i) as u64 * PAGE);
                i = j;
            }
            return Ok(0);
        }
        MemoryStrategy::Eager => resolved.data_frames().map(|g| g / per_region).collect(),
        // Whole 2 MiB regions: with MADV_HUGEPAGE, touching one page of a region makes the
        // whole region present (zero-filled), so all its data pages must be copied.
        MemoryStrategy::Prefetch => working_set.iter().map(|g| g / per_region).collect(),
    };
    regions.sort_unstable();
    regions.dedup();
    // Sparse regions may use small pages only where nothing is left to userfaultfd.
    let allow_sparse = strategy == MemoryStrategy::Eager;
    let fill = |part: usize| -> Result<u64, TemplateError> {
        let mut copied = 0;
        for &r in regions.iter().skip(part).step_by(2) {
            let frames = r * per_region..((r + 1) * per_region).min(resolved.frame_count());
            let mut pages = Vec::with_capacity(per_region as usize);
            for gfn in frames {
                if let Some(Frame::Data(p)) = resolved.frame_verified(gfn)? {
                    pages.push((gfn, p));
                }
            }
            if allow_sparse && pages.len() < SPARSE_REGION_PAGES {
                mem.advise_small_pages(r * layout::HUGE_PAGE_SIZE, layout::HUGE_PAGE_SIZE);
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

/// Serves userfaultfd faults from the store until `stop` is set, recording the order in
/// which frames were first touched.
pub(crate) struct FaultServer<'a> {
    pub(crate) uffd: &'a Uffd,
    pub(crate) base: *mut u8,
    pub(crate) resolved: &'a Resolved,
    pub(crate) wake: Waker,
    pub(crate) faults: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) touched: Mutex<Vec<u64>>,
    /// The first damaged page met, if any.
    pub(crate) corrupt: Mutex<Option<snapshot_store::LoadError>>,
}

// SAFETY: `base` is the start of guest RAM, which outlives the server (scoped thread);
// it is only used to compute fault addresses handed to UFFDIO_COPY/ZEROPAGE.
unsafe impl Sync for FaultServer<'_> {}

impl FaultServer<'_> {
    pub(crate) fn serve(&self) -> Result<(), UffdError> {
        while let Some(addr) = self.uffd.next_fault(&self.wake)? {
            let off = (addr - self.base as u64) & !(PAGE - 1);
            let gfn = off / PAGE;
            // SAFETY: `off` lies inside guest RAM: the kernel only reports faults in the
            // registered range, which is exactly guest RAM.
            let dst = unsafe { self.base.add(off as usize) };
            let frame = self.resolved.frame_verified(gfn).unwrap_or_else(|e| {
                // Serve zeros so the guest does not hang; the restore reports the damage.
                if let Ok(mut c) = self.corrupt.lock() {
                    c.get_or_insert(e);
                }
                None
            });
            match frame {
                Some(Frame::Data(p)) => {
                    // SAFETY: `dst` is the faulting page of guest RAM, which is registered
                    // with this userfaultfd; the host holds no reference into guest RAM
                    // while the vCPU runs (GuestMemory reads and writes through copies).
                    unsafe { self.uffd.copy(dst, p)? };
                    self.bytes.fetch_add(PAGE, Ordering::Relaxed);
                }
                // SAFETY: as for the copy above.
                _ => unsafe { self.uffd.zeropage(dst, PAGE as usize)? },
            }
            self.faults.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut t) = self.touched.lock() {
                t.push(gfn);
            }
        }
        Ok(())
    }
}
