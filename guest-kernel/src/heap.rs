//! The guest kernel's heap allocator: a two-level segregated-fit allocator (TLSF-like)
//! with boundary tags, O(1) allocation and free, immediate coalescing and in-place
//! `realloc`.
//!
//! Plain Rust over a byte range, so the host tests run it over a `Vec<u8>`; the kernel
//! runs it over `[HEAP_START, module_gpa)`. Every page it writes ends up in the guest's
//! snapshots, which cost per 2 MiB region that holds data: see the placement policy.
//!
//! # Block layout
//!
//! Every block starts with an 8-byte header at an address `≡ 8 (mod 16)`, so payloads
//! are 16-byte aligned. Block sizes are multiples of 16 and at least [`MIN_BLOCK`].
//!
//! ```text
//! used:  [size|USED|PREV_USED] [payload ........................................]
//! free:  [size|     PREV_USED] [next free] [prev free] [...unused...] [size footer]
//! ```
//!
//! A used block has no footer: its successor's `PREV_USED` bit says so, and only a free
//! predecessor's footer is ever read. The blocks tile `[lo, top)`: the lowest block has
//! `PREV_USED` set, so that coalescing stops there, and `top` is an address the heap
//! compares with, never a header it writes. Neither the lowest nor the last block is ever
//! free.
//!
//! # Bins
//!
//! Free blocks below 1 KiB sit in exact bins (one per 16 bytes); larger ones in 8
//! sub-bins per power of two. A bitmap finds the first non-empty bin that is guaranteed
//! to fit in O(1); if none, and the untouched space (see below) cannot take the request
//! either, the one bin that may hold a fitting block is scanned, so an allocation fails
//! only when no free block is large enough.
//!
//! # Placement policy (few 2 MiB regions, growth in place)
//!
//! [`Heap::init`] writes nothing: the heap starts empty at the **split**, a 2 MiB boundary
//! at most `len / 8` and [`LOW_PART_MAX`] above the start. The blocks then grow away from
//! the split in both directions, each side only as far as its data goes:
//!
//! ```text
//! start     lo                       split                          top                end
//! [ untouched | small | holes | small |  L  |  L  | linear memory  | untouched ........]
//!              <- the bottom frontier           the top frontier ->
//! ```
//!
//! * Any request first reuses a free block from the bins (a hole left by a free): the
//!   smallest that fits (TLSF). A large request takes its low end; a small one its high
//!   end when the hole is at least [`SPLIT_HIGH_SLACK`] larger (so that the rest stays in
//!   one piece), else its low end.
//! * Without a fitting hole, a **small** request (an allocation below [`LARGE_ALLOC`], or a
//!   `realloc` that moves a block to a size below [`LARGE_REQUEST`]) is carved just below
//!   `lo`, and a **large** one (an allocation of at least [`LARGE_ALLOC`], or a `realloc`
//!   that moves a block and grows it to at least [`LARGE_REQUEST`]) just above the last
//!   block, moving the end up. So the block allocated last on the large side is
//!   followed by untouched space and `realloc` grows it in place by moving the end:
//!   a wasm linear memory allocated there grows without a copy. Blocks that start smaller
//!   and grow later (a compiler's buffers, a wasm memory of a page or two) are placed as
//!   small ones and move to the large side on the first growth that cannot be done in
//!   place (one copy of less than [`LARGE_ALLOC`] bytes).
//! * A side whose space is used up takes the other side's: a small request above the
//!   last block, a large one below `lo`. The heap stays one contiguous range of blocks.
//! * A free block that reaches `lo` or `top` is given back to the untouched space.
//!
//! Only the blocks between the two frontiers are ever written, so the heap's data sits in
//! `[lo, top)`: a few MiB around the split.
//!
//! # Granted memory
//!
//! With a grant function ([`Heap::set_grant`]) the heap touches only memory it was granted:
//! before a frontier moves past the granted range `[glo, ghi)` (whole [`GRANT_ALIGN`]
//! regions, one contiguous range around the split, since the blocks are), it asks for a
//! larger one, with room to spare in the direction of growth (a quarter of the range's
//! size, between [`GRANT_MIN_STEP`] and [`GRANT_MAX_STEP`]) so that few requests are
//! needed while little is granted that is never used. A refused grant makes the
//! allocation fail like exhaustion.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

const USED: usize = 1;
const PREV_USED: usize = 2;
const FLAGS: usize = USED | PREV_USED;
const HDR: usize = 8;
/// Header + two free-list links + footer.
pub const MIN_BLOCK: usize = 32;
const ALIGN: usize = 16;

const SMALL_LIMIT: usize = 1024;
const SMALL_BINS: usize = SMALL_LIMIT / ALIGN; // 64
const SUB_BITS: u32 = 3;
const SUB_BINS: usize = 1 << SUB_BITS; // 8
const FIRST_LARGE_LOG: u32 = 10; // 1 KiB
const NBINS: usize = SMALL_BINS + (usize::BITS - FIRST_LARGE_LOG) as usize * SUB_BINS;
const NWORDS: usize = NBINS.div_ceil(64);

/// A `realloc` that has to move a block and grows it to at least this many bytes places
/// it as a large block (see the module docs).
pub const LARGE_REQUEST: usize = 64 * 1024;
/// Allocations of at least this many bytes are placed as large blocks (wasm linear
/// memories, big buffers); smaller ones as small blocks (see the module docs).
pub const LARGE_ALLOC: usize = 1024 * 1024;
/// A free block at least this much larger than a small request gives the request its
/// high end (see the module docs).
const SPLIT_HIGH_SLACK: usize = 1024 * 1024;
/// Most bytes below the split (see the module docs).
pub const LOW_PART_MAX: usize = 16 << 20;
/// The split is aligned to this (the guest's large-page size), so that the small and the
/// large side each fill whole regions.
const SPLIT_ALIGN: usize = 2 << 20;

/// Granted memory comes in regions of this size (the VMM's memory slots; see the module
/// docs).
pub const GRANT_ALIGN: usize = 2 << 20;
/// Least room a grant leaves beyond what was asked for.
pub const GRANT_MIN_STEP: usize = 2 << 20;
/// Most room a grant leaves beyond what was asked for.
pub const GRANT_MAX_STEP: usize = 16 << 20;

/// Asked to make `[lo, hi)` (whole regions) accessible; false if it cannot.
pub type GrantFn = fn(usize, usize) -> bool;

/// Bin index of a free block of `size` bytes (the bin whose range contains it).
fn bin_floor(size: usize) -> usize {
    if size < SMALL_LIMIT {
        size / ALIGN
    } else {
        let log = usize::BITS - 1 - size.leading_zeros();
        let sub = (size >> (log - SUB_BITS)) & (SUB_BINS - 1);
        SMALL_BINS + (log - FIRST_LARGE_LOG) as usize * SUB_BINS + sub
    }
}

/// The first bin all of whose blocks are at least `size` bytes (may be `NBINS`).
fn bin_ceil(size: usize) -> usize {
    if size < SMALL_LIMIT {
        return size.div_ceil(ALIGN);
    }
    let log = usize::BITS - 1 - size.leading_zeros();
    let step = 1usize << (log - SUB_BITS);
    if size & (step - 1) == 0 {
        bin_floor(size)
    } else {
        bin_floor(size) + 1
    }
}

/// The split (a header address) of a heap whose headers may lie in `[start, end]`: 8
/// bytes below a 2 MiB boundary at most `len / 8` and [`LOW_PART_MAX`] above `start` and
/// at least half that, so that the payload of the first large block starts at the boundary;
/// `start` (no bottom side) for a heap under 16 MiB.
fn split_point(start: usize, end: usize) -> usize {
    let low = ((end - start) / 8).min(LOW_PART_MAX);
    if low < SPLIT_ALIGN {
        return start;
    }
    let boundary = (start + low) & !(SPLIT_ALIGN - 1);
    if boundary < start + low / 2 {
        return start;
    }
    boundary - HDR
}

/// Block size for a payload of `n` bytes, or `None` on overflow.
fn block_size(n: usize) -> Option<usize> {
    let s = n.checked_add(HDR + ALIGN - 1)? & !(ALIGN - 1);
    Some(s.max(MIN_BLOCK))
}

/// The allocator state. Not thread-safe by itself; [`LockedHeap`] wraps it.
pub struct Heap {
    bitmap: [u64; NWORDS],
    bins: [usize; NBINS],
    /// Lowest header address the heap may use and the highest end of a block (both
    /// ≡ 8 mod 16).
    start: usize,
    end: usize,
    /// Header of the lowest block (`top` when there is none) and the end of the last one:
    /// the blocks tile `[lo, top)`; `[start, lo)` and `[top, end)` are untouched. Nothing
    /// is stored at `top`: code that looks at a block's successor compares it with `top`.
    lo: usize,
    top: usize,
    /// Where `lo` and `top` started (see the module docs).
    split: usize,
    used: usize,
    /// See [`Heap::set_grant`]; `glo == ghi` when nothing is granted yet.
    grant: Option<GrantFn>,
    glo: usize,
    ghi: usize,
}

impl Heap {
    /// An empty heap (every allocation fails until [`Heap::init`]).
    pub const fn empty() -> Self {
        Heap {
            bitmap: [0; NWORDS],
            bins: [0; NBINS],
            start: 0,
            end: 0,
            lo: 0,
            top: 0,
            split: 0,
            used: 0,
            grant: None,
            glo: 0,
            ghi: 0,
        }
    }

    /// Take over `[start, start + len)`. Writes nothing.
    ///
    /// # Safety
    /// The range must be valid, writable memory owned by this heap alone for as long as
    /// the heap (and anything allocated from it) is used; `init` is called at most once.
    pub unsafe fn init(&mut self, start: *mut u8, len: usize) {
        let range = start as usize;
        let Some(range_end) = range.checked_add(len) else {
            return;
        };
        // Headers at ≡ 8 mod 16, so blocks also end there.
        let start = (range + HDR).next_multiple_of(ALIGN) - HDR;
        if range_end < start + MIN_BLOCK + HDR {
            return;
        }
        let end = ((range_end - HDR) & !(ALIGN - 1)) + HDR;
        if end < start + MIN_BLOCK {
            return;
        }
        let split = split_point(start, end);
        self.start = start;
        self.end = end;
        self.split = split;
        self.lo = split;
        self.top = split;
    }

    /// Touch only memory that `grant` made accessible (see the module docs); without a
    /// grant function all of the heap's range is.
    pub fn set_grant(&mut self, grant: GrantFn) {
        self.grant = Some(grant);
    }

    /// The range granted so far (empty without a grant function or before any block).
    pub fn granted(&self) -> core::ops::Range<usize> {
        self.glo..self.ghi
    }

    /// Make `[a, b)` accessible before the heap writes to it: true if it already is or
    /// the grant function granted a range that holds it.
    fn ensure(&mut self, a: usize, b: usize) -> bool {
        let Some(grant) = self.grant else {
            return true;
        };
        if a >= b || (a >= self.glo && b <= self.ghi) {
            return true;
        }
        let region = GRANT_ALIGN;
        let floor = self.start & !(region - 1);
        let ceil = match self.end.checked_next_multiple_of(region) {
            Some(c) => c,
            None => return false,
        };
        let (a, b) = (a & !(region - 1), b.next_multiple_of(region));
        let (mut na, mut nb, have) = if self.glo == self.ghi {
            (a, b, 0)
        } else {
            (a.min(self.glo), b.max(self.ghi), self.ghi - self.glo)
        };
        let step = (have / 4)
            .clamp(GRANT_MIN_STEP, GRANT_MAX_STEP)
            .next_multiple_of(region);
        if self.glo == self.ghi || na < self.glo {
            na = na.saturating_sub(step).max(floor);
        }
        if self.glo == self.ghi || nb > self.ghi {
            nb = nb.saturating_add(step).min(ceil);
        }
        if !grant(na, nb) {
            return false;
        }
        self.glo = na;
        self.ghi = nb;
        true
    }

    /// Usable bytes managed.
    pub fn size(&self) -> usize {
        self.end - self.start
    }

    /// Bytes in used blocks (headers included).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Where the two sides of the heap meet (see the module docs); the heap's start for a
    /// heap too small to have a bottom side.
    pub fn split(&self) -> usize {
        self.split
    }

    /// The address range that holds the blocks. Nothing outside it is written (freed
    /// blocks given back to the untouched space keep what they held).
    pub fn span(&self) -> core::ops::Range<usize> {
        self.lo..self.top
    }

    /// Allocate; null when no free block fits (never panics).
    pub fn alloc(&mut self, layout: Layout) -> *mut u8 {
        // SAFETY: the heap's invariants (every header, link and footer consistent) hold
        // between public calls; the helpers keep them.
        unsafe { self.alloc_placed(layout.size(), layout.align(), layout.size() >= LARGE_ALLOC) }
    }

    /// Free a block returned by [`Heap::alloc`]/[`Heap::realloc`].
    ///
    /// # Safety
    /// `p` came from this heap and was not freed yet.
    pub unsafe fn dealloc(&mut self, p: *mut u8) {
        // SAFETY: per the contract `p - 8` is the header of a used block of this heap.
        unsafe {
            let mut h = p as usize - HDR;
            let w = word(h);
            let mut size = w & !FLAGS;
            self.used -= size;
            let next = h + size;
            if next != self.top && word(next) & USED == 0 {
                let nsize = word(next) & !FLAGS;
                self.remove_free(next, nsize);
                size += nsize;
            }
            if w & PREV_USED == 0 {
                let psize = word(h - HDR);
                h -= psize;
                self.remove_free(h, psize);
                size += psize;
            }
            self.release(h, size);
        }
    }

    /// Resize a block, in place when possible.
    ///
    /// # Safety
    /// `p` came from this heap with `layout` and was not freed yet.
    pub unsafe fn realloc(&mut self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(need) = block_size(new_size) else {
            return ptr::null_mut();
        };
        // SAFETY: per the contract `p - 8` is the header of a used block of this heap.
        unsafe {
            let h = p as usize - HDR;
            let size = word(h) & !FLAGS;
            if need <= size {
                self.shrink(h, size, need);
                return p;
            }
            let next = h + size;
            if next == self.top {
                // The last block: move the end up.
                if h.checked_add(need).is_some_and(|e| e <= self.end) && self.ensure(next, h + need)
                {
                    set_size_keep_flags(h, need);
                    self.top = h + need;
                    self.used += need - size;
                    return p;
                }
            } else {
                let nw = word(next);
                if nw & USED == 0 && size + (nw & !FLAGS) >= need {
                    let nsize = nw & !FLAGS;
                    self.remove_free(next, nsize);
                    self.used += nsize;
                    set_size_keep_flags(h, size + nsize);
                    mark_prev_used(h + size + nsize, true);
                    self.shrink(h, size + nsize, need);
                    return p;
                }
            }
            // Growing past LARGE_REQUEST: it may keep growing, so give it room after it.
            let new = self.alloc_placed(new_size, layout.align(), new_size >= LARGE_REQUEST);
            if !new.is_null() {
                ptr::copy_nonoverlapping(p, new, layout.size().min(new_size));
                self.dealloc(p);
            }
            new
        }
    }

    // --- internals --------------------------------------------------------------

    /// Allocate `n` bytes aligned to `align`, placed as a large or a small block.
    unsafe fn alloc_placed(&mut self, n: usize, align: usize, large: bool) -> *mut u8 {
        let align = align.max(ALIGN);
        let Some(need) = block_size(n) else {
            return ptr::null_mut();
        };
        let search = if align == ALIGN {
            need
        } else {
            match need.checked_add(align + MIN_BLOCK) {
                Some(s) => s,
                None => return ptr::null_mut(),
            }
        };
        // SAFETY: invariants hold (see `alloc`).
        unsafe {
            // A hole that surely fits, else untouched space, else a hole that may fit: O(1)
            // unless the heap is nearly full.
            let hole = match self.find_fit(search) {
                Some(b) => Some(b),
                None => {
                    let h = if large {
                        self.carve_top(need, align)
                            .or_else(|| self.carve_bottom(need, align))
                    } else {
                        self.carve_bottom(need, align)
                            .or_else(|| self.carve_top(need, align))
                    };
                    if let Some(h) = h {
                        return (h + HDR) as *mut u8;
                    }
                    self.find_scan(search)
                }
            };
            if let Some((h, size)) = hole {
                self.remove_free(h, size);
                // The placement picks a window of `search` bytes; the block lies in it.
                let w = if !large && size - search >= SPLIT_HIGH_SLACK {
                    h + size - search
                } else {
                    h
                };
                let mut payload = (w + HDR).next_multiple_of(align);
                if payload - HDR != h && payload - HDR - h < MIN_BLOCK {
                    payload = (h + HDR + MIN_BLOCK).next_multiple_of(align);
                }
                self.carve(h, size, payload - HDR, need);
                return payload as *mut u8;
            }
            ptr::null_mut()
        }
    }

    /// Mark `[at, at + need)` of free block `h` (already unlinked, `size` bytes) used,
    /// returning the parts before and after it to the free lists. The lead `at - h` is 0 or
    /// at least [`MIN_BLOCK`] and `at + need <= h + size`; a tail too small for a block
    /// stays with the used one.
    unsafe fn carve(&mut self, h: usize, size: usize, at: usize, need: usize) {
        let lead = at - h;
        let mut tail = size - lead - need;
        let mut used = need;
        if tail < MIN_BLOCK {
            used += tail;
            tail = 0;
        }
        // SAFETY: `h..h+size` is an unlinked free block; `at`, `at + used` lie inside it or
        // are its successor's header. Neither part touches a frontier: a free block never
        // starts at `lo` nor ends at `top`.
        unsafe {
            let prev = if lead > 0 {
                // The header of `h` keeps its PREV_USED bit; insert_free sets the size.
                self.insert_free(h, lead);
                0
            } else {
                word(h) & PREV_USED
            };
            set_word(at, used | USED | prev);
            if tail > 0 {
                set_word(at + used, PREV_USED);
                self.insert_free(at + used, tail);
            } else {
                mark_prev_used(at + used, true);
            }
        }
        self.used += used;
    }

    /// A block of at least `need` bytes right above the last one (the end moves up), its
    /// payload aligned to `align`: its header, or `None` when it does not fit.
    unsafe fn carve_top(&mut self, need: usize, align: usize) -> Option<usize> {
        let s = self.top;
        let mut payload = (s + HDR).next_multiple_of(align);
        if payload - HDR != s && payload - HDR - s < MIN_BLOCK && s != self.lo {
            payload = (s + HDR + MIN_BLOCK).next_multiple_of(align);
        }
        let h = payload - HDR;
        let new_end = h.checked_add(need)?;
        if new_end > self.end || !self.ensure(s, new_end) {
            return None;
        }
        // SAFETY: `[s, new_end)` lies in `[start, end)`, untouched space above the blocks.
        unsafe {
            let prev = if h == s {
                // The last block is used (or there is none).
                PREV_USED
            } else if s == self.lo {
                // No blocks yet: the alignment gap stays untouched space below `lo`.
                self.lo = h;
                PREV_USED
            } else {
                // The alignment gap becomes a free block after the (used) last block.
                set_word(s, PREV_USED);
                self.insert_free(s, h - s);
                0
            };
            set_word(h, need | USED | prev);
        }
        self.top = new_end;
        self.used += need;
        Some(h)
    }

    /// A block of at least `need` bytes right below the lowest one (`lo` moves down), its
    /// payload aligned to `align`: its header, or `None` when it does not fit.
    unsafe fn carve_bottom(&mut self, need: usize, align: usize) -> Option<usize> {
        let want = self.lo.checked_sub(need)?;
        // Aligning down: the block absorbs the gap up to `lo`.
        let h = ((want + HDR) & !(align - 1)).checked_sub(HDR)?;
        if h < self.start || !self.ensure(h, self.lo) {
            return None;
        }
        let size = self.lo - h;
        // SAFETY: `[h, lo)` lies in `[start, lo)`, untouched space. The block at `lo` (if
        // any) already has PREV_USED set, and its new predecessor is used.
        unsafe { set_word(h, size | USED | PREV_USED) };
        self.lo = h;
        self.used += size;
        Some(h)
    }

    /// Free `[h, h + size)` (already coalesced with free neighbours, unlinked): give it
    /// back to the untouched space when it reaches a frontier, else to the free lists. An
    /// empty heap starts again at the split.
    unsafe fn release(&mut self, h: usize, size: usize) {
        // SAFETY: `h` is the header of the block being freed; its predecessor is used (or
        // it is the lowest block) and so is its successor (or it is the last block).
        unsafe {
            if h + size == self.top {
                self.top = h;
                if self.lo == h {
                    self.lo = self.split;
                    self.top = self.split;
                }
            } else if h == self.lo {
                self.lo = h + size;
                mark_prev_used(self.lo, true);
            } else {
                self.insert_free(h, size);
            }
        }
    }

    /// Cut used block `h` of `size` bytes down to `need`, freeing the tail if worth it.
    unsafe fn shrink(&mut self, h: usize, size: usize, need: usize) {
        if size - need < MIN_BLOCK {
            return;
        }
        // SAFETY: `h` is a used block of `size` bytes; the tail becomes its own block.
        unsafe {
            set_size_keep_flags(h, need);
            let tail = h + need;
            let mut tsize = size - need;
            self.used -= tsize;
            let next = h + size;
            if next != self.top && word(next) & USED == 0 {
                let nsize = word(next) & !FLAGS;
                self.remove_free(next, nsize);
                tsize += nsize;
            }
            set_word(tail, PREV_USED);
            self.release(tail, tsize);
        }
    }

    /// A free block of at least `need` bytes from the bins that surely fit: (header, size).
    fn find_fit(&self, need: usize) -> Option<(usize, usize)> {
        let b = self.first_nonempty(bin_ceil(need))?;
        let h = self.bins[b];
        // SAFETY: a linked free block has a valid header.
        Some((h, unsafe { word(h) } & !FLAGS))
    }

    /// A free block of at least `need` bytes in the bin below the guaranteed-fit ones
    /// (a linear scan of that bin: the last resort).
    fn find_scan(&self, need: usize) -> Option<(usize, usize)> {
        let b = bin_floor(need);
        if b < bin_ceil(need) && b < NBINS {
            let mut h = self.bins[b];
            while h != 0 {
                // SAFETY: a linked free block has a valid header and link words.
                unsafe {
                    let s = word(h) & !FLAGS;
                    if s >= need {
                        return Some((h, s));
                    }
                    h = word(h + HDR);
                }
            }
        }
        None
    }

    fn first_nonempty(&self, from: usize) -> Option<usize> {
        if from >= NBINS {
            return None;
        }
        let mut w = from / 64;
        let mut bits = self.bitmap[w] & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
            w += 1;
            if w >= NWORDS {
                return None;
            }
            bits = self.bitmap[w];
        }
    }

    /// Make `h` a free block of `size` bytes (keeping its PREV_USED bit), link it and
    /// clear its successor's PREV_USED bit.
    unsafe fn insert_free(&mut self, h: usize, size: usize) {
        let b = bin_floor(size);
        // SAFETY: `h..h+size` is a block of this heap no longer in any list.
        unsafe {
            let prev_used = word(h) & PREV_USED;
            set_word(h, size | prev_used);
            set_word(h + size - HDR, size);
            let head = self.bins[b];
            set_word(h + HDR, head);
            set_word(h + 2 * HDR, 0);
            if head != 0 {
                set_word(head + 2 * HDR, h);
            }
            mark_prev_used(h + size, false);
        }
        self.bins[b] = h;
        self.bitmap[b / 64] |= 1 << (b % 64);
    }

    unsafe fn remove_free(&mut self, h: usize, size: usize) {
        let b = bin_floor(size);
        // SAFETY: `h` is a linked free block: its link words are valid.
        unsafe {
            let next = word(h + HDR);
            let prev = word(h + 2 * HDR);
            if prev != 0 {
                set_word(prev + HDR, next);
            } else {
                self.bins[b] = next;
                if next == 0 {
                    self.bitmap[b / 64] &= !(1 << (b % 64));
                }
            }
            if next != 0 {
                set_word(next + 2 * HDR, prev);
            }
        }
    }

    /// Walk every block and check the invariants (tests).
    #[cfg(test)]
    fn check(&self) -> (usize, usize) {
        // SAFETY: the walk follows the block sizes from the lowest header to `top` and
        // the free-list links from the bins; with the invariants intact (what
        // this checks, asserting as it goes) every address read is a header, footer or
        // link word inside the heap.
        unsafe {
            assert!(self.start <= self.lo && self.lo <= self.top);
            assert!(self.top <= self.end);
            let (mut h, mut prev_used, mut free) = (self.lo, true, 0usize);
            let mut used = 0;
            while h != self.top {
                let w = word(h);
                let size = w & !FLAGS;
                assert!(
                    size >= MIN_BLOCK && size.is_multiple_of(ALIGN),
                    "bad size {size}"
                );
                assert_eq!(w & PREV_USED != 0, prev_used, "prev_used bit at {h:#x}");
                if w & USED == 0 {
                    assert!(prev_used, "two adjacent free blocks");
                    assert_eq!(word(h + size - HDR), size, "footer");
                    let b = bin_floor(size);
                    assert!(self.bitmap[b / 64] & (1 << (b % 64)) != 0);
                    free += size;
                } else {
                    used += size;
                }
                prev_used = w & USED != 0;
                h += size;
            }
            assert!(prev_used, "the last block is free");
            assert_eq!(used, self.used);
            // Every listed block is free and counted once.
            let mut listed = 0;
            for (b, &head) in self.bins.iter().enumerate() {
                let mut x = head;
                let mut prev = 0;
                assert_eq!(head != 0, self.bitmap[b / 64] & (1 << (b % 64)) != 0);
                while x != 0 {
                    let s = word(x) & !FLAGS;
                    assert_eq!(bin_floor(s), b);
                    assert_eq!(word(x + 2 * HDR), prev);
                    listed += s;
                    prev = x;
                    x = word(x + HDR);
                }
            }
            assert_eq!(listed, free);
            // The lowest block is used (a free one would have been given back).
            assert!(self.lo == self.top || word(self.lo) & USED != 0);
            let untouched = (self.lo - self.start) + (self.end - self.top);
            assert_eq!(used + free + untouched, self.size());
            (used, free + untouched)
        }
    }
}

#[inline(always)]
unsafe fn word(a: usize) -> usize {
    // SAFETY: callers pass 8-aligned addresses inside the heap.
    unsafe { *(a as *const usize) }
}

#[inline(always)]
unsafe fn set_word(a: usize, v: usize) {
    // SAFETY: callers pass 8-aligned addresses inside the heap.
    unsafe { *(a as *mut usize) = v }
}

#[inline(always)]
unsafe fn set_size_keep_flags(h: usize, size: usize) {
    // SAFETY: `h` is a block header (caller's contract).
    unsafe { set_word(h, size | (word(h) & FLAGS)) }
}

#[inline(always)]
unsafe fn mark_prev_used(h: usize, used: bool) {
    // SAFETY: `h` is a block header (caller's contract).
    unsafe {
        let w = word(h);
        set_word(h, if used { w | PREV_USED } else { w & !PREV_USED });
    }
}

/// A [`Heap`] behind a spin lock, usable as the `#[global_allocator]`.
pub struct LockedHeap {
    lock: AtomicBool,
    heap: core::cell::UnsafeCell<Heap>,
}

// SAFETY: every access to `heap` goes through `with`, which holds the spin lock.
unsafe impl Sync for LockedHeap {}

impl LockedHeap {
    pub const fn empty() -> Self {
        LockedHeap {
            lock: AtomicBool::new(false),
            heap: core::cell::UnsafeCell::new(Heap::empty()),
        }
    }

    /// Run `f` with exclusive access to the heap.
    pub fn with<R>(&self, f: impl FnOnce(&mut Heap) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let r = f(unsafe { &mut *self.heap.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    /// See [`Heap::init`].
    ///
    /// # Safety
    /// As for [`Heap::init`].
    pub unsafe fn init(&self, start: *mut u8, len: usize) {
        // SAFETY: forwarded contract.
        self.with(|h| unsafe { h.init(start, len) })
    }

    /// See [`Heap::set_grant`].
    pub fn set_grant(&self, grant: GrantFn) {
        self.with(|h| h.set_grant(grant))
    }

    /// (size, used) in bytes.
    pub fn stats(&self) -> (usize, usize) {
        self.with(|h| (h.size(), h.used()))
    }
}

// SAFETY: `Heap` returns blocks that are disjoint, inside its range, aligned as asked
// and at least as large as asked; null on failure.
unsafe impl GlobalAlloc for LockedHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.with(|h| h.alloc(layout))
    }
    unsafe fn dealloc(&self, p: *mut u8, _layout: Layout) {
        // SAFETY: GlobalAlloc's contract: p came from this allocator.
        self.with(|h| unsafe { h.dealloc(p) })
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc's contract: p came from this allocator with `layout`.
        self.with(|h| unsafe { h.realloc(p, layout, new_size) })
    }
}

#[cfg(test)]
mod tests {
    // Test code: every raw pointer used below comes from the heap under test with the
    // size written next to it, and `Heap::check` validates the heap after each step.
    #![allow(clippy::undocumented_unsafe_blocks)]
    use super::*;
    use std::vec::Vec;

    struct TestHeap {
        _buf: Vec<u128>,
        heap: Heap,
    }

    fn heap(bytes: usize) -> TestHeap {
        let mut buf = vec![0u128; bytes / 16];
        let mut heap = Heap::empty();
        // The +8 skews the start to exercise the alignment fix-up.
        unsafe { heap.init((buf.as_mut_ptr() as *mut u8).add(8), bytes - 8) };
        TestHeap { _buf: buf, heap }
    }

    fn l(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn bins_are_consistent() {
        for s in (MIN_BLOCK..1 << 22).step_by(16) {
            let f = bin_floor(s);
            let c = bin_ceil(s);
            assert!(c == f || c == f + 1, "size {s}");
            // Every block in bin c is at least s: smaller sizes map below c.
            if s > MIN_BLOCK {
                assert!(bin_floor(s - 16) < c, "size {s}");
            }
        }
        assert!(bin_floor(usize::MAX & !15) < NBINS);
    }

    #[test]
    fn alloc_free_roundtrip_and_alignment() {
        let mut t = heap(1 << 20);
        let h = &mut t.heap;
        let total = h.check().1;
        let mut ptrs = Vec::new();
        for i in 0..200usize {
            let align = [1, 8, 16, 32, 64, 4096][i % 6];
            let size = (i * 37) % 700 + 1;
            let p = h.alloc(l(size, align));
            assert!(!p.is_null());
            assert_eq!(p as usize % align.max(16), 0, "alignment {align}");
            unsafe { ptr::write_bytes(p, i as u8, size) };
            ptrs.push((p, size, i as u8));
            h.check();
        }
        for (k, &(p, size, v)) in ptrs.iter().enumerate() {
            let s = unsafe { core::slice::from_raw_parts(p, size) };
            assert!(s.iter().all(|&b| b == v), "block {k} overwritten");
        }
        for (p, _, _) in ptrs.drain(..).rev().step_by(1) {
            unsafe { h.dealloc(p) };
            h.check();
        }
        assert_eq!(h.check(), (0, total), "everything coalesces back");
    }

    #[test]
    fn exhaustion_returns_null() {
        let mut t = heap(64 * 1024);
        let h = &mut t.heap;
        assert!(h.alloc(l(1 << 20, 8)).is_null());
        assert!(h.alloc(l(isize::MAX as usize - 64, 8)).is_null());
        assert!(h.alloc(l(1 << 30, 1 << 20)).is_null());
        let mut n = 0;
        while !h.alloc(l(1000, 8)).is_null() {
            n += 1;
        }
        assert!(n >= 60, "only {n} KiB-blocks fit in 64 KiB");
        h.check();
        // The whole heap in one block fits exactly when empty.
        let mut t = heap(64 * 1024);
        let free = t.heap.check().1;
        let p = t.heap.alloc(l(free - HDR, 16));
        assert!(!p.is_null());
        assert!(t.heap.alloc(l(1, 1)).is_null());
        unsafe { t.heap.dealloc(p) };
        assert_eq!(t.heap.check().1, free);
    }

    #[test]
    fn realloc_grows_large_block_in_place() {
        let mut t = heap(64 << 20);
        let h = &mut t.heap;
        // Some small allocations around, like a compiler would leave.
        let small: Vec<_> = (0..100).map(|i| h.alloc(l(24 + i, 8))).collect();
        let mut mem = h.alloc(l(1 << 20, 16));
        unsafe { ptr::write_bytes(mem, 0xab, 1 << 20) };
        let more: Vec<_> = (0..100).map(|i| h.alloc(l(100 + i, 8))).collect();
        let first = mem;
        let mut size = 1 << 20;
        while size < 32 << 20 {
            let new = size * 2;
            mem = unsafe { h.realloc(mem, l(size, 16), new) };
            assert_eq!(mem, first, "grew in place to {new}");
            size = new;
            h.check();
        }
        assert_eq!(unsafe { *mem.add((1 << 20) - 1) }, 0xab);
        // Shrink, then free everything.
        mem = unsafe { h.realloc(mem, l(size, 16), 4096) };
        assert_eq!(mem, first);
        h.check();
        for p in small.into_iter().chain(more) {
            unsafe { h.dealloc(p) };
        }
        unsafe { h.dealloc(mem) };
        assert_eq!(h.check().0, 0);
    }

    #[test]
    fn realloc_moves_and_keeps_contents() {
        let mut t = heap(1 << 20);
        let h = &mut t.heap;
        let a = h.alloc(l(100, 8));
        unsafe { ptr::write_bytes(a, 7, 100) };
        let blocker = h.alloc(l(100, 8));
        // `blocker` sits right after `a` (low end of the remaining free block).
        let b = unsafe { h.realloc(a, l(100, 8), 5000) };
        assert!(!b.is_null());
        assert_ne!(a, b);
        assert!(unsafe { core::slice::from_raw_parts(b, 100) }
            .iter()
            .all(|&x| x == 7));
        h.check();
        // Realloc failure leaves the block intact.
        assert!(unsafe { h.realloc(b, l(5000, 8), 10 << 20) }.is_null());
        assert_eq!(unsafe { *b.add(99) }, 7);
        unsafe {
            h.dealloc(b);
            h.dealloc(blocker);
        }
        assert_eq!(h.check().0, 0);
    }

    #[test]
    fn random_workload_matches_model() {
        random_workload(8 << 20, 200_000, 4000);
    }

    /// Random allocations (some of up to `big` bytes), frees and reallocs (to up to
    /// `resize` bytes), checked against the contents each block must hold.
    fn random_workload(bytes: usize, big: u64, resize: u64) {
        let mut t = heap(bytes);
        let h = &mut t.heap;
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live: Vec<(*mut u8, usize, usize, u8)> = Vec::new();
        for step in 0..20_000 {
            let r = next();
            match r % 4 {
                0 | 1 => {
                    let size = if r % 64 == 0 {
                        (next() % big) as usize
                    } else {
                        (next() % 300) as usize + 1
                    };
                    let align = 1 << (next() % 8);
                    let p = h.alloc(l(size, align));
                    if !p.is_null() {
                        assert_eq!(p as usize % align, 0);
                        let tag = step as u8;
                        unsafe { ptr::write_bytes(p, tag, size) };
                        live.push((p, size, align, tag));
                    }
                }
                2 if !live.is_empty() => {
                    let i = (next() as usize) % live.len();
                    let (p, size, _, tag) = live.swap_remove(i);
                    assert!(unsafe { core::slice::from_raw_parts(p, size) }
                        .iter()
                        .all(|&b| b == tag));
                    unsafe { h.dealloc(p) };
                }
                3 if !live.is_empty() => {
                    let i = (next() as usize) % live.len();
                    let (p, size, align, tag) = live[i];
                    let new = (next() % resize) as usize + 1;
                    let q = unsafe { h.realloc(p, l(size, align), new) };
                    if !q.is_null() {
                        assert_eq!(q as usize % align, 0);
                        assert!(unsafe { core::slice::from_raw_parts(q, size.min(new)) }
                            .iter()
                            .all(|&b| b == tag));
                        unsafe { ptr::write_bytes(q, tag, new) };
                        live[i] = (q, new, align, tag);
                    }
                }
                _ => {}
            }
            if step % 500 == 0 {
                h.check();
            }
        }
        for (p, ..) in live {
            unsafe { h.dealloc(p) };
        }
        assert_eq!(h.check().0, 0);
    }

    #[test]
    fn random_workload_on_a_split_heap() {
        // Large enough to split; blocks of up to 3 MiB exhaust both sides, so requests
        // fall back to the other side and fail cleanly.
        random_workload(48 << 20, 3 << 20, 300_000);
    }

    /// Lowest and highest non-zero byte of the test heap's buffer (addresses).
    fn written_span(t: &TestHeap) -> (usize, usize) {
        let bytes =
            unsafe { core::slice::from_raw_parts(t._buf.as_ptr() as *const u8, t._buf.len() * 16) };
        let lo = bytes.iter().position(|&b| b != 0).unwrap();
        let hi = bytes.iter().rposition(|&b| b != 0).unwrap();
        let base = bytes.as_ptr() as usize;
        (base + lo, base + hi + 1)
    }

    /// A freshly initialised heap has written nothing: blocks appear around the split.
    #[test]
    fn init_writes_nothing_and_blocks_start_at_the_split() {
        let mut t = heap(64 << 20);
        let bytes =
            unsafe { core::slice::from_raw_parts(t._buf.as_ptr() as *const u8, t._buf.len() * 16) };
        assert!(bytes.iter().all(|&b| b == 0));
        let h = &mut t.heap;
        let split = h.split();
        assert_eq!(
            (split + HDR) % SPLIT_ALIGN,
            0,
            "split {split:#x} not 2 MiB-aligned"
        );
        assert!(split > h.start && split - h.start <= (64 << 20) / 8);
        let small = h.alloc(l(100, 8)) as usize;
        let large = h.alloc(l(LARGE_ALLOC, 16)) as usize;
        // The small block ends at the split, the large one's payload starts at the 2 MiB
        // boundary right above it.
        assert_eq!(small - HDR + block_size(100).unwrap(), split);
        assert_eq!(large, split + HDR);
        assert_eq!(
            h.span(),
            small - HDR..large - HDR + block_size(LARGE_ALLOC).unwrap()
        );
        h.check();
    }

    /// A QuickJS-like sequence, as the kernel sees it: wasmi compiling (thousands of small
    /// blocks, some freed, buffers growing by doubling), the wasm linear memory, a
    /// function-config buffer taken and freed, stdin and output buffers, more small
    /// blocks, and the linear memory growing. Everything it writes lies in one span a
    /// little larger than the bytes written (the old policy put small blocks at the top of
    /// the heap, the large ones at its start); the linear memory grows in place.
    #[test]
    fn quickjs_like_sequence_keeps_data_together_and_memory_growing_in_place() {
        let mut t = heap(128 << 20);
        let h = &mut t.heap;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut live: Vec<(*mut u8, usize)> = Vec::new();
        let mut written = 0usize;
        let fill = |p: *mut u8, n: usize, written: &mut usize| {
            unsafe { ptr::write_bytes(p, 0x5a, n) };
            *written += n;
        };
        // Compile: small blocks, a third of them freed again, and growing buffers.
        let mut growing: Vec<(*mut u8, usize)> = Vec::new();
        for i in 0..30_000usize {
            let n = 16 + (next() % 240) as usize;
            let p = h.alloc(l(n, 8));
            assert!(!p.is_null());
            fill(p, n, &mut written);
            live.push((p, n));
            if i % 3 == 0 {
                let k = (next() as usize) % live.len();
                let (p, _) = live.swap_remove(k);
                unsafe { h.dealloc(p) };
            }
            if i % 5000 == 0 {
                let p = h.alloc(l(8192, 8));
                fill(p, 8192, &mut written);
                growing.push((p, 8192));
            }
            if i % 1000 == 999 {
                // Double every growing buffer (a Vec pushing instructions).
                for g in growing.iter_mut() {
                    if g.1 < 512 << 10 {
                        let q = unsafe { h.realloc(g.0, l(g.1, 8), 2 * g.1) };
                        assert!(!q.is_null());
                        fill(unsafe { q.add(g.1) }, g.1, &mut written);
                        *g = (q, 2 * g.1);
                    }
                }
            }
        }
        h.check();
        // Instantiate: a 34-page linear memory; the runtime touches its start.
        let mut mem_size = 34 * 65536;
        let mem = h.alloc(l(mem_size, 1));
        assert!(!mem.is_null());
        fill(mem, 128 << 10, &mut written);
        // The function configuration: a 4 MiB buffer, copied out and freed.
        let cfg_buf = h.alloc(l(4 << 20, 1));
        fill(cfg_buf, 300, &mut written);
        let cfg = h.alloc(l(300, 1));
        fill(cfg, 300, &mut written);
        unsafe { h.dealloc(cfg_buf) };
        // Script files and the runtime's objects, then the memory doubles.
        for _ in 0..2000 {
            let n = 16 + (next() % 1000) as usize;
            let p = h.alloc(l(n, 8));
            fill(p, n, &mut written);
            live.push((p, n));
        }
        let grown = unsafe { h.realloc(mem, l(mem_size, 1), 2 * mem_size) };
        assert_eq!(grown, mem, "the linear memory moved");
        fill(unsafe { mem.add(mem_size) }, 300 << 10, &mut written);
        mem_size *= 2;
        // stdin (zero-filled: nothing written but its header) and a small response.
        let stdin = h.alloc(l(crate::wasi::STDIN_BUFFER, 1));
        assert!(!stdin.is_null());
        let out = h.alloc(l(4096, 1));
        fill(out, 100, &mut written);
        // The request makes the memory grow twice more: still in place.
        for _ in 0..2 {
            let grown = unsafe { h.realloc(mem, l(mem_size, 1), 2 * mem_size) };
            assert_eq!(grown, mem, "the linear memory moved");
            mem_size *= 2;
        }
        h.check();

        // The written bytes (~8 MiB, freed ones included) lie in one span, which also
        // holds the untouched middle of the linear memory (its first size, 2.1 MiB).
        let (lo, hi) = written_span(&t);
        assert!(
            hi - lo < written + 34 * 65536 + (1 << 20),
            "data spread over {} bytes for {written} written",
            hi - lo
        );
        let _ = (stdin, out, cfg);
    }

    #[test]
    fn freed_blocks_at_either_end_return_to_untouched_space() {
        let mut t = heap(64 << 20);
        let h = &mut t.heap;
        let empty = h.span();
        let a = h.alloc(l(1000, 8));
        let b = h.alloc(l(1000, 8));
        let big = h.alloc(l(2 << 20, 16));
        let big2 = h.alloc(l(3 << 20, 16));
        assert!(
            b < a && a < big && big < big2,
            "small grow down, large grow up"
        );
        let span = h.span();
        // Freeing the lowest block and the last one shrinks the span.
        unsafe { h.dealloc(b) };
        assert_eq!(h.span().start, a as usize - HDR);
        unsafe { h.dealloc(big2) };
        assert_eq!(
            h.span().end,
            big as usize - HDR + block_size(2 << 20).unwrap()
        );
        h.check();
        // A freed middle block is a hole; freeing its neighbours merges everything back.
        unsafe { h.dealloc(a) };
        assert_eq!(h.span().start, big as usize - HDR);
        unsafe { h.dealloc(big) };
        assert_eq!(h.check().0, 0);
        assert!(h.span().is_empty());
        assert!(span.start < empty.start && span.end > empty.end);
        // A new large block takes the same place again.
        let again = h.alloc(l(2 << 20, 16));
        assert_eq!(again, big);
    }

    #[test]
    fn a_full_side_borrows_the_other() {
        let mut t = heap(64 << 20);
        let h = &mut t.heap;
        let below = h.split() - h.start;
        let above = h.end - h.split();
        // Small blocks until the space below the split is used up: the next ones go above.
        let mut small = Vec::new();
        let mut used_below = 0;
        while used_below + 4096 <= below {
            let p = h.alloc(l(4096 - HDR, 8));
            assert!((p as usize) < h.split());
            small.push(p);
            used_below += 4096;
        }
        let p = h.alloc(l(4096 - HDR, 8));
        assert!(
            p as usize > h.split(),
            "small block above the split once below is full"
        );
        small.push(p);
        h.check();
        // A large block larger than what is left above fails; one that fits goes above.
        assert!(h.alloc(l(above, 16)).is_null());
        let big = h.alloc(l(above - 2 * 4096, 16));
        assert!(!big.is_null());
        h.check();
        for p in small.into_iter().chain([big]) {
            unsafe { h.dealloc(p) };
        }
        assert_eq!(h.check().0, 0);
        // Both sides empty: a large block as big as the space below fits there.
        let below = h.split() - h.start;
        let above = h.end - h.split();
        let p = h.alloc(l(above - HDR, 16));
        assert!(!p.is_null());
        let q = h.alloc(l(below - HDR, 16));
        assert!(!q.is_null() && (q as usize) < h.split());
        unsafe {
            h.dealloc(p);
            h.dealloc(q);
        }
        assert_eq!(h.check().0, 0);
    }

    #[test]
    fn locked_heap_as_global_alloc() {
        let mut buf = vec![0u128; 1 << 16];
        let g = LockedHeap::empty();
        unsafe { g.init(buf.as_mut_ptr() as *mut u8, buf.len() * 16) };
        let p = unsafe { GlobalAlloc::alloc(&g, l(40, 8)) };
        assert!(!p.is_null());
        let p = unsafe { GlobalAlloc::realloc(&g, p, l(40, 8), 400) };
        assert!(!p.is_null());
        assert!(g.stats().1 >= 400);
        unsafe { GlobalAlloc::dealloc(&g, p, l(400, 8)) };
        assert_eq!(g.stats().1, 0);
    }

    static GRANTS: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

    fn record_grant(lo: usize, hi: usize) -> bool {
        GRANTS.lock().unwrap().push((lo, hi));
        true
    }

    fn refuse_grant(_: usize, _: usize) -> bool {
        false
    }

    #[test]
    fn blocks_stay_inside_granted_regions_and_grants_are_few() {
        let mut t = heap(256 << 20);
        t.heap.set_grant(record_grant);
        let mut live: Vec<(*mut u8, usize)> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..4000 {
            let r = next();
            if r % 3 == 0 && !live.is_empty() {
                let (p, _) = live.swap_remove((r as usize / 3) % live.len());
                unsafe { t.heap.dealloc(p) };
            } else {
                let size = if r % 50 == 1 {
                    (r as usize >> 8) % (6 << 20) + 1
                } else {
                    (r as usize >> 8) % 4000 + 1
                };
                let p = t.heap.alloc(l(size, 16));
                assert!(!p.is_null(), "allocation {i} of {size}");
                let g = t.heap.granted();
                let (a, b) = (p as usize - HDR, p as usize + size);
                assert!(
                    g.start <= a && b <= g.end,
                    "block {a:#x}..{b:#x} outside {g:x?}"
                );
                unsafe { ptr::write_bytes(p, 0xa5, size) };
                live.push((p, size));
            }
            let span = t.heap.span();
            let g = t.heap.granted();
            if !span.is_empty() {
                assert!(
                    g.start <= span.start && span.end <= g.end,
                    "{span:x?} outside {g:x?}"
                );
            }
            assert_eq!(g.start % GRANT_ALIGN, 0);
            assert_eq!(g.end % GRANT_ALIGN, 0);
        }
        t.heap.check();
        let grants = GRANTS.lock().unwrap().clone();
        // Every grant holds the one before it (the range only grows), and there are few.
        for w in grants.windows(2) {
            assert!(w[1].0 <= w[0].0 && w[1].1 >= w[0].1, "{w:x?}");
        }
        let g = t.heap.granted();
        assert_eq!(grants.last().copied(), Some((g.start, g.end)));
        assert!(grants.len() <= 24, "{} grants: {grants:x?}", grants.len());
    }

    #[test]
    fn a_refused_grant_fails_the_allocation() {
        let mut t = heap(64 << 20);
        t.heap.set_grant(refuse_grant);
        assert!(t.heap.alloc(l(100, 16)).is_null());
        assert!(t.heap.alloc(l(2 << 20, 16)).is_null());
        assert!(t.heap.span().is_empty());
        t.heap.check();
    }
}
