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
//! W^X: every page has wasmtime's protection: read-only (R+NX), read-write (RW+NX) or
//! read-execute (R+X), never writable and executable ([`Prot`]). A block is mapped with one
//! 2 MiB page when all its pages are mapped with the same protection, or when it holds code
//! and nothing writable (then read-execute: wasmtime's code memory is its text, read-execute,
//! next to read-only data; with 4 KiB pages, every 8 pages of code first run after a restore
//! cost a shadow-paging exit, which made served requests measurably slower); the pages of
//! such a block past its reservation's end are mapped read-only (zeroed) for that. A block
//! that ever held an executable page also loses write access in the identity map (its
//! chunk is one identity 2 MiB page) until its memory goes back to the heap, so compiled
//! code is writable through no mapping at all. Changes are made a block at a time: one
//! `invlpg` per changed 4 KiB entry, or one TLB flush (CR3 reload) for more than 16 (each
//! `invlpg` is an exit on PVM).
//!
//! Page tables: every table lives in the first 2 MiB of guest RAM (the VMM's, and ours
//! from the pool `[PT_POOL_START, PT_POOL_END)`), which the identity map maps read-only;
//! they are read and written only through the alias window at `layout::ALIAS_BASE`.

use alloc::alloc::dealloc;
use alloc::collections::BTreeMap;
use core::alloc::Layout;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmm_abi::layout;

const PAGE: usize = 4096;
const BLOCK: usize = 2 << 20;
const PAGES_PER_BLOCK: usize = BLOCK / PAGE;
const WORDS: usize = PAGES_PER_BLOCK / 64;
/// First address handed out: PML4 slot 1 (slot 0 identity-maps guest RAM).
const VA_START: usize = 1 << 39;
/// End of what is handed out: the alias window's PML4 slot (PVM reserves slot 256 on).
const VA_END: usize = layout::ALIAS_BASE as usize;
const ALIAS: usize = layout::ALIAS_BASE as usize;
/// Page tables are reached through the alias window, which covers the first 2 MiB.
const ALIAS_LEN: usize = layout::HUGE_PAGE_SIZE as usize;
const POOL_START: usize = layout::PT_POOL_START as usize;
const POOL_PAGES: usize = (layout::PT_POOL_END - layout::PT_POOL_START) as usize / PAGE;

use vmm_abi::pte::{
    ADDR_MASK, HUGE as PTE_PS, LEAF_CODE, LEAF_DATA, LEAF_READ_ONLY, PRESENT as PTE_P, TABLE,
};

/// What a page may be used for (wasmtime's `PROT_*` flags; never writable and executable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prot {
    None,
    Read,
    ReadWrite,
    ReadExec,
}

impl Prot {
    /// From `PROT_READ` (1), `PROT_WRITE` (2), `PROT_EXEC` (4); `None` for write and
    /// execute together, which W^X never grants.
    pub fn from_flags(flags: u32) -> Option<Prot> {
        let (w, x) = (flags & 2 != 0, flags & 4 != 0);
        Some(match (w, x) {
            (true, true) => return None,
            (true, false) => Prot::ReadWrite,
            (false, true) => Prot::ReadExec,
            (false, false) if flags & 1 != 0 => Prot::Read,
            _ => Prot::None,
        })
    }

    fn bits(self) -> u64 {
        match self {
            Prot::None => 0,
            Prot::Read => LEAF_READ_ONLY,
            Prot::ReadWrite => LEAF_DATA,
            Prot::ReadExec => LEAF_CODE,
        }
    }
}

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
    /// Of the mapped pages: writable ones, executable ones (never both).
    write: [u64; WORDS],
    exec: [u64; WORDS],
    /// A page was executable: the chunk is read-only in the identity map.
    code: bool,
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
    fn uniform(bits: &[u64; WORDS]) -> bool {
        Block::all(bits) || Block::none(bits)
    }
    fn prot(&self, i: usize) -> Prot {
        match (
            Block::bit(&self.mapped, i),
            Block::bit(&self.write, i),
            Block::bit(&self.exec, i),
        ) {
            (false, _, _) => Prot::None,
            (true, true, _) => Prot::ReadWrite,
            (true, false, true) => Prot::ReadExec,
            (true, false, false) => Prot::Read,
        }
    }
    fn set_prot(&mut self, i: usize, p: Prot) {
        Block::set(&mut self.mapped, i, p != Prot::None);
        Block::set(&mut self.write, i, p == Prot::ReadWrite);
        Block::set(&mut self.exec, i, p == Prot::ReadExec);
    }
    /// The 4 KiB page-table entry of page `i` (0: not mapped).
    fn pte(&self, i: usize) -> u64 {
        match self.prot(i) {
            Prot::None => 0,
            p => (self.chunk + i * PAGE) as u64 | p.bits(),
        }
    }
    /// The entry bits of one 2 MiB page that maps the whole block, if one can: every page
    /// mapped and alike, or (a code block) every page read-only or code: read-execute.
    fn big_page(&self) -> Option<u64> {
        if !Block::all(&self.mapped) {
            return None;
        }
        if Block::uniform(&self.write) && Block::uniform(&self.exec) {
            return Some(self.prot(0).bits());
        }
        (self.code && Block::none(&self.write)).then_some(LEAF_CODE)
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

/// Reserve `size` bytes (rounded up to pages) of address space, mapped (zeroed) with
/// `prot` unless `Prot::None`.
pub fn reserve(size: usize, prot: Prot) -> Result<usize, VmemError> {
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
    if prot != Prot::None {
        if let Err(e) = protect(base, size, prot) {
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

/// Give `[addr, addr + len)` protection `prot` (pages never written read as zero), or make
/// it inaccessible (`Prot::None`: contents kept for a later `protect`).
pub fn protect(addr: usize, len: usize, prot: Prot) -> Result<(), VmemError> {
    with(|s| {
        let (base, r, len) = find(s, addr, len)?;
        if prot != Prot::None {
            map_all(r, base, addr, len, prot)
        } else {
            drop_pages(r, base, addr, len, false);
            Ok(())
        }
    })
}

/// Map every page of `[addr, addr + len)` with `prot`. If memory runs out, the pages this
/// call made accessible are made inaccessible again and memory it took is freed, so a
/// failed request changes nothing (as far as the bookkeeping of what was there before fits
/// in memory; pages it changed the protection of keep the new one).
fn map_all(
    r: &mut Reservation,
    base: usize,
    addr: usize,
    len: usize,
    prot: Prot,
) -> Result<(), VmemError> {
    /// A block's state before this call: (index, mapped, init; `None`: no memory yet).
    type Before = (usize, Option<([u64; WORDS], [u64; WORDS])>);
    let mut before: alloc::vec::Vec<Before> = alloc::vec::Vec::new();
    let mut result = Ok(());
    for (b, pages) in spans(base, addr, len) {
        let state = r.blocks.get(&b).map(|k| (k.mapped, k.init));
        let remember = before.try_reserve(1).is_ok();
        if remember {
            before.push((b, state));
        }
        // Pages of this block past the reservation's end (only in its last block).
        let tail = (r.len.saturating_sub(b * BLOCK) / PAGE).min(PAGES_PER_BLOCK);
        let mapped = map_range(&mut r.blocks, b, pages, tail, base + b * BLOCK, prot);
        if let Err(e) = mapped {
            result = Err(e);
            break;
        }
    }
    if result.is_err() {
        for (b, state) in before {
            let block_va = base + b * BLOCK;
            let (mapped, init) = state.unwrap_or(([0; WORDS], [0; WORDS]));
            if let Some(block) = r.blocks.get_mut(&b) {
                for i in 0..PAGES_PER_BLOCK {
                    if Block::bit(&block.mapped, i) && !Block::bit(&mapped, i) {
                        unmap_pages(block, i..i + 1, block_va, false);
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
    let end = addr - base + len;
    for b in present {
        let lo = (addr - base).max(b * BLOCK) - b * BLOCK;
        let mut hi = end.min((b + 1) * BLOCK) - b * BLOCK;
        if end >= r.len {
            // Up to the reservation's end: the pages past it (a code block's) go too.
            hi = BLOCK;
        }
        let block_va = base + b * BLOCK;
        if let Some(block) = r.blocks.get_mut(&b) {
            unmap_pages(block, lo / PAGE..hi / PAGE, block_va, forget);
        }
        release_if_empty(&mut r.blocks, b);
    }
}

/// Replace `[addr, addr + len)` with fresh zero memory with protection `prot`.
pub fn remap(addr: usize, len: usize, prot: Prot) -> Result<(), VmemError> {
    with(|s| {
        let (base, r, len) = find(s, addr, len)?;
        drop_pages(r, base, addr, len, true);
        if prot != Prot::None {
            map_all(r, base, addr, len, prot)
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

/// Map pages `pages` of block `b` (at `block_va`) with `prot`; `tail`: the first page
/// index past the reservation's end.
fn map_range(
    blocks: &mut BTreeMap<usize, Block>,
    b: usize,
    pages: core::ops::Range<usize>,
    tail: usize,
    block_va: usize,
    prot: Prot,
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
                write: [0; WORDS],
                exec: [0; WORDS],
                code: false,
            })
        }
    };
    let code = block.code || prot == Prot::ReadExec;
    // A code block's pages past the reservation's end (never asked for) are mapped
    // read-only too, so that once every page is read-only or code, the block is one
    // read-execute 2 MiB page (code runs with one TLB entry and one shadow-paging exit per
    // 2 MiB, not one per 8 pages): read-only data next to the code is then executable,
    // but nothing in the block is writable.
    let fill = if code && tail < PAGES_PER_BLOCK {
        tail..PAGES_PER_BLOCK
    } else {
        0..0
    };
    let fresh =
        |block: &Block, r: &core::ops::Range<usize>| r.clone().any(|i| !Block::bit(&block.init, i));
    if fresh(block, &pages) || fresh(block, &fill) {
        // Zero pages never made accessible, through the identity map (made writable for
        // the moment if the block holds code: nothing runs meanwhile).
        if block.code {
            identity_writable(block.chunk, true)?;
        }
        for i in pages.clone().chain(fill.clone()) {
            if !Block::bit(&block.init, i) {
                // SAFETY: the page lies in the chunk this block owns, writable in the
                // identity map now; nothing maps it yet.
                unsafe { core::ptr::write_bytes((block.chunk + i * PAGE) as *mut u8, 0, PAGE) };
                Block::set(&mut block.init, i, true);
            }
        }
        if block.code {
            identity_writable(block.chunk, false)?;
        }
    }
    if code && !block.code {
        // Code: no longer writable through the identity map either.
        identity_writable(block.chunk, false)?;
        block.code = true;
    }
    for i in fill.clone() {
        if !Block::bit(&block.mapped, i) {
            block.set_prot(i, Prot::Read);
        }
    }
    for i in pages.clone() {
        block.set_prot(i, prot);
    }
    let pde = pde_for(block_va)?;
    apply(pde, block, pages.chain(fill), block_va)
}

/// Make the page-table entries of block `block` (at `block_va`, directory entry `pde`)
/// say what its bookkeeping says, where pages `changed` may have changed: one 2 MiB page if
/// the whole block can have one, else a page table (split from a 2 MiB page if there was
/// one). Entries that lose or change a mapping are flushed from the TLB.
fn apply(
    pde: usize,
    block: &Block,
    changed: impl Iterator<Item = usize>,
    block_va: usize,
) -> Result<(), VmemError> {
    let e = read(pde);
    if let Some(bits) = block.big_page() {
        let big = block.chunk as u64 | bits | PTE_PS;
        if e == big {
            return Ok(());
        }
        write(pde, big);
        if e & PTE_P != 0 {
            // Changes the mapping of the whole block; a table no longer referenced goes.
            flush(block_va, e);
            if e & PTE_PS == 0 {
                free_table(table_of(e));
            }
        }
        return Ok(());
    }
    if e & PTE_P == 0 || e & PTE_PS != 0 {
        // No table yet, or a 2 MiB page to split: a table of what every page is now.
        let pt = new_table()?;
        for k in 0..PAGES_PER_BLOCK {
            write(pt + k * 8, block.pte(k));
        }
        write(pde, pt as u64 | TABLE);
        if e & PTE_P != 0 {
            invlpg(block_va);
        }
        return Ok(());
    }
    let pt = table_of(e);
    let mut stale = 0usize;
    for i in changed {
        let (old, new) = (read(pt + i * 8), block.pte(i));
        if old != new {
            write(pt + i * 8, new);
            if old & PTE_P != 0 {
                stale += 1;
                if stale <= MAX_INVLPG {
                    invlpg(block_va + i * PAGE);
                }
            }
        }
    }
    if stale > MAX_INVLPG {
        flush_all();
    }
    Ok(())
}

/// Above this many stale 4 KiB entries, one flush of the whole TLB is cheaper than an
/// `invlpg` each (each is an exit on PVM).
const MAX_INVLPG: usize = 16;

/// Flush the TLB entries of a block whose directory entry was `old`: its 2 MiB page, or
/// the 4 KiB pages its table mapped.
fn flush(block_va: usize, old: u64) {
    if old & PTE_PS != 0 {
        invlpg(block_va);
        return;
    }
    let pt = table_of(old);
    let present = (0..PAGES_PER_BLOCK)
        .filter(|&k| read(pt + k * 8) & PTE_P != 0)
        .count();
    if present > MAX_INVLPG {
        flush_all();
    } else {
        for k in 0..PAGES_PER_BLOCK {
            if read(pt + k * 8) & PTE_P != 0 {
                invlpg(block_va + k * PAGE);
            }
        }
        invlpg(block_va);
    }
}

/// Flush the whole TLB (no page is global): reload CR3.
fn flush_all() {
    // SAFETY: writes CR3 back unchanged: the same page tables, every non-global TLB entry
    // dropped.
    unsafe {
        core::arch::asm!(
            "mov {t}, cr3",
            "mov cr3, {t}",
            t = out(reg) _,
            options(nostack, preserves_flags)
        )
    };
}

/// Unmap pages `pages` of `block` (at `block_va`); with `forget`, their contents go too.
fn unmap_pages(block: &mut Block, pages: core::ops::Range<usize>, block_va: usize, forget: bool) {
    let changed: alloc::vec::Vec<usize> = pages
        .clone()
        .filter(|&i| Block::bit(&block.mapped, i))
        .collect();
    for i in pages {
        block.set_prot(i, Prot::None);
        if forget {
            Block::set(&mut block.init, i, false);
        }
    }
    if changed.is_empty() {
        return;
    }
    let Ok(pde) = pde_for(block_va) else { return };
    if Block::none(&block.mapped) {
        let e = read(pde);
        write(pde, 0);
        if e & PTE_P != 0 {
            flush(block_va, e);
            if e & PTE_PS == 0 {
                free_table(table_of(e));
            }
        }
    } else if apply(pde, block, changed.into_iter(), block_va).is_err() {
        // Out of page tables to split a 2 MiB page: unmap the whole block instead.
        let e = read(pde);
        write(pde, 0);
        flush(block_va, e);
        for k in 0..PAGES_PER_BLOCK {
            block.set_prot(k, Prot::None);
        }
    }
}

/// Give a block's memory back to the heap once none of its pages holds anything.
fn release_if_empty(blocks: &mut BTreeMap<usize, Block>, b: usize) {
    if let Some(block) = blocks.get(&b) {
        if Block::none(&block.init) && Block::none(&block.mapped) {
            let (chunk, code) = (block.chunk, block.code);
            if code && identity_writable(chunk, true).is_err() {
                // Cannot make it writable again: keep it out of the heap for good.
                return;
            }
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

/// Make the identity map's 2 MiB page of `chunk` (2 MiB aligned guest RAM) writable or
/// read-only; it is never executable.
fn identity_writable(chunk: usize, writable: bool) -> Result<(), VmemError> {
    let (gib, index) = (chunk >> 30, (chunk >> 21) & 511);
    if !chunk.is_multiple_of(BLOCK) || gib as u64 >= layout::MAX_PD_PAGES {
        return Err(VmemError::Invalid);
    }
    let pde = layout::PD_GPA as usize + gib * PAGE + index * 8;
    let e = read(pde);
    if e & PTE_P == 0 || e & PTE_PS == 0 || (e & ADDR_MASK) as usize != chunk {
        return Err(VmemError::Invalid);
    }
    write(
        pde,
        (chunk as u64) | (if writable { LEAF_DATA } else { LEAF_READ_ONLY }) | PTE_PS,
    );
    invlpg(chunk);
    Ok(())
}

/// Pages of the page-table pool in use (bit `i`: `POOL_START + i * PAGE`). Only touched
/// under the lock of [`with`].
static POOL_USED: [AtomicU64; POOL_PAGES.div_ceil(64)] =
    [const { AtomicU64::new(0) }; POOL_PAGES.div_ceil(64)];

/// A zeroed page-table page from the pool (its guest-physical address).
fn new_table() -> Result<usize, VmemError> {
    for (w, used) in POOL_USED.iter().enumerate() {
        let bits = used.load(Ordering::Relaxed);
        if bits == u64::MAX {
            continue;
        }
        let i = w * 64 + (!bits).trailing_zeros() as usize;
        if i >= POOL_PAGES {
            break;
        }
        used.store(bits | 1 << (i % 64), Ordering::Relaxed);
        let p = POOL_START + i * PAGE;
        for k in 0..PAGE / 8 {
            write(p + k * 8, 0);
        }
        return Ok(p);
    }
    Err(VmemError::NoMemory)
}

/// Give a page table back to the pool; nothing may reference it any more.
fn free_table(p: usize) {
    if (POOL_START..POOL_START + POOL_PAGES * PAGE).contains(&p) {
        let i = (p - POOL_START) / PAGE;
        POOL_USED[i / 64].fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
    }
}

/// The guest-physical address of the table an entry points to.
fn table_of(e: u64) -> usize {
    (e & ADDR_MASK) as usize
}

/// Read the page-table word at guest-physical `pa` (through the alias window).
fn read(pa: usize) -> u64 {
    assert!(
        pa < ALIAS_LEN && pa.is_multiple_of(8),
        "page table word at {pa:#x}"
    );
    // SAFETY: `pa` lies in the first 2 MiB, which the alias window maps (made by the VMM's
    // loader, never changed); aligned.
    unsafe { core::ptr::read_volatile((ALIAS + pa) as *const u64) }
}

/// Write the page-table word at guest-physical `pa` (through the alias window).
fn write(pa: usize, v: u64) {
    assert!(
        pa < ALIAS_LEN && pa.is_multiple_of(8),
        "page table word at {pa:#x}"
    );
    // SAFETY: as in `read`; the alias window is writable. Callers only write page-table
    // entries of the tables they own (the VMM's PML4 slots other than 0 and the alias's,
    // the identity PDE of a chunk this module owns, and tables from the pool).
    unsafe { core::ptr::write_volatile((ALIAS + pa) as *mut u64, v) }
}

/// The guest-physical address of the page-directory entry of the 2 MiB block at `va`,
/// creating the tables above it.
fn pde_for(va: usize) -> Result<usize, VmemError> {
    if !(VA_START..VA_END).contains(&va) {
        return Err(VmemError::Invalid);
    }
    let index = |level: u32| (va >> (12 + 9 * level)) & 511;
    // The PML4 is the kernel's (CR3); `va` lies in slots 1..ALIAS_PML4_SLOT, whose tables
    // are all ours, from the pool.
    let mut table = layout::PML4_GPA as usize;
    for level in [3u32, 2] {
        let e = table + index(level) * 8;
        let mut v = read(e);
        if v & PTE_P == 0 {
            v = new_table()? as u64 | TABLE;
            write(e, v);
        }
        table = table_of(v);
        if table >= ALIAS_LEN {
            return Err(VmemError::Invalid);
        }
    }
    Ok(table + index(1) * 8)
}

/// The guest-physical address `va` maps to, if it lies in a reservation and is mapped.
pub fn translate(va: usize) -> Option<usize> {
    if !(VA_START..VA_END).contains(&va) {
        return None;
    }
    let index = |level: u32| (va >> (12 + 9 * level)) & 511;
    let mut table = layout::PML4_GPA as usize;
    for level in [3u32, 2, 1, 0] {
        let e = read(table + index(level) * 8);
        if e & PTE_P == 0 {
            return None;
        }
        if level == 1 && e & PTE_PS != 0 {
            return Some(table_of(e) + (va & (BLOCK - 1)));
        }
        if level == 0 {
            return Some(table_of(e) + (va & (PAGE - 1)));
        }
        table = table_of(e);
        if table >= ALIAS_LEN {
            return None;
        }
    }
    None
}

fn invlpg(va: usize) {
    // SAFETY: invlpg only drops TLB entries for `va`.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}
