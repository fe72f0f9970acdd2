//! What an [`Engine`](crate::engine::Engine) works with: explicit settings (the library
//! reads no environment variables). Below the engine and the templates it loads, which
//! keep the settings that concern them.

use std::path::PathBuf;

/// What an [`Engine`] works with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The template store.
    pub store_dir: PathBuf,
    /// Shared instances map the template's memory image from the store's image cache
    /// (`<store>/cache/`: checked against the page ids when loaded, reused by later
    /// processes) instead of a memory file built for this process. For one-shot
    /// processes; a long-running one builds its own.
    pub cached_images: bool,
    /// A restore fills guest memory on two threads of its own while the calling thread
    /// creates the VM: the lowest latency for one restore on an idle machine (a one-shot
    /// `vmm restore`). Off, a restore runs on the calling thread alone: a daemon whose
    /// workers already keep every CPU busy gets more restores per second so.
    pub parallel_restore: bool,
}

impl Config {
    pub fn new(store_dir: impl Into<PathBuf>) -> Config {
        Config {
            store_dir: store_dir.into(),
            cached_images: false,
            parallel_restore: true,
        }
    }
}
