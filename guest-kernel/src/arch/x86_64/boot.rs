//! The ELF entry point.
//!
//! The VMM enters `_start` in 64-bit mode with paging on (identity map), a flat CS
//! (selector 0x08), data selectors 0x10 and `RSP = layout::INITIAL_RSP` (16n - 8).
//! `_start` records the entry TSC in the mailbox before anything else, makes sure SSE
//! is usable (CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR | OSXMMEXCPT; control registers are
//! only written when a bit is wrong, since a CR write may trap to the VMM on PVM),
//! resets the x87/SSE state and calls `kernel_main`, which never returns.

use vmm_abi::{layout, offsets};

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const MXCSR_DEFAULT: u32 = 0x1f80;

/// MXCSR value loaded at boot (all exceptions masked, round to nearest).
#[no_mangle]
static BOOT_MXCSR: u32 = MXCSR_DEFAULT;

core::arch::global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    ".type _start, @function",
    "_start:",
    // stats.kernel_entry = rdtsc, first thing.
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov qword ptr [{entry_stat}], rax",
    "    xor ebp, ebp",
    // SSE: CR0.EM = 0, CR0.MP = 1 (write only if needed).
    "    mov rax, cr0",
    "    mov rcx, rax",
    "    btr rcx, {em_bit}",
    "    bts rcx, {mp_bit}",
    "    cmp rcx, rax",
    "    je 2f",
    "    mov cr0, rcx",
    "2:",
    // CR4.OSFXSR | OSXMMEXCPT (write only if needed).
    "    mov rax, cr4",
    "    mov rcx, rax",
    "    or rcx, {cr4_sse}",
    "    cmp rcx, rax",
    "    je 3f",
    "    mov cr4, rcx",
    "3:",
    "    fninit",
    "    ldmxcsr [rip + {mxcsr}]",
    // Keep the ABI's stack alignment whatever the VMM passed: RSP = 16n, then `call`
    // leaves the callee at 16n - 8 as the SysV ABI requires.
    "    and rsp, -16",
    "    call {main}",
    "4:  hlt",
    "    jmp 4b",
    ".size _start, . - _start",
    entry_stat = const layout::MAILBOX_GPA as usize + offsets::STATS,
    em_bit = const CR0_EM.trailing_zeros(),
    mp_bit = const CR0_MP.trailing_zeros(),
    cr4_sse = const CR4_OSFXSR | CR4_OSXMMEXCPT,
    mxcsr = sym BOOT_MXCSR,
    main = sym crate::kernel_main,
);
