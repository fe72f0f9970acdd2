//! The hostcall port and volatile mailbox access.
//!
//! A hostcall writes `op` and `args` into the mailbox page (identity-mapped at
//! `layout::MAILBOX_GPA`), executes `out HOSTCALL_PORT, al` (a VM exit to the VMM, which
//! serves it synchronously) and reads `ret`/`ret2` back.

use vmm_abi::{layout, offsets, HOSTCALL_PORT};

/// Byte offset of `stats.<word>` in the mailbox.
pub const fn stats_offset(word: usize) -> usize {
    offsets::STATS + word * 8
}
pub const STATS_KERNEL_READY: usize = stats_offset(1);
pub const STATS_COMPILED: usize = stats_offset(2);
pub const STATS_INSTANTIATED: usize = stats_offset(3);
pub const STATS_RUNTIME_INITIALIZED: usize = stats_offset(4);
pub const STATS_FUNCTION_START: usize = stats_offset(5);
pub const STATS_FUNCTION_END: usize = stats_offset(6);
pub const STATS_HOSTCALLS: usize = stats_offset(7);

/// Read the mailbox word at byte offset `off`.
#[inline(always)]
pub fn read(off: usize) -> u64 {
    debug_assert!(off.is_multiple_of(8) && off < vmm_abi::MAILBOX_BYTES);
    // SAFETY: the mailbox page is identity-mapped RAM owned by the kernel/VMM protocol;
    // `off` is an aligned offset inside it (all callers pass ABI constants).
    unsafe { core::ptr::read_volatile((layout::MAILBOX_GPA as usize + off) as *const u64) }
}

/// Write the mailbox word at byte offset `off`.
#[inline(always)]
pub fn write(off: usize, v: u64) {
    debug_assert!(off.is_multiple_of(8) && off < vmm_abi::MAILBOX_BYTES);
    // SAFETY: as in `read`.
    unsafe { core::ptr::write_volatile((layout::MAILBOX_GPA as usize + off) as *mut u64, v) }
}

/// Issue hostcall `op` with up to 6 `args` (the rest are zeroed); returns (ret, ret2).
pub fn raw(op: u64, args: &[u64]) -> (u64, u64) {
    write(offsets::OP, op);
    for i in 0..6 {
        write(offsets::ARGS + i * 8, args.get(i).copied().unwrap_or(0));
    }
    write(STATS_HOSTCALLS, read(STATS_HOSTCALLS).wrapping_add(1));
    // SAFETY: `out` to the hostcall port exits to the VMM, which reads the mailbox and
    // any guest memory the args name, and writes ret/ret2 (and buffers the op names).
    // No `nomem`: the asm is a compiler barrier, so buffer writes happen before it and
    // reads of what the VMM wrote happen after it.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") HOSTCALL_PORT,
            in("al") 0u8,
            options(nostack, preserves_flags),
        )
    };
    (read(offsets::RET), read(offsets::RET2))
}
