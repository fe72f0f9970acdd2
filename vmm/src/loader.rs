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
    #[error("guest kernel segments at {start:#x}..{end:#x} make one 2 MiB page both writable and executable; link the kernel with 2 MiB-aligned segments (guest-kernel/link.ld)")]
    WritableCode { start: u64, end: u64 },
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

/// ELF program header flags.
const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// One loaded segment: `[start, end)` (.bss included) and its ELF flags (`PF_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub end: u64,
    pub flags: u32,
}

/// What [`load_kernel`] loaded.
#[derive(Clone, Debug)]
pub struct KernelImage {
    pub entry: u64,
    /// The end of the highest segment (.bss included).
    pub end: u64,
    pub segments: Vec<Segment>,
}

/// Load the PT_LOAD segments of `elf` at their physical addresses.
pub fn load_kernel(mem: &GuestMemory, elf: &[u8]) -> Result<KernelImage, LoadError> {
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
    let mut segments = Vec::new();
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
        let flags = u32_at(
            elf,
            ph.checked_add(4)
                .ok_or(LoadError::Malformed("phdr offset"))?,
        )?;
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
        segments.push(Segment {
            start: paddr,
            end,
            flags,
        });
        // Fresh anonymous memory is zero, so .bss (memsz beyond filesz) needs nothing.
        if (paddr..end).contains(&entry) {
            entry_ok = true;
        }
    }
    if !entry_ok {
        return Err(LoadError::BadEntry(entry));
    }
    Ok(KernelImage {
        entry,
        end: image_end,
        segments,
    })
}

/// The identity map's entry bits for the 2 MiB page at `addr`, W^X: read-execute where a
/// kernel segment is executable, read-only where one is read-only, read-write and
/// non-executable everywhere else. A 2 MiB page that two segments with different rights
/// share gets the union of their rights; both writable and executable is refused.
fn huge_page_bits(addr: u64, segments: &[Segment]) -> Result<u64, LoadError> {
    let page = addr..addr + HUGE_PAGE_SIZE;
    let mut flags = None::<u32>;
    for s in segments
        .iter()
        .filter(|s| s.start < page.end && page.start < s.end)
    {
        flags = Some(flags.unwrap_or(0) | s.flags);
    }
    Ok(match flags {
        None => pte::LEAF_DATA,
        Some(f) if f & PF_X != 0 && f & PF_W != 0 => {
            return Err(LoadError::WritableCode {
                start: page.start,
                end: page.end,
            })
        }
        Some(f) if f & PF_X != 0 => pte::LEAF_CODE,
        Some(f) if f & PF_W != 0 => pte::LEAF_DATA,
        Some(_) => pte::LEAF_READ_ONLY,
    } | pte::HUGE)
}

/// Identity-map guest RAM with 2 MiB pages (A/D set: KVM then maps a whole page per
/// exit), leaving the stack guard unmapped, and the first 2 MiB with 4 KiB pages, leaving
/// page 0 unmapped (null pointers fault). `mem_size` is a multiple of 2 MiB.
///
/// W^X: the kernel's code (`segments` with `PF_X`) is read-execute, its read-only data
/// read-only, everything else non-executable. The first 2 MiB, which holds every page
/// table, is read-only but for the VIF page and the mailbox; the guest writes its page
/// tables through the alias window (`layout::ALIAS_BASE`), which maps it read-write.
pub fn build_page_tables(mem: &GuestMemory, segments: &[Segment]) -> Result<(), LoadError> {
    let size = mem.size();
    let table = pte::TABLE;
    mem.write_u64(PML4_GPA, PDPT_GPA | table)?;
    mem.write_u64(PML4_GPA + ALIAS_PML4_SLOT * 8, ALIAS_PDPT_GPA | table)?;
    mem.write_u64(ALIAS_PDPT_GPA, ALIAS_PD_GPA | table)?;
    mem.write_u64(ALIAS_PD_GPA, pte::LEAF_DATA | pte::HUGE)?;
    let gib = size.div_ceil(1 << 30);
    for i in 0..gib {
        mem.write_u64(PDPT_GPA + i * 8, (PD_GPA + i * PAGE_SIZE) | table)?;
    }
    let mut pds = vec![0u8; (gib * PAGE_SIZE) as usize];
    let mut pt0 = vec![0u8; PAGE_SIZE as usize];
    for page in 1..HUGE_PAGE_SIZE / PAGE_SIZE {
        let at = (page * 8) as usize;
        let gpa = page * PAGE_SIZE;
        let bits = if gpa == VIF_GPA || gpa == MAILBOX_GPA {
            pte::LEAF_DATA
        } else {
            pte::LEAF_READ_ONLY
        };
        pt0[at..at + 8].copy_from_slice(&(gpa | bits).to_le_bytes());
    }
    mem.write(PT0_GPA, &pt0)?;
    pds[..8].copy_from_slice(&(PT0_GPA | table).to_le_bytes());
    let mut addr = HUGE_PAGE_SIZE;
    while addr < size {
        if !(GUARD_START..STACK_BOTTOM).contains(&addr) {
            let idx = (addr / HUGE_PAGE_SIZE) as usize * 8;
            let bits = huge_page_bits(addr, segments)?;
            pds[idx..idx + 8].copy_from_slice(&(addr | bits).to_le_bytes());
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

    /// The kernel's segments as `guest-kernel/link.ld` lays them out: text, rodata, data.
    fn segments() -> Vec<Segment> {
        vec![
            Segment {
                start: KERNEL_BASE,
                end: KERNEL_BASE + 0x1a_0000,
                flags: PF_X | 4,
            },
            Segment {
                start: 0x40_0000,
                end: 0x45_0000,
                flags: 4,
            },
            Segment {
                start: 0x60_0000,
                end: 0x61_0000,
                flags: PF_W | 4,
            },
        ]
    }

    #[test]
    fn page_tables_skip_guard_and_are_w_xor_x() {
        let m = GuestMemory::new(64 << 20).unwrap();
        build_page_tables(&m, &segments()).unwrap();
        let word = |gpa: u64| {
            let mut b = [0u8; 8];
            m.read_into(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        let pde = |a: u64| word(PD_GPA + (a / HUGE_PAGE_SIZE) * 8);
        assert_eq!(pde(GUARD_START), 0);
        assert_eq!(pde(0), PT0_GPA | 0x27, "the first 2 MiB: a page table");
        let pte = |page: u64| word(PT0_GPA + page * 8);
        assert_eq!(pte(0), 0, "page 0 is not mapped");
        let nx = pte::NO_EXECUTE;
        assert_eq!(pte(MAILBOX_GPA / PAGE_SIZE), MAILBOX_GPA | 0x67 | nx);
        assert_eq!(pte(VIF_GPA / PAGE_SIZE), VIF_GPA | 0x67 | nx);
        // Every page table (and the pool for the guest's own) is read-only here.
        for gpa in [
            PML4_GPA,
            PDPT_GPA,
            PD_GPA,
            PT0_GPA,
            ALIAS_PD_GPA,
            PT_POOL_START,
        ] {
            assert_eq!(pte(gpa / PAGE_SIZE), gpa | 0x65 | nx, "{gpa:#x}");
        }
        assert_eq!(pte(511), 0x1f_f000 | 0x65 | nx);
        // Text read-execute, rodata read-only, data and the rest read-write, not executable.
        assert_eq!(pde(KERNEL_BASE), KERNEL_BASE | 0xe5);
        assert_eq!(pde(0x40_0000), 0x40_0000 | 0xe5 | nx);
        assert_eq!(pde(0x60_0000), 0x60_0000 | 0xe7 | nx);
        assert_eq!(pde(0x80_0000), 0x80_0000 | 0xe7 | nx);
        assert_eq!(pde(HEAP_START), HEAP_START | 0xe7 | nx);
        assert_eq!(pde((64 << 20) - HUGE_PAGE_SIZE), (62 << 20) | 0xe7 | nx);
        // The alias window: guest-physical 0..2 MiB, writable, not executable.
        assert_eq!(word(PML4_GPA + ALIAS_PML4_SLOT * 8), ALIAS_PDPT_GPA | 0x27);
        assert_eq!(word(ALIAS_PDPT_GPA), ALIAS_PD_GPA | 0x27);
        assert_eq!(word(ALIAS_PD_GPA), 0xe7 | nx);
    }

    #[test]
    fn a_page_both_writable_and_executable_is_refused() {
        let m = GuestMemory::new(64 << 20).unwrap();
        let mut s = segments();
        s[2].start = 0x3f_f000; // data in the text's last 2 MiB page
        assert!(matches!(
            build_page_tables(&m, &s),
            Err(LoadError::WritableCode {
                start: 0x20_0000,
                end: 0x40_0000
            })
        ));
    }
}
