//! `vmm serve`: a long-running invoker. HTTP/1.1 (hyper on a small tokio runtime) in
//! front, a fixed set of worker threads behind it that run the vCPUs (never on the async
//! executor), and [`vmm::pool::Pools`] keeping instances of every template ready.
//!
//! A request is queued (bounded: 429 when full), a worker takes a ready instance of its
//! template, writes the body into the guest's pending read, runs it to its exit, sends the
//! response back, and only then resets the instance in place for the next request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::guest::RunLimits;
use vmm::pool::{PoolConfig, Pools};

/// A line on stderr; a closed or full stderr is not a reason to stop serving (eprintln!
/// would panic).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod auth;
mod backend;
pub mod cell;
mod cells;
mod deploy;
mod event;
mod http;
mod invoke;
mod jail;
mod limits;
mod metrics;
mod proto;
mod registry;
mod workers;

/// Largest request body accepted by default (413 above it).
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where to listen: HOST:PORT, or unix:PATH for a Unix socket.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The template store [default: $VMM_STORE, else $XDG_DATA_HOME/vmm/store, else ~/.local/share/vmm/store]
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// With --remote, a request for a template the store lacks pulls it first.
    #[command(flatten)]
    pub remote: crate::remote::RemoteArgs,
    /// Ready instances kept per template (0: restore one per request, destroy it after).
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=65536))]
    pub pool: u32,
    /// Most instances alive at once, over all templates. Checked at start-up against the
    /// open-files limit (the soft one is raised as far as needed) and `vm.max_map_count`.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_instances: u32,
    /// Host memory (resident, e.g. 512M, 8G) above which idle instances are destroyed,
    /// least recently used templates first.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = snapshot_store::parse_size)]
    pub memory_limit: u64,
    /// Worker threads running vCPUs, 1 to 1024 [default: the number of CPUs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,
    /// Stop a function's guest after this many seconds (504).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30.0,
        allow_negative_numbers = true
    )]
    pub timeout: f64,
    /// Largest request body in bytes, up to 64 MiB (413 above it). Request bodies held at
    /// once (read, queued or running) may total 256 MiB or 16 bodies, whichever is more;
    /// past that, new requests get 429.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_BODY as u64,
          value_parser = clap::value_parser!(u64).range(0..=64 << 20))]
    pub max_body: u64,
    /// Requests waiting for a worker before new ones get 429 (1 to 100000).
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queue: u32,
    /// How pooled instances hold the template's memory: `shared` maps one image of it
    /// copy-on-write and keeps privately only the pages the guest wrote (~3 MiB per idle
    /// JS instance; each new instance is warmed up with an empty request off the request
    /// path, since its first touch of each page costs an exit); `copy` gives each its own
    /// copy in 2 MiB pages (~10 MiB); `auto` starts shared and gives a template's
    /// instances copies once one of its requests changes the guest's page tables (a
    /// function that grows its memory: after such a request every page touched again
    /// costs a shared instance an exit). Instances restored on demand (`--pool 0`, or
    /// every pooled one busy) always get a copy.
    #[arg(long, value_enum, default_value = "auto")]
    pub instance_memory: InstanceMemory,
    /// Seconds a client has to send its request headers, and then again its body (408
    /// after that); 1 to 3600.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
    /// Worker processes holding the instances, each a share of --pool and
    /// --max-instances; 0 keeps them in the daemon's own process. A worker that ends
    /// unexpectedly fails only its running requests and is replaced. [default: 0 up to
    /// 256 instances, else one per 256: every KVM VM of a process makes each page fault,
    /// mmap and munmap of that process slower]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub processes: Option<u32>,
    /// Bearer tokens callers must present, one per line: `NAME sha256:HEX SCOPES`, the hex
    /// being the SHA-256 of the token (`printf %s TOKEN | sha256sum`), the scopes a comma
    /// list of invoke, invoke:FUNCTION, metrics (GET /metrics and /v1/functions), deploy
    /// (the deploy API: PUT/DELETE /v1/functions/NAME, PUT /v1/modules, /v1/files). 401
    /// without a valid token, 403 without the scope. Without --auth the deploy API is off
    /// and the daemon listens only on loopback or a Unix socket (see --no-auth-on-network).
    #[arg(long, value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// A function anyone may invoke without a token (repeatable; with --auth).
    #[arg(long, value_name = "NAME", requires = "auth")]
    pub public: Vec<String>,
    /// The WebAssembly module deployed functions of a runtime run on when their spec names
    /// none: `js=PATH` (QuickJS-NG's WASI reactor), `python=PATH` (CPython for WASI).
    /// Stored in the store once, by its SHA-256, like any upload. Repeatable.
    #[arg(long, value_name = "RUNTIME=PATH")]
    pub runtime_module: Vec<String>,
    /// The largest module or file `PUT /v1/modules` and `PUT /v1/files` take.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = snapshot_store::parse_size)]
    pub max_upload: u64,
    /// Listen on a network address without --auth: anyone who reaches the port may invoke
    /// every function and read the metrics.
    #[arg(long)]
    pub no_auth_on_network: bool,
    #[command(flatten)]
    pub seccomp: crate::cli::SeccompArg,
    /// Run as this unprivileged user (a name, a uid, or UID:GID), jailed: started as root,
    /// the daemon opens its listener, auth file and store, then enters a mount namespace of
    /// its own where only the store, /dev/kvm and its own /proc are visible, sets
    /// no_new_privs and its rlimits, and drops to the user with no capabilities left. Its
    /// worker processes inherit all of it. The store must belong to the user (`chown -R`).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: the directory the jail's root (a small tmpfs, in the daemon's own mount
    /// namespace only) is mounted on [default: /tmp, hidden from the daemon, not changed].
    #[arg(long, value_name = "DIR", requires = "user")]
    pub jail: Option<PathBuf>,
}

/// `--instance-memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InstanceMemory {
    /// One copy-on-write image per template; an instance keeps only the pages it wrote.
    Shared,
    /// Each instance has its own copy of the template's memory.
    Copy,
    /// Shared until a request of the template changes the guest's page tables, then copies.
    Auto,
}

impl InstanceMemory {
    /// The value's number, for a worker process's configuration.
    pub fn code(self) -> u8 {
        match self {
            InstanceMemory::Shared => 0,
            InstanceMemory::Copy => 1,
            InstanceMemory::Auto => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<InstanceMemory> {
        [
            InstanceMemory::Shared,
            InstanceMemory::Copy,
            InstanceMemory::Auto,
        ]
        .into_iter()
        .find(|m| m.code() == c)
    }

    /// The pool's backing for new instances, and whether it adapts
    /// ([`PoolConfig::adapt`]).
    pub fn pool_backing(self) -> (vmm::instance::Backing, bool) {
        use vmm::instance::Backing;
        match self {
            InstanceMemory::Shared => (Backing::Shared, false),
            InstanceMemory::Copy => (Backing::Eager, false),
            InstanceMemory::Auto => (Backing::Shared, true),
        }
    }
}

/// Logs on stderr: one line per request at `info`; RUST_LOG=warn quiets them
/// (RUST_LOG=debug for more).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The engine over `store_dir` and pools configured by `config`.
fn make_pools(store_dir: PathBuf, config: PoolConfig) -> Result<Arc<Pools>, String> {
    let engine = vmm::engine::Engine::new(vmm::engine::Config {
        // The workers keep the CPUs busy: a restore on demand runs on its worker alone.
        parallel_restore: false,
        ..vmm::engine::Config::new(store_dir)
    })
    .map_err(|e| format!("{e} (is /dev/kvm there and usable? try `ls -l /dev/kvm`)"))?;
    Ok(Arc::new(Pools::new(Arc::new(engine), config)))
}

/// The limits every request runs with.
fn run_limits(timeout: Duration) -> RunLimits {
    RunLimits {
        timeout,
        test_hostcalls: false,
        eager_compile: false,
        ..RunLimits::default()
    }
}

/// The pool keeper: fills the pools (the daemon listens meanwhile: a request before its
/// template's pool is ready restores an instance on demand), then keeps them filled,
/// calling `tick` after each round; stops when `stop` is set or `tick` returns false.
fn spawn_keeper(
    pools: Arc<Pools>,
    stop: Arc<AtomicBool>,
    index: u32,
    tick: impl Fn() -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vmm-pool-keeper".into())
        .spawn(move || {
            vmm::seccomp::install_or_exit(vmm::seccomp::Kind::Keeper);
            let t = Instant::now();
            let created = pools.maintain(true);
            tracing::info!(
                store = %pools.store_dir().display(),
                templates = pools.entries().len(),
                instances = created,
                ms = t.elapsed().as_secs_f64() * 1e3,
                worker = index,
                "pools filled"
            );
            // Refill every 200 ms; look for new templates in the store every 2 s (a
            // request for one is served at once anyway: it is loaded on demand).
            let mut n = 0u64;
            while tick() && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                n += 1;
                pools.maintain(n.is_multiple_of(10));
            }
        })
        .map(|_| ())
}

/// Run the daemon until SIGTERM or Ctrl-C (then drain the requests in flight); the
/// process exit status.
pub fn serve(args: ServeArgs, store_dir: PathBuf) -> i32 {
    init_logging();
    let timeout = match crate::cli::timeout(args.timeout) {
        Ok(t) => t,
        Err(e) => {
            say!("vmm: error: {e}");
            return 2;
        }
    };
    let (user, store_dir) = match jail_prepare(&args, store_dir) {
        Ok(u) => u,
        Err(e) => {
            say!("vmm: error: {e}");
            return 2;
        }
    };
    if args.remote.remote.as_deref().is_some_and(|r| !r.is_empty()) {
        // A worker may start empty and pull every template on its first request.
        if let Err(e) = snapshot_store::Store::create_or_open(&store_dir) {
            say!(
                "vmm: error: create the template store {}: {e}",
                store_dir.display()
            );
            return 2;
        }
    }
    let auth = match &args.auth {
        Some(path) => match auth::Auth::load(path, &args.public) {
            Ok(a) => Some(a),
            Err(e) => {
                say!("vmm: error: {e}");
                return 2;
            }
        },
        None if !auth::local_only(&args.listen) && !args.no_auth_on_network => {
            say!(
                "vmm: error: --listen {} is reachable from other machines and there is no --auth: give callers tokens (--auth FILE), listen on loopback or a Unix socket, or pass --no-auth-on-network to let anyone who reaches it invoke every function",
                args.listen
            );
            return 2;
        }
        None => None,
    };
    let processes = args.processes.unwrap_or_else(|| {
        if args.max_instances <= cells::INSTANCES_PER_PROCESS {
            0
        } else {
            args.max_instances.div_ceil(cells::INSTANCES_PER_PROCESS)
        }
    });
    // No more workers than instances (each worker may hold at least one).
    let processes = processes.min(args.max_instances);
    // The limits are per process: with worker processes, each holds its share.
    let per_process = args.max_instances.div_ceil(processes.max(1));
    if let Err(e) = limits::ensure(per_process) {
        say!("vmm: error: {e}");
        return 2;
    }
    if auth.is_some() {
        // Functions may be deployed into an empty store.
        if let Err(e) = snapshot_store::Store::create_or_open(&store_dir) {
            say!(
                "vmm: error: create the template store {}: {e}",
                store_dir.display()
            );
            return 2;
        }
    }
    let runtime_modules = match load_runtime_modules(&store_dir, &args.runtime_module) {
        Ok(m) => m,
        Err(e) => {
            say!("vmm: error: {e}");
            return 2;
        }
    };
    if !store_dir.join("store.cfg").exists() {
        say!(
            "vmm: error: no template store at {}: create a template first (`vmm template create`) or pass --store DIR",
            store_dir.display()
        );
        return 2;
    }
    let workers = args
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get().min(1024) as u32)
                .unwrap_or(2)
        })
        .max(1);
    let listener = match http::bind(&args.listen) {
        Ok(l) => l,
        Err((e, code)) => {
            say!("vmm: error: {e}");
            return code;
        }
    };
    if let Err(e) = jail(
        &args,
        user.as_ref(),
        &store_dir,
        per_process,
        processes,
        workers,
    ) {
        say!("vmm: error: {e}");
        return 2;
    }
    let metrics = Arc::new(metrics::Metrics::new());
    let stop = Arc::new(AtomicBool::new(false));
    // Seccomp: every filter compiled (a failure stops here), the watchdog's thread
    // started before any thread filters itself; each thread installs its own kind's
    // filter as it starts, this one last, before it serves.
    vmm::seccomp::set_mode(args.seccomp.mode());
    if let Err(e) = vmm::seccomp::prepare() {
        say!("vmm: error: {e}");
        return 1;
    }
    vmm::watchdog::start();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vmm-http")
        .on_thread_start(|| {
            // Threads started by a filtered thread already have its filter (the same
            // list): stacking it again would only cost every call a second pass.
            if !vmm::seccomp::filtered() {
                vmm::seccomp::install_or_exit(vmm::seccomp::Kind::Api);
            }
        })
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("vmm: error: start the HTTP runtime: {e}");
            return 1;
        }
    };
    let backend = if processes == 0 {
        let pools = match make_pools(
            store_dir.clone(),
            PoolConfig {
                pool: args.pool as usize,
                max_instances: args.max_instances as usize,
                memory_limit: args.memory_limit,
                backing: args.instance_memory.pool_backing().0,
                adapt: args.instance_memory.pool_backing().1,
                // As many warm as can run at once: a burst of more pays first touches.
                warm: workers as usize,
                ..PoolConfig::default()
            },
        ) {
            Ok(p) => p,
            Err(e) => {
                say!("vmm: error: {e}");
                return 1;
            }
        };
        {
            let m = metrics.clone();
            pools.set_reset_observer(move |_, s| m.reset.observe(s.reset_ms / 1e3));
        }
        let queue = workers::start(
            workers,
            args.queue as usize,
            &pools,
            &metrics,
            &run_limits(timeout),
        );
        if let Err(e) = spawn_keeper(pools.clone(), stop.clone(), 0, || true) {
            say!("vmm: error: start the pool keeper: {e}");
            return 1;
        }
        backend::Backend::Local { pools, queue }
    } else {
        // Fail here, with the reason, rather than in every worker.
        if let Err(e) = vmm::engine::Engine::new(vmm::engine::Config::new(store_dir.clone())) {
            say!("vmm: error: {e} (is /dev/kvm there and usable? try `ls -l /dev/kvm`)");
            return 1;
        }
        let plan = cells::Plan {
            processes,
            pool: args.pool as u64,
            max_instances: args.max_instances as u64,
            memory_limit: args.memory_limit,
            instance_memory: args.instance_memory.code(),
            threads: workers,
            timeout_ms: timeout.as_millis().min(u64::MAX as u128) as u64,
            store_dir: store_dir.to_string_lossy().into_owned(),
            seccomp: args.seccomp.mode(),
        };
        let started = {
            let _guard = rt.enter();
            cells::Cells::start(plan, args.queue as usize, metrics.clone())
        };
        match started {
            Ok(c) => {
                tracing::info!(
                    processes,
                    instances_each = per_process,
                    "worker processes started"
                );
                backend::Backend::Cells(c)
            }
            Err(e) => {
                say!("vmm: error: {e}");
                return 1;
            }
        }
    };
    let cells = match &backend {
        backend::Backend::Cells(c) => Some(c.clone()),
        backend::Backend::Local { .. } => None,
    };
    let remote_args = args
        .remote
        .remote
        .as_deref()
        .is_some_and(|r| !r.is_empty())
        .then(|| args.remote.clone());
    let registry = Arc::new(registry::Registry::new(
        &store_dir,
        runtime_modules,
        default_engine(),
        timeout,
        remote_args,
    ));
    let state = Arc::new(http::State {
        backend,
        deploy: auth.is_some(),
        auth,
        registry,
        max_upload: args.max_upload.min(usize::MAX as u64) as usize,
        upload_timeout: Duration::from_secs(args.header_timeout.max(1) * 30),
        metrics,
        draining: AtomicBool::new(false),
        max_body: args.max_body as usize,
        body_timeout: Duration::from_secs(args.header_timeout),
        body_bytes: Arc::new(AtomicU64::new(0)),
        body_budget: (256u64 << 20).max(16 * args.max_body),
        remote: args
            .remote
            .remote
            .as_deref()
            .is_some_and(|r| !r.is_empty())
            .then(|| (store_dir.clone(), args.remote.clone())),
        in_use: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    let drain_for = Duration::from_secs_f64(args.timeout + 5.0);
    if let Err(e) = vmm::seccomp::install(vmm::seccomp::Kind::Api) {
        say!("vmm: error: {e}");
        return 1;
    }
    tracing::info!(seccomp = args.seccomp.mode().name(), "system call filters");
    let code = rt.block_on(http::accept_loop(
        listener,
        state.clone(),
        Duration::from_secs(args.header_timeout.max(1)),
        drain_for,
    ));
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = cells {
        c.stop();
    }
    drop(state);
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// `--user`: the user, once the daemon may run as it (root now, the store the user's),
/// and the store's absolute path (the jail binds it there); before the daemon writes
/// anything. None and the store as given without `--user`.
fn jail_prepare(
    args: &ServeArgs,
    store_dir: PathBuf,
) -> Result<(Option<jail::User>, PathBuf), String> {
    let Some(spec) = &args.user else {
        return Ok((None, store_dir));
    };
    let user = jail::resolve_user(spec)?;
    let store_dir = jail::prepare(&user, &store_dir)?;
    Ok((Some(user), store_dir))
}

/// `--user` (and `--jail`): jail the daemon, which has opened its listener, auth file and
/// store and started no thread yet (see [`jail`]). Nothing without `--user`.
fn jail(
    args: &ServeArgs,
    user: Option<&jail::User>,
    store_dir: &std::path::Path,
    per_process: u32,
    processes: u32,
    workers: u32,
) -> Result<(), String> {
    let Some(user) = user else {
        return Ok(());
    };
    let remote = args.remote.remote.as_deref().is_some_and(|r| !r.is_empty());
    jail::enter(&jail::Plan {
        user,
        store: store_dir,
        dir: args.jail.as_deref(),
        open_files: limits::open_files(per_process),
        // Each process's threads (its vCPU threads, the HTTP runtime's and blocking pool's,
        // the pool keeper, ...) and the processes themselves, with room for others of the
        // same user (the limit counts them all).
        tasks: (u64::from(processes) + 1) * (u64::from(workers) + 64) + 1024,
        files: if remote {
            jail::remote_files()
        } else {
            Vec::new()
        },
    })
}

/// Largest `--runtime-module` read (CPython for WASI is ~26 MiB).
const MAX_RUNTIME_MODULE: u64 = 1 << 30;

/// `--runtime-module RUNTIME=PATH`: each module stored as a blob, by runtime.
fn load_runtime_modules(
    store_dir: &std::path::Path,
    given: &[String],
) -> Result<std::collections::HashMap<vmm::function::Runtime, snapshot_store::BlobDigest>, String> {
    use vmm::function::Runtime;
    let mut out = std::collections::HashMap::new();
    if given.is_empty() {
        return Ok(out);
    }
    snapshot_store::Store::create_or_open(store_dir)
        .map_err(|e| format!("create the template store {}: {e}", store_dir.display()))?;
    let fstore = snapshot_store::FunctionStore::new(store_dir);
    for g in given {
        let Some((rt, path)) = g.split_once('=') else {
            return Err(format!(
                "--runtime-module {g}: expected RUNTIME=PATH (js=... or python=...)"
            ));
        };
        let rt = match rt {
            "js" => Runtime::Js,
            "python" => Runtime::Python,
            _ => return Err(format!("--runtime-module {g}: the runtime is js or python")),
        };
        let bytes = {
            // A regular file of bounded size (not /dev/zero, not a FIFO).
            use std::io::Read;
            let mut b = Vec::new();
            snapshot_store::open_regular(std::path::Path::new(path))
                .and_then(|f| f.take(MAX_RUNTIME_MODULE + 1).read_to_end(&mut b))
                .map_err(|e| format!("--runtime-module {g}: read {path}: {e}"))?;
            if b.len() as u64 > MAX_RUNTIME_MODULE {
                return Err(format!(
                    "--runtime-module {g}: {path} is over {} MiB",
                    MAX_RUNTIME_MODULE >> 20
                ));
            }
            b
        };
        if !bytes.starts_with(b"\0asm") {
            return Err(format!(
                "--runtime-module {g}: {path} is not a WebAssembly binary"
            ));
        }
        let (d, _) = fstore
            .put_blob(&bytes)
            .map_err(|e| format!("--runtime-module {g}: store it: {e}"))?;
        out.insert(rt, d);
    }
    Ok(out)
}

/// The guest engine deployed functions run on unless their spec says: `$VMM_ENGINE`
/// (`wasmi`), else wasmtime.
fn default_engine() -> vmm::guest::EngineKind {
    match std::env::var("VMM_ENGINE").as_deref() {
        Ok("wasmi") => vmm::guest::EngineKind::Wasmi,
        _ => vmm::guest::EngineKind::Wasmtime,
    }
}
