//! The guest kernel image: a `no_std` unikernel that runs one WebAssembly module.
//!
//! Boot (`arch::x86_64::boot::_start`) -> [`kernel_main`]: check the mailbox, load the
//! GDT/TSS/IDT, set up the heap over `[HEAP_START, module_gpa)`, mark `kernel_ready`,
//! then hand the module to the engine the VMM chose (`guest_kernel::engine`: wasmi
//! compiles WebAssembly, wasmtime loads an artifact the VMM compiled) with a [`KernelHost`]
//! that talks to the VMM through hostcalls, report the result (`Op::Exit` / `Op::Error`)
//! and halt. Any CPU exception that is not a wasm trap is reported with `Op::Fault`, any
//! panic with `Op::Panic`.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
#[cfg(feature = "hostile")]
mod hostile;

use alloc::vec::Vec;
use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write as _;
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arch::x86_64::{self as cpu, hostcall};
use guest_kernel::heap::LockedHeap;
use guest_kernel::runner::RunOptions;
use guest_kernel::{engine, Host, Phase, RunError, RunOutput, Runtime};
use vmm_abi::{layout, offsets, GuestStats, Mailbox, Op};

// --- mailbox fields the kernel reads (offsets from the ABI's repr(C) struct) ----------
const MB_MAGIC: usize = offset_of!(Mailbox, magic);
const MB_ABI_VERSION: usize = offset_of!(Mailbox, abi_version);
const MB_FLAGS: usize = offset_of!(Mailbox, flags);
const MB_MEM_SIZE: usize = offset_of!(Mailbox, mem_size);
const MB_TSC_KHZ: usize = offset_of!(Mailbox, tsc_khz);
const MB_MODULE_GPA: usize = offset_of!(Mailbox, module_gpa);
const MB_MODULE_LEN: usize = offset_of!(Mailbox, module_len);
const MB_RUNTIME: usize = offset_of!(Mailbox, runtime);
const MB_ENGINE: usize = offset_of!(Mailbox, engine);
const _: () = assert!(offset_of!(Mailbox, stats) == offsets::STATS);
const _: () =
    assert!(offset_of!(GuestStats, kernel_ready) == hostcall::STATS_KERNEL_READY - offsets::STATS);
const _: () =
    assert!(offset_of!(GuestStats, hostcalls) == hostcall::STATS_HOSTCALLS - offsets::STATS);

/// TSC frequency assumed when the VMM does not say (never expected; clocks would drift).
const FALLBACK_TSC_KHZ: u64 = 2_000_000;
/// First guess for the function configuration's size.
const CONFIG_BUFFER: usize = 4 << 20;

// --- heap ------------------------------------------------------------------------------

static HEAP: LockedHeap = LockedHeap::empty();
/// Bytes managed by the heap (for the out-of-memory message; read without the lock).
static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Size of the last allocation that failed (for the out-of-memory message).
static LAST_FAILED_ALLOC: AtomicUsize = AtomicUsize::new(0);

struct KernelAlloc;

// SAFETY: forwards to `LockedHeap`, a correct `GlobalAlloc`; only records failures.
unsafe impl GlobalAlloc for KernelAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded GlobalAlloc contract.
        let p = unsafe { HEAP.alloc(layout) };
        if p.is_null() {
            LAST_FAILED_ALLOC.store(layout.size(), Ordering::Relaxed);
        }
        p
    }
    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        // SAFETY: forwarded GlobalAlloc contract.
        unsafe { HEAP.dealloc(p, layout) }
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded GlobalAlloc contract.
        let q = unsafe { HEAP.realloc(p, layout, new_size) };
        if q.is_null() {
            LAST_FAILED_ALLOC.store(new_size, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: KernelAlloc = KernelAlloc;

/// Whether region `r` of guest RAM is granted, by the VMM's grant map.
fn region_granted(r: usize) -> bool {
    let word = r / 64;
    if word * 8 >= layout::GRANT_MAP_BYTES {
        return false;
    }
    // SAFETY: the grant map is identity-mapped RAM below the kernel, written by the VMM
    // only; `word` lies inside it (checked above).
    let w = unsafe {
        core::ptr::read_volatile((layout::GRANT_MAP_GPA as usize + word * 8) as *const u64)
    };
    w & (1 << (r % 64)) != 0
}

/// The heap's grant function: make `[lo, hi)` (whole regions) accessible. Asks the VMM
/// (one exit) only for the regions its grant map does not name yet: after a reset the
/// map says what the instance already has.
fn grant_memory(lo: usize, hi: usize) -> bool {
    let region = layout::GRANT_REGION as usize;
    let (first, end) = (lo / region, hi.div_ceil(region));
    let Some(miss) = (first..end).find(|&r| !region_granted(r)) else {
        return true;
    };
    let last = (miss..end)
        .rev()
        .find(|&r| !region_granted(r))
        .unwrap_or(miss);
    let (gpa, len) = (miss * region, (last + 1 - miss) * region);
    let (ret, _) = hostcall::raw(Op::Grant as u64, &[gpa as u64, len as u64]);
    ret == 0 && (miss..=last).all(region_granted)
}

// --- entry -----------------------------------------------------------------------------

/// Called by `_start` with SSE enabled and RSP = 16n - 8.
#[no_mangle]
pub extern "C" fn kernel_main() -> ! {
    if hostcall::read(MB_MAGIC) != vmm_abi::MAILBOX_MAGIC
        || hostcall::read(MB_ABI_VERSION) != vmm_abi::ABI_VERSION
    {
        panic!(
            "mailbox magic/ABI version mismatch: magic {:#x}, abi_version {} (kernel speaks {})",
            hostcall::read(MB_MAGIC),
            hostcall::read(MB_ABI_VERSION),
            vmm_abi::ABI_VERSION
        );
    }
    // SAFETY: first thing at boot, once.
    unsafe { cpu::descriptors::init() };
    // What this guest's `cpuid` reports, for the VMM to show and check against the CPU
    // model it set (and compiled the module for).
    for (i, w) in guest_kernel::cpuid_regs()
        .to_words()
        .into_iter()
        .enumerate()
    {
        hostcall::write(offsets::CPUID + i * 8, w);
    }

    let mem_size = hostcall::read(MB_MEM_SIZE);
    let module_gpa = hostcall::read(MB_MODULE_GPA);
    let module_len = hostcall::read(MB_MODULE_LEN);
    let module_end = module_gpa.checked_add(module_len);
    if module_len > 0
        && (module_gpa < layout::HEAP_START || module_end.is_none_or(|e| e > mem_size))
    {
        panic!("module at {module_gpa:#x}+{module_len:#x} lies outside guest RAM ({mem_size:#x})");
    }
    let heap_end = if module_len > 0 { module_gpa } else { mem_size } & !(layout::PAGE_SIZE - 1);
    if heap_end <= layout::HEAP_START {
        panic!("no room for a heap: heap would end at {heap_end:#x}");
    }
    let heap_len = (heap_end - layout::HEAP_START) as usize;
    // SAFETY: [HEAP_START, heap_end) is identity-mapped RAM below the module bytes, used by
    // nothing else (the layout puts the stack and the image below HEAP_START); once.
    unsafe { HEAP.init(layout::HEAP_START as *mut u8, heap_len) };
    HEAP.set_grant(grant_memory);
    HEAP_BYTES.store(HEAP.stats().0, Ordering::Relaxed);

    let module: &'static [u8] = if module_len == 0 {
        &[]
    } else {
        // SAFETY: checked above to lie inside RAM above the heap; the VMM wrote it before
        // boot and nothing writes it afterwards.
        unsafe { core::slice::from_raw_parts(module_gpa as *const u8, module_len as usize) }
    };
    let test_hostcalls = hostcall::read(MB_FLAGS) & vmm_abi::FLAG_TEST_HOSTCALLS != 0;
    let runtime = match hostcall::read(MB_RUNTIME) {
        vmm_abi::RUNTIME_QJS => Runtime::Qjs,
        _ => Runtime::Wasi,
    };
    let host = KernelHost::new(test_hostcalls);
    hostcall::write(hostcall::STATS_KERNEL_READY, cpu::rdtsc());
    // The VMM's tests' hostile guest (never in the image the VMM embeds): does not return.
    #[cfg(feature = "hostile")]
    hostile::run();

    if test_hostcalls {
        selftest(module);
    }

    let opts = RunOptions {
        test_hostcalls,
        eager_compile: hostcall::read(MB_FLAGS) & vmm_abi::FLAG_EAGER_COMPILE != 0,
    };
    // Neither engine keeps anything that points into the module bytes once it has them
    // (wasmi translated them, wasmtime copied the artifact into its code memory): zero
    // them, so that snapshots neither store nor restore megabytes of dead bytes.
    let forget_module = || {
        // SAFETY: [module_gpa, +module_len) was checked above to lie in RAM above the
        // heap; `module` is not used after this point and nothing else refers to it.
        unsafe { core::ptr::write_bytes(module_gpa as *mut u8, 0, module_len as usize) };
    };
    let result = match hostcall::read(MB_ENGINE) {
        vmm_abi::ENGINE_WASMI => engine::wasmi::compile(module, opts).and_then(|compiled| {
            forget_module();
            let mut host = host;
            host.mark(Phase::Compiled);
            engine::wasmi::run(host, &compiled, runtime, opts)
        }),
        vmm_abi::ENGINE_WASMTIME => engine::wasmtime::load(module).and_then(|loaded| {
            forget_module();
            let mut host = host;
            host.mark(Phase::Compiled);
            engine::wasmtime::run(host, &loaded, runtime, opts)
        }),
        other => Err(RunError {
            code: vmm_abi::ERR_CONFIG,
            message: alloc::format!(
                "the VMM asked for WebAssembly engine {other}, which this guest kernel does not have"
            ),
        }),
    };
    report(result)
}

/// Hand the run's result to the VMM (`Op::Exit` or `Op::Error`) and halt.
fn report(result: Result<RunOutput, RunError>) -> ! {
    match result {
        Ok(out) => {
            hostcall::raw(
                Op::Exit as u64,
                &[
                    out.exit_code as u32 as u64,
                    out.stdout.as_ptr() as u64,
                    out.stdout.len() as u64,
                    out.stderr.as_ptr() as u64,
                    out.stderr.len() as u64,
                    (if out.stdout_truncated {
                        vmm_abi::EXIT_STDOUT_TRUNCATED
                    } else {
                        0
                    }) | (if out.stderr_truncated {
                        vmm_abi::EXIT_STDERR_TRUNCATED
                    } else {
                        0
                    }),
                ],
            );
        }
        Err(e) => {
            let msg = e.message.as_bytes();
            let len = msg.len().min(vmm_abi::MAX_MESSAGE_LEN as usize);
            hostcall::raw(Op::Error as u64, &[e.code, msg.as_ptr() as u64, len as u64]);
        }
    }
    cpu::halt_forever()
}

/// Fault-injection for the VMM's tests, only with `FLAG_TEST_HOSTCALLS` and a "module"
/// that is not wasm but `\0vmm-selftest:<what>`.
fn selftest(module: &[u8]) {
    let Some(what) = module.strip_prefix(b"\0vmm-selftest:") else {
        return;
    };
    match what {
        b"ud" => {
            // SAFETY: deliberately raises #UD, which is reported and halts.
            unsafe { core::arch::asm!("ud2") }
        }
        b"pf" => {
            // SAFETY: deliberately reads the unmapped guard range: #PF, reported, halts.
            let v = unsafe { core::ptr::read_volatile(layout::GUARD_START as *const u64) };
            core::hint::black_box(v);
        }
        b"so" => {
            core::hint::black_box(recurse(0));
        }
        b"oom" => {
            let mut v: Vec<Vec<u8>> = Vec::new();
            loop {
                v.push(alloc::vec![1u8; 64 << 20]);
            }
        }
        b"panic" => panic!("selftest panic"),
        w if w.starts_with(b"wx-") => cpu::wx_selftest::run(w),
        _ => {}
    }
}

/// Unbounded recursion: overflows the boot stack into the guard range (#PF while
/// pushing -> #DF on its IST stack).
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut buf = [0u8; 1024];
    buf[(depth % 1024) as usize] = depth as u8;
    core::hint::black_box(&mut buf);
    recurse(depth + 1) + u64::from(buf[7])
}

// --- the Host implementation -------------------------------------------------------------

/// `guest_kernel::Host` over hostcalls and the TSC.
struct KernelHost {
    /// ns per TSC tick, as a 32.32 fixed-point number.
    ns_per_tick_32: u64,
    boot_tsc: u64,
    /// Wall clock at `wall_tsc`, re-based after every hostcall.
    wall_ns: u64,
    wall_tsc: u64,
    entropy_seen: u64,
    test_hostcalls: bool,
}

impl KernelHost {
    fn new(test_hostcalls: bool) -> Self {
        let khz = match hostcall::read(MB_TSC_KHZ) {
            0 => FALLBACK_TSC_KHZ,
            k => k,
        };
        let tsc = cpu::rdtsc();
        KernelHost {
            ns_per_tick_32: (1_000_000u64 << 32) / khz,
            boot_tsc: tsc,
            wall_ns: hostcall::read(offsets::NOW_UNIX_NS),
            wall_tsc: tsc,
            entropy_seen: 0,
            test_hostcalls,
        }
    }

    fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((u128::from(ticks) * u128::from(self.ns_per_tick_32)) >> 32) as u64
    }

    /// A hostcall, then re-base the wall clock on the value the VMM just refreshed.
    fn call(&mut self, op: Op, args: &[u64]) -> (u64, u64) {
        let r = hostcall::raw(op as u64, args);
        self.wall_ns = hostcall::read(offsets::NOW_UNIX_NS);
        self.wall_tsc = cpu::rdtsc();
        r
    }
}

impl Host for KernelHost {
    fn now_unix_ns(&mut self) -> u64 {
        let dt = cpu::rdtsc().wrapping_sub(self.wall_tsc);
        self.wall_ns.wrapping_add(self.ticks_to_ns(dt))
    }

    fn monotonic_ns(&mut self) -> u64 {
        self.ticks_to_ns(cpu::rdtsc().wrapping_sub(self.boot_tsc))
    }

    fn take_entropy(&mut self) -> Option<[u8; 32]> {
        let generation = hostcall::read(offsets::ENTROPY_GEN);
        if generation == self.entropy_seen {
            return None;
        }
        self.entropy_seen = generation;
        let mut out = [0u8; 32];
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&hostcall::read(offsets::ENTROPY + i * 8).to_le_bytes());
        }
        Some(out)
    }

    fn get_function(&mut self) -> Vec<u8> {
        let mut cap = CONFIG_BUFFER;
        for _ in 0..4 {
            let mut buf: Vec<u8> = Vec::with_capacity(cap);
            let (total, _) = self.call(Op::GetFunction, &[buf.as_mut_ptr() as u64, cap as u64]);
            if total <= cap as u64 {
                // SAFETY: the VMM wrote `total <= cap` bytes at the buffer (the asm in the
                // hostcall is a compiler barrier, so the writes are visible).
                unsafe { buf.set_len(total as usize) };
                // A copy, not `shrink_to_fit`: the buffer is a large block, allocated after
                // the wasm linear memory; shrunk in place it would stay right after it and
                // make its next growth a copy. Freed, it goes back to the heap's top.
                return buf.to_vec();
            }
            cap = usize::try_from(total).unwrap_or(usize::MAX);
        }
        panic!("GetFunction: the function configuration kept growing ({cap} bytes)");
    }

    fn read_stdin(&mut self, buf: &mut [u8]) -> (usize, bool) {
        let (n, eof) = self.call(Op::ReadStdin, &[buf.as_mut_ptr() as u64, buf.len() as u64]);
        ((n as usize).min(buf.len()), eof != 0)
    }

    fn write_output(&mut self, fd: u32, data: &[u8]) {
        self.call(
            Op::Write,
            &[u64::from(fd), data.as_ptr() as u64, data.len() as u64],
        );
    }

    fn mark(&mut self, phase: Phase) {
        let off = match phase {
            Phase::Compiled => hostcall::STATS_COMPILED,
            Phase::Instantiated => hostcall::STATS_INSTANTIATED,
            Phase::RuntimeInitialized => hostcall::STATS_RUNTIME_INITIALIZED,
            Phase::FunctionStart => hostcall::STATS_FUNCTION_START,
            Phase::FunctionEnd => hostcall::STATS_FUNCTION_END,
        };
        hostcall::write(off, cpu::rdtsc());
    }

    fn memory_available(&mut self) -> usize {
        let (size, used) = HEAP.stats();
        size.saturating_sub(used)
    }

    fn raw_hostcall(&mut self, op: u64, args: [u64; 4]) -> Option<u64> {
        if !self.test_hostcalls {
            return None;
        }
        let r = hostcall::raw(op, &args);
        self.wall_ns = hostcall::read(offsets::NOW_UNIX_NS);
        self.wall_tsc = cpu::rdtsc();
        Some(r.0)
    }
}

// --- panics ----------------------------------------------------------------------------------

/// A fixed buffer for the panic message: the heap may be exhausted or broken.
struct PanicBuf {
    buf: [u8; 4096],
    len: usize,
}

impl core::fmt::Write for PanicBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);
static mut PANIC_BUF: PanicBuf = PanicBuf {
    buf: [0; 4096],
    len: 0,
};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        // A panic while reporting a panic: nothing sensible is left to do.
        cpu::halt_forever();
    }
    let buf = &raw mut PANIC_BUF;
    // SAFETY: the PANICKING flag lets only the first panic reach this buffer.
    let out = unsafe { &mut *buf };
    let _ = write!(out, "{}", info.message());
    let mut kind = vmm_abi::PANIC_GENERIC;
    // The default alloc error handler panics with "memory allocation of N bytes failed".
    if out.buf[..out.len].starts_with(b"memory allocation of ") {
        kind = vmm_abi::PANIC_OUT_OF_MEMORY;
        out.len = 0;
        let _ = write!(
            out,
            "guest out of memory: allocation of {} bytes failed (heap {} MiB; raise --mem)",
            LAST_FAILED_ALLOC.load(Ordering::Relaxed),
            HEAP_BYTES.load(Ordering::Relaxed) >> 20
        );
    } else if let Some(loc) = info.location() {
        let _ = write!(out, " (at {}:{}:{})", loc.file(), loc.line(), loc.column());
    }
    hostcall::raw(
        Op::Panic as u64,
        &[out.buf.as_ptr() as u64, out.len as u64, kind],
    );
    cpu::halt_forever()
}

/// The shipped `core` was built with unwinding; with `panic = "abort"` nothing calls
/// these, but the linker may still want the symbols.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    cpu::halt_forever()
}
