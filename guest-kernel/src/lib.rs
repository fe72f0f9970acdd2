//! The portable part of the guest kernel: the WASI preview1 layer, the wasm runner,
//! the CSPRNG and the heap allocator. It is `no_std` in the kernel image and plain
//! Rust on the host, so `cargo test -p guest-kernel` exercises it without KVM.
//! The kernel binary (`src/main.rs`, `src/arch/`) implements [`Host`] with hostcalls.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

pub mod engine;
pub mod heap;
pub mod rng;
pub mod runner;
pub mod wasi;

/// The CPU features this guest's `cpuid` reports (the registers `vmm_abi::cpu` reads them
/// from), read once: on some back ends every `cpuid` is an exit to the host's KVM. The VMM
/// compiles wasm for exactly what these registers show (the same `vmm_abi::cpu` functions).
pub fn cpuid_regs() -> vmm_abi::cpu::CpuidRegs {
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    static READ: AtomicBool = AtomicBool::new(false);
    static WORDS: [AtomicU64; vmm_abi::cpu::CPUID_WORDS] =
        [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    if !READ.load(Ordering::Acquire) {
        let regs = vmm_abi::cpu::CpuidRegs::read(|leaf, sub| {
            let r = core::arch::x86_64::__cpuid_count(leaf, sub);
            [r.eax, r.ebx, r.ecx, r.edx]
        });
        for (slot, w) in WORDS.iter().zip(regs.to_words()) {
            slot.store(w, Ordering::Relaxed);
        }
        READ.store(true, Ordering::Release);
        return regs;
    }
    vmm_abi::cpu::CpuidRegs::from_words(core::array::from_fn(|i| WORDS[i].load(Ordering::Relaxed)))
}

/// What the runner needs from the world outside the wasm sandbox. The kernel implements
/// it with hostcalls to the VMM (each costs a VM exit, ~26 µs on PVM); tests implement it
/// in memory.
pub trait Host {
    /// Wall clock, nanoseconds since the Unix epoch.
    fn now_unix_ns(&mut self) -> u64;
    /// Monotonic clock, nanoseconds since an arbitrary start.
    fn monotonic_ns(&mut self) -> u64;
    /// Fresh seed material if the host supplied some since the last call; the runner
    /// mixes it into its CSPRNG before serving `random_get`.
    fn take_entropy(&mut self) -> Option<[u8; 32]>;
    /// The function configuration blob (`vmm_abi::FunctionConfig` wire format).
    /// One hostcall; the runtime base template is taken here.
    fn get_function(&mut self) -> Vec<u8>;
    /// Read the next chunk of stdin into `buf` (one hostcall). Returns the number of
    /// bytes written and whether stdin is exhausted after them.
    fn read_stdin(&mut self, buf: &mut [u8]) -> (usize, bool);
    /// Hand a full output buffer for fd 1 or 2 to the host (one hostcall).
    fn write_output(&mut self, fd: u32, data: &[u8]);
    /// Record the time at which a phase completed (for `vmm run --stats`).
    fn mark(&mut self, phase: Phase);
    /// Test-only raw hostcall (`vmm_test.hostcall` import). `None` when not enabled.
    fn raw_hostcall(&mut self, op: u64, args: [u64; 4]) -> Option<u64>;
    /// Bytes of guest memory not yet allocated (an engine refuses a memory or table growth
    /// that could not fit, so that `memory.grow`/`table.grow` return -1 instead of the
    /// allocation failing). Unbounded by default.
    fn memory_available(&mut self) -> usize {
        usize::MAX
    }
}

/// A host borrowed for a run (the engines own their host: `&mut H` lends one).
impl<T: Host + ?Sized> Host for &mut T {
    fn now_unix_ns(&mut self) -> u64 {
        (**self).now_unix_ns()
    }
    fn monotonic_ns(&mut self) -> u64 {
        (**self).monotonic_ns()
    }
    fn take_entropy(&mut self) -> Option<[u8; 32]> {
        (**self).take_entropy()
    }
    fn get_function(&mut self) -> Vec<u8> {
        (**self).get_function()
    }
    fn read_stdin(&mut self, buf: &mut [u8]) -> (usize, bool) {
        (**self).read_stdin(buf)
    }
    fn write_output(&mut self, fd: u32, data: &[u8]) {
        (**self).write_output(fd, data)
    }
    fn mark(&mut self, phase: Phase) {
        (**self).mark(phase)
    }
    fn raw_hostcall(&mut self, op: u64, args: [u64; 4]) -> Option<u64> {
        (**self).raw_hostcall(op, args)
    }
    fn memory_available(&mut self) -> usize {
        (**self).memory_available()
    }
}

/// Phases whose completion the runner reports through [`Host::mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Compiled,
    Instantiated,
    RuntimeInitialized,
    FunctionStart,
    FunctionEnd,
}

/// How the module is driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// A WASI command module: `_start`.
    Wasi,
    /// QuickJS-NG's WASI reactor: `_initialize`, then `qjs_init_argv(qjs --std <script>...)`.
    Qjs,
}

/// A completed run. `stdout`/`stderr` hold what is still buffered (not yet handed to
/// the host through [`Host::write_output`]); the kernel passes them in its exit hostcall.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output to stdout / stderr was lost at the output cap (`wasi::OUTPUT_CAP`).
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// A run that could not complete. `code` is one of `vmm_abi::ERR_*`. Any buffered
/// output has been flushed through [`Host::write_output`] before this is returned.
#[derive(Debug)]
pub struct RunError {
    pub code: u64,
    pub message: String,
}
