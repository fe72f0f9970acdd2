//! W^X self tests, reachable only as the VMM's fault-injection modules
//! (`\0vmm-selftest:wx-<what>` with `FLAG_TEST_HOSTCALLS`, see `selftest` in main.rs):
//! each does one thing W^X forbids, which must end the guest with a page fault (vector 14)
//! that the VMM reports with the faulting address. Tests/wx.rs runs every one.

use alloc::boxed::Box;

use super::vmem::{self, Prot};
use vmm_abi::layout;

/// `ret`, repeated.
const RET: u8 = 0xc3;
/// `mov eax, 42; ret`.
const RETURN_42: [u8; 6] = [0xb8, 42, 0, 0, 0, RET];

/// Read-only data (placed in .rodata).
static RODATA: [u8; 16] = [RET; 16];
/// Writable data (placed in .data): code W^X must not run.
static mut DATA: [u8; 16] = [RET; 16];

/// Write a byte at `addr` (a page fault unless writable).
fn poke(addr: usize) {
    // SAFETY: deliberately writes where W^X forbids it: a page fault, reported, halts. If
    // the write succeeded, it changed one byte the test then reports as not faulting.
    unsafe { core::arch::asm!("mov byte ptr [{}], 0x90", in(reg) addr, options(nostack)) };
}

/// Call `addr` as a function returning u32 (a page fault unless executable).
fn call(addr: usize) -> u32 {
    let r: u32;
    // SAFETY: deliberately calls into memory W^X must keep from executing; where it is
    // executable (a read-execute mapping), the caller put a whole function there.
    unsafe {
        core::arch::asm!("call {}", in(reg) addr, out("eax") r, clobber_abi("C"));
    }
    r
}

/// Run W^X self test `what` (`wx-...`); returns only if the test's step did not fault,
/// which the caller reports as a panic naming it.
pub fn run(what: &[u8]) {
    match what {
        // The kernel's own text.
        b"wx-write-text" => poke(layout::KERNEL_BASE as usize),
        // Its read-only data.
        b"wx-write-rodata" => poke(core::hint::black_box(RODATA.as_ptr()) as usize),
        // The page tables, through the identity map.
        b"wx-write-page-table" => poke(layout::PML4_GPA as usize),
        // Code in .data, on the stack, on the heap.
        b"wx-exec-data" => {
            call(core::hint::black_box(&raw const DATA) as usize);
        }
        b"wx-exec-stack" => {
            let buf = core::hint::black_box([RET; 64]);
            call(buf.as_ptr() as usize);
        }
        b"wx-exec-heap" => {
            let b = core::hint::black_box(Box::new([RET; 64]));
            call(b.as_ptr() as usize);
        }
        // wasmtime's memory: read-write data is not executable ...
        b"wx-vmem-exec-data" => {
            let va = vmem_with(&RETURN_42, Prot::ReadWrite);
            call(va);
        }
        // ... read-execute code runs, but is not writable at its address ...
        b"wx-vmem-write-code" => {
            let va = vmem_with(&RETURN_42, Prot::ReadExec);
            assert_eq!(call(va), 42, "code mapped read-execute did not run");
            poke(va);
        }
        // ... nor through the identity map of the memory behind it.
        b"wx-vmem-write-code-identity" => {
            let va = vmem_with(&RETURN_42, Prot::ReadExec);
            assert_eq!(call(va), 42, "code mapped read-execute did not run");
            let pa = vmem::translate(va).expect("code page not mapped");
            poke(pa);
        }
        // Read-only data is not writable.
        b"wx-vmem-write-read-only" => {
            let va = vmem_with(&RETURN_42, Prot::Read);
            poke(va);
        }
        _ => return,
    }
    panic!(
        "W^X self test {} did not fault",
        core::str::from_utf8(what).unwrap_or("?")
    );
}

/// Two pages of wasmtime-style memory holding `code`, then given protection `prot`.
fn vmem_with(code: &[u8], prot: Prot) -> usize {
    let va = vmem::reserve(2 * 4096, Prot::ReadWrite).expect("reserve memory");
    // SAFETY: the reservation's first page was just mapped read-write.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), va as *mut u8, code.len()) };
    vmem::protect(va, 4096, prot).expect("protect memory");
    va
}
