//! The functions deployed to this daemon (`PUT /v1/functions/NAME`): their records in the
//! store, each version's spec and template, and building a template from a spec, on
//! deploy or on the first invocation (SEUSS's cold start). Builds of one function happen
//! once: concurrent first requests wait for the one build.
//!
//! The store is the truth (several daemons or worker processes may share it): a record
//! is read again when its file changes, so a deploy seen by one daemon is served by all.

use snapshot_store::{
    function_template_name, valid_function_name, BlobDigest, FunctionRecord, FunctionStore,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmm::error::{Error, ErrorKind};
use vmm::function::{DeploySpec, Interface, Runtime};
use vmm::guest::{EngineKind, RunLimits};

/// How long the remote's "no such function" is believed.
const REMOTE_MISS_TTL: Duration = Duration::from_secs(5);

/// Largest spec blob read back from the store.
const MAX_SPEC_BYTES: u64 = 32 << 20;

/// One version of a deployed function, as its record and spec say.
pub(super) struct Deployed {
    pub(super) record: FunctionRecord,
    pub(super) spec: DeploySpec,
}

use vmm::pool::{file_id, FileId};

/// How a request reached its instance (SEUSS's three paths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path3 {
    /// No template yet: built for this request.
    Cold,
    /// A template, no ready instance: one was restored.
    Warm,
    /// A ready instance.
    Hot,
}

impl Path3 {
    pub(super) fn name(self) -> &'static str {
        match self {
            Path3::Cold => "cold",
            Path3::Warm => "warm",
            Path3::Hot => "hot",
        }
    }
}

/// Requests of one function by path.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) cold: AtomicU64,
    pub(super) warm: AtomicU64,
    pub(super) hot: AtomicU64,
}

/// What an invocation of a deployed function runs.
pub(super) struct Target {
    pub(super) template: String,
    pub(super) interface: Interface,
    pub(super) timeout: Option<Duration>,
    /// No template fits yet: this request builds it (holding the function's turn, so
    /// that requests arriving meanwhile wait for this build instead of making their own).
    pub(super) cold: Option<Cold>,
}

/// A build this request makes (see [`Registry::cold`]).
pub(super) struct Cold {
    turn: tokio::sync::OwnedMutexGuard<()>,
    deployed: Arc<Deployed>,
}

/// What a cold request got: the response of the instance its template was taken from,
/// or (no runtime base to layer on yet: the build made one) only the template, which the
/// request then runs on like any other.
pub(super) enum ColdOutcome {
    Served(Box<vmm::instance::Response>),
    Built,
}

/// What a build made.
pub(super) struct Built {
    pub(super) template: String,
    pub(super) report: Option<vmm::template::create::CreateReport>,
    pub(super) ms: f64,
}

pub(super) struct Registry {
    fstore: FunctionStore,
    store_dir: PathBuf,
    /// `--runtime-module`: the module a js or python function without one runs on.
    runtime_modules: HashMap<Runtime, BlobDigest>,
    default_engine: EngineKind,
    /// `--timeout`: no function's requests (or build) run longer.
    max_timeout: Duration,
    engine: OnceLock<Arc<vmm::engine::Engine>>,
    fingerprint: OnceLock<String>,
    cache: Mutex<HashMap<String, (FileId, Arc<Deployed>)>>,
    /// The store, opened for writing once (see [`Registry::write_layer`]).
    writer: Mutex<Option<snapshot_store::Store>>,
    /// Functions the remote did not have, and when that was found.
    remote_misses: Mutex<HashMap<String, Instant>>,
    /// Runtime bases loaded (and verified) once, to layer cold functions on.
    bases: Mutex<HashMap<String, Arc<vmm::template::Template>>>,
    /// Per function: deploys, removals and builds of it take turns.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Builds running at once (each boots or restores a guest and writes the store), cold
    /// starts included: a burst of new functions queues here instead of running a guest
    /// per request at once.
    builds: Arc<tokio::sync::Semaphore>,
    counters: Mutex<HashMap<String, Arc<Counters>>>,
    pub(super) remote: Option<crate::remote::RemoteArgs>,
}

/// The template of version `version` of function `name` built for `fingerprint`: named
/// after what it is built for too, so that a rebuild for a new guest kernel, say, is a
/// template of its own beside the one requests may still run on.
fn template_name(name: &str, version: u64, fingerprint: &str) -> String {
    format!(
        "{}.{}",
        function_template_name(name, version),
        &BlobDigest::of(fingerprint.as_bytes()).hex()[..8]
    )
}

fn already_exists(e: &Error) -> bool {
    e.find::<snapshot_store::WriteError>()
        .is_some_and(|w| matches!(w, snapshot_store::WriteError::AlreadyExists { .. }))
}

impl Registry {
    pub(super) fn new(
        store_dir: &Path,
        runtime_modules: HashMap<Runtime, BlobDigest>,
        default_engine: EngineKind,
        max_timeout: Duration,
        remote: Option<crate::remote::RemoteArgs>,
    ) -> Registry {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Registry {
            fstore: FunctionStore::new(store_dir),
            store_dir: store_dir.to_path_buf(),
            runtime_modules,
            default_engine,
            max_timeout,
            engine: OnceLock::new(),
            fingerprint: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
            bases: Mutex::new(HashMap::new()),
            remote_misses: Mutex::new(HashMap::new()),
            writer: Mutex::new(None),
            locks: Mutex::new(HashMap::new()),
            builds: Arc::new(tokio::sync::Semaphore::new(2 * cpus)),
            counters: Mutex::new(HashMap::new()),
            remote,
        }
    }

    /// A turn to build (see `builds`), held until dropped.
    pub(super) async fn build_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.builds.clone().acquire_owned().await.ok()
    }

    /// `--timeout`.
    pub(super) fn max_timeout(&self) -> Duration {
        self.max_timeout
    }

    pub(super) fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub(super) fn store(&self) -> &FunctionStore {
        &self.fstore
    }

    pub(super) fn runtime_module(&self, r: Runtime) -> Option<BlobDigest> {
        self.runtime_modules.get(&r).copied()
    }

    fn engine(&self) -> Result<Arc<vmm::engine::Engine>, Error> {
        if let Some(e) = self.engine.get() {
            return Ok(e.clone());
        }
        let e = Arc::new(vmm::engine::Engine::new(vmm::engine::Config::new(
            self.store_dir.clone(),
        ))?);
        Ok(self.engine.get_or_init(|| e).clone())
    }

    /// What templates must have been built for here (see [`vmm::function::build_fingerprint`]).
    pub(super) fn fingerprint(&self) -> Result<String, Error> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f.clone());
        }
        let f = vmm::function::build_fingerprint(&*self.engine()?)?;
        Ok(self.fingerprint.get_or_init(|| f).clone())
    }

    pub(super) fn lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub(super) fn counters(&self, name: &str) -> Arc<Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Function `name` as the store has it now (`None`: not a deployed function; removed
    /// ones are returned, marked). Reads the record again only when its file changed.
    pub(super) fn current(&self, name: &str) -> Result<Option<Arc<Deployed>>, Error> {
        if !valid_function_name(name) {
            return Ok(None);
        }
        let path = self.store_dir.join("functions").join(format!("{name}.fn"));
        let Some(id) = file_id(&path) else {
            self.cache_remove(name);
            return Ok(None);
        };
        if let Some((cached, d)) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
        {
            if *cached == id {
                return Ok(Some(d.clone()));
            }
        }
        let step = "read the function's record";
        let Some(record) = self
            .fstore
            .record(name)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?
        else {
            return Ok(None);
        };
        if record.removed {
            // Removed: served as a name nothing answers to (its spec may not even be here,
            // when the removal came from the remote).
            self.cache_remove(name);
            return Ok(None);
        }
        let spec = self.read_spec(&record)?;
        let d = Arc::new(Deployed { record, spec });
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), (id, d.clone()));
        Ok(Some(d))
    }

    fn cache_remove(&self, name: &str) {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
    }

    fn read_spec(&self, record: &FunctionRecord) -> Result<DeploySpec, Error> {
        let step = "read the function's spec";
        let bytes = self
            .fstore
            .get_blob(&record.spec_digest(), MAX_SPEC_BYTES)
            .map_err(|e| Error::new(ErrorKind::Damaged, step, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::new(ErrorKind::Damaged, step, e))
    }

    /// Whether `name` is a deployed function marked public.
    pub(super) fn is_public(&self, name: &str) -> bool {
        matches!(self.current(name), Ok(Some(d)) if d.spec.public && !d.record.removed)
    }

    /// Every deployed function (removed ones left out).
    pub(super) fn all(&self) -> Vec<Arc<Deployed>> {
        let mut v = Vec::new();
        for r in self.fstore.records() {
            let Ok(r) = r else { continue };
            if r.removed {
                continue;
            }
            if let Ok(Some(d)) = self.current(&r.name) {
                v.push(d);
            }
        }
        v
    }

    /// The limits a build of `spec` runs with.
    fn build_limits(&self, spec: &DeploySpec) -> RunLimits {
        RunLimits {
            timeout: self.timeout_of(spec).unwrap_or(self.max_timeout),
            mem_mib: spec.memory_mib(),
            ..RunLimits::default()
        }
    }

    /// A function's own timeout, at most `--timeout`.
    pub(super) fn timeout_of(&self, spec: &DeploySpec) -> Option<Duration> {
        spec.timeout_secs
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .map(|t| t.min(self.max_timeout))
    }

    /// Build version `version` of function `name` from `spec` (blocking: boots or
    /// restores a guest and writes the store). A template of that name already there (a
    /// build by another daemon on the same store) is taken as it is.
    pub(super) fn build_blocking(
        &self,
        name: &str,
        version: u64,
        spec: &DeploySpec,
    ) -> Result<Built, Error> {
        let t0 = Instant::now();
        let engine = self.engine()?;
        let fp = self.fingerprint()?;
        let fspec = vmm::function::resolve(&self.fstore, spec, self.default_engine)?;
        let template = template_name(name, version, &fp);
        let mut store = snapshot_store::Store::create_or_open(&self.store_dir)
            .map_err(|e| Error::new(ErrorKind::Host, "open the template store", e))?;
        let trial: Vec<u8> = match spec.interface {
            Interface::Raw => Vec::new(),
            Interface::Http => super::event::trial_event(),
        };
        let limits = self.build_limits(spec);
        let report = match vmm::template::create::create_template(
            &engine, &mut store, &template, &fspec, None, &trial, &limits,
        ) {
            Ok(r) => Some(r),
            Err(e) if already_exists(&e) => None,
            Err(e) => return Err(e),
        };
        Ok(Built {
            template,
            report,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Build `d` (on a blocking thread, at most a few builds at once) and record the
    /// template, unless its record moved on meanwhile. Returns the template name.
    pub(super) async fn build(self: &Arc<Self>, d: &Deployed) -> Result<Built, Error> {
        let _slot = self.builds.acquire().await.map_err(|_| {
            Error::new(
                ErrorKind::Host,
                "build the template",
                "the daemon is stopping",
            )
        })?;
        let (me, name, version, spec) = (
            self.clone(),
            d.record.name.clone(),
            d.record.version,
            d.spec.clone(),
        );
        let built = tokio::task::spawn_blocking(move || me.build_blocking(&name, version, &spec))
            .await
            .map_err(|_| {
                Error::new(ErrorKind::Host, "build the template", "the build panicked")
            })??;
        Ok(built)
    }

    /// Write `record` and forget what was cached for it.
    pub(super) fn put_record(&self, record: &FunctionRecord) -> Result<(), Error> {
        self.fstore
            .put_record(record)
            .map_err(|e| Error::new(ErrorKind::Host, "write the function's record", e))?;
        self.cache_remove(&record.name);
        Ok(())
    }

    /// The template an invocation of deployed function `d` runs on: the recorded one
    /// when it fits this VMM, else (cold) the build this request is to make, once however
    /// many requests ask at once: the others wait for it and take the template it made.
    pub(super) async fn target(self: &Arc<Self>, d: Arc<Deployed>) -> Result<Target, Error> {
        let name = d.record.name.clone();
        let fp = self.fingerprint()?;
        // Built for this VMM, and still in the store (a template removed underneath is
        // built again rather than failing every request).
        let fits = |d: &Deployed| {
            d.record.built_for.as_deref() == Some(fp.as_str())
                && d.record.template.as_ref().is_some_and(|t| {
                    self.store_dir
                        .join("templates")
                        .join(format!("{t}.tmpl"))
                        .exists()
                })
        };
        let target = |d: &Deployed| Target {
            template: d.record.template.clone().unwrap_or_default(),
            interface: d.spec.interface,
            timeout: self.timeout_of(&d.spec),
            cold: None,
        };
        if fits(&d) {
            return Ok(target(&d));
        }
        let turn = self.lock(&name).lock_owned().await;
        // Built (or replaced) while this request waited for its turn.
        let gone = || {
            Error::new(
                ErrorKind::NotFound,
                "find the function",
                format!("function {name:?} was removed"),
            )
        };
        let now = self.current(&name)?.ok_or_else(gone)?;
        if now.record.removed {
            return Err(gone());
        }
        if fits(&now) {
            return Ok(target(&now));
        }
        let mut t = target(&now);
        t.template = template_name(&name, now.record.version, &fp);
        t.cold = Some(Cold {
            turn,
            deployed: now,
        });
        Ok(t)
    }

    /// The runtime base `spec` layers on, loaded and verified once (`None`: the store has
    /// none yet; a full build makes it).
    fn base_for(
        &self,
        spec: &vmm::guest::FunctionSpec,
        mem_mib: u64,
    ) -> Result<Option<Arc<vmm::template::Template>>, Error> {
        let name = vmm::template::create::runtime_base_name(spec, mem_mib);
        if let Some(b) = self
            .bases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&name)
        {
            return Ok(Some(b.clone()));
        }
        let base = match self.engine()?.load_base(&name) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        base.prepare()?;
        self.bases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, base.clone());
        Ok(Some(base))
    }

    /// SEUSS's cold path for `cold`'s function: restore its runtime base, give it the
    /// function, snapshot that in memory, serve `stdin` on that very instance, and only
    /// after the response is out (`respond`) write the template and record it. Without a
    /// runtime base yet, a full build makes one (and the template), and the request runs
    /// on the template like any other ([`ColdOutcome::Built`]). Blocking.
    pub(super) fn cold_blocking(
        &self,
        cold: Cold,
        stdin: &[u8],
        limits: &RunLimits,
        respond: impl FnOnce(Result<ColdOutcome, Error>),
    ) {
        let Cold { turn, deployed: d } = cold;
        let t0 = Instant::now();
        let name = d.record.name.as_str();
        let fp = match self.fingerprint() {
            Ok(f) => f,
            Err(e) => return respond(Err(e)),
        };
        let template = template_name(name, d.record.version, &fp);
        let layered = (|| {
            let fspec = vmm::function::resolve(&self.fstore, &d.spec, self.default_engine)?;
            match self.base_for(&fspec, d.spec.memory_mib())? {
                Some(base) => vmm::template::create::layer_on(
                    &base,
                    &template,
                    &fspec,
                    &self.build_limits(&d.spec),
                )
                .map(Some),
                None => Ok(None),
            }
        })();
        let written = match layered {
            Err(e) => return respond(Err(e)),
            Ok(Some((mut inst, layer))) => {
                let layered_ms = t0.elapsed().as_secs_f64() * 1e3;
                let resp = inst.invoke(stdin, limits);
                tracing::debug!(function = %name, layered_ms, run_ms = resp.stats.run_ms, "cold: served on the layered instance");
                respond(Ok(ColdOutcome::Served(Box::new(resp))));
                drop(inst);
                let pages = layer.changed_pages();
                self.write_layer(layer).map(|()| pages)
            }
            Ok(None) => match self.build_blocking(name, d.record.version, &d.spec) {
                Ok(b) => {
                    let pages = b.report.as_ref().map_or(0, |r| r.new_pages as usize);
                    let r = self.record_built(&d, &b.template, &fp);
                    respond(r.map(|()| ColdOutcome::Built));
                    drop(turn);
                    self.push_built(name);
                    tracing::info!(function = %name, version = d.record.version, template = %b.template, pages, ms = b.ms, "built on its first request (and its runtime base)");
                    return;
                }
                Err(e) => return respond(Err(e)),
            },
        };
        match written.and_then(|pages| self.record_built(&d, &template, &fp).map(|()| pages)) {
            Ok(pages) => {
                tracing::info!(function = %name, version = d.record.version, template = %template, pages, ms = t0.elapsed().as_secs_f64() * 1e3, "built on its first request");
                drop(turn);
                self.push_built(name);
                return;
            }
            Err(e) => {
                tracing::warn!(function = %name, "storing the template made on its first request failed (the next request builds it again): {e}")
            }
        }
        drop(turn);
    }

    /// Store a layer through the daemon's one writing handle of the store (opening a store
    /// for writing reads every pack index: per build, that cost grew with the store).
    fn write_layer(&self, layer: vmm::template::create::Layered) -> Result<(), Error> {
        let mut w = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.is_none() {
            *w = Some(
                snapshot_store::Store::create_or_open(&self.store_dir)
                    .map_err(|e| Error::new(ErrorKind::Host, "open the template store", e))?,
            );
        }
        let Some(store) = w.as_mut() else {
            return Err(Error::new(
                ErrorKind::Host,
                "open the template store",
                "no handle",
            ));
        };
        match layer.write(store) {
            Ok(_) => Ok(()),
            Err(e) if already_exists(&e) => Ok(()),
            Err(e) => {
                // Opened again for the next write, in case the handle is what failed.
                *w = None;
                Err(e)
            }
        }
    }

    /// With a remote: push a function whose template was just built, so other daemons
    /// pull it instead of building it too. Blocking; a failure is logged.
    fn push_built(&self, name: &str) {
        if let Some(remote) = &self.remote {
            if let Err(e) = super::deploy::reg_push(&self.store_dir, name, remote) {
                tracing::warn!(function = %name, "pushing the template built on its first request: {e}");
            }
        }
    }

    /// With a remote: when this store has no record of `name`, or its record's template
    /// is missing here, pull the function (its record, spec and files, and its template
    /// if it fits this VMM). Remembers for a few seconds that the remote has none, so
    /// that requests for plain templates do not ask it every time. Blocking.
    pub(super) fn pull_if_needed(&self, name: &str) -> Result<(), String> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        if !valid_function_name(name) {
            return Ok(());
        }
        let local = self.fstore.record(name).map_err(|e| e.to_string())?;
        let have = |t: &str| {
            self.store_dir
                .join("templates")
                .join(format!("{t}.tmpl"))
                .exists()
        };
        if let Some(r) = &local {
            if r.removed || r.template.as_deref().is_none_or(have) {
                return Ok(());
            }
        }
        if local.is_none()
            && self
                .remote_misses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(name)
                .is_some_and(|t| t.elapsed() < REMOTE_MISS_TTL)
        {
            return Ok(());
        }
        let fp = self.fingerprint().map_err(|e| e.to_string())?;
        let pulled =
            crate::remote::pull_function_fitting(&self.store_dir, name, remote, Some(&fp))?;
        let mut misses = self
            .remote_misses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match pulled {
            None => {
                misses.insert(name.to_string(), Instant::now());
            }
            Some(p) => {
                misses.remove(name);
                tracing::info!(function = %name, version = p.record.version, blobs = p.blobs_fetched, template = ?p.template, "pulled the function from the remote");
                self.cache_remove(name);
            }
        }
        Ok(())
    }

    /// Record that `d`'s version is served by `template`, built for `fp` (unless the
    /// function moved on meanwhile).
    fn record_built(&self, d: &Deployed, template: &str, fp: &str) -> Result<(), Error> {
        let now = self
            .fstore
            .record(&d.record.name)
            .map_err(|e| Error::new(ErrorKind::Damaged, "read the function's record", e))?;
        if now
            .as_ref()
            .is_none_or(|r| r.version != d.record.version || r.removed)
        {
            return Ok(());
        }
        let mut record = d.record.clone();
        record.template = Some(template.to_string());
        record.built_for = Some(fp.to_string());
        self.put_record(&record)
    }

    /// Remove the templates of `name`'s versions before `keep_from` (all with 0 ... no:
    /// `u64::MAX` removes every one). Requests already running keep theirs in memory.
    pub(super) fn remove_templates(&self, name: &str, keep_from: u64) {
        let prefix = format!("fn.{name}.v");
        let Ok(mut store) = snapshot_store::Store::open(&self.store_dir) else {
            return;
        };
        let Ok(list) = store.list_all() else { return };
        let names: Vec<String> = list
            .templates
            .iter()
            .map(|t| t.name.as_str().to_string())
            .filter(|t| {
                t.strip_prefix(&prefix)
                    .and_then(|rest| rest.split('.').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v < keep_from)
            })
            .collect();
        for t in names {
            if let Err(e) = store.remove(&t) {
                tracing::warn!(template = %t, "removing an old version's template: {e}");
            }
        }
    }
}
