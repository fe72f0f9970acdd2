//! GDT, TSS and IDT.
//!
//! The GDT keeps the VMM's selectors (code 0x08, data 0x10) so that reloading the
//! segment registers changes nothing visible; it adds the TSS at 0x18, whose IST
//! stacks give #DF (stack overflow), NMI and #MC a known-good stack. #PF runs on the
//! current stack on purpose: a stack overflow into the guard range then becomes a #DF,
//! which is reported with the faulting RSP and CR2.

use core::mem::size_of;

use super::exceptions;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const TSS_SEL: u16 = 0x18;

/// IST slots (1-based, as in the gate descriptor).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
const IST_STACKS: usize = 3;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_STACKS]);

/// The 64-bit TSS as 26 dwords (the u64 fields are only 4-byte aligned).
#[repr(C, align(16))]
struct Tss([u32; 26]);

#[repr(C, align(16))]
struct Gdt([u64; 5]);

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Idt([Gate; 32]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

static mut IST: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_STACKS]);
static mut TSS: Tss = Tss([0; 26]);
static mut GDT: Gdt = Gdt([
    0,
    0x00af_9a00_0000_ffff, // 0x08: 64-bit code, DPL0, present
    0x00cf_9200_0000_ffff, // 0x10: data, writable, present
    0,                     // 0x18: TSS (low), filled in at init
    0,                     // 0x20: TSS (high)
]);
static mut IDT: Idt = Idt([Gate {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    reserved: 0,
}; 32]);

/// Load the GDT (reloading every segment register), the TSS and the IDT.
///
/// # Safety
/// Call once, at boot, before anything relies on exceptions being reported.
pub unsafe fn init() {
    // SAFETY: boot is single-threaded and nothing else references these statics; the
    // descriptors written are valid for the identity-mapped kernel.
    unsafe {
        let tss = &raw mut TSS;
        let ist = &raw mut IST;
        for slot in 0..IST_STACKS {
            // Stack tops are 16-byte aligned (the CPU aligns RSP on IST entry anyway).
            let top = (&raw mut (*ist).0[slot]) as u64 + IST_STACK_SIZE as u64;
            let dword = 9 + 2 * slot; // IST1 is at byte 36
            (*tss).0[dword] = top as u32;
            (*tss).0[dword + 1] = (top >> 32) as u32;
        }
        // I/O map base beyond the limit: no I/O permission bitmap.
        (*tss).0[25] = (size_of::<Tss>() as u32) << 16;

        let base = tss as u64;
        let limit = (size_of::<Tss>() - 1) as u64;
        let gdt = &raw mut GDT;
        (*gdt).0[3] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit TSS (available)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        (*gdt).0[4] = base >> 32;

        let idt = &raw mut IDT;
        let stubs = exceptions::stub_addresses();
        for (vector, gate) in (*idt).0.iter_mut().enumerate() {
            let addr = stubs[vector];
            *gate = Gate {
                offset_lo: addr as u16,
                selector: KERNEL_CS,
                ist: match vector {
                    2 => IST_NMI,
                    8 => IST_DOUBLE_FAULT,
                    18 => IST_MACHINE_CHECK,
                    _ => 0,
                },
                type_attr: 0x8e, // present, DPL0, 64-bit interrupt gate
                offset_mid: (addr >> 16) as u16,
                offset_hi: (addr >> 32) as u32,
                reserved: 0,
            };
        }

        let gdtr = DescriptorPointer {
            limit: (size_of::<Gdt>() - 1) as u16,
            base: gdt as u64,
        };
        let idtr = DescriptorPointer {
            limit: (size_of::<Idt>() - 1) as u16,
            base: idt as u64,
        };
        core::arch::asm!(
            "lgdt [{gdtr}]",
            // Reload CS with a far return, then the data segment registers.
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            "mov {tmp:e}, {tss}",
            "ltr {tmp:x}",
            "lidt [{idtr}]",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            cs = const KERNEL_CS as u64,
            ds = const KERNEL_DS as u32,
            tss = const TSS_SEL as u32,
            tmp = out(reg) _,
        );
    }
}
