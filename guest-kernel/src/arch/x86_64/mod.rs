//! x86_64 support: entry point, CPU setup (SSE, GDT, TSS, IDT), exception reporting,
//! the hostcall port, the C memory functions the compiler calls, and the platform wasmtime
//! runs on (virtual memory and traps).

pub mod boot;
pub mod capi;
pub mod descriptors;
pub mod exceptions;
pub mod hostcall;
pub mod mem;
pub mod vmem;
pub mod wx_selftest;

/// Read the time-stamp counter (on PVM the host's TSC, read natively).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the TSC into edx:eax; CR4.TSD is clear (we never set it).
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Halt forever. `hlt` sits in a loop: on PVM the first `hlt` after the host wrote the
/// VIF MSR returns at once, and any wake-up must not fall through.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: hlt only waits for an interrupt; nothing is touched.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack, preserves_flags)) };
    }
}

/// CR2: the faulting address of the last page fault.
#[inline(always)]
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects (the kernel runs at CPL0 as far as it knows;
    // PVM emulates the access).
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}
