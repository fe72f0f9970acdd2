//! CPU exception entry stubs and the reporting handler.
//!
//! Every one of the 32 exception vectors has a stub that pushes a zero error code when
//! the CPU does not push one, then the vector number, and jumps to a common path that
//! calls [`exception_handler`] with a pointer to the frame and the interrupted RBP.
//!
//! A divide error, invalid opcode, general protection fault or page fault may be a wasm
//! trap in code compiled by wasmtime (`ud2` for `unreachable` and failed checks, `div`
//! by zero, an access to a guard page): the handler first hands it to the handler wasmtime
//! registered ([`super::capi::trap_handler`]), which does not return when the faulting
//! instruction is wasm's (it resumes at the trap's landing point, the call into wasm then
//! returns the trap as an error). Anything else is reported, with vector, error code, RIP,
//! CR2 and the interrupted RSP, to the VMM (`Op::Fault`), and the kernel halts: a fault in
//! the kernel is never recoverable.

use vmm_abi::Op;

use super::{capi, halt_forever, hostcall, read_cr2};

const DIVIDE_ERROR: u64 = 0;
const INVALID_OPCODE: u64 = 6;
const GENERAL_PROTECTION: u64 = 13;
const PAGE_FAULT: u64 = 14;

/// What the stubs leave on the stack, lowest address first.
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

core::arch::global_asm!(
    ".section .text.exceptions, \"ax\"",
    // Vectors without a CPU-pushed error code.
    ".irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "exception_stub_\\n:",
    "    push 0",
    "    push \\n",
    "    jmp exception_common",
    ".endr",
    // Vectors with an error code.
    ".irp n, 8,10,11,12,13,14,17,21,29,30",
    "exception_stub_\\n:",
    "    push \\n",
    "    jmp exception_common",
    ".endr",
    "exception_common:",
    "    cld",
    "    mov rdi, rsp",
    "    mov rsi, rbp",
    "    and rsp, -16",
    "    call {handler}",
    "    ud2",
    ".section .rodata.exception_stubs, \"a\"",
    ".balign 8",
    ".global exception_stub_table",
    "exception_stub_table:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad exception_stub_\\n",
    ".endr",
    ".text",
    handler = sym exception_handler,
);

extern "C" {
    static exception_stub_table: [u64; 32];
}

/// Entry addresses of the 32 exception stubs, by vector.
pub fn stub_addresses() -> [u64; 32] {
    // SAFETY: the table is defined above as 32 quads of stub addresses, never written.
    unsafe { exception_stub_table }
}

/// Let wasmtime take a trap in wasm code; report anything else to the VMM and stop.
extern "C" fn exception_handler(frame: &ExceptionFrame, rbp: u64) -> ! {
    let cr2 = read_cr2();
    if matches!(
        frame.vector,
        DIVIDE_ERROR | INVALID_OPCODE | GENERAL_PROTECTION | PAGE_FAULT
    ) {
        if let Some(handler) = capi::trap_handler() {
            // Returns only if the faulting instruction is not wasm's.
            let page_fault = frame.vector == PAGE_FAULT;
            handler(frame.rip as usize, rbp as usize, page_fault, cr2 as usize);
        }
    }
    hostcall::raw(
        Op::Fault as u64,
        &[frame.vector, frame.error_code, frame.rip, cr2, frame.rsp],
    );
    halt_forever()
}
