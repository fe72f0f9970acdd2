// The wasmtime settings that the VMM's ahead-of-time compilation (vmm/src/aot.rs) and the
// guest's runtime (guest-kernel/src/engine/wasmtime.rs) must share, applied to a
// `wasmtime::Config`. Included by both with `include!` (the abi crate does not depend on
// wasmtime); the numbers are in `vmm_abi::wasmtime_settings`.

/// Apply the shared settings to `config`.
fn apply_shared_settings(config: &mut wasmtime::Config) {
    use vmm_abi::wasmtime_settings as s;
    config
        .wasm_exceptions(true)
        .signals_based_traps(true)
        .memory_reservation(s::MEMORY_RESERVATION)
        .memory_guard_size(s::MEMORY_GUARD_SIZE)
        .memory_reservation_for_growth(s::MEMORY_RESERVATION_FOR_GROWTH)
        .memory_may_move(false)
        .guard_before_linear_memory(false)
        // (wasmtime checks the wasm stack against the async stack size even without async.)
        .async_stack_size(s::MAX_WASM_STACK)
        .max_wasm_stack(s::MAX_WASM_STACK)
        .memory_init_cow(false)
        .table_lazy_init(true);
}
