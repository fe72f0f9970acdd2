//! A minimal KVM VMM for serverless functions: it boots our own unikernel, which runs
//! WebAssembly behind WASI, and (with the snapshot store) restores it from templates.
//!
//! One model serves every command: an [`engine::Engine`] boots functions cold and loads
//! [`template::Template`]s; a template instantiates [`instance::Instance`]s, whose memory
//! an [`instance::Backing`] fills; an instance serves requests ([`instance::Instance::invoke`])
//! and is reset between them; [`pool::Pools`] keep instances of many templates ready.
//! Templates are made by [`template::create::create_template`].

pub mod aot;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod error;
pub mod function;
pub mod guest;
pub mod hostcall;
pub mod instance;
pub mod loader;
pub mod memory;
pub mod persist;
pub mod platform;
pub mod pool;
pub mod seccomp;
pub mod stats;
pub mod template;
pub mod text;
pub mod uffd;
pub mod vm;
pub mod watchdog;
