//! The contract between the VMM (host) and the guest kernel.
//!
//! Everything both sides must agree on lives here, once: the guest-physical memory
//! layout, the mailbox page, the hostcall operations and the wire format of the
//! function configuration. The guest is hostile input to the VMM: every decoder in
//! this crate bounds every length and never panics.
//!
//! # Guest physical memory (identity-mapped, VA == GPA)
//!
//! ```text
//! 0x0000_0000  +-------------------------------+
//!              | not mapped (null page)        |
//! 0x0000_1000  | PVM VIF page (16 bytes used)  |
//! 0x0000_2000  | PML4                          |
//! 0x0000_3000  | PDPT                          |
//! 0x0000_4000  | PD x 4 (2 MiB pages, <= 4 GiB)|
//! 0x0000_8000  | mailbox page (struct Mailbox) |
//! 0x0000_9000  | PT of the first 2 MiB (4 KiB) |
//! 0x0000_a000  | grant map (VMM -> guest)      |
//! 0x0000_b000  | PDPT, PD of the alias window  |
//! 0x0001_0000  | page-table pool (guest's own) |
//! 0x0020_0000  | kernel image (ELF PT_LOADs)   |
//! 0x00c0_0000  | guard (not mapped)            |
//! 0x00e0_0000  | boot stack (8 MiB, grows down)|
//! 0x0160_0000  | heap ...                      |
//!              | ... module bytes (top of RAM) |
//! mem_size     +-------------------------------+
//! ```
//!
//! # Granted memory
//!
//! Guest RAM is divided into 2 MiB regions ([`layout::GRANT_REGION`]); KVM backs only the
//! regions the VMM has **granted** with memory slots (KVM's per-slot metadata costs ~10
//! bytes per 4 KiB page of a slot, whatever the guest uses). The regions below
//! [`layout::HEAP_START`] and those holding the module are granted before boot; the
//! guest's heap asks for the rest as it grows ([`Op::Grant`]) and must never touch a
//! region that is not granted. The VMM keeps the grant map page ([`layout::GRANT_MAP_GPA`],
//! one bit per region, bit `r % 64` of little-endian word `r / 64`) equal to what it has
//! granted, so the guest asks only for regions whose bit is clear; a restore creates
//! slots for exactly the regions the template's map names.
//!
//! # Hostcalls
//!
//! The guest fills `op` and `args` in the mailbox and executes `out HOSTCALL_PORT, al`.
//! The VMM decodes the request with [`decode_request`], serves it, writes `ret`/`ret2`,
//! refreshes `now_unix_ns` (and, on [`Op::GetFunction`]/[`Op::ReadStdin`], `entropy`)
//! and resumes the vCPU. Each exit costs ~26 µs on the PVM back end, so the guest
//! buffers stdout/stderr and hands them over in [`Op::Exit`].
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::vec::Vec;

pub mod cpu;

/// Guest physical memory layout.
pub mod layout {
    pub const PAGE_SIZE: u64 = 0x1000;
    pub const HUGE_PAGE_SIZE: u64 = 0x20_0000;
    pub const VIF_GPA: u64 = 0x1000;
    pub const PML4_GPA: u64 = 0x2000;
    pub const PDPT_GPA: u64 = 0x3000;
    /// First of up to [`MAX_PD_PAGES`] page directories (each maps 1 GiB with 2 MiB pages).
    pub const PD_GPA: u64 = 0x4000;
    pub const MAX_PD_PAGES: u64 = 4;
    pub const MAILBOX_GPA: u64 = 0x8000;
    /// The page table of the first 2 MiB, mapped with 4 KiB pages so that page 0 is not
    /// mapped: a null pointer dereference faults (wasmtime relies on it for `call_indirect`
    /// of a null function reference).
    pub const PT0_GPA: u64 = 0x9000;
    /// The grant map: one bit per [`GRANT_REGION`] of guest RAM that has a memory slot,
    /// written by the VMM only ([`GRANT_MAP_BYTES`] bytes; see the crate docs).
    pub const GRANT_MAP_GPA: u64 = 0xa000;
    /// W^X: every page table lives in the first 2 MiB, which the identity map maps
    /// read-only (except the VIF page and the mailbox); the guest kernel writes its page
    /// tables only through the **alias window**, a writable, non-executable 2 MiB page at
    /// [`ALIAS_BASE`] that maps guest-physical `0..2 MiB` (PML4 slot [`ALIAS_PML4_SLOT`],
    /// through the PDPT and PD below, made by the VMM's loader).
    pub const ALIAS_PDPT_GPA: u64 = 0xb000;
    pub const ALIAS_PD_GPA: u64 = 0xc000;
    pub const ALIAS_PML4_SLOT: u64 = 255;
    pub const ALIAS_BASE: u64 = ALIAS_PML4_SLOT << 39;
    /// Pages the guest kernel takes its own page tables from (wasmtime's mappings):
    /// `[PT_POOL_START, PT_POOL_END)`, read-only in the identity map like the VMM's tables.
    pub const PT_POOL_START: u64 = 0x1_0000;
    pub const PT_POOL_END: u64 = HUGE_PAGE_SIZE;
    /// Granularity of granted memory.
    pub const GRANT_REGION: u64 = HUGE_PAGE_SIZE;
    /// One bit per region of the largest guest RAM.
    pub const GRANT_MAP_BYTES: usize = (MAX_MEM_MIB / 2 / 8) as usize;
    pub const KERNEL_BASE: u64 = 0x20_0000;
    /// The kernel image must end below this address.
    pub const KERNEL_END_MAX: u64 = 0xc0_0000;
    /// 2 MiB left unmapped below the stack so that a stack overflow faults.
    pub const GUARD_START: u64 = 0xc0_0000;
    pub const STACK_BOTTOM: u64 = 0xe0_0000;
    pub const STACK_TOP: u64 = 0x160_0000;
    /// Initial RSP: 16n - 8, as after a `call` (the compiler's `movaps` spills need it).
    pub const INITIAL_RSP: u64 = STACK_TOP - 8;
    pub const HEAP_START: u64 = 0x160_0000;
    pub const MIN_MEM_MIB: u64 = 64;
    pub const MAX_MEM_MIB: u64 = MAX_PD_PAGES * 1024;
    pub const DEFAULT_MEM_MIB: u64 = 512;
}

/// Page-table entry bits, as the VMM's identity map and the guest's own mappings (wasmtime's
/// memories) set them.
pub mod pte {
    pub const PRESENT: u64 = 1;
    pub const WRITABLE: u64 = 1 << 1;
    /// The PVM back end requires U on every entry at every level (harmless on hardware KVM
    /// with SMEP/SMAP off).
    pub const USER: u64 = 1 << 2;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    /// A 2 MiB (page directory) or 1 GiB (PDPT) page, not a table.
    pub const HUGE: u64 = 1 << 7;
    /// No instruction fetch from the page (EFER.NXE is set).
    pub const NO_EXECUTE: u64 = 1 << 63;
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// An entry that points to a table.
    pub const TABLE: u64 = PRESENT | WRITABLE | USER | ACCESSED;
    /// An entry that maps a page: also dirty. With A/D already set, KVM maps a whole aligned
    /// group of pages per exit and never has to set them.
    pub const LEAF: u64 = TABLE | DIRTY;
    /// W^X leaves: data (read-write, no execute), read-only data, code (read-execute).
    pub const LEAF_DATA: u64 = LEAF | NO_EXECUTE;
    pub const LEAF_READ_ONLY: u64 = (LEAF & !WRITABLE) | NO_EXECUTE;
    pub const LEAF_CODE: u64 = LEAF & !WRITABLE;
}

/// The I/O port the guest writes to for a hostcall.
pub const HOSTCALL_PORT: u16 = 0x7e0;
pub const MAILBOX_MAGIC: u64 = 0x786f_626c_6961_6d76; // "vmmailbox" (le)
/// Version 2 added `Mailbox::engine` (and the wasmtime artifact as the module); version 3
/// granted memory ([`Op::Grant`], the grant map).
pub const ABI_VERSION: u64 = 3;

/// Boot flags (`Mailbox::flags`).
pub const FLAG_TEST_HOSTCALLS: u64 = 1 << 0;
/// Translate the whole module before running it (set when creating a runtime base, so that
/// restores never translate functions again).
pub const FLAG_EAGER_COMPILE: u64 = 1 << 1;

/// `Mailbox::runtime`.
pub const RUNTIME_WASI: u64 = 1;
pub const RUNTIME_QJS: u64 = 2;

/// `Mailbox::engine`: wasmi (an interpreter in the guest; the module is WebAssembly).
pub const ENGINE_WASMI: u64 = 1;
/// `Mailbox::engine`: wasmtime (runtime only; the module is an artifact that the VMM
/// compiled ahead of time with Cranelift, see [`wasmtime_settings`]).
pub const ENGINE_WASMTIME: u64 = 2;

/// What the VMM's ahead-of-time compilation and the guest's wasmtime runtime must agree
/// on: a module compiled with other settings is refused by the guest's
/// `Module::deserialize` (reported as an invalid module). Both sides apply these through
/// the one function in `abi/src/wasmtime_config.rs` (included by both, since this crate
/// does not depend on wasmtime).
pub mod wasmtime_settings {
    /// The wasmtime version both sides are built with (exact: artifacts are version
    /// specific).
    pub const VERSION: &str = "48.0.8";
    /// The target artifacts are compiled for: the guest kernel's.
    pub const TARGET: &str = "x86_64-unknown-none";
    /// Address space reserved for each linear memory: with a 32-bit index and the guard
    /// below, every access lands in the reservation or the guard, so bounds checks are
    /// left to the guard pages (unmapped in the guest's page tables).
    pub const MEMORY_RESERVATION: u64 = 4 << 30;
    pub const MEMORY_GUARD_SIZE: u64 = 32 << 20;
    pub const MEMORY_RESERVATION_FOR_GROWTH: u64 = 0;
    /// Native stack wasm may use, well inside the guest's 8 MiB boot stack (the rest is
    /// for the kernel and host functions below it).
    pub const MAX_WASM_STACK: usize = 4 << 20;
    /// CPU features every artifact is compiled with: (Cranelift flag, CPUID feature name
    /// as wasmtime's `detect_host_feature` asks for it). SSE only: AVX needs XSAVE/XCR0,
    /// which the guest must not touch on the PVM back end.
    pub const REQUIRED_FEATURES: &[(&str, &str)] = &[
        ("has_sse3", "sse3"),
        ("has_ssse3", "ssse3"),
        ("has_sse41", "sse4.1"),
        ("has_sse42", "sse4.2"),
        ("has_popcnt", "popcnt"),
    ];
    /// Features used when the host CPU has them (the guest runs on the same CPU; one that
    /// lacked a feature would refuse the artifact with an error naming it).
    pub const OPTIONAL_FEATURES: &[(&str, &str)] = &[
        ("has_bmi1", "bmi1"),
        ("has_bmi2", "bmi2"),
        ("has_lzcnt", "lzcnt"),
    ];
}

/// Number of u64 words in the mailbox page that the ABI uses.
pub const MAILBOX_WORDS: usize = 64;
pub const MAILBOX_BYTES: usize = MAILBOX_WORDS * 8;

/// The mailbox page. All fields are u64 so that any bit pattern is a valid value and
/// the layout has no padding; it is read and written word by word (little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Mailbox {
    // --- host -> guest, set before boot -------------------------------------------
    pub magic: u64,
    pub abi_version: u64,
    pub flags: u64,
    pub mem_size: u64,
    pub tsc_khz: u64,
    pub module_gpa: u64,
    pub module_len: u64,
    pub runtime: u64,
    // --- host -> guest, refreshed on every hostcall return ------------------------
    pub now_unix_ns: u64,
    /// Incremented whenever `entropy` holds fresh host randomness to mix in.
    pub entropy_gen: u64,
    pub entropy: [u64; 4],
    // --- guest -> host request ----------------------------------------------------
    pub op: u64,
    pub args: [u64; 6],
    // --- host -> guest result -----------------------------------------------------
    pub ret: u64,
    pub ret2: u64,
    // --- guest -> host timings (guest TSC ticks, 0 = not reached) -----------------
    pub stats: GuestStats,
    // --- host -> guest, set before boot (ABI version 2) ---------------------------
    /// [`ENGINE_WASMI`] or [`ENGINE_WASMTIME`]: how to read the module.
    pub engine: u64,
    // --- guest -> host, written at boot -------------------------------------------
    /// The CPUID registers the guest read with its own `cpuid` ([`cpu::CpuidRegs::to_words`]):
    /// what its wasmtime checks a compiled module against. 0 from kernels that predate it.
    pub cpuid: [u64; cpu::CPUID_WORDS],
}

/// TSC timestamps the guest records at each phase; the VMM turns them into a breakdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestStats {
    pub kernel_entry: u64,
    pub kernel_ready: u64,
    pub compiled: u64,
    pub instantiated: u64,
    pub runtime_initialized: u64,
    pub function_start: u64,
    pub function_end: u64,
    pub hostcalls: u64,
}

const STATS_WORDS: usize = 8;
const _: () = assert!(core::mem::size_of::<GuestStats>() == STATS_WORDS * 8);
const _: () = assert!(core::mem::size_of::<Mailbox>() <= MAILBOX_BYTES);
const _: () = assert!(layout::MAILBOX_GPA.is_multiple_of(layout::PAGE_SIZE));

impl Mailbox {
    /// Serialise to the mailbox page's words.
    pub fn to_words(&self) -> [u64; MAILBOX_WORDS] {
        let mut w = [0u64; MAILBOX_WORDS];
        let s = &self.stats;
        let fields: [u64; 8 + 2 + 4 + 1 + 6 + 2 + STATS_WORDS + 1 + cpu::CPUID_WORDS] = [
            self.magic,
            self.abi_version,
            self.flags,
            self.mem_size,
            self.tsc_khz,
            self.module_gpa,
            self.module_len,
            self.runtime,
            self.now_unix_ns,
            self.entropy_gen,
            self.entropy[0],
            self.entropy[1],
            self.entropy[2],
            self.entropy[3],
            self.op,
            self.args[0],
            self.args[1],
            self.args[2],
            self.args[3],
            self.args[4],
            self.args[5],
            self.ret,
            self.ret2,
            s.kernel_entry,
            s.kernel_ready,
            s.compiled,
            s.instantiated,
            s.runtime_initialized,
            s.function_start,
            s.function_end,
            s.hostcalls,
            self.engine,
            self.cpuid[0],
            self.cpuid[1],
            self.cpuid[2],
        ];
        w[..fields.len()].copy_from_slice(&fields);
        w
    }

    /// Deserialise from little-endian bytes. Short input reads as zeros; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let word = |i: usize| -> u64 {
            let mut b = [0u8; 8];
            if let Some(src) = bytes.get(i * 8..i * 8 + 8) {
                b.copy_from_slice(src);
            }
            u64::from_le_bytes(b)
        };
        Mailbox {
            magic: word(0),
            abi_version: word(1),
            flags: word(2),
            mem_size: word(3),
            tsc_khz: word(4),
            module_gpa: word(5),
            module_len: word(6),
            runtime: word(7),
            now_unix_ns: word(8),
            entropy_gen: word(9),
            entropy: [word(10), word(11), word(12), word(13)],
            op: word(14),
            args: [word(15), word(16), word(17), word(18), word(19), word(20)],
            ret: word(21),
            ret2: word(22),
            stats: GuestStats {
                kernel_entry: word(23),
                kernel_ready: word(24),
                compiled: word(25),
                instantiated: word(26),
                runtime_initialized: word(27),
                function_start: word(28),
                function_end: word(29),
                hostcalls: word(30),
            },
            engine: word(31),
            cpuid: [word(32), word(33), word(34)],
        }
    }

    /// Little-endian bytes of the whole mailbox (`MAILBOX_BYTES`).
    pub fn to_bytes(&self) -> [u8; MAILBOX_BYTES] {
        let mut out = [0u8; MAILBOX_BYTES];
        for (i, w) in self.to_words().iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// Byte offsets of fields inside the mailbox, for the guest's volatile accesses.
pub mod offsets {
    pub const NOW_UNIX_NS: usize = 8 * 8;
    pub const ENTROPY_GEN: usize = 9 * 8;
    pub const ENTROPY: usize = 10 * 8;
    pub const OP: usize = 14 * 8;
    pub const ARGS: usize = 15 * 8;
    pub const RET: usize = 21 * 8;
    pub const RET2: usize = 22 * 8;
    pub const STATS: usize = 23 * 8;
    /// `stats.function_start`.
    pub const FUNCTION_START: usize = 28 * 8;
    pub const ENGINE: usize = 31 * 8;
    pub const CPUID: usize = 32 * 8;
}

/// Hostcall operation codes (`Mailbox::op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    /// args: [gpa, cap]. ret = total length of the function config; it is written at
    /// gpa only if it fits in cap (else the guest retries with a larger buffer).
    /// This is where the runtime base template is taken.
    GetFunction = 1,
    /// args: [gpa, cap]. ret = bytes written (<= cap); ret2 = 1 once stdin is exhausted.
    /// The first one is where a function template is taken.
    ReadStdin = 2,
    /// args: [fd (1 or 2), gpa, len]. A flush of a full output buffer. ret = 0.
    Write = 3,
    /// args: [exit code (i32), stdout gpa, stdout len, stderr gpa, stderr len, flags].
    /// flags: [`EXIT_STDOUT_TRUNCATED`] | [`EXIT_STDERR_TRUNCATED`] (0 from kernels that
    /// predate them: unused args are written as 0).
    Exit = 4,
    /// args: [vector, error code, rip, cr2, rsp]. A CPU exception in the guest kernel.
    Fault = 5,
    /// args: [message gpa, message len, kind]. A guest kernel panic (kind: PANIC_*).
    Panic = 6,
    /// args: [code, message gpa, message len]. The guest could not run the module
    /// (not wasm, unsupported import, trap...): the message says what and why.
    Error = 7,
    /// args: [gpa, len], both multiples of [`layout::GRANT_REGION`], len > 0. Give the
    /// guest memory slots over `[gpa, gpa + len)` (regions already granted are left as
    /// they are). ret = 0; the grant map is updated before the guest resumes.
    Grant = 8,
}

/// `Op::Exit` flags: output to stdout / stderr was lost at the guest's output cap
/// ([`MAX_TRANSFER_LEN`] bytes of stdout and stderr together).
pub const EXIT_STDOUT_TRUNCATED: u64 = 1 << 0;
pub const EXIT_STDERR_TRUNCATED: u64 = 1 << 1;

pub const PANIC_GENERIC: u64 = 0;
pub const PANIC_OUT_OF_MEMORY: u64 = 1;

/// `Op::Error` codes.
pub const ERR_MODULE_INVALID: u64 = 1;
pub const ERR_INSTANTIATE: u64 = 2;
pub const ERR_TRAP: u64 = 3;
pub const ERR_CONFIG: u64 = 4;
pub const ERR_RUNTIME_INIT: u64 = 5;

/// Longest message (panic, error) the VMM accepts from the guest.
pub const MAX_MESSAGE_LEN: u64 = 64 * 1024;
/// Largest single stdout/stderr transfer the VMM accepts in one hostcall.
pub const MAX_TRANSFER_LEN: u64 = 64 * 1024 * 1024;

/// A decoded, range-checked hostcall request. Addresses are checked against the guest's
/// memory size; lengths against the limits above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    GetFunction {
        buf: GuestRange,
    },
    ReadStdin {
        buf: GuestRange,
    },
    Write {
        fd: u32,
        data: GuestRange,
    },
    Exit {
        code: i32,
        stdout: GuestRange,
        stderr: GuestRange,
        /// `EXIT_*_TRUNCATED` bits (unknown bits are dropped).
        flags: u64,
    },
    Fault {
        vector: u64,
        error_code: u64,
        rip: u64,
        cr2: u64,
        rsp: u64,
    },
    Panic {
        message: GuestRange,
        kind: u64,
    },
    Error {
        code: u64,
        message: GuestRange,
    },
    Grant {
        range: GuestRange,
    },
}

/// A range of guest-physical memory, checked to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    pub gpa: u64,
    pub len: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    UnknownOp(u64),
    /// A (gpa, len) pair that does not lie inside guest RAM.
    OutOfRange {
        what: &'static str,
        gpa: u64,
        len: u64,
    },
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    BadFd(u64),
    /// A range that must be a non-empty run of whole regions and is not.
    Unaligned {
        what: &'static str,
        gpa: u64,
        len: u64,
    },
}

impl core::fmt::Display for AbiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AbiError::UnknownOp(op) => write!(f, "unknown hostcall op {op}"),
            AbiError::OutOfRange { what, gpa, len } => {
                write!(
                    f,
                    "{what}: range gpa={gpa:#x} len={len:#x} is outside guest memory"
                )
            }
            AbiError::TooLong { what, len, max } => {
                write!(f, "{what}: length {len} exceeds the limit of {max}")
            }
            AbiError::BadFd(fd) => write!(f, "write to fd {fd}: only 1 and 2 are outputs"),
            AbiError::Unaligned { what, gpa, len } => write!(
                f,
                "{what}: range gpa={gpa:#x} len={len:#x} is not a non-empty run of 2 MiB regions"
            ),
        }
    }
}

impl GuestRange {
    /// Check that `[gpa, gpa+len)` lies inside `[0, mem_size)` and len <= max.
    pub fn checked(
        what: &'static str,
        gpa: u64,
        len: u64,
        max: u64,
        mem_size: u64,
    ) -> Result<Self, AbiError> {
        if len > max {
            return Err(AbiError::TooLong { what, len, max });
        }
        match gpa.checked_add(len) {
            Some(end) if end <= mem_size => Ok(GuestRange { gpa, len }),
            _ => Err(AbiError::OutOfRange { what, gpa, len }),
        }
    }
}

/// Decode the guest's request in `mb`. `mem_size` is the guest RAM size in bytes.
/// Never panics; every range is checked.
pub fn decode_request(mb: &Mailbox, mem_size: u64) -> Result<Request, AbiError> {
    let a = mb.args;
    let range = |what, gpa, len, max| GuestRange::checked(what, gpa, len, max, mem_size);
    Ok(match mb.op {
        1 => Request::GetFunction {
            buf: range("function config buffer", a[0], a[1], mem_size)?,
        },
        2 => Request::ReadStdin {
            buf: range("stdin buffer", a[0], a[1], mem_size)?,
        },
        3 => {
            if a[0] != 1 && a[0] != 2 {
                return Err(AbiError::BadFd(a[0]));
            }
            Request::Write {
                fd: a[0] as u32,
                data: range("output", a[1], a[2], MAX_TRANSFER_LEN)?,
            }
        }
        4 => Request::Exit {
            code: a[0] as u32 as i32,
            stdout: range("stdout", a[1], a[2], MAX_TRANSFER_LEN)?,
            stderr: range("stderr", a[3], a[4], MAX_TRANSFER_LEN)?,
            flags: a[5] & (EXIT_STDOUT_TRUNCATED | EXIT_STDERR_TRUNCATED),
        },
        5 => Request::Fault {
            vector: a[0],
            error_code: a[1],
            rip: a[2],
            cr2: a[3],
            rsp: a[4],
        },
        6 => Request::Panic {
            message: range("panic message", a[0], a[1], MAX_MESSAGE_LEN)?,
            kind: a[2],
        },
        7 => Request::Error {
            code: a[0],
            message: range("error message", a[1], a[2], MAX_MESSAGE_LEN)?,
        },
        8 => {
            let r = range("memory grant", a[0], a[1], mem_size)?;
            if r.len == 0
                || !r.gpa.is_multiple_of(layout::GRANT_REGION)
                || !r.len.is_multiple_of(layout::GRANT_REGION)
            {
                return Err(AbiError::Unaligned {
                    what: "memory grant",
                    gpa: r.gpa,
                    len: r.len,
                });
            }
            Request::Grant { range: r }
        }
        op => return Err(AbiError::UnknownOp(op)),
    })
}

/// Name of a CPU exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "NMI",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        _ => "reserved exception",
    }
}

// ---------------------------------------------------------------------------------
// Function configuration: what the VMM hands the guest at Op::GetFunction.
// ---------------------------------------------------------------------------------

pub const FUNCTION_CONFIG_MAGIC: [u8; 4] = *b"FNC1";
/// Caps that keep a decoder from being asked to allocate or walk without bound.
pub const MAX_CONFIG_ITEMS: u32 = 4096;

/// One file of the read-only tree under the preopened directory `/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigFile<'a> {
    /// Path relative to `/`, `/`-separated, no `.`/`..` components, not empty.
    pub path: &'a [u8],
    pub data: &'a [u8],
}

/// The decoded function configuration, borrowing from the blob.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionConfig<'a> {
    /// argv, including argv[0].
    pub args: Vec<&'a [u8]>,
    /// `KEY=VALUE` entries.
    pub env: Vec<&'a [u8]>,
    pub files: Vec<ConfigFile<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    BadMagic,
    Truncated,
    TooManyItems(u32),
    BadPath,
    TrailingBytes,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::BadMagic => f.write_str("function config: bad magic"),
            ConfigError::Truncated => f.write_str("function config: truncated"),
            ConfigError::TooManyItems(n) => {
                write!(f, "function config: {n} items exceed the limit")
            }
            ConfigError::BadPath => f.write_str("function config: invalid file path"),
            ConfigError::TrailingBytes => f.write_str("function config: trailing bytes"),
        }
    }
}

/// Is `p` an acceptable path in the guest's file tree?
pub fn valid_guest_path(p: &[u8]) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

impl<'a> FunctionConfig<'a> {
    pub fn encode(&self) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&FUNCTION_CONFIG_MAGIC);
        for list in [&self.args, &self.env] {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for item in list.iter() {
                put(&mut out, item);
            }
        }
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for f in &self.files {
            put(&mut out, f.path);
            put(&mut out, f.data);
        }
        out
    }

    /// Decode a blob; bounds every count and length, never panics.
    pub fn decode(blob: &'a [u8]) -> Result<Self, ConfigError> {
        let mut r = Reader { b: blob };
        if r.take(4)? != FUNCTION_CONFIG_MAGIC {
            return Err(ConfigError::BadMagic);
        }
        let mut cfg = FunctionConfig::default();
        for which in 0..2 {
            let n = r.count()?;
            for _ in 0..n {
                let item = r.bytes()?;
                if which == 0 {
                    cfg.args.push(item)
                } else {
                    cfg.env.push(item)
                }
            }
        }
        let n = r.count()?;
        for _ in 0..n {
            let path = r.bytes()?;
            if !valid_guest_path(path) {
                return Err(ConfigError::BadPath);
            }
            let data = r.bytes()?;
            cfg.files.push(ConfigFile { path, data });
        }
        if !r.b.is_empty() {
            return Err(ConfigError::TrailingBytes);
        }
        Ok(cfg)
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConfigError> {
        if n > self.b.len() {
            return Err(ConfigError::Truncated);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ConfigError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn count(&mut self) -> Result<u32, ConfigError> {
        let n = self.u32()?;
        // Each item takes at least 4 bytes, so a count larger than that is a lie.
        if n > MAX_CONFIG_ITEMS || n as usize > self.b.len() / 4 {
            return Err(ConfigError::TooManyItems(n));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<&'a [u8], ConfigError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_roundtrip() {
        let mut mb = Mailbox {
            magic: MAILBOX_MAGIC,
            op: 3,
            ..Default::default()
        };
        mb.args = [1, 2, 3, 4, 5, 6];
        mb.stats.function_end = 77;
        mb.engine = ENGINE_WASMTIME;
        mb.entropy = [9, 8, 7, 6];
        mb.cpuid = [1 << 40 | 3, 5, u64::MAX];
        let back = Mailbox::from_bytes(&mb.to_bytes());
        assert_eq!(mb, back);
        assert_eq!(
            Mailbox::from_bytes(&[1, 2, 3]).magic,
            0,
            "a partial word reads as zero"
        );
    }

    #[test]
    fn offsets_match_layout() {
        let mb = Mailbox {
            op: 0xabc,
            ret: 0x123,
            entropy_gen: 5,
            engine: ENGINE_WASMI,
            ..Default::default()
        };
        let b = mb.to_bytes();
        assert_eq!(
            b[offsets::ENGINE..offsets::ENGINE + 8],
            ENGINE_WASMI.to_le_bytes()
        );
        assert_eq!(
            core::mem::offset_of!(Mailbox, engine),
            offsets::ENGINE,
            "the words are the struct's fields in order"
        );
        assert_eq!(core::mem::offset_of!(Mailbox, cpuid), offsets::CPUID);
        assert_eq!(b[offsets::OP..offsets::OP + 8], 0xabcu64.to_le_bytes());
        assert_eq!(b[offsets::RET..offsets::RET + 8], 0x123u64.to_le_bytes());
        assert_eq!(
            b[offsets::ENTROPY_GEN..offsets::ENTROPY_GEN + 8],
            5u64.to_le_bytes()
        );
    }

    #[test]
    fn decode_rejects_out_of_range() {
        let mem = 64 << 20;
        let mut mb = Mailbox {
            op: Op::Exit as u64,
            ..Default::default()
        };
        mb.args = [0, u64::MAX - 2, 10, 0, 0, 0];
        assert!(matches!(
            decode_request(&mb, mem),
            Err(AbiError::OutOfRange { .. })
        ));
        mb.args = [0, 0x1000, MAX_TRANSFER_LEN + 1, 0, 0, 0];
        assert!(matches!(
            decode_request(&mb, mem),
            Err(AbiError::TooLong { .. })
        ));
        mb.args = [3, 0x1000, 10, 0x2000, 5, 0];
        assert_eq!(
            decode_request(&mb, mem),
            Ok(Request::Exit {
                code: 3,
                stdout: GuestRange {
                    gpa: 0x1000,
                    len: 10
                },
                stderr: GuestRange {
                    gpa: 0x2000,
                    len: 5
                },
                flags: 0
            })
        );
        mb.args[5] = EXIT_STDOUT_TRUNCATED | EXIT_STDERR_TRUNCATED | 0xf0;
        assert!(matches!(
            decode_request(&mb, mem),
            Ok(Request::Exit { flags: 3, .. })
        ));
        mb.op = 99;
        assert_eq!(decode_request(&mb, mem), Err(AbiError::UnknownOp(99)));
        mb.op = Op::Grant as u64;
        mb.args = [2 << 20, 4 << 20, 0, 0, 0, 0];
        assert_eq!(
            decode_request(&mb, mem),
            Ok(Request::Grant {
                range: GuestRange {
                    gpa: 2 << 20,
                    len: 4 << 20
                }
            })
        );
        for (gpa, len) in [
            (0x1000, 2 << 20),
            (0, 0),
            (0, 0x1000),
            (mem - (2 << 20), 4 << 20),
        ] {
            mb.args = [gpa, len, 0, 0, 0, 0];
            assert!(decode_request(&mb, mem).is_err(), "{gpa:#x}+{len:#x}");
        }
        mb.op = Op::Write as u64;
        mb.args = [7, 0, 0, 0, 0, 0];
        assert_eq!(decode_request(&mb, mem), Err(AbiError::BadFd(7)));
    }

    #[test]
    fn config_roundtrip_and_hostile() {
        let cfg = FunctionConfig {
            args: alloc::vec![&b"qjs"[..], b"--std", b"hello.js"],
            env: alloc::vec![&b"A=1"[..]],
            files: alloc::vec![ConfigFile {
                path: b"lib/x.js",
                data: b"export default 1"
            }],
        };
        let blob = cfg.encode();
        assert_eq!(FunctionConfig::decode(&blob).unwrap(), cfg);
        for cut in 0..blob.len() {
            assert!(FunctionConfig::decode(&blob[..cut]).is_err());
        }
        let mut huge = blob.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FunctionConfig::decode(&huge),
            Err(ConfigError::TooManyItems(_))
        ));
        let bad = FunctionConfig {
            files: alloc::vec![ConfigFile {
                path: b"../etc",
                data: b""
            }],
            ..Default::default()
        };
        assert_eq!(
            FunctionConfig::decode(&bad.encode()),
            Err(ConfigError::BadPath)
        );
    }
}
