//! A minimal KVM VMM for serverless functions: it boots our own unikernel, which runs
//! WebAssembly behind WASI, and (with the snapshot store) restores it from templates.

pub mod aot;
pub mod bench;
pub mod checks;
pub mod cli;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod fill;
pub mod hostwasm;
pub mod instance;
pub mod loader;
pub mod memory;
pub mod persist;
pub mod platform;
pub mod pool;
pub mod remote;
pub mod run;
pub mod snapshot;
pub mod uffd;
pub mod vm;
pub mod watchdog;
