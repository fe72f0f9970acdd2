//! The C memory functions the compiler emits calls to (`memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp`); the host target's libc is not linked. And the C math functions
//! wasmtime's runtime calls (`fmod`, `fmodf`), built with hardware floats like the rest of
//! the kernel: the target's prebuilt ones take floats in integer registers.
//!
//! Small sizes use a few overlapping unaligned loads/stores (wasmi copies many small
//! values); larger ones `rep movsb`/`rep stosb`, which is fast on CPUs with ERMSB/FSRM.
//! None of them is written as a byte loop that the compiler could turn back into a call
//! to itself.

use core::arch::asm;
use core::ptr::{read_unaligned as ld, write_unaligned as st};

/// Copy `n <= 32` bytes. All loads happen before any store, so overlap is fine.
#[inline(always)]
unsafe fn copy_small(d: *mut u8, s: *const u8, n: usize) {
    // SAFETY: the caller guarantees `s[..n]` readable and `d[..n]` writable; every access
    // below stays inside those ranges for the `n` of its branch.
    unsafe {
        if n >= 16 {
            let a = ld(s as *const u128);
            let b = ld(s.add(n - 16) as *const u128);
            st(d as *mut u128, a);
            st(d.add(n - 16) as *mut u128, b);
        } else if n >= 8 {
            let a = ld(s as *const u64);
            let b = ld(s.add(n - 8) as *const u64);
            st(d as *mut u64, a);
            st(d.add(n - 8) as *mut u64, b);
        } else if n >= 4 {
            let a = ld(s as *const u32);
            let b = ld(s.add(n - 4) as *const u32);
            st(d as *mut u32, a);
            st(d.add(n - 4) as *mut u32, b);
        } else if n > 0 {
            let a = *s;
            let b = *s.add(n / 2);
            let c = *s.add(n - 1);
            *d = a;
            *d.add(n / 2) = b;
            *d.add(n - 1) = c;
        }
    }
}

/// # Safety
/// C `memcpy` contract: `s[..n]` readable, `d[..n]` writable, no overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if n <= 32 {
        // SAFETY: forwarded contract.
        unsafe { copy_small(d, s, n) };
    } else {
        // SAFETY: forwarded contract; DF is clear (SysV ABI: clear on function entry).
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") d => _,
                inout("rsi") s => _,
                options(nostack, preserves_flags)
            )
        };
    }
    d
}

/// # Safety
/// C `memmove` contract: `s[..n]` readable, `d[..n]` writable; they may overlap.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if n <= 32 {
        // SAFETY: copy_small loads everything before storing, so overlap is fine.
        unsafe { copy_small(d, s, n) };
    } else if (d as usize).wrapping_sub(s as usize) >= n {
        // d is below s, or the ranges do not overlap: a forward copy is correct.
        // SAFETY: forwarded contract; DF is clear.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") d => _,
                inout("rsi") s => _,
                options(nostack, preserves_flags)
            )
        };
    } else {
        // d overlaps the tail of s: copy backwards, 8 bytes at a time, then the head.
        // SAFETY: forwarded contract; every access stays inside the two ranges and each
        // chunk is loaded before it is stored, moving from the end towards the start.
        unsafe {
            let mut i = n;
            while i >= 8 {
                i -= 8;
                let v = ld(s.add(i) as *const u64);
                asm!("", options(nomem, nostack, preserves_flags)); // keep it a loop, not a call
                st(d.add(i) as *mut u64, v);
            }
            while i > 0 {
                i -= 1;
                let v = *s.add(i);
                asm!("", options(nomem, nostack, preserves_flags)); // keep it a loop, not a call
                *d.add(i) = v;
            }
        }
    }
    d
}

/// # Safety
/// C `memset` contract: `d[..n]` writable.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    let b = c as u8;
    if n <= 32 {
        let v = u64::from(b) * 0x0101_0101_0101_0101;
        // SAFETY: forwarded contract; each branch stays inside d[..n].
        unsafe {
            if n >= 16 {
                let w = (u128::from(v) << 64) | u128::from(v);
                st(d as *mut u128, w);
                st(d.add(n - 16) as *mut u128, w);
            } else if n >= 8 {
                st(d as *mut u64, v);
                st(d.add(n - 8) as *mut u64, v);
            } else if n >= 4 {
                st(d as *mut u32, v as u32);
                st(d.add(n - 4) as *mut u32, v as u32);
            } else if n > 0 {
                *d = b;
                *d.add(n / 2) = b;
                *d.add(n - 1) = b;
            }
        }
    } else {
        // SAFETY: forwarded contract; DF is clear.
        unsafe {
            asm!(
                "rep stosb",
                inout("rcx") n => _,
                inout("rdi") d => _,
                in("al") b,
                options(nostack, preserves_flags)
            )
        };
    }
    d
}

/// # Safety
/// C `memcmp` contract: `a[..n]` and `b[..n]` readable.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    // SAFETY: forwarded contract; all accesses are below n.
    unsafe {
        while i + 8 <= n {
            let x = ld(a.add(i) as *const u64);
            let y = ld(b.add(i) as *const u64);
            if x != y {
                // The first differing byte decides: compare big-endian.
                return if x.swap_bytes() < y.swap_bytes() {
                    -1
                } else {
                    1
                };
            }
            i += 8;
        }
        while i < n {
            let (x, y) = (*a.add(i), *b.add(i));
            asm!("", options(nomem, nostack, preserves_flags)); // keep it a loop, not a call
            if x != y {
                return i32::from(x) - i32::from(y);
            }
            i += 1;
        }
    }
    0
}

/// # Safety
/// As `memcmp`; only zero / non-zero is meaningful.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// C `strlen` contract (some core paths may call it): `s` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: forwarded contract: every byte up to the NUL is readable.
    unsafe {
        while *s.add(n) != 0 {
            asm!("", options(nomem, nostack, preserves_flags)); // keep it a loop, not a call
            n += 1;
        }
    }
    n
}

/// C `fmod` (wasmtime's `f64.nearest` libcall), with hardware floats.
#[no_mangle]
pub extern "C" fn fmod(x: f64, y: f64) -> f64 {
    libm::fmod(x, y)
}

/// C `fmodf` (wasmtime's `f32.nearest` libcall), with hardware floats.
#[no_mangle]
pub extern "C" fn fmodf(x: f32, y: f32) -> f32 {
    libm::fmodf(x, y)
}
