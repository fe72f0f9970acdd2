//! The WebAssembly engines behind [`crate::runner::Session`]: each compiles or loads a
//! module, instantiates it with the WASI functions ([`crate::define_wasi!`]) and hands
//! it to [`crate::runner::drive`].
//!
//! * [`wasmi`]: an interpreter; the module is WebAssembly. Runs on the host too (tests).
//! * `wasmtime` (kernel image only): modules compiled ahead of time by the VMM with
//!   Cranelift, loaded with `Module::deserialize`; native speed.

pub mod wasmi;
#[cfg(target_os = "none")]
pub mod wasmtime;
