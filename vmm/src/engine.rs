//! The entry point of the library: an [`Engine`] opens /dev/kvm and detects the back end
//! once (PVM or hardware KVM, see [`crate::platform`]) and the guest CPU model; it boots
//! functions cold ([`Engine::boot`], [`Engine::run`]) and loads templates
//! ([`Engine::load_template`]) to instantiate ([`Template::instantiate_with`]). Its configuration is explicit: the library reads no
//! environment variables (the CLI does, and passes what it found).
//!
//! ```no_run
//! use std::sync::Arc;
//! use vmm::engine::{Config, Engine};
//! let engine = Arc::new(Engine::new(Config::new("/var/lib/vmm/store"))?);
//! let template = engine.load_template("hello")?;       // verified once, shared by Arc
//! let mut instance = template.instantiate()?;          // restored, waiting for a request
//! let resp = instance.invoke(br#"{"name":"x"}"#, &vmm::guest::RunLimits::default());
//! assert_eq!(resp.result?, 0);
//! instance.reset()?;                                    // back to the template's state
//! # Ok::<(), vmm::error::Error>(())
//! ```

pub use crate::config::Config;
use crate::error::{Error, ErrorKind};
use crate::guest::{FunctionSpec, RunLimits};
use crate::instance::{Instance, Response};
use crate::platform::Backend;
use crate::stats::Stats;
use crate::template::{Kind, LoadStats, Template};
use crate::vm::VmError;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// This process's /dev/kvm (its back end and guest CPU model, found once: [`crate::vm::host`])
/// and the store templates come from.
pub struct Engine {
    config: Config,
    /// The store, opened on first use and shared by every load. Opened lazily: a load
    /// reads the template's own location records and the packs they name, so its cost
    /// follows the template, not the store, and templates written by other processes
    /// show.
    store: OnceLock<Arc<snapshot_store::Store>>,
}

impl Engine {
    /// Open /dev/kvm, detect the back end and build the guest CPU model (once per process:
    /// [`crate::vm::host`]).
    pub fn new(config: Config) -> Result<Engine, Error> {
        let engine = Engine {
            config,
            store: OnceLock::new(),
        };
        engine.host()?;
        Ok(engine)
    }

    /// [`Engine::new`] that opens /dev/kvm and creates the process's first VM on a thread of
    /// its own (~1.3 ms here), so that what the caller does next (loading a template,
    /// filling guest memory) overlaps it: for one-shot processes. A failure to open KVM
    /// then surfaces at the first instance.
    pub fn start(config: Config) -> Engine {
        let _ = std::thread::Builder::new()
            .name("vmm-open-kvm".into())
            .spawn(|| crate::vm::host().map(|_| ()));
        Engine {
            config,
            store: OnceLock::new(),
        }
    }

    fn host(&self) -> Result<&'static crate::vm::Host, Error> {
        crate::vm::host().map_err(|e: VmError| Error::new(ErrorKind::Host, "open KVM", e))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    /// The KVM back end every VM of this engine runs on.
    pub fn backend(&self) -> Result<Backend, Error> {
        Ok(self.host()?.backend)
    }

    /// The guest CPU model every VM of this engine gets (and templates are checked against).
    pub fn cpu(&self) -> Result<&'static crate::cpu::GuestCpu, Error> {
        Ok(self.host()?.cpu)
    }

    /// Boot `spec` cold, ready for its first [`Instance::invoke`] (which gives the guest
    /// its function, then the request). Compiled modules are cached in
    /// `limits.artifact_store` when set.
    pub fn boot(&self, spec: &FunctionSpec, limits: &RunLimits) -> Result<Instance, Error> {
        let cache = artifact_cache(limits);
        Instance::boot(spec, limits, cache.as_ref(), true, &mut Stats::default())
    }

    /// Boot `spec` cold and serve one request (`vmm run`). The instance is handed back
    /// so that its teardown can wait until the response is out. A compiled module from the
    /// cache that the guest refuses is compiled again, once, and replaced.
    pub fn run(
        &self,
        spec: &FunctionSpec,
        stdin: &[u8],
        limits: &RunLimits,
    ) -> (Response, Option<Instance>) {
        let cache = artifact_cache(limits);
        let mut reuse = true;
        loop {
            let mut stats = Stats::default();
            let mut inst = match Instance::boot(spec, limits, cache.as_ref(), reuse, &mut stats) {
                Ok(i) => i,
                Err(e) => return (Response::failed(e, stats), None),
            };
            let resp = inst.invoke(stdin, limits);
            let wrote = !resp.stdout.is_empty() || !resp.stderr.is_empty();
            let failure = resp.result.as_ref().err();
            if reuse
                && crate::guest::cached_artifact_refused(failure, resp.stats.artifact_cache, wrote)
            {
                reuse = false;
                continue;
            }
            return (resp, Some(inst));
        }
    }

    /// Load function template `name` from the store and check it, ready to instantiate
    /// (see [`Template`]).
    pub fn load_template(&self, name: &str) -> Result<Arc<Template>, Error> {
        self.load_template_with_stats(name).map(|(t, _)| t)
    }

    pub fn load_template_with_stats(
        &self,
        name: &str,
    ) -> Result<(Arc<Template>, LoadStats), Error> {
        self.load(name, Kind::Function)
    }

    /// Load runtime base `name` (to layer a function on: see
    /// [`create_template`](crate::template::create::create_template)).
    pub fn load_base(&self, name: &str) -> Result<Arc<Template>, Error> {
        self.load(name, Kind::Base).map(|(t, _)| t)
    }

    fn load(&self, name: &str, kind: Kind) -> Result<(Arc<Template>, LoadStats), Error> {
        let store = self.store()?.clone();
        let (t, stats) = Template::load(store, &self.config, name, kind)?;
        Ok((Arc::new(t), stats))
    }

    /// The template store, opened on first use (until it opens, every call tries again).
    pub fn store(&self) -> Result<&Arc<snapshot_store::Store>, Error> {
        if let Some(s) = self.store.get() {
            return Ok(s);
        }
        let s = snapshot_store::Store::open_lazy(&self.config.store_dir)
            .map_err(|e| Error::new(ErrorKind::Damaged, "open the template store", e))?;
        // Two first uses at once: one handle wins, the other is dropped.
        Ok(self.store.get_or_init(|| Arc::new(s)))
    }
}

/// The store whose compiled-module cache a cold run uses (created if missing). A store
/// that cannot be opened must not stop the run: compile without the cache, and say why.
fn artifact_cache(limits: &RunLimits) -> Option<snapshot_store::Store> {
    let dir = limits.artifact_store.as_deref()?;
    snapshot_store::Store::create_or_open(dir)
        .map_err(|e| {
            eprintln!(
                "vmm: warning: the compiled-module cache in {} is not used: {e}",
                dir.display()
            )
        })
        .ok()
}
