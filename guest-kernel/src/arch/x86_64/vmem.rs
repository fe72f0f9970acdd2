//! Virtual memory for wasmtime (its custom-platform C API, `wasmtime_mmap_*` and
//! `wasmtime_mprotect`) over the guest's own page tables.
//!
//! Guest RAM stays identity-mapped in PML4 slot 0. Reservations get address space of their
//! own above it, from PML4 slot 1 up to the end of the lower half (slot 256, which PVM
//! reserves, is never reached): a bump allocator that never reuses addresses, each
//! reservation 2 MiB aligned and followed by at least 2 MiB that is never mapped.
//!
//! Memory is backed by 2 MiB chunks of guest RAM taken from the kernel heap, one per 2 MiB
//! block of a reservation that has an accessible page; a page is mapped (4 KiB, A/D set,
//! U set at every level as PVM requires) when it is made accessible, zeroed the first time,
//! and unmapped (with `invlpg`) when made inaccessible, so that an access beyond a linear
//! memory's current size faults and wasmtime reports it as a trap. A block whose pages are
//! all accessible is mapped with one 2 MiB page (one TLB entry, one shadow-paging exit on
//! first touch instead of one per 8 pages).
//!
//! Protections are accessible or not: read-only and executable requests map the page
//! read-write (no NX): wasmtime only relies on inaccessible pages faulting.

use alloc::alloc::{alloc_zeroed, dealloc};
use alloc::collections::BTreeMap;
use core::alloc::Layout;
use core::sync::atomic::{AtomicBool, Ordering};

use vmm_abi::layout;

const PAGE: usize = 4096;
const BLOCK: usize = 2 << 20;
const PAGES_PER_BLOCK: usize = BLOCK / PAGE;
const WORDS: usize = PAGES_PER_BLOCK / 64;
/// First address handed out: PML4 slot 1 (slot 0 identity-maps guest RAM).
const VA_START: usize = 1 << 39;
/// End of the lower canonical half (PML4 slot 256 on is reserved by PVM).
const VA_END: usize = 1 << 47;

use vmm_abi::pte::{ADDR_MASK, HUGE as PTE_PS, LEAF, PRESENT as PTE_P, TABLE};

/// Why a request failed (returned to wasmtime as a non-zero code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum VmemError {
    /// No address space or guest memory left.
    NoMemory = 12,
    /// An address or size that is not page aligned, or not inside one reservation.
    Invalid = 22,
}

/// One 2 MiB block of a reservation that has backing memory.
struct Block {
    /// Guest-physical (= kernel-virtual) address of the 2 MiB of backing memory.
    chunk: usize,
    /// Pages currently mapped.
    mapped: [u64; WORDS],
    /// Pages whose contents are valid (zeroed once, since written by wasm or wasmtime).
    init: [u64; WORDS],
}

impl Block {
    fn bit(bits: &[u64; WORDS], i: usize) -> bool {
        bits[i / 64] & (1 << (i % 64)) != 0
    }
    fn set(bits: &mut [u64; WORDS], i: usize, on: bool) {
        if on {
            bits[i / 64] |= 1 << (i % 64);
        } else {
            bits[i / 64] &= !(1 << (i % 64));
        }
    }
    fn all(bits: &[u64; WORDS]) -> bool {
        bits.iter().all(|&w| w == u64::MAX)
    }
    fn none(bits: &[u64; WORDS]) -> bool {
        bits.iter().all(|&w| w == 0)
    }
}

struct Reservation {
    len: usize,
    /// By block index from the reservation's start.
    blocks: BTreeMap<usize, Block>,
}

struct State {
    next: usize,
    reservations: BTreeMap<usize, Reservation>,
}

struct Locked {
    busy: AtomicBool,
    state: core::cell::UnsafeCell<State>,
}

// SAFETY: every access goes through `with`, which lets one caller in at a time.
unsafe impl Sync for Locked {}

static STATE: Locked = Locked {
    busy: AtomicBool::new(false),
    state: core::cell::UnsafeCell::new(State {
        next: VA_START,
        reservations: BTreeMap::new(),
    }),
};

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    if STATE.busy.swap(true, Ordering::Acquire) {
        // One vCPU, no interrupts: only a fault inside this module could get here.
        panic!("virtual memory state entered twice");
    }
    // SAFETY: the flag above gives this caller exclusive access until it is cleared.
    let r = f(unsafe { &mut *STATE.state.get() });
    STATE.busy.store(false, Ordering::Release);
    r
}

fn round_up(x: usize, to: usize) -> Option<usize> {
    x.checked_add(to - 1).map(|v| v & !(to - 1))
}

/// Reserve `size` bytes (rounded up to pages) of address space; accessible (zeroed) if
/// `access`.
pub fn reserve(size: usize, access: bool) -> Result<usize, VmemError> {
    let size = round_up(size, PAGE).ok_or(VmemError::NoMemory)?;
    if size == 0 {
        return Err(VmemError::Invalid);
    }
    let base = with(|s| {
        let span = round_up(size, BLOCK)
            .and_then(|l| l.checked_add(BLOCK))
            .ok_or(VmemError::NoMemory)?;
        let base = s.next;
        let end = base.checked_add(span).ok_or(VmemError::NoMemory)?;
        if end > VA_END {
            return Err(VmemError::NoMemory);
        }
        s.next = end;
        s.reservations.insert(
            base,
            Reservation {
                len: size,
                blocks: BTreeMap::new(),
            },
        );
        Ok(base)
    })?;
    if access {
        if let Err(e) = protect(base, size, true) {
            let _ = unmap(base, size);
            return Err(e);
        }
    }
    Ok(base)
}

/// The reservation that holds all of `[addr, addr + len)` (`addr` page aligned, `len`
/// rounded up to whole pages, as `mprotect` does): (its base, it, the rounded length).
fn find(
    s: &mut State,
    addr: usize,
    len: usize,
) -> Result<(usize, &mut Reservation, usize), VmemError> {
    let len = round_up(len, PAGE).ok_or(VmemError::Invalid)?;
    if !addr.is_multiple_of(PAGE) {
        return Err(VmemError::Invalid);
    }
    let end = addr.checked_add(len).ok_or(VmemError::Invalid)?;
    let (&base, r) = s
        .reservations
        .range_mut(..=addr)
        .next_back()
        .ok_or(VmemError::Invalid)?;
    if end > base + r.len {
        return Err(VmemError::Invalid);
    }
    Ok((base, r, len))
}

/// The blocks `[addr, addr + len)` touches in a reservation at `base`, each with the range
/// of its page indices inside it: (block index, pages).
fn spans(
    base: usize,
    addr: usize,
    len: usize,
) -> impl Iterator<Item = (usize, core::ops::Range<usize>)> {
    let (start, end) = (addr - base, addr - base + len);
    let blocks = if len == 0 {
        0..0
    } else {
        start / BLOCK..(end - 1) / BLOCK + 1
    };
    blocks.map(move |b| {
        let lo = start.max(b * BLOCK) - b * BLOCK;
        let hi = end.min((b + 1) * BLOCK) - b * BLOCK;
        (b, lo / PAGE..hi / PAGE)
    })
}

/// Make `[addr, addr + len)` accessible (pages never written read as zero) or not
/// (contents kept for a later `protect(.., true)`).
pub fn protect(addr: usize, len: usize, access: bool) -> Result<(), VmemError> {
    with(|s| {
        let (base, r, len) = find(s, addr, len)?;
        if access {
            map_all(r, base, addr, len)
        } else {
            drop_pages(r, base, addr, len, false);
            Ok(())
        }
    })
}

/// Map every page of `[addr, addr + len)`. If memory runs out, the pages this call made
/// accessible are made inaccessible again and memory it took is freed, so a failed request
/// changes nothing (as far as the bookkeeping of what was there before fits in memory).
fn map_all(r: &mut Reservation, base: usize, addr: usize, len: usize) -> Result<(), VmemError> {
    /// A block's state before this call: (index, mapped, init; `None`: no memory yet).
    type Before = (usize, Option<([u64; WORDS], [u64; WORDS])>);
    let mut before: alloc::vec::Vec<Before> = alloc::vec::Vec::new();
    let mut result = Ok(());
    'all: for (b, pages) in spans(base, addr, len) {
        let state = r.blocks.get(&b).map(|k| (k.mapped, k.init));
        let remember = before.try_reserve(1).is_ok();
        if remember {
            before.push((b, state));
        }
        for i in pages {
            if let Err(e) = map_page(&mut r.blocks, b, i, base + b * BLOCK) {
                result = Err(e);
                break 'all;
            }
        }
    }
    if result.is_err() {
        for (b, state) in before {
            let block_va = base + b * BLOCK;
            let (mapped, init) = state.unwrap_or(([0; WORDS], [0; WORDS]));
            if let Some(block) = r.blocks.get_mut(&b) {
                for i in 0..PAGES_PER_BLOCK {
                    if Block::bit(&block.mapped, i) && !Block::bit(&mapped, i) {
                        unmap_page(block, i, block_va);
                    }
                    if !Block::bit(&init, i) {
                        Block::set(&mut block.init, i, false);
                    }
                }
            }
            release_if_empty(&mut r.blocks, b);
        }
    }
    result
}

/// Unmap the pages of `[addr, addr + len)` that are mapped; with `forget`, also drop
/// their contents (and the memory of blocks left with none). Visits only blocks that
/// have memory, so a whole 4 GiB reservation costs what its used blocks cost.
fn drop_pages(r: &mut Reservation, base: usize, addr: usize, len: usize, forget: bool) {
    if len == 0 {
        return;
    }
    let (first, last) = ((addr - base) / BLOCK, (addr - base + len - 1) / BLOCK);
    let present: alloc::vec::Vec<usize> = r.blocks.range(first..=last).map(|(&b, _)| b).collect();
    for b in present {
        let lo = (addr - base).max(b * BLOCK) - b * BLOCK;
        let hi = (addr - base + len).min((b + 1) * BLOCK) - b * BLOCK;
        let block_va = base + b * BLOCK;
        if let Some(block) = r.blocks.get_mut(&b) {
            for i in lo / PAGE..hi / PAGE {
                unmap_page(block, i, block_va);
                if forget {
                    Block::set(&mut block.init, i, false);
                }
            }
        }
        release_if_empty(&mut r.blocks, b);
    }
}

/// Replace `[addr, addr + len)` with fresh zero memory, accessible or not.
pub fn remap(addr: usize, len: usize, access: bool) -> Result<(), VmemError> {
    with(|s| {
        let (base, r, len) = find(s, addr, len)?;
        drop_pages(r, base, addr, len, true);
        if access {
            map_all(r, base, addr, len)
        } else {
            Ok(())
        }
    })
}

/// Unmap `[addr, addr + len)` and free its memory; a reservation unmapped as a whole is
/// forgotten (its addresses are never handed out again).
pub fn unmap(addr: usize, len: usize) -> Result<(), VmemError> {
    with(|s| {
        let (base, r, len) = find(s, addr, len)?;
        drop_pages(r, base, addr, len, true);
        if base == addr && r.len == len && r.blocks.is_empty() {
            s.reservations.remove(&addr);
        }
        Ok(())
    })
}

fn map_page(
    blocks: &mut BTreeMap<usize, Block>,
    b: usize,
    i: usize,
    block_va: usize,
) -> Result<(), VmemError> {
    let block = match blocks.get_mut(&b) {
        Some(block) => block,
        None => {
            // Not zeroed here: each page is zeroed when it is first made accessible.
            // SAFETY: a non-zero size and a power-of-two alignment.
            let chunk =
                unsafe { alloc::alloc::alloc(Layout::from_size_align_unchecked(BLOCK, BLOCK)) }
                    as usize;
            if chunk == 0 {
                return Err(VmemError::NoMemory);
            }
            blocks.entry(b).or_insert(Block {
                chunk,
                mapped: [0; WORDS],
                init: [0; WORDS],
            })
        }
    };
    if Block::bit(&block.mapped, i) {
        return Ok(());
    }
    let frame = block.chunk + i * PAGE;
    if !Block::bit(&block.init, i) {
        // SAFETY: the page lies in the chunk this block owns; nothing maps it yet.
        unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE) };
        Block::set(&mut block.init, i, true);
    }
    let pde = pde_for(block_va)?;
    // SAFETY: `pde` points into a live page directory of our page tables.
    unsafe {
        if *pde & PTE_P == 0 || *pde & PTE_PS != 0 {
            // No table yet (a 2 MiB page here means every page is mapped: not this one).
            let pt = new_table()?;
            *pde = pt as u64 | TABLE;
        }
        let pt = (*pde & ADDR_MASK) as *mut u64;
        *pt.add(i) = frame as u64 | LEAF;
    }
    Block::set(&mut block.mapped, i, true);
    if Block::all(&block.mapped) {
        // Every page: one 2 MiB page over the chunk, and the table goes.
        // SAFETY: as above; the table is no longer referenced once the entry is replaced
        // and the range is flushed.
        unsafe {
            let pt = (*pde & ADDR_MASK) as *mut u8;
            *pde = block.chunk as u64 | LEAF | PTE_PS;
            invlpg(block_va);
            free_table(pt);
        }
    }
    Ok(())
}

fn unmap_page(block: &mut Block, i: usize, block_va: usize) {
    if !Block::bit(&block.mapped, i) {
        return;
    }
    let Ok(pde) = pde_for(block_va) else { return };
    // SAFETY: `pde` points into a live page directory; a table it names is ours.
    unsafe {
        if *pde & PTE_PS != 0 {
            // Split the 2 MiB page back into 4 KiB ones.
            let Ok(pt) = new_table() else {
                // Out of memory for a table: unmap the whole block instead.
                *pde = 0;
                invlpg(block_va);
                block.mapped = [0; WORDS];
                return;
            };
            let pt = pt as *mut u64;
            for k in 0..PAGES_PER_BLOCK {
                *pt.add(k) = (block.chunk + k * PAGE) as u64 | LEAF;
            }
            *pt.add(i) = 0;
            *pde = pt as u64 | TABLE;
            invlpg(block_va);
        } else if *pde & PTE_P != 0 {
            let pt = (*pde & ADDR_MASK) as *mut u64;
            *pt.add(i) = 0;
            invlpg(block_va + i * PAGE);
        }
    }
    Block::set(&mut block.mapped, i, false);
    if Block::none(&block.mapped) {
        // SAFETY: as above.
        unsafe {
            if *pde & PTE_P != 0 && *pde & PTE_PS == 0 {
                let pt = (*pde & ADDR_MASK) as *mut u8;
                *pde = 0;
                invlpg(block_va);
                free_table(pt);
            }
        }
    }
}

/// Give a block's memory back to the heap once none of its pages holds anything.
fn release_if_empty(blocks: &mut BTreeMap<usize, Block>, b: usize) {
    if let Some(block) = blocks.get(&b) {
        if Block::none(&block.init) && Block::none(&block.mapped) {
            let chunk = block.chunk;
            blocks.remove(&b);
            // SAFETY: allocated in `map_page` with this layout, referenced by nothing now.
            unsafe {
                dealloc(
                    chunk as *mut u8,
                    Layout::from_size_align_unchecked(BLOCK, BLOCK),
                )
            };
        }
    }
}

/// A zeroed page-table page.
fn new_table() -> Result<usize, VmemError> {
    // SAFETY: a non-zero size and a power-of-two alignment.
    let p = unsafe { alloc_zeroed(Layout::from_size_align_unchecked(PAGE, PAGE)) };
    if p.is_null() {
        Err(VmemError::NoMemory)
    } else {
        Ok(p as usize)
    }
}

/// # Safety
/// `p` came from [`new_table`] and nothing references it.
unsafe fn free_table(p: *mut u8) {
    // SAFETY: forwarded.
    unsafe { dealloc(p, Layout::from_size_align_unchecked(PAGE, PAGE)) }
}

/// The page-directory entry of the 2 MiB block at `va`, creating the tables above it.
fn pde_for(va: usize) -> Result<*mut u64, VmemError> {
    let pml4 = layout::PML4_GPA as *mut u64;
    let index = |level: u32| (va >> (12 + 9 * level)) & 511;
    // SAFETY: the PML4 is the kernel's, identity-mapped at PML4_GPA; every table below it
    // that this walks is either the VMM's identity map (slot 0, never reached: `va` is
    // above VA_START) or one of ours, made by `new_table`.
    unsafe {
        let mut table = pml4;
        for level in [3u32, 2] {
            let e = table.add(index(level));
            if *e & PTE_P == 0 {
                *e = new_table()? as u64 | TABLE;
            }
            table = (*e & ADDR_MASK) as *mut u64;
        }
        Ok(table.add(index(1)))
    }
}

fn invlpg(va: usize) {
    // SAFETY: invlpg only drops TLB entries for `va`.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}
