//! A hostile guest, for the VMM's tests only (feature `hostile`; never in the image the
//! VMM embeds): instead of running the module, it attacks the hostcall boundary with what
//! the request names. `tests/hostile.rs` builds it (see there) and runs it through
//! `$VMM_GUEST_KERNEL` with `vmm run`, and as a template next to normal ones in `vmm serve`.
//!
//! It asks for its function as the real kernel does (a runtime base is taken there), then
//! reads the first [`NAME_LEN`] bytes of the request (a function template is taken there):
//! the attack's name, up to a newline. The rest of the request is the attack's payload.
//! `ok` and the attacks that end normally exit 0 with a line of what the guest sees; the
//! others send a hostcall the VMM must refuse (out of range, overlapping, oversized,
//! repeated, unknown) and halt if it is ever answered.

use crate::arch::x86_64::{self as cpu, hostcall};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};
use vmm_abi::{layout, Mailbox, Op};

/// Bytes of the request that name the attack.
pub const NAME_LEN: usize = 32;

/// Set by `mark`: a request served later by a reset instance must not see it.
static mut MARKER: [u8; 16] = [0; 16];
const MARK: &[u8; 16] = b"hostile-marker!!";

/// The code `overlap-code` overwrites with its payload (through a read of stdin whose
/// buffer is this function); every request calls it, so a reset that left the payload in
/// place would fault the next one.
#[inline(never)]
extern "C" fn victim() -> u64 {
    core::hint::black_box(42)
}

/// Guest RAM size, read from the mailbox at the start (an attack may overwrite the
/// mailbox: its own loss, which must not fault the report).
static MEM_SIZE: AtomicU64 = AtomicU64::new(0);

fn mem_size() -> u64 {
    MEM_SIZE.load(Ordering::Relaxed)
}

fn call(op: u64, args: &[u64]) -> (u64, u64) {
    hostcall::raw(op, args)
}

/// Exit 0 with `line` on stdout.
fn exit(line: &str) -> ! {
    let b = line.as_bytes();
    call(
        Op::Exit as u64,
        &[0, b.as_ptr() as u64, b.len() as u64, 0, 0, 0],
    );
    cpu::halt_forever()
}

/// The VMM answered a hostcall it had to refuse.
fn answered(what: &str) -> ! {
    let mut s = alloc::string::String::new();
    let _ = write!(s, "hostile: the VMM answered {what}");
    exit(&s)
}

/// The region `mark` grants and writes a marker into: in the middle of RAM, above what the
/// idle heap uses, below the module.
fn mid_region() -> u64 {
    mem_size() / 2 / layout::GRANT_REGION * layout::GRANT_REGION
}

fn is_granted(gpa: u64) -> bool {
    let r = (gpa / layout::GRANT_REGION) as usize;
    // SAFETY: a volatile byte read inside the grant map page (r < MAX_MEM_MIB / 2).
    let b =
        unsafe { core::ptr::read_volatile((layout::GRANT_MAP_GPA as usize + r / 8) as *const u8) };
    b & (1 << (r % 8)) != 0
}

/// Regions the grant map names.
fn granted_regions() -> u32 {
    let mut n = 0;
    for i in 0..layout::GRANT_MAP_BYTES {
        // SAFETY: the grant map page is identity-mapped RAM the VMM writes between
        // hostcalls; a volatile byte read inside it.
        let b =
            unsafe { core::ptr::read_volatile((layout::GRANT_MAP_GPA as usize + i) as *const u8) };
        n += b.count_ones();
    }
    n
}

/// What the guest sees: whether a marker is set, its grants, and that its code is intact.
fn status() -> alloc::string::String {
    // SAFETY: a copy of a static only this single-threaded kernel touches.
    let marker = unsafe { core::ptr::read_volatile(&raw const MARKER) };
    // The middle region's first bytes, if it is granted (touching it otherwise would
    // stop the guest).
    let mid = mid_region();
    let mid = if is_granted(mid) {
        // SAFETY: granted, identity-mapped RAM of this guest; a volatile copy.
        let m = unsafe { core::ptr::read_volatile(mid as *const [u8; 16]) };
        if m == *MARK {
            "set"
        } else if m == [0; 16] {
            "zero"
        } else {
            "other"
        }
    } else {
        "ungranted"
    };
    let mut s = alloc::string::String::new();
    let _ = write!(
        s,
        "marker={} mid={mid} grants={} victim={}",
        if marker == *MARK { "set" } else { "none" },
        granted_regions(),
        victim()
    );
    s
}

/// Read the rest of the request into `[gpa, gpa + len)` (wherever that is), in chunks of
/// `len`; the bytes read in all.
fn read_rest_into(gpa: u64, len: u64) -> u64 {
    let mut total = 0;
    loop {
        let (n, eof) = call(Op::ReadStdin as u64, &[gpa, len]);
        total += n;
        if eof != 0 || n == 0 {
            return total;
        }
    }
}

/// Entered after the heap is set up; never returns.
pub fn run() {
    MEM_SIZE.store(
        hostcall::read(offset_of!(Mailbox, mem_size)),
        Ordering::Relaxed,
    );
    // The function config, as the real kernel asks for it (the runtime base is taken here).
    let mut cap = 64 << 10;
    let cfg = loop {
        let mut cfg: Vec<u8> = vec![0; cap];
        let (total, _) = call(
            Op::GetFunction as u64,
            &[cfg.as_mut_ptr() as u64, cap as u64],
        );
        if total <= cap as u64 {
            cfg.truncate(total as usize);
            break cfg;
        }
        cap = total as usize;
    };
    // An attack on the template itself (named by an argument of the function): a grant map
    // whose regions alternate (all inside RAM: one past it is refused), left in guest memory where the template is taken (the next
    // read). Every restore registers slots for what it names.
    if cfg.windows(12).any(|w| w == b"fragment-map") {
        // SAFETY: the grant map page is identity-mapped RAM of this guest; the VMM reads it
        // (bounded, hostile input) only when it takes or restores a template.
        unsafe {
            core::ptr::write_bytes(
                layout::GRANT_MAP_GPA as *mut u8,
                0x55,
                (mem_size() / layout::GRANT_REGION / 8) as usize,
            )
        };
    }
    let mut name_buf = [0u8; NAME_LEN];
    let (n, eof) = call(
        Op::ReadStdin as u64,
        &[name_buf.as_mut_ptr() as u64, NAME_LEN as u64],
    );
    let got = &name_buf[..(n as usize).min(NAME_LEN)];
    let name = got.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let name: Vec<u8> = name.iter().copied().filter(|b| *b != b' ').collect();
    let size = mem_size();
    let scratch = vec![0x5au8; 4096];
    let p = scratch.as_ptr() as u64;
    match &name[..] {
        b"ok" => {
            if eof == 0 {
                read_rest_into(p, 4096);
            }
            exit(&status())
        }
        // Leaves a marker in kernel data and a new grant, then ends normally (the instance
        // is reset and reused) or with a refused hostcall.
        b"mark" | b"mark-fail" => {
            // SAFETY: a write of a static only this single-threaded kernel touches.
            unsafe { core::ptr::write_volatile(&raw mut MARKER, *MARK) };
            let mid = mid_region();
            call(Op::Grant as u64, &[mid, layout::GRANT_REGION]);
            // SAFETY: just granted, identity-mapped RAM of this guest, unused by the heap
            // (a guest's own memory: the point is to see whether it outlives the request).
            unsafe { core::ptr::write_volatile(mid as *mut [u8; 16], *MARK) };
            if name == b"mark" {
                exit(&status())
            }
            call(Op::Write as u64, &[1, size - 8, 16]);
            answered("a write past the end of RAM")
        }
        // Out of range.
        b"oob-stdin" => {
            call(Op::ReadStdin as u64, &[size - 16, 4096]);
            answered("a read of stdin past the end of RAM")
        }
        b"oob-write" => {
            call(Op::Write as u64, &[1, size - 8, 16]);
            answered("a write past the end of RAM")
        }
        b"oob-exit" => {
            call(Op::Exit as u64, &[0, u64::MAX - 8, 100, 0, 0, 0]);
            answered("an exit with stdout at the top of the address space")
        }
        b"oob-grant" => {
            call(Op::Grant as u64, &[size, layout::GRANT_REGION]);
            answered("a grant past the end of RAM")
        }
        b"unaligned-grant" => {
            call(
                Op::Grant as u64,
                &[layout::GRANT_REGION + 0x1000, layout::GRANT_REGION],
            );
            answered("an unaligned grant")
        }
        // Oversized.
        b"oversize-write" => {
            call(Op::Write as u64, &[1, 0, vmm_abi::MAX_TRANSFER_LEN + 1]);
            answered("a write beyond the transfer limit")
        }
        b"oversize-panic" => {
            call(Op::Panic as u64, &[p, 1 << 30, 0]);
            answered("a panic message beyond the limit")
        }
        b"flood" => {
            // 64 KiB writes until the VMM's output cap (64 MiB) stops the guest.
            let big = vec![b'f'; 64 << 10];
            for _ in 0..100_000 {
                call(
                    Op::Write as u64,
                    &[1, big.as_ptr() as u64, big.len() as u64],
                );
            }
            answered("6.4 GB of writes")
        }
        // Malformed.
        b"unknown-op" => {
            call(99, &[p, 16]);
            answered("op 99")
        }
        b"bad-fd" => {
            call(Op::Write as u64, &[7, p, 16]);
            answered("a write to fd 7")
        }
        b"bad-port" => {
            // SAFETY: an `out` to a port the VMM does not serve: it stops the guest.
            unsafe {
                core::arch::asm!("out dx, al", in("dx") 0x3f8u16, in("al") b'x',
                    options(nostack, preserves_flags))
            };
            answered("an out to port 0x3f8")
        }
        b"in-port" => {
            let v: u8;
            // SAFETY: an `in` from the hostcall port, which the VMM only serves for `out`.
            unsafe {
                core::arch::asm!("in al, dx", in("dx") vmm_abi::HOSTCALL_PORT, out("al") v,
                    options(nostack, preserves_flags))
            };
            core::hint::black_box(v);
            answered("an in from the hostcall port")
        }
        // Overlapping: the rest of the request read over the guest's own structures.
        b"overlap-mailbox" => {
            let n = read_rest_into(layout::MAILBOX_GPA, 4096);
            let mut s = status();
            let _ = write!(s, " read={n}");
            exit(&s)
        }
        b"overlap-code" => {
            // The payload is code (e.g. `ud2`s): it runs, and faults.
            read_rest_into(victim as *const () as u64, 64);
            victim();
            answered("a read of stdin over the kernel's code, which then ran")
        }
        b"overlap-output" => {
            // stdout and stderr over the same bytes, which are the mailbox.
            let m = layout::MAILBOX_GPA;
            call(Op::Exit as u64, &[0, m, 64, m + 8, 64, 0]);
            answered("nothing (exit returned)")
        }
        // Repeated.
        b"repeat-grant" => {
            let last = size - layout::GRANT_REGION;
            for _ in 0..20_000 {
                call(Op::Grant as u64, &[last, layout::GRANT_REGION]);
            }
            exit(&status())
        }
        b"repeat-stdin" => {
            let mut eofs = 0;
            for _ in 0..10_000 {
                let (_, e) = call(Op::ReadStdin as u64, &[p, 4096]);
                eofs += e;
            }
            let mut s = status();
            let _ = write!(s, " eofs={eofs}");
            exit(&s)
        }
        b"repeat-function" => {
            // The function was given at the base: asking again stops the run.
            call(Op::GetFunction as u64, &[p, 4096]);
            answered("a second request for the function")
        }
        _ => {
            let mut s = alloc::string::String::from("hostile: unknown attack ");
            s.push_str(&alloc::string::String::from_utf8_lossy(&name));
            exit(&s)
        }
    }
}
