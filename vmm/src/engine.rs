//! The entry point of the library: an [`Engine`] opens /dev/kvm and detects the back end
//! once (PVM or hardware KVM, see [`crate::platform`]), and creates every VM of the
//! process from that one descriptor. Its configuration is explicit: the library reads no
//! environment variables (the CLI does, and passes what it found).
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmm::engine::{Config, Engine};
//! let engine = Arc::new(Engine::new(Config::new("/var/lib/vmm/store"))?);
//! let template = engine.load_template("hello")?;       // verified once, shared by Arc
//! let mut instance = template.instantiate()?;          // restored, waiting for a request
//! let resp = instance.invoke(br#"{"name":"x"}"#, &vmm::run::RunLimits::default());
//! assert_eq!(resp.result?, 0);
//! instance.reset()?;                                    // back to the template's state
//! # Ok::<(), vmm::error::Error>(())
//! ```

use crate::error::{Error, ErrorKind};
use crate::instance::{LoadStats, Template};
use crate::platform::Backend;
use crate::vm::{VmError, VmParts};
use kvm_ioctls::Kvm;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// What an [`Engine`] works with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The template store.
    pub store_dir: PathBuf,
}

impl Config {
    pub fn new(store_dir: impl Into<PathBuf>) -> Config {
        Config {
            store_dir: store_dir.into(),
        }
    }
}

/// One /dev/kvm, its back end detected once, and the store templates come from.
pub struct Engine {
    config: Config,
    kvm: Arc<Kvm>,
    backend: Backend,
    tsc_khz: u64,
    cpu: &'static crate::cpu::GuestCpu,
    /// The store, opened on first use and shared by every load (reads take `&Store`;
    /// each load refreshes it, so templates and packs written by other processes show).
    store: OnceLock<snapshot_store::Store>,
}

impl Engine {
    /// Open /dev/kvm, detect the back end and build the guest CPU model (once per process:
    /// [`crate::vm::host`]).
    pub fn new(config: Config) -> Result<Engine, Error> {
        let step = "open KVM";
        let host = |e: VmError| Error::new(ErrorKind::Host, step, e);
        let h = crate::vm::host().map_err(host)?;
        h.release_probe();
        Ok(Engine {
            config,
            kvm: h.kvm.clone(),
            backend: h.backend,
            tsc_khz: h.tsc_khz,
            cpu: h.cpu,
            store: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    /// The KVM back end every VM of this engine runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The guest CPU model every VM of this engine gets (and templates are checked against).
    pub fn cpu(&self) -> &'static crate::cpu::GuestCpu {
        self.cpu
    }

    /// A new VM with one vCPU on this engine's /dev/kvm.
    pub(crate) fn vm_parts(&self) -> Result<VmParts, VmError> {
        VmParts::create_on(&self.kvm, self.backend, self.tsc_khz, self.cpu)
    }

    /// Load function template `name` from the store: every page verified once, laid out
    /// in memory, ready to instantiate (see [`Template`]).
    pub fn load_template(self: &Arc<Self>, name: &str) -> Result<Arc<Template>, Error> {
        self.load_template_with_stats(name).map(|(t, _)| t)
    }

    pub fn load_template_with_stats(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(Arc<Template>, LoadStats), Error> {
        let (t, stats) = Template::load(self.clone(), self.store()?, name)?;
        Ok((Arc::new(t), stats))
    }

    /// The template store, opened on first use (until it opens, every call tries again).
    pub fn store(&self) -> Result<&snapshot_store::Store, Error> {
        if let Some(s) = self.store.get() {
            return Ok(s);
        }
        let s = snapshot_store::Store::open(&self.config.store_dir)
            .map_err(|e| Error::new(ErrorKind::Damaged, "open the template store", e))?;
        // Two first uses at once: one handle wins, the other is dropped.
        Ok(self.store.get_or_init(|| s))
    }
}
