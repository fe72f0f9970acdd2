//! A minimal KVM VMM for serverless functions: it boots our own unikernel, which runs
//! WebAssembly behind WASI, and (with the snapshot store) restores it from templates.

pub mod aot;
pub mod checks;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod fill;
pub mod instance;
pub mod loader;
pub mod memory;
pub mod persist;
pub mod platform;
pub mod pool;
pub mod run;
pub mod snapshot;
pub mod uffd;
pub mod vm;
pub mod watchdog;
