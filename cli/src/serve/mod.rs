//! `vmm serve`: a long-running invoker. HTTP/1.1 (hyper on a small tokio runtime) in
//! front, a fixed set of worker threads behind it that run the vCPUs (never on the async
//! executor), and [`vmm::pool::Pools`] keeping instances of every template ready.
//!
//! A request is queued (bounded: 429 when full), a worker takes a ready instance of its
//! template, writes the body into the guest's pending read, runs it to its exit, sends the
//! response back, and only then resets the instance in place for the next request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use vmm::error::ErrorKind;
use vmm::pool::{PoolConfig, Pools, Timings};
use vmm::run::RunLimits;

/// A line on stderr; a closed or full stderr is not a reason to stop serving (eprintln!
/// would panic).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

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
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub pool: u32,
    /// Most instances alive at once, over all templates.
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
    /// copy in 2 MiB pages (~10 MiB). Instances restored on demand (`--pool 0`, or every
    /// pooled one busy) always get a copy.
    #[arg(long, value_enum, default_value = "shared")]
    pub instance_memory: InstanceMemory,
    /// Seconds a client has to send its request headers, and then again its body (408
    /// after that); 1 to 3600.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout: u64,
}

/// `--instance-memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InstanceMemory {
    /// One copy-on-write image per template; an instance keeps only the pages it wrote.
    Shared,
    /// Each instance has its own copy of the template's memory.
    Copy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    template: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    template: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    queue_wait: Histogram,
    acquire: Histogram,
    run: Histogram,
    reset: Histogram,
    ready: Family<TemplateLabels, Gauge>,
    busy: Family<TemplateLabels, Gauge>,
    live: Gauge,
    resident: Gauge,
    queued: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmm");
        let requests = Family::<RequestLabels, Counter>::default();
        let seconds = || Histogram::new(exponential_buckets(0.000_025, 2.0, 20));
        let (queue_wait, acquire, run, reset) = (seconds(), seconds(), seconds(), seconds());
        let ready = Family::<TemplateLabels, Gauge>::default();
        let busy = Family::<TemplateLabels, Gauge>::default();
        let (live, resident, queued) = (Gauge::default(), Gauge::default(), Gauge::default());
        registry.register(
            "requests",
            "HTTP invocations by template and status",
            requests.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a request waited for a worker",
            queue_wait.clone(),
        );
        registry.register(
            "acquire_seconds",
            "Time to take a ready instance (or restore one)",
            acquire.clone(),
        );
        registry.register(
            "run_seconds",
            "Time from writing the request into the guest to its exit",
            run.clone(),
        );
        registry.register(
            "reset_seconds",
            "Time to reset an instance to its template after a request",
            reset.clone(),
        );
        registry.register(
            "pool_ready_instances",
            "Ready instances per template",
            ready.clone(),
        );
        registry.register(
            "pool_busy_instances",
            "Instances serving a request, per template",
            busy.clone(),
        );
        registry.register(
            "instances_live",
            "Instances alive (ready and busy)",
            live.clone(),
        );
        registry.register(
            "host_resident_bytes",
            "Resident memory of the vmm serve process",
            resident.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a worker",
            queued.clone(),
        );
        Metrics {
            registry,
            requests,
            queue_wait,
            acquire,
            run,
            reset,
            ready,
            busy,
            live,
            resident,
            queued,
        }
    }
}

/// One queued invocation.
struct Job {
    name: String,
    body: Bytes,
    /// Fired when the client goes away, to stop the guest early.
    interrupt: vmm::watchdog::InterruptHandle,
    enqueued: Instant,
    reply: oneshot::Sender<JobResult>,
}

enum JobResult {
    Done {
        exit: Result<i32, (ErrorKind, String)>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        truncated: vmm::vm::Truncated,
        timings: Timings,
        queue_ms: f64,
    },
    Refused(ErrorKind, String),
}

impl Metrics {
    /// Count a request. The template label is the name only for a template the pools know:
    /// names a client makes up (404s, bodies refused before the lookup) share one label,
    /// so that they cannot grow the metrics without bound.
    fn count(&self, pools: &Pools, name: &str, status: u16) {
        let template = if pools.is_loaded(name) {
            name.to_string()
        } else {
            UNKNOWN_TEMPLATE.to_string()
        };
        self.requests
            .get_or_create(&RequestLabels { template, status })
            .inc();
    }
}

/// The metrics label of requests for a template the daemon does not know.
const UNKNOWN_TEMPLATE: &str = "(unknown)";

/// Bytes of request bodies held now (reserved before reading, released with the guard).
struct BodyBytes(Arc<AtomicU64>, u64);

impl BodyBytes {
    fn reserve(held: &Arc<AtomicU64>, want: u64, budget: u64) -> Option<BodyBytes> {
        let mut now = held.load(Ordering::Relaxed);
        loop {
            // One request is always let through, whatever its size (up to --max-body).
            if now > 0 && now + want > budget {
                return None;
            }
            match held.compare_exchange_weak(now, now + want, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(BodyBytes(held.clone(), want)),
                Err(x) => now = x,
            }
        }
    }
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

impl State {
    fn count(&self, name: &str, status: u16) {
        self.metrics.count(&self.pools, name, status);
    }
}

struct State {
    pools: Arc<Pools>,
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    queued: Arc<AtomicU64>,
    max_body: usize,
    /// How long a client has to send its body once its headers are in.
    body_timeout: Duration,
    /// Request body bytes held now, and the most that may be.
    body_bytes: Arc<AtomicU64>,
    body_budget: u64,
    /// `--remote`: the store and where to pull templates it lacks from.
    remote: Option<(PathBuf, crate::remote::RemoteArgs)>,
    /// Templates this daemon serves from the remote, held in use (never evicted) while it runs.
    in_use: std::sync::Mutex<std::collections::HashMap<String, remote_store::InUse>>,
}

pub fn serve(args: ServeArgs, store_dir: PathBuf) -> i32 {
    // One line per request at `info`; RUST_LOG=warn quiets them (RUST_LOG=debug for more).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let timeout = match crate::cli::timeout(args.timeout) {
        Ok(t) => t,
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
    let engine = match vmm::engine::Engine::new(vmm::engine::Config::new(store_dir.clone())) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            say!("vmm: error: {e} (is /dev/kvm there and usable? try `ls -l /dev/kvm`)");
            return 1;
        }
    };
    let pools = Arc::new(Pools::new(
        engine,
        PoolConfig {
            pool: args.pool as usize,
            max_instances: args.max_instances as usize,
            memory_limit: args.memory_limit,
            sharing: match args.instance_memory {
                InstanceMemory::Shared => vmm::instance::Sharing::Shared,
                InstanceMemory::Copy => vmm::instance::Sharing::Copy,
            },
            ..PoolConfig::default()
        },
    ));
    let metrics = Arc::new(Metrics::new());
    {
        let m = metrics.clone();
        pools.set_reset_observer(move |_, s| m.reset.observe(s.reset_ms / 1e3));
    }
    let limits = RunLimits {
        timeout,
        test_hostcalls: false,
        eager_compile: false,
        ..RunLimits::default()
    };
    let (tx, rx) = sync_channel::<Job>(args.queue as usize);
    let rx = Arc::new(Mutex::new(rx));
    let queued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..workers {
        let (rx, pools, metrics, limits, queued) = (
            rx.clone(),
            pools.clone(),
            metrics.clone(),
            limits.clone(),
            queued.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("vmm-worker-{i}"))
                .spawn(move || worker(&rx, &pools, &metrics, &limits, &queued))
                .expect("spawn a worker thread"),
        );
    }
    // Pools: filled on the keeper thread (the daemon listens meanwhile: a request before
    // its template's pool is ready restores an instance on demand), then kept filled.
    {
        let (pools, stop) = (pools.clone(), stop.clone());
        let store_dir = store_dir.clone();
        std::thread::Builder::new()
            .name("vmm-pool-keeper".into())
            .spawn(move || {
                let t = Instant::now();
                let created = pools.maintain(true);
                tracing::info!(
                    store = %store_dir.display(),
                    templates = pools.entries().len(),
                    instances = created,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "pools filled"
                );
                // Refill every 200 ms; look for new templates in the store every 2 s (a
                // request for one is served at once anyway: it is loaded on demand).
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    tick += 1;
                    pools.maintain(tick.is_multiple_of(10));
                }
            })
            .expect("spawn the pool keeper");
    }
    let state = Arc::new(State {
        pools: pools.clone(),
        jobs: tx,
        metrics,
        draining: AtomicBool::new(false),
        queued,
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vmm-http")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say!("vmm: error: start the HTTP runtime: {e}");
            return 1;
        }
    };
    let drain_for = Duration::from_secs_f64(args.timeout + 5.0);
    let code = rt.block_on(accept_loop(
        args.listen.clone(),
        state.clone(),
        Duration::from_secs(args.header_timeout.max(1)),
        drain_for,
    ));
    stop.store(true, Ordering::Relaxed);
    drop(state);
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    pools: &Pools,
    metrics: &Metrics,
    limits: &RunLimits,
    queued: &AtomicU64,
) {
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        queued.fetch_sub(1, Ordering::Relaxed);
        let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
        metrics.queue_wait.observe(queue_ms / 1e3);
        let gone = |step: &str| {
            metrics.count(pools, &job.name, 499);
            tracing::info!(template = %job.name, status = 499, "the client went away {step}");
        };
        if job.reply.is_closed() {
            gone("while its request waited");
            continue;
        }
        let limits = RunLimits {
            interrupt: Some(job.interrupt.clone()),
            ..limits.clone()
        };
        match pools.invoke(&job.name, &job.body, &limits) {
            Ok((resp, timings, checkout)) => {
                metrics.acquire.observe(timings.acquire_ms / 1e3);
                metrics.run.observe(timings.invoke.run_ms / 1e3);
                let exit = resp.result.map_err(|e| (e.kind(), e.to_string()));
                if matches!(exit, Err((ErrorKind::Interrupted, _))) {
                    gone("during its run: guest stopped, instance destroyed");
                }
                let _ = job.reply.send(JobResult::Done {
                    exit,
                    stdout: resp.stdout,
                    stderr: resp.stderr,
                    truncated: resp.truncated,
                    timings,
                    queue_ms,
                });
                drop(checkout); // reset (or destroy) after the response is on its way
            }
            Err(e) => {
                let _ = job.reply.send(JobResult::Refused(e.kind(), e.to_string()));
            }
        }
    }
}

async fn accept_loop(
    listen: String,
    state: Arc<State>,
    header_timeout: Duration,
    drain_for: Duration,
) -> i32 {
    enum Listener {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, PathBuf),
    }
    let listener = if let Some(path) = listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                say!("vmm: error: --listen {listen}: exists and is not a socket; refusing to replace it");
                return 2;
            }
            let _ = std::fs::remove_file(&path);
        }
        match tokio::net::UnixListener::bind(&path) {
            Ok(l) => Listener::Unix(l, path),
            Err(e) => {
                say!("vmm: error: listen on {listen}: {e}");
                return 1;
            }
        }
    } else {
        match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => Listener::Tcp(l),
            Err(e) => {
                say!("vmm: error: listen on {listen}: {e} (is another server on that port? pass --listen)");
                return 1;
            }
        }
    };
    let shown = match &listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(listen.clone()),
        Listener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    tracing::info!(listen = %shown, "serving");
    // Machine-readable line for scripts and tests that pass port 0.
    say!("vmm serve: listening on {shown}");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            say!("vmm: error: install the SIGTERM handler: {e}");
            return 1;
        }
    };
    let builder = {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        b
    };
    loop {
        let stream: Box<dyn IoStream> = tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            accepted = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, _)| { let _ = s.set_nodelay(true); Box::new(s) as Box<dyn IoStream> }),
                    Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn IoStream>),
                }
            } => match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let st = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| handle(st.clone(), req)),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!("draining: no new connections; waiting for requests in flight");
    listener_cleanup(&listener_path(&listen));
    match tokio::time::timeout(drain_for, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("drained; bye");
            0
        }
        Err(_) => {
            tracing::warn!("requests still running after {drain_for:?}; exiting");
            0
        }
    }
}

fn listener_path(listen: &str) -> Option<PathBuf> {
    listen.strip_prefix("unix:").map(PathBuf::from)
}

fn listener_cleanup(p: &Option<PathBuf>) {
    if let Some(p) = p {
        let _ = std::fs::remove_file(p);
    }
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> IoStream for T {}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("static header"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    r
}

fn wants_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn error_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::GuestFault | ErrorKind::Damaged => StatusCode::BAD_GATEWAY,
        ErrorKind::Host => StatusCode::SERVICE_UNAVAILABLE,
        // The client went away: nobody reads this (499 as nginx logs it).
        ErrorKind::Interrupted => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let r = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else {
                text(StatusCode::OK, "ok")
            }
        }
        (&Method::GET, "/metrics") => metrics(&state),
        (&Method::GET, "/v1/functions") => functions(&state),
        (_, p) if invoke_target(p).is_some() => {
            let name = invoke_target(p).unwrap_or_default().to_string();
            if method != Method::POST {
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST to invoke a function",
                )
            } else {
                invoke(&state, name, req).await
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: POST /v1/functions/NAME/invoke, GET /v1/functions, /healthz, /metrics",
        ),
    };
    Ok(r)
}

/// The template name in `/v1/functions/NAME/invoke` (the name is checked when looked up).
fn invoke_target(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/functions/")?.strip_suffix("/invoke")
}

async fn invoke(state: &State, name: String, req: Request<Incoming>) -> Resp {
    let t0 = Instant::now();
    let as_json = wants_json(&req);
    let count = |status: StatusCode| state.count(&name, status.as_u16());
    if state.draining.load(Ordering::Relaxed) {
        count(StatusCode::SERVICE_UNAVAILABLE);
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the server is shutting down",
        );
    }
    if req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > state.max_body as u64)
    {
        count(StatusCode::PAYLOAD_TOO_LARGE);
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over the {}-byte limit", state.max_body),
        );
    }
    // Bound the request bodies held at once: reserve what this one may take before reading.
    let want = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(state.max_body as u64)
        .min(state.max_body as u64);
    let Some(_held) = BodyBytes::reserve(&state.body_bytes, want, state.body_budget) else {
        count(StatusCode::TOO_MANY_REQUESTS);
        let mut r = text(
            StatusCode::TOO_MANY_REQUESTS,
            "too many request bodies are held at once; retry",
        );
        r.headers_mut()
            .insert("retry-after", "1".parse().expect("static header"));
        return r;
    };
    let read = Limited::new(req.into_body(), state.max_body).collect();
    let Ok(read) = tokio::time::timeout(state.body_timeout, read).await else {
        count(StatusCode::REQUEST_TIMEOUT);
        return text(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:?}",
                state.body_timeout
            ),
        );
    };
    let body = match read {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let status = if too_large {
                StatusCode::PAYLOAD_TOO_LARGE
            } else {
                StatusCode::BAD_REQUEST
            };
            count(status);
            return text(
                status,
                if too_large {
                    format!("request body over the {}-byte limit", state.max_body)
                } else {
                    format!("read the request body: {e}")
                },
            );
        }
    };
    if let Some((dir, remote)) = &state.remote {
        // A template the store lacks is pulled first, off the async executor; pulls of one
        // template queue on its lock file and the later ones find it there.
        let held = state
            .in_use
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&name);
        let (dir, remote, n) = (dir.clone(), remote.clone(), name.clone());
        let (ptx, prx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("vmm-pull".into())
            .spawn(move || {
                let r = if held {
                    remote_store::touch_used(&dir, &n);
                    crate::remote::pull_if_missing(&dir, &n, &remote).map(|pulled| {
                        crate::remote::Ready {
                            pulled,
                            in_use: None,
                        }
                    })
                } else {
                    crate::remote::prepare(&dir, &n, &remote)
                };
                let _ = ptx.send(r);
            });
        let ready = match spawned {
            Ok(_) => prx
                .await
                .unwrap_or_else(|_| Err("the pull thread died".into())),
            Err(e) => Err(format!("start a pull thread: {e}")),
        };
        let pulled = ready.map(|r| {
            if let Some(g) = r.in_use {
                state
                    .in_use
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.clone(), g);
            }
            r.pulled
        });
        match pulled {
            Ok(Some(p)) => tracing::info!(
                template = %name,
                layers = p.layers_created,
                pages = p.pages_fetched,
                bytes = p.bytes_received,
                ms = p.ms,
                "pulled from the remote"
            ),
            Ok(None) => {}
            Err(e) => {
                count(StatusCode::BAD_GATEWAY);
                return text(StatusCode::BAD_GATEWAY, e);
            }
        }
    }
    let (tx, rx) = oneshot::channel();
    // If this future is dropped (the client disconnected), stop the guest.
    struct InterruptOnDrop(Option<vmm::watchdog::InterruptHandle>);
    impl Drop for InterruptOnDrop {
        fn drop(&mut self) {
            if let Some(h) = self.0.take() {
                h.interrupt();
            }
        }
    }
    let interrupt = vmm::watchdog::InterruptHandle::new();
    let mut guard = InterruptOnDrop(Some(interrupt.clone()));
    let job = Job {
        name: name.clone(),
        body,
        interrupt,
        enqueued: Instant::now(),
        reply: tx,
    };
    state.queued.fetch_add(1, Ordering::Relaxed);
    match state.jobs.try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            state.queued.fetch_sub(1, Ordering::Relaxed);
            count(StatusCode::TOO_MANY_REQUESTS);
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                "the request queue is full; retry",
            );
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("static header"));
            return r;
        }
    }
    let result = match rx.await {
        Ok(r) => r,
        Err(_) => JobResult::Refused(ErrorKind::Host, "the worker stopped".into()),
    };
    guard.0 = None; // answered: nothing to interrupt
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    match result {
        JobResult::Refused(kind, msg) => {
            let msg = format!("template {name}: {msg}");
            let status = error_status(kind);
            count(status);
            tracing::info!(template = %name, status = status.as_u16(), total_ms, "refused: {msg}");
            let mut r = if as_json {
                json(status, &serde_json::json!({"error": msg, "kind": kind}))
            } else {
                text(status, msg)
            };
            if status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut()
                    .insert("retry-after", "1".parse().expect("static header"));
            }
            r
        }
        JobResult::Done {
            exit,
            stdout,
            stderr,
            truncated,
            timings,
            queue_ms,
        } => {
            let (status, code, error) = match &exit {
                // Output cut at the cap is not a success, whatever the exit code.
                Ok(c) if truncated.any() => (StatusCode::INTERNAL_SERVER_ERROR, Some(*c), None),
                Ok(0) => (StatusCode::OK, Some(0), None),
                Ok(c) => (StatusCode::INTERNAL_SERVER_ERROR, Some(*c), None),
                Err((kind, msg)) => (error_status(*kind), None, Some((*kind, msg.clone()))),
            };
            count(status);
            tracing::info!(
                template = %name,
                status = status.as_u16(),
                exit_code = code,
                queue_ms,
                acquire_ms = timings.acquire_ms,
                run_ms = timings.invoke.run_ms,
                total_ms,
                on_demand = timings.restored_on_demand,
                "invoke"
            );
            let mut r = if as_json {
                json(
                    status,
                    &serde_json::json!({
                        "stdout": String::from_utf8_lossy(&stdout),
                        "stderr": String::from_utf8_lossy(&stderr),
                        "exit_code": code,
                        "stdout_truncated": truncated.stdout,
                        "stderr_truncated": truncated.stderr,
                        "error": error.as_ref().map(|e| &e.1),
                        "error_kind": error.as_ref().map(|e| e.0),
                        "timings": {
                            "queue_ms": queue_ms,
                            "acquire_ms": timings.acquire_ms,
                            "run_ms": timings.invoke.run_ms,
                            "total_ms": total_ms,
                            "exits": timings.invoke.exits,
                            "restored_on_demand": timings.restored_on_demand,
                        },
                    }),
                )
            } else {
                let mut body = stdout;
                if let Some((_, msg)) = &error {
                    if body.is_empty() {
                        body = format!("{msg}\n").into_bytes();
                    }
                }
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                r
            };
            let h = r.headers_mut();
            if let Some(c) = code {
                h.insert("x-vmm-exit-code", c.into());
            }
            if let Some((kind, _)) = &error {
                if let Ok(v) = serde_json::to_value(kind) {
                    if let Some(s) = v.as_str().and_then(|s| s.parse().ok()) {
                        h.insert("x-vmm-error", s);
                    }
                }
            }
            if truncated.any() {
                h.insert(
                    "x-vmm-output-truncated",
                    "true".parse().expect("static header"),
                );
            }
            if let Ok(v) = format!("{:.3}", timings.invoke.run_ms).parse() {
                h.insert("x-vmm-run-ms", v);
            }
            r
        }
    }
}

fn functions(state: &State) -> Resp {
    let list: Vec<_> = state
        .pools
        .entries()
        .into_iter()
        .map(|(name, e)| {
            serde_json::json!({
                "name": name,
                "ready": e.ready(),
                "busy": e.busy(),
                "served": e.served(),
                "data_pages": e.template().data_pages(),
                "image_bytes": e.template().image_bytes(),
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "functions": list,
            "live_instances": state.pools.live_instances(),
            "pool": state.pools.config().pool,
        }),
    )
}

fn metrics(state: &State) -> Resp {
    let m = &state.metrics;
    for (name, e) in state.pools.entries() {
        let l = TemplateLabels { template: name };
        m.ready.get_or_create(&l).set(e.ready() as i64);
        m.busy.get_or_create(&l).set(e.busy() as i64);
    }
    m.live.set(state.pools.live_instances() as i64);
    m.resident
        .set(vmm::pool::resident_bytes().unwrap_or(0) as i64);
    m.queued.set(state.queued.load(Ordering::Relaxed) as i64);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encode metrics: {e}"),
        );
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
            .parse()
            .expect("static header"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_paths_are_parsed_without_panicking() {
        assert_eq!(invoke_target("/v1/functions/hello/invoke"), Some("hello"));
        assert_eq!(invoke_target("/v1/functions//invoke"), Some(""));
        assert_eq!(invoke_target("/v1/functions/invoke"), None);
        assert_eq!(invoke_target("/v1/functions/"), None);
        assert_eq!(invoke_target("/v1/functions/a/b/invoke"), Some("a/b"));
    }

    #[test]
    fn request_bodies_held_at_once_stay_within_the_budget() {
        let held = Arc::new(AtomicU64::new(0));
        let a = BodyBytes::reserve(&held, 600, 1000).expect("first");
        assert!(
            BodyBytes::reserve(&held, 600, 1000).is_none(),
            "over the budget"
        );
        let b = BodyBytes::reserve(&held, 400, 1000).expect("fits");
        assert_eq!(held.load(Ordering::Relaxed), 1000);
        drop((a, b));
        assert_eq!(held.load(Ordering::Relaxed), 0);
        // One body is always let through, even one larger than the budget.
        let c = BodyBytes::reserve(&held, 5000, 1000).expect("alone");
        assert!(BodyBytes::reserve(&held, 1, 1000).is_none());
        drop(c);
    }
}
