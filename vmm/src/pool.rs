//! Pools of ready instances per template, for a long-running invoker.
//!
//! [`Pools`] loads each function template once (verified into memory, see
//! [`Template`]), keeps up to `pool` instances of it ready (restored, stopped at the
//! function's pending read of stdin), hands one to each request and, after the response,
//! resets it in place and puts it back. Instances that failed are dropped. The store is
//! watched: a template created later is found on its first request, a replaced one is
//! reloaded, a removed one is refused (requests already running finish).
//!
//! Everything here is blocking and runs on the caller's threads (vCPUs never run on an
//! async executor): [`Pools::invoke`] runs the guest on the calling thread and returns
//! the response before the instance is reset; [`Checkout`] puts it back on drop.

use crate::error::{Error, ErrorKind};
use crate::guest::RunLimits;
use crate::instance::{Backing, Instance, ResetStats, Response};
use crate::stats::ms;
use crate::stats::Stats;
use crate::template::Template;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How the pools are sized.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Ready instances kept per template (0: restore on demand, destroy after use).
    pub pool: usize,
    /// Most instances alive at once, over all templates (busy and ready).
    pub max_instances: usize,
    /// Host memory (resident set of the process, bytes) above which idle instances of
    /// the least recently used templates are destroyed.
    pub memory_limit: u64,
    /// Idle instances beyond `pool` are destroyed after this long unused.
    pub idle_timeout: Duration,
    /// How the instances the pool keeper makes hold the template's memory (instances
    /// restored on demand for a request always get their own copy).
    pub backing: Backing,
    /// With `backing` [`Backing::Shared`]: once a request of a template changes the guest's
    /// page tables, that template's instances get their own copy instead
    /// ([`Backing::Eager`]). The reset after such a request makes KVM forget every mapping
    /// it built, so a shared instance's next request pays an exit per 4 KiB page it
    /// touches again, a copy one per 2 MiB: measured, a function allocating 48 MiB per
    /// request ran 1.6x as long shared, a Python one importing modules 1.3x, while
    /// functions whose requests map nothing ran as fast shared as copied.
    pub adapt: bool,
    /// Of a template's ready instances, how many are warmed up (a shared instance's first
    /// run pays an exit per page it touches: the keeper gives it an empty request first).
    /// The rest are only restored: they cost a fraction of the memory and time to make
    /// (measured: 300 hello instances in 0.28 s and 179 KiB each, against 3.6 s and 589
    /// KiB warmed) and pay their touches on their first request. Warm instances are
    /// handed out first, and an instance is warm once it has served a request.
    pub warm: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool: 2,
            max_instances: 256,
            memory_limit: 16 << 30,
            idle_timeout: Duration::from_secs(30),
            backing: Backing::Eager,
            adapt: false,
            warm: 2,
        }
    }
}

/// How long a failed template load is remembered (for an unchanged manifest).
const RETRY_FAILED_LOAD: Duration = Duration::from_secs(5);

/// Identity of a template's manifest on disk: a change means it was replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

/// The identity of the file at `path` now (`None`: there is none).
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        ino: m.ino(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        len: m.len(),
    })
}

/// Called after every reset with the template's name and what the reset cost.
type ResetObserver = Box<dyn Fn(&str, &ResetStats) + Send + Sync>;

/// One template and its ready instances.
pub struct Entry {
    template: Arc<Template>,
    file: Option<FileId>,
    /// Ready instances, the next to hand out last: warm ones are pushed at the back,
    /// instances that were never run at the front.
    ready: Mutex<VecDeque<(Instance, Instant)>>,
    busy: AtomicUsize,
    last_used: Mutex<Instant>,
    served: AtomicU64,
    /// A request changed the guest's page tables: with [`PoolConfig::adapt`], new
    /// instances get their own copy of memory.
    maps_memory: std::sync::atomic::AtomicBool,
}

impl Entry {
    /// Whether a request of this template changed the guest's page tables (see
    /// [`PoolConfig::adapt`]).
    pub fn maps_memory(&self) -> bool {
        self.maps_memory.load(Ordering::Relaxed)
    }

    /// How the pool's new instances of this template hold its memory.
    pub fn backing(&self, config: &PoolConfig) -> Backing {
        match config.backing {
            Backing::Shared if config.adapt && self.maps_memory() => Backing::Eager,
            b => b,
        }
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }
    pub fn ready(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// What [`Pools::invoke`] measured, beside the response.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    /// Finding the template and taking (or creating) an instance.
    pub acquire_ms: f64,
    /// Whether a new instance had to be restored for this request (no ready one).
    pub restored_on_demand: bool,
    #[serde(flatten)]
    pub invoke: Box<Stats>,
}

/// The pools of every template of one store.
pub struct Pools {
    engine: Arc<crate::engine::Engine>,
    store_dir: PathBuf,
    config: PoolConfig,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    /// One lock per template name: a template is loaded by one thread at a time, while
    /// other templates load in parallel (the store's read side is shared).
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Templates whose load failed, with the manifest it failed on and why.
    failed: Mutex<HashMap<String, (FileId, Instant, ErrorKind, String)>>,
    live: Arc<Live>,
    /// Instances to destroy off the request path (unmapping RAM and destroying the KVM VM
    /// takes a few ms); the reaper thread drops them and releases their count.
    reaper: Mutex<std::sync::mpsc::Sender<Instance>>,
    /// Observers of resets (for metrics), called after each reset.
    on_reset: Mutex<Option<ResetObserver>>,
}

/// An instance taken from a pool for one request; returned (reset) or destroyed on drop.
pub struct Checkout<'p> {
    pools: &'p Pools,
    entry: Arc<Entry>,
    instance: Option<Instance>,
}

impl Pools {
    pub fn new(engine: Arc<crate::engine::Engine>, config: PoolConfig) -> Pools {
        let live = Arc::new(Live::default());
        Pools {
            store_dir: engine.store_dir().to_path_buf(),
            engine,
            config,
            entries: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            reaper: Mutex::new(spawn_reaper(live.clone())),
            live,
            on_reset: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Call `f` after every reset with the template name and what the reset cost.
    pub fn set_reset_observer(&self, f: impl Fn(&str, &ResetStats) + Send + Sync + 'static) {
        if let Ok(mut o) = self.on_reset.lock() {
            *o = Some(Box::new(f));
        }
    }

    fn manifest_path(&self, name: &str) -> PathBuf {
        self.store_dir
            .join("templates")
            .join(format!("{name}.tmpl"))
    }

    /// Whether `name` is a template loaded into the pools (known to exist).
    pub fn is_loaded(&self, name: &str) -> bool {
        self.entries.lock().is_ok_and(|m| m.contains_key(name))
    }

    /// Instances alive now (ready and busy, all templates).
    pub fn live_instances(&self) -> usize {
        self.live.count.lock().map(|l| *l).unwrap_or(0)
    }

    /// The templates loaded so far, by name.
    pub fn entries(&self) -> Vec<(String, Arc<Entry>)> {
        let mut v: Vec<_> = self
            .entries
            .lock()
            .map(|e| e.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The entry for `name`, loading the template if it is new or was replaced on disk.
    pub fn entry(&self, name: &str) -> Result<Arc<Entry>, Error> {
        let step = "find template";
        if snapshot_store::TemplateName::new(name).is_err() {
            return Err(Error::new(
                ErrorKind::NotFound,
                step,
                format!("no template named {name:?}"),
            ));
        }
        let now = file_id(&self.manifest_path(name));
        let Some(now) = now else {
            // Removed (or never there): forget it; running requests keep their Arc.
            self.forget(name);
            return Err(Error::new(
                ErrorKind::NotFound,
                step,
                format!("no template named {name:?} in {}", self.store_dir.display()),
            ));
        };
        if let Some(e) = self.entries.lock().ok().and_then(|m| m.get(name).cloned()) {
            if e.file == Some(now) {
                return Ok(e);
            }
        }
        let lock = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Another thread may have loaded it while this one waited.
        if let Some(e) = self.entries.lock().ok().and_then(|m| m.get(name).cloned()) {
            if e.file == Some(now) {
                return Ok(e);
            }
        }
        // A template that failed to load is not loaded (and verified) again for a while
        // unless its manifest changes: a stream of requests for a damaged template stays
        // cheap, and a store repaired underneath (`vmm-store reindex`) is seen again soon.
        if let Some((kind, msg)) = self.failed.lock().ok().and_then(|f| {
            f.get(name)
                .filter(|(id, at, _, _)| *id == now && at.elapsed() < RETRY_FAILED_LOAD)
                .map(|(_, _, k, m)| (*k, m.clone()))
        }) {
            return Err(Error::new(kind, "load template", msg));
        }
        // Every page verified once, into the image instances share and resets copy from.
        let loaded = self
            .engine
            .load_template(name)
            .and_then(|t| t.prepare().map(|()| t));
        let template = match loaded {
            Ok(t) => t,
            Err(e) => {
                if let Ok(mut f) = self.failed.lock() {
                    f.insert(
                        name.to_string(),
                        (
                            now,
                            Instant::now(),
                            e.kind(),
                            std::error::Error::source(&e)
                                .map(|s| s.to_string())
                                .unwrap_or_else(|| e.to_string()),
                        ),
                    );
                }
                return Err(e);
            }
        };
        if let Ok(mut f) = self.failed.lock() {
            f.remove(name);
        }
        let entry = Arc::new(Entry {
            template,
            file: Some(now),
            ready: Mutex::new(VecDeque::new()),
            busy: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            served: AtomicU64::new(0),
            maps_memory: Default::default(),
        });
        let old = self
            .entries
            .lock()
            .map_err(|_| Error::new(ErrorKind::Host, step, "pool lock poisoned"))?
            .insert(name.to_string(), entry.clone());
        if let Some(old) = old {
            self.destroy_ready(&old, usize::MAX);
        }
        Ok(entry)
    }

    fn forget(&self, name: &str) {
        let old = self.entries.lock().ok().and_then(|mut m| m.remove(name));
        if let Some(old) = old {
            self.destroy_ready(&old, usize::MAX);
        }
    }

    /// Destroy up to `n` ready instances of `entry`; returns how many.
    fn destroy_ready(&self, entry: &Entry, n: usize) -> usize {
        let taken: Vec<_> = match entry.ready.lock() {
            Ok(mut r) => {
                let k = n.min(r.len());
                r.drain(..k).collect()
            }
            Err(_) => vec![],
        };
        let k = taken.len();
        drop(taken);
        self.release(k);
        k
    }

    fn release(&self, n: usize) {
        self.live.release(n);
    }

    /// Destroy `inst` on the reaper thread (inline if that thread is gone).
    fn destroy(&self, inst: Instance) {
        let failed = match self.reaper.lock() {
            Ok(tx) => tx.send(inst).err().map(|e| e.0),
            Err(_) => Some(inst),
        };
        if let Some(inst) = failed {
            drop(inst);
            self.release(1);
        }
    }

    /// Reserve room for one more instance. At a limit, a request (`evict`) destroys idle
    /// instances, least recently used templates first, then waits up to `wait` for a busy
    /// one to end; the pool keeper (`!evict`) never takes room from others. An instance is
    /// always allowed when none is alive (a memory limit below the daemon's own floor).
    fn reserve(&self, wait: Duration, evict: bool) -> Result<(), Error> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut live = self.live.count.lock().unwrap_or_else(|e| e.into_inner());
                let room = *live < self.config.max_instances && !self.over_memory();
                if room || (evict && *live == 0) {
                    *live += 1;
                    return Ok(());
                }
            }
            if evict
                && (self.evict_lru(1) > 0 || (self.over_memory() && self.forget_idle_template()))
            {
                continue;
            }
            let live = self.live.count.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Host,
                    "acquire an instance",
                    format!(
                        "every one of the {} instances allowed is busy (or the memory limit is reached)",
                        self.config.max_instances
                    ),
                ));
            }
            let _ = self
                .live
                .released
                .wait_timeout(live, (deadline - now).min(Duration::from_millis(50)));
        }
    }

    fn over_memory(&self) -> bool {
        resident_bytes().is_some_and(|r| r > self.config.memory_limit)
    }

    /// Destroy up to `n` idle instances, least recently used templates first.
    pub fn evict_lru(&self, n: usize) -> usize {
        let mut entries = self.entries();
        oldest_first(&mut entries, |(_, e)| {
            e.last_used
                .lock()
                .map(|t| *t)
                .unwrap_or_else(|_| Instant::now())
        });
        let mut done = 0;
        for (_, e) in entries {
            if done >= n {
                break;
            }
            done += self.destroy_ready(&e, n - done);
        }
        done
    }

    /// Forget the least recently used template that has no instance, ready or busy: its
    /// verified memory image (the template's whole memory, kept for restores and resets)
    /// is freed. Over the memory limit with no idle instance left, these images are what
    /// holds the memory (many functions each served once). Whether one was forgotten.
    fn forget_idle_template(&self) -> bool {
        let mut entries = self.entries();
        oldest_first(&mut entries, |(_, e)| {
            e.last_used
                .lock()
                .map(|t| *t)
                .unwrap_or_else(|_| Instant::now())
        });
        for (name, e) in entries {
            if e.ready() == 0 && e.busy() == 0 {
                let removed = self.entries.lock().ok().and_then(|mut m| {
                    if m.get(&name).is_some_and(|cur| Arc::ptr_eq(cur, &e)) {
                        m.remove(&name)
                    } else {
                        None
                    }
                });
                if removed.is_some() {
                    tracing::debug!(template = %name, "over the memory limit: its image is freed until its next request");
                    return true;
                }
            }
        }
        false
    }

    /// Take a ready instance of `name`, or restore a new one.
    pub fn checkout(&self, name: &str, wait: Duration) -> Result<(Checkout<'_>, bool), Error> {
        let entry = self.entry(name)?;
        if let Ok(mut t) = entry.last_used.lock() {
            *t = Instant::now();
        }
        let ready = entry.ready.lock().ok().and_then(|mut r| r.pop_back());
        let (instance, fresh) = match ready {
            Some((i, _)) => (i, false),
            None => {
                self.reserve(wait, true)?;
                // On the request path: a private copy, whose first touches cost no exits (a
                // shared instance is warmed up first, which only the pool keeper can afford).
                match entry.template.instantiate_with(Backing::Eager) {
                    Ok(i) => (i, true),
                    Err(e) => {
                        self.release(1);
                        return Err(e);
                    }
                }
            }
        };
        entry.busy.fetch_add(1, Ordering::Relaxed);
        Ok((
            Checkout {
                pools: self,
                entry,
                instance: Some(instance),
            },
            fresh,
        ))
    }

    /// Serve one request of template `name`: take an instance, run, and return the
    /// response. The instance is reset and returned to its pool when the returned
    /// [`Checkout`] is dropped, which the caller does after sending the response.
    pub fn invoke(
        &self,
        name: &str,
        stdin: &[u8],
        limits: &RunLimits,
    ) -> Result<(Response, Timings, Checkout<'_>), Error> {
        let t0 = Instant::now();
        let (mut co, fresh) = self.checkout(name, limits.timeout)?;
        let acquire_ms = ms(t0.elapsed());
        let resp = co.instance_mut().invoke(stdin, limits);
        co.entry.served.fetch_add(1, Ordering::Relaxed);
        let timings = Timings {
            acquire_ms,
            restored_on_demand: fresh,
            invoke: Box::new(resp.stats.clone()),
        };
        Ok((resp, timings, co))
    }

    /// Bring every loaded template's pool up to `pool` ready instances and destroy idle
    /// ones beyond it that were unused for `idle_timeout`; load function templates found
    /// in the store when `discover` is set (and `pool` is not 0). Returns instances created.
    pub fn maintain(&self, discover: bool) -> usize {
        // With no pool to fill, templates are loaded on their first request only (a worker
        // process of a daemon whose pools are shared out may keep none of a template).
        // Over the memory limit: idle instances of the least recently used templates go
        // first, then those templates' images.
        while self.over_memory() && (self.evict_lru(1) > 0 || self.forget_idle_template()) {}
        // Over the memory limit, templates are loaded only for their requests (the
        // keeper would otherwise load back what the limit made the pools forget).
        if discover && self.config.pool > 0 && !self.over_memory() {
            for name in self.function_templates_on_disk() {
                let _ = self.entry(&name);
            }
        }
        // Forget templates removed from disk.
        for (name, _) in self.entries() {
            if file_id(&self.manifest_path(&name)).is_none() {
                self.forget(&name);
            }
        }
        let mut created = 0;
        for (_, e) in self.entries() {
            // Idle shrink.
            let now = Instant::now();
            let stale: Vec<_> = match e.ready.lock() {
                // Nothing beyond the pool: nothing can be stale (and a worker process
                // keeping hundreds ready does not move them all every tick).
                Ok(r) if r.len() <= self.config.pool => vec![],
                Ok(mut r) => {
                    let (keep, stale) = split_idle(
                        std::mem::take(&mut *r).into(),
                        self.config.pool,
                        self.config.idle_timeout,
                        now,
                    );
                    *r = keep.into();
                    stale
                }
                Err(_) => vec![],
            };
            let k = stale.len();
            drop(stale);
            self.release(k);
            // Refill.
            while e.ready() + e.busy() < self.config.pool {
                if self.reserve(Duration::ZERO, false).is_err() {
                    break;
                }
                match e.template.instantiate_with(e.backing(&self.config)) {
                    Ok(i) => {
                        // Warm (to the back, handed out first) while fewer than `warm` are
                        // ready; else only restored (to the front).
                        let warm = e.ready() < self.config.warm;
                        let i = if warm { self.warm_up(i) } else { Some(i) };
                        let Some(i) = i else {
                            self.release(1);
                            break;
                        };
                        if let Ok(mut r) = e.ready.lock() {
                            if warm {
                                r.push_back((i, Instant::now()));
                            } else {
                                r.push_front((i, Instant::now()));
                            }
                        }
                        created += 1;
                    }
                    Err(err) => {
                        self.release(1);
                        tracing::warn!(template = e.template.name(), "refill failed: {err}");
                        break;
                    }
                }
            }
        }
        created
    }

    /// A shared instance pays one exit per page on its guest's first touch of it: give a
    /// new one an empty request and reset it, off the request path, so that its first real
    /// request does not pay that. If the warm-up fails (the function may not accept an
    /// empty request), a fresh instance is used instead.
    fn warm_up(&self, mut inst: Instance) -> Option<Instance> {
        if inst.backing() != Backing::Shared {
            return Some(inst);
        }
        let limits = RunLimits {
            timeout: Duration::from_secs(2),
            ..RunLimits::default()
        };
        let warmed = inst.invoke(b"", &limits).result.is_ok() && inst.reset().is_ok();
        if warmed {
            return Some(inst);
        }
        let t = inst.template()?.clone();
        drop(inst);
        t.instantiate_with(Backing::Shared).ok()
    }

    /// Names of the function templates in the store (runtime bases are skipped).
    fn function_templates_on_disk(&self) -> Vec<String> {
        let Ok(store) = self.engine.store() else {
            return vec![];
        };
        let Ok(list) = store.list() else {
            return vec![];
        };
        list.into_iter()
            .filter(|t| t.parent.is_some())
            .map(|t| t.name.as_str().to_string())
            .collect()
    }
}

impl Checkout<'_> {
    pub fn instance_mut(&mut self) -> &mut Instance {
        self.instance.as_mut().expect("instance present until drop")
    }
    pub fn template_name(&self) -> &str {
        self.entry.template.name()
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        let Some(mut inst) = self.instance.take() else {
            self.entry.busy.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        let pools = self.pools;
        // The entry may have been replaced or forgotten meanwhile: then destroy.
        let current = pools
            .entries
            .lock()
            .ok()
            .and_then(|m| m.get(self.entry.template.name()).cloned())
            .is_some_and(|e| Arc::ptr_eq(&e, &self.entry));
        let keep = current && pools.config.pool > 0 && !inst.is_broken();
        if keep {
            match inst.reset() {
                Ok(stats) => {
                    // What the request touched goes into the template's learned working
                    // set (for the first requests only; a store write when it added frames).
                    if let Err(e) = inst.learn() {
                        tracing::debug!(template = self.entry.template.name(), "{e}");
                    }
                    if let Ok(o) = pools.on_reset.lock() {
                        if let Some(f) = o.as_ref() {
                            f(self.entry.template.name(), &stats);
                        }
                    }
                    let to_copies = stats.mappings_dropped
                        && pools.config.adapt
                        && inst.backing() == Backing::Shared;
                    if to_copies {
                        // From now on this template's instances get copies; this one goes.
                        if !self.entry.maps_memory.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                template = self.entry.template.name(),
                                "its requests change the guest's page tables: its instances get their own copy of memory from now on"
                            );
                        }
                    } else if let Ok(mut r) = self.entry.ready.lock() {
                        r.push_back((inst, Instant::now()));
                        // Busy ends only once the instance is ready again, so the pool
                        // keeper never sees a gap to refill while it is being reset.
                        self.entry.busy.fetch_sub(1, Ordering::Relaxed);
                        pools.live.released.notify_all();
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(template = self.entry.template.name(), "reset failed: {e}");
                }
            }
        }
        self.entry.busy.fetch_sub(1, Ordering::Relaxed);
        pools.destroy(inst);
    }
}

/// The count of live instances, and a condition to wait on for one to go.
#[derive(Default)]
struct Live {
    count: Mutex<usize>,
    released: Condvar,
}

impl Live {
    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Ok(mut l) = self.count.lock() {
            *l = l.saturating_sub(n);
        }
        self.released.notify_all();
    }
}

/// Sort `items` least recently used first (the order idle instances are evicted in).
fn oldest_first<T>(items: &mut [T], last_used: impl Fn(&T) -> Instant) {
    items.sort_by_key(last_used);
}

/// The idle shrink of one template's ready instances (each with when it became ready):
/// the first `pool` always stay; beyond them, those unused for longer than `idle` at `now`
/// go. Returns (kept, in their order; to destroy).
fn split_idle<T>(
    ready: Vec<(T, Instant)>,
    pool: usize,
    idle: Duration,
    now: Instant,
) -> (Vec<(T, Instant)>, Vec<T>) {
    let mut keep = Vec::new();
    let mut stale = Vec::new();
    for (i, t) in ready {
        if keep.len() >= pool && now.saturating_duration_since(t) > idle {
            stale.push(i);
        } else {
            keep.push((i, t));
        }
    }
    (keep, stale)
}

fn spawn_reaper(live: Arc<Live>) -> std::sync::mpsc::Sender<Instance> {
    let (tx, rx) = std::sync::mpsc::channel::<Instance>();
    let spawned = std::thread::Builder::new()
        .name("vmm-reaper".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::Kind::Reaper);
            for inst in rx {
                drop(inst);
                live.release(1);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no reaper thread ({e}): instances are destroyed inline");
    }
    tx
}

/// Resident set size of this process in bytes (/proc/self/statm).
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_takes_the_least_recently_used_templates_first() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut v = vec![("b", at(20)), ("c", at(30)), ("a", at(10)), ("d", at(0))];
        oldest_first(&mut v, |e| e.1);
        let names: Vec<&str> = v.iter().map(|e| e.0).collect();
        assert_eq!(names, ["d", "a", "b", "c"]);
    }

    #[test]
    fn the_idle_shrink_keeps_the_pool_and_what_was_used_lately() {
        let now = Instant::now() + Duration::from_secs(100);
        let ago = |s: u64| now - Duration::from_secs(s);
        let idle = Duration::from_secs(30);
        // Two kept whatever their age (the pool); beyond them, the stale ones go.
        let ready = vec![
            (1, ago(90)),
            (2, ago(60)),
            (3, ago(31)),
            (4, ago(5)),
            (5, ago(40)),
        ];
        let (keep, stale) = split_idle(ready, 2, idle, now);
        let kept: Vec<i32> = keep.iter().map(|k| k.0).collect();
        assert_eq!(kept, [1, 2, 4]);
        assert_eq!(stale, [3, 5]);
        // Exactly the idle time is not yet stale; a pool of 0 keeps only fresh ones.
        let (keep, stale) = split_idle(vec![(1, ago(30)), (2, ago(31))], 0, idle, now);
        assert_eq!((keep.len(), stale), (1, vec![2]));
        // Nothing ready: nothing to do.
        let (keep, stale) = split_idle(Vec::<(i32, Instant)>::new(), 2, idle, now);
        assert!(keep.is_empty() && stale.is_empty());
    }
}
