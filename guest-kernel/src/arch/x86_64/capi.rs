//! wasmtime's custom-platform C API (`wasmtime` crate, `runtime/vm/sys/custom/capi.rs`):
//! virtual memory over [`super::vmem`], thread-local slots (one vCPU: plain statics) and
//! the trap handler the exception handler calls first (see [`super::exceptions`]).

use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use super::vmem::{self, Prot, VmemError};

/// wasmtime's `PROT_*` flags as a W^X protection; writable and executable together is
/// refused.
fn prot(flags: u32) -> Result<Prot, VmemError> {
    Prot::from_flags(flags).ok_or(VmemError::Invalid)
}

fn code(r: Result<(), VmemError>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e as i32,
    }
}

/// `fn(ip, fp, has_faulting_addr, faulting_addr)`: returns if the fault is not wasm's.
pub type TrapHandler = extern "C" fn(usize, usize, bool, usize);

static TRAP_HANDLER: AtomicUsize = AtomicUsize::new(0);
static TLS: [AtomicPtr<u8>; 2] = [
    AtomicPtr::new(core::ptr::null_mut()),
    AtomicPtr::new(core::ptr::null_mut()),
];

/// The handler wasmtime registered, if any.
pub fn trap_handler() -> Option<TrapHandler> {
    match TRAP_HANDLER.load(Ordering::Relaxed) {
        0 => None,
        // SAFETY: only `wasmtime_init_traps` stores here, and it stores a `TrapHandler`.
        p => Some(unsafe { core::mem::transmute::<usize, TrapHandler>(p) }),
    }
}

#[no_mangle]
pub extern "C" fn wasmtime_mmap_new(size: usize, prot_flags: u32, ret: &mut *mut u8) -> i32 {
    match prot(prot_flags).and_then(|p| vmem::reserve(size, p)) {
        Ok(p) => {
            *ret = p as *mut u8;
            0
        }
        Err(e) => e as i32,
    }
}

#[no_mangle]
pub extern "C" fn wasmtime_mmap_remap(addr: *mut u8, size: usize, prot_flags: u32) -> i32 {
    code(prot(prot_flags).and_then(|p| vmem::remap(addr as usize, size, p)))
}

#[no_mangle]
pub extern "C" fn wasmtime_munmap(ptr: *mut u8, size: usize) -> i32 {
    code(vmem::unmap(ptr as usize, size))
}

#[no_mangle]
pub extern "C" fn wasmtime_mprotect(ptr: *mut u8, size: usize, prot_flags: u32) -> i32 {
    code(prot(prot_flags).and_then(|p| vmem::protect(ptr as usize, size, p)))
}

#[no_mangle]
pub extern "C" fn wasmtime_page_size() -> usize {
    4096
}

#[no_mangle]
pub extern "C" fn wasmtime_init_traps(handler: TrapHandler) -> i32 {
    TRAP_HANDLER.store(handler as usize, Ordering::Relaxed);
    0
}

/// No copy-on-write images: wasmtime then writes a module's data segments into each new
/// linear memory (one instance per guest, so there is nothing to share).
#[no_mangle]
pub extern "C" fn wasmtime_memory_image_new(
    _ptr: *const u8,
    _len: usize,
    ret: &mut *mut u8,
) -> i32 {
    *ret = core::ptr::null_mut();
    0
}

/// Never called: [`wasmtime_memory_image_new`] makes no images.
#[no_mangle]
pub extern "C" fn wasmtime_memory_image_map_at(
    _image: *mut u8,
    _addr: *mut u8,
    _len: usize,
) -> i32 {
    VmemError::Invalid as i32
}

#[no_mangle]
pub extern "C" fn wasmtime_memory_image_free(_image: *mut u8) {}

#[no_mangle]
pub extern "C" fn wasmtime_tls_get(slot: usize) -> *mut u8 {
    TLS.get(slot)
        .map_or(core::ptr::null_mut(), |t| t.load(Ordering::Relaxed))
}

#[no_mangle]
pub extern "C" fn wasmtime_tls_set(slot: usize, ptr: *mut u8) {
    if let Some(t) = TLS.get(slot) {
        t.store(ptr, Ordering::Relaxed);
    }
}
