//! Loading the guest kernel: ELF64 program headers into guest RAM, the identity page
//! tables, and the vCPU's 64-bit start state. The ELF is ours, but it is still parsed
//! with every offset and size checked.

use crate::memory::{GuestMemory, MemoryError};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vmm_abi::layout::*;
use vmm_abi::pte;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("guest kernel image is not a 64-bit little-endian x86-64 executable ELF")]
    NotElf,
    #[error("guest kernel image is truncated or malformed: {0}")]
    Malformed(&'static str),
    #[error("guest kernel segment at {start:#x}..{end:#x} lies outside {KERNEL_BASE:#x}..{KERNEL_END_MAX:#x}")]
    SegmentOutOfRange { start: u64, end: u64 },
    #[error("guest kernel entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("write the guest kernel into guest RAM: {0}")]
    Memory(#[from] MemoryError),
}

fn bytes_at<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N], LoadError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(LoadError::Malformed("header past end of file"))
}
fn u16_at(b: &[u8], off: usize) -> Result<u16, LoadError> {
    bytes_at::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Result<u32, LoadError> {
    bytes_at::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Result<u64, LoadError> {
    bytes_at::<8>(b, off).map(u64::from_le_bytes)
}

/// Load the PT_LOAD segments of `elf` at their physical addresses; returns the entry point
/// and the end of the highest segment (.bss included).
pub fn load_kernel(mem: &GuestMemory, elf: &[u8]) -> Result<(u64, u64), LoadError> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(LoadError::NotElf);
    }
    if u16_at(elf, 18)? != 62 {
        return Err(LoadError::NotElf); // EM_X86_64
    }
    let entry = u64_at(elf, 24)?;
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    if phentsize < 56 || phnum > 64 {
        return Err(LoadError::Malformed("program header table"));
    }
    let mut entry_ok = false;
    let mut image_end = KERNEL_BASE;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or(LoadError::Malformed("phdr offset"))?,
            )
            .ok_or(LoadError::Malformed("phdr offset"))?;
        if u32_at(elf, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let field = |o: usize| {
            ph.checked_add(o)
                .ok_or(LoadError::Malformed("phdr offset"))
                .and_then(|p| u64_at(elf, p))
        };
        let offset = field(8)?;
        let paddr = field(24)?;
        let filesz = field(32)?;
        let memsz = field(40)?;
        let end = paddr
            .checked_add(memsz)
            .ok_or(LoadError::Malformed("segment size"))?;
        if filesz > memsz {
            return Err(LoadError::Malformed(
                "segment file size exceeds memory size",
            ));
        }
        if paddr < KERNEL_BASE || end > KERNEL_END_MAX {
            return Err(LoadError::SegmentOutOfRange { start: paddr, end });
        }
        let data = offset
            .checked_add(filesz)
            .and_then(|e| elf.get(offset as usize..e as usize))
            .ok_or(LoadError::Malformed("segment data past end of file"))?;
        mem.write(paddr, data)?;
        image_end = image_end.max(end);
        // Fresh anonymous memory is zero, so .bss (memsz beyond filesz) needs nothing.
        if (paddr..end).contains(&entry) {
            entry_ok = true;
        }
    }
    if !entry_ok {
        return Err(LoadError::BadEntry(entry));
    }
    Ok((entry, image_end))
}

/// Identity-map guest RAM with 2 MiB pages (A/D set: KVM then maps a whole page per
/// exit), leaving the stack guard unmapped, and the first 2 MiB with 4 KiB pages, leaving
/// page 0 unmapped (null pointers fault). `mem_size` is a multiple of 2 MiB.
pub fn build_page_tables(mem: &GuestMemory) -> Result<(), LoadError> {
    let size = mem.size();
    let table = pte::TABLE;
    mem.write_u64(PML4_GPA, PDPT_GPA | table)?;
    let gib = size.div_ceil(1 << 30);
    for i in 0..gib {
        mem.write_u64(PDPT_GPA + i * 8, (PD_GPA + i * PAGE_SIZE) | table)?;
    }
    let mut pds = vec![0u8; (gib * PAGE_SIZE) as usize];
    let mut pt0 = vec![0u8; PAGE_SIZE as usize];
    for page in 1..HUGE_PAGE_SIZE / PAGE_SIZE {
        let at = (page * 8) as usize;
        pt0[at..at + 8].copy_from_slice(&((page * PAGE_SIZE) | pte::LEAF).to_le_bytes());
    }
    mem.write(PT0_GPA, &pt0)?;
    pds[..8].copy_from_slice(&(PT0_GPA | table).to_le_bytes());
    let mut addr = HUGE_PAGE_SIZE;
    while addr < size {
        if !(GUARD_START..STACK_BOTTOM).contains(&addr) {
            let idx = (addr / HUGE_PAGE_SIZE) as usize * 8;
            pds[idx..idx + 8].copy_from_slice(&(addr | pte::LEAF | pte::HUGE).to_le_bytes());
        }
        addr += HUGE_PAGE_SIZE;
    }
    mem.write(PD_GPA, &pds)?;
    Ok(())
}

/// 64-bit long mode, paging on, SSE usable (CR0.MP, CR4.OSFXSR|OSXMMEXCPT).
pub fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cr0 = 0x8005_0033; // PG | WP | NE | ET | MP | PE
    s.cr3 = PML4_GPA;
    s.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE (CR4.PCIDE is refused by PVM)
    s.efer = 0xd01; // NXE | LMA | LME | SCE
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 3,
        l: 0,
        db: 1,
        ..code
    };
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s
}

pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: INITIAL_RSP,
        rflags: 2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_hostile_elves() {
        let m = GuestMemory::new(64 << 20).unwrap();
        assert!(matches!(
            load_kernel(&m, b"not an elf"),
            Err(LoadError::NotElf)
        ));
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        elf[54] = 56;
        elf[56] = 1;
        assert!(matches!(
            load_kernel(&m, &elf),
            Err(LoadError::Malformed(_))
        ));
    }

    #[test]
    fn page_tables_skip_guard() {
        let m = GuestMemory::new(64 << 20).unwrap();
        build_page_tables(&m).unwrap();
        let pde = |a: u64| {
            let mut b = [0u8; 8];
            m.read_into(PD_GPA + (a / HUGE_PAGE_SIZE) * 8, &mut b)
                .unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(pde(GUARD_START), 0);
        assert_eq!(pde(0), PT0_GPA | 0x27, "the first 2 MiB: a page table");
        let pte = |page: u64| {
            let mut b = [0u8; 8];
            m.read_into(PT0_GPA + page * 8, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        assert_eq!(pte(0), 0, "page 0 is not mapped");
        assert_eq!(pte(MAILBOX_GPA / PAGE_SIZE), MAILBOX_GPA | 0x67);
        assert_eq!(pde(KERNEL_BASE) & !0xfff, KERNEL_BASE);
        assert_eq!(pde(KERNEL_BASE) & 0xff, 0xe7);
        assert_eq!(
            pde((64 << 20) - HUGE_PAGE_SIZE) & pte::PRESENT,
            pte::PRESENT
        );
    }
}
