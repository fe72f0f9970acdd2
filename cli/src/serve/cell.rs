//! A worker process of `vmm serve` (`vmm serve-cell`, started by the daemon, never by
//! hand): it holds a bounded share of the daemon's instances, so that what KVM does per
//! VM on every page fault, mmap and munmap of one address space (each VM's MMU notifier
//! is walked) does not grow with the daemon's instances.
//!
//! Its stdin is a socket to the daemon ([`super::proto`]): first its [`CellConfig`], then
//! requests to run; it answers each request and sends the state of its pools every 200
//! ms. At the end of that stream (the daemon exited or closed it) it exits; its instances
//! go with it. Its stdout is a second socket that carries only cancellations (a client
//! went away), read by a thread of its own so that they arrive while every vCPU thread
//! runs a guest; nothing else is ever written to stdout here.

use super::metrics::Metrics;
use super::proto::{self, CellConfig, FromCell, ToCell};
use super::workers::{self, Job, JobResult, Reply};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::guest::RunLimits;
use vmm::watchdog::InterruptHandle;

/// Most reset durations kept between two statuses.
const MAX_RESETS: usize = 4096;

/// The worker process's life; its exit status.
pub fn run() -> i32 {
    // Started through /proc/self/exe, so `ps` and `top` would call it "exe".
    let name = c"vmm-serve-cell";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the
    // pointer (this one is 15 with its NUL, and static); it only renames this thread.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    super::init_logging();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Jailed (`vmm serve --user`): other processes of the same user may not ptrace this
        // one or read its memory. Its own /proc/self/pagemap is opened first (once it is
        // not dumpable, that file belongs to root).
        let _ = vmm::memory::pagemap();
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    }
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            say!("vmm serve-cell: error: stdin: {e}");
            return 2;
        }
    };
    let mut rd = sock;
    let wr = match rd.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            say!("vmm serve-cell: error: stdin: {e}");
            return 2;
        }
    };
    let cfg = match proto::read_blocking::<ToCell>(&mut rd) {
        Ok(Some(ToCell::Config(c))) => c,
        Ok(_) => {
            say!("vmm serve-cell: error: started without a configuration (this command is run by `vmm serve`, not by hand)");
            return 2;
        }
        Err(e) => {
            say!("vmm serve-cell: error: read the configuration: {e} (this command is run by `vmm serve`, not by hand)");
            return 2;
        }
    };
    let index = cfg.index;
    match vmm::seccomp::Mode::parse(&cfg.seccomp) {
        Some(m) => vmm::seccomp::set_mode(m),
        None => {
            say!(
                "vmm serve-cell {index}: error: unknown seccomp mode {:?}",
                cfg.seccomp
            );
            return 2;
        }
    }
    if let Err(e) = vmm::seccomp::prepare() {
        say!("vmm serve-cell {index}: error: {e}");
        return 1;
    }
    // Started before any thread filters itself (see `vmm::watchdog::start`).
    vmm::watchdog::start();
    let (pools, limits) = match setup(&cfg) {
        Ok(p) => p,
        Err(e) => {
            say!("vmm serve-cell {index}: error: {e}");
            return 1;
        }
    };
    let resets = Arc::new(Mutex::new(Vec::<f32>::new()));
    {
        let resets = resets.clone();
        pools.set_reset_observer(move |_, s| {
            if let Ok(mut r) = resets.lock() {
                if r.len() < MAX_RESETS {
                    r.push((s.reset_ms / 1e3) as f32);
                }
            }
        });
    }
    let send = {
        let wr = wr.clone();
        move |msg: &FromCell| -> bool {
            let Ok(mut w) = wr.lock() else { return false };
            proto::write_blocking(&mut *w, msg).is_ok()
        }
    };
    // The daemon measures the requests; this process's metrics are not served.
    let metrics = Arc::new(Metrics::new());
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (p, stop, send) = (pools.clone(), stop.clone(), send.clone());
        // Sent when it changed, or every 2 s: with hundreds of idle workers, the daemon
        // is not woken 5 times a second by each.
        type Key = Vec<(String, u64, u64, u64)>;
        let last: Mutex<(Option<Key>, u32)> = Mutex::new((None, 0));
        let status = move || {
            let resets = resets
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            let status = super::backend::local_status(&p);
            let key: Key = status
                .functions
                .iter()
                .map(|f| (f.name.clone(), f.ready, f.busy, f.served))
                .collect();
            if let Ok(mut l) = last.lock() {
                l.1 += 1;
                if resets.is_empty() && l.0.as_ref() == Some(&key) && l.1 < 10 {
                    return true;
                }
                *l = (Some(key), 0);
            }
            send(&FromCell::Status { status, resets })
        };
        if let Err(e) = super::spawn_keeper(pools.clone(), stop, index, status) {
            say!("vmm serve-cell {index}: error: start the pool keeper: {e}");
            return 1;
        }
    }
    // Cancellations, on stdout's socket.
    let running: Arc<Mutex<HashMap<u64, InterruptHandle>>> = Default::default();
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => {
            let (mut c, running) = (UnixStream::from(fd), running.clone());
            let spawned = std::thread::Builder::new()
                .name("vmm-cancel".into())
                .spawn(move || {
                    vmm::seccomp::install_or_exit(vmm::seccomp::Kind::Cancel);
                    while let Ok(Some(ToCell::Cancel { id })) =
                        proto::read_blocking::<ToCell>(&mut c)
                    {
                        if let Some(h) = running.lock().ok().and_then(|r| r.get(&id).cloned()) {
                            h.interrupt();
                        }
                    }
                });
            if let Err(e) = spawned {
                say!("vmm serve-cell {index}: error: start the cancellation thread: {e}");
                return 1;
            }
        }
        Err(e) => {
            say!("vmm serve-cell {index}: error: stdout: {e}");
            return 2;
        }
    }
    // The vCPU threads take turns reading the socket and each runs the request it read
    // (no hand-off from a reader thread to a worker: one wake-up less per request).
    let shared = Arc::new(Shared {
        rd: Mutex::new(std::io::BufReader::with_capacity(64 << 10, rd)),
        running,
        index,
    });
    for t in 1..cfg.threads.max(1) {
        let (shared, pools, metrics, limits, send) = (
            shared.clone(),
            pools.clone(),
            metrics.clone(),
            limits.clone(),
            send.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("vmm-worker-{t}"))
            .spawn(move || serve_requests(&shared, &pools, &metrics, &limits, &send));
        if let Err(e) = spawned {
            say!("vmm serve-cell {index}: error: start a vCPU thread: {e}");
            return 1;
        }
    }
    let code = serve_requests(&shared, &pools, &metrics, &limits, &send);
    stop.store(true, Ordering::Relaxed);
    code
}

/// What the vCPU threads of a worker share.
struct Shared {
    rd: Mutex<std::io::BufReader<UnixStream>>,
    /// Requests being run, for their cancellation.
    running: Arc<Mutex<HashMap<u64, InterruptHandle>>>,
    index: u32,
}

/// Read requests and run them until the daemon's stream ends; then the whole process
/// exits (its instances go with it: nothing to hand back).
fn serve_requests(
    shared: &Arc<Shared>,
    pools: &vmm::pool::Pools,
    metrics: &Metrics,
    limits: &RunLimits,
    send: &(impl Fn(&FromCell) -> bool + Clone + Send + 'static),
) -> i32 {
    vmm::seccomp::install_or_exit(vmm::seccomp::Kind::Vcpu);
    let index = shared.index;
    loop {
        let msg = {
            let Ok(mut rd) = shared.rd.lock() else {
                return 1;
            };
            proto::read_blocking::<ToCell>(&mut *rd)
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                say!("vmm serve-cell {index}: error: from the daemon: {e}");
                std::process::exit(1);
            }
        };
        match msg {
            ToCell::Invoke {
                id,
                name,
                body,
                timeout_ms,
            } => {
                let interrupt = InterruptHandle::new();
                if let Ok(mut r) = shared.running.lock() {
                    r.insert(id, interrupt.clone());
                }
                let (sh, send) = (shared.clone(), send.clone());
                let reply = Reply::Remote(Box::new(move |r: JobResult| {
                    if let Ok(mut m) = sh.running.lock() {
                        m.remove(&id);
                    }
                    let _ = send(&FromCell::Done {
                        id,
                        result: r.into(),
                    });
                }));
                let job = Job {
                    name,
                    body: body.into(),
                    timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
                    interrupt,
                    enqueued: Instant::now(),
                    reply,
                };
                workers::run(job, pools, metrics, limits);
            }
            ToCell::Cancel { id } => {
                if let Some(h) = shared.running.lock().ok().and_then(|r| r.get(&id).cloned()) {
                    h.interrupt();
                }
            }
            ToCell::Config(_) => {
                say!("vmm serve-cell {index}: error: a second configuration");
                std::process::exit(1);
            }
        }
    }
}

/// The pools this worker keeps and the limits its requests run with.
fn setup(cfg: &CellConfig) -> Result<(Arc<vmm::pool::Pools>, RunLimits), String> {
    let memory = super::InstanceMemory::from_code(cfg.instance_memory)
        .ok_or_else(|| format!("unknown instance memory {}", cfg.instance_memory))?;
    let pools = super::make_pools(
        std::path::PathBuf::from(&cfg.store_dir),
        vmm::pool::PoolConfig {
            pool: cfg.pool as usize,
            max_instances: cfg.max_instances.max(1) as usize,
            memory_limit: cfg.memory_limit,
            backing: memory.pool_backing().0,
            adapt: memory.pool_backing().1,
            warm: cfg.warm as usize,
            ..vmm::pool::PoolConfig::default()
        },
    )?;
    let limits = super::run_limits(Duration::from_millis(cfg.timeout_ms));
    Ok((pools, limits))
}
