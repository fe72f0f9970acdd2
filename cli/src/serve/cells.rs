//! The daemon's side of its worker processes (`cell.rs` is theirs).
//!
//! Every KVM VM registers an MMU notifier on its process's address space, and the kernel
//! walks all of them on every page fault that changes a mapping, every mmap and munmap
//! (measured: with 1,500 instances in one process, ~50% of the daemon's time went there,
//! and filling its pools slowed from ~100 to ~2 instances per second). So past
//! [`INSTANCES_PER_PROCESS`] instances the daemon keeps them in worker processes, each
//! with a bounded share of the pools (`--pool` and `--max-instances` divided among them).
//!
//! Requests wait in one queue here, first come first served, and at most `--workers` run
//! at once over all workers (as many as the daemon's own vCPU threads would run). Each
//! goes to the first worker (in a fixed order, so that the busy instances stay in few
//! address spaces and warm) that has a free vCPU thread and a ready instance of its
//! template, else to the first with a free thread (which restores one). A worker that
//! ends unexpectedly fails only its running requests (503, retry), is counted in
//! `vmm_worker_process_exits_total`, logged, and replaced by a new one that fills its pools
//! again; its instances are never seen by anyone else.

use super::metrics::Metrics;
use super::proto::{self, CellConfig, FromCell, Status, ToCell};
use super::workers::{Job, JobResult, Reply};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use vmm::error::ErrorKind;

/// Instances one process holds at most, unless `--processes` says otherwise. Measured
/// (hello, never-run instances): making one costs ~0.2 ms plus ~5 µs per VM already in
/// its process, and every page fault of a running guest pays a share of that walk.
pub(super) const INSTANCES_PER_PROCESS: u32 = 256;

/// Templates one worker's status may list (more are dropped).
const MAX_FUNCTIONS: usize = 4096;
/// Reset durations one status may carry (more are dropped).
const MAX_RESETS: usize = 8192;

/// How the daemon's pools are divided among worker processes.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    pub(super) processes: u32,
    pub(super) pool: u64,
    pub(super) max_instances: u64,
    pub(super) memory_limit: u64,
    pub(super) instance_memory: u8,
    pub(super) threads: u32,
    pub(super) timeout_ms: u64,
    pub(super) store_dir: String,
    /// `--seccomp`.
    pub(super) seccomp: vmm::seccomp::Mode,
}

impl Plan {
    /// Worker `i`'s configuration: its share of every bound (the first ones take the
    /// remainders), and warm instances only in the first worker, the one requests go to
    /// first. The pool is packed into the first workers, each taking at least as many as
    /// requests can run in it at once (a pool of 2 is not two workers with one each).
    pub(super) fn config(&self, i: u32) -> CellConfig {
        let n = self.processes.max(1) as u64;
        let share = |total: u64, i: u64| total / n + u64::from(i < total % n);
        let max_of = |i: u64| share(self.max_instances, i).max(1);
        let each = self
            .pool
            .div_ceil(n)
            .max(self.pool.min(2 * self.threads as u64));
        // In order: each worker takes what is left, up to `each` and its own instance limit.
        let mut left = self.pool;
        let mut pool = 0;
        for j in 0..=i as u64 {
            pool = left.min(each).min(max_of(j));
            left -= pool;
        }
        CellConfig {
            index: i,
            store_dir: self.store_dir.clone(),
            pool,
            max_instances: max_of(i as u64),
            memory_limit: (self.memory_limit / n).max(1),
            instance_memory: self.instance_memory,
            warm: if i == 0 { self.threads as u64 } else { 0 },
            threads: self.threads,
            timeout_ms: self.timeout_ms,
            seccomp: self.seccomp.name().to_string(),
        }
    }
}

/// A request sent to a worker, until its answer.
struct Pending {
    /// The HTTP handler waiting for the answer.
    tx: oneshot::Sender<JobResult>,
    /// A cancellation was sent (its client went away).
    cancelled: bool,
    name: String,
    /// Time it waited here before it was sent.
    queue_ms: f64,
    sent: Instant,
}

/// One worker process slot (its process is replaced when it ends).
#[derive(Default)]
struct Slot {
    /// Counts the processes this slot has had; messages of an older one are ignored.
    generation: u64,
    /// Frames to the process; `None` while none runs.
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Its cancellation socket (its stdout): read by a thread of its own, so that a
    /// cancellation arrives while every vCPU thread runs a guest.
    cancel: Option<std::os::unix::net::UnixStream>,
    pid: u32,
    started: Option<Instant>,
    /// Ends in a row shortly after a start (backoff).
    quick_ends: u32,
    pending: HashMap<u64, Pending>,
    status: Status,
}

impl Slot {
    fn pending_of(&self, name: &str) -> u64 {
        self.pending.values().filter(|p| p.name == name).count() as u64
    }
    fn ready_of(&self, name: &str) -> u64 {
        self.status
            .functions
            .iter()
            .find(|f| f.name == name)
            .map_or(0, |f| f.ready)
    }
}

pub(super) struct Cells {
    plan: Plan,
    slots: Vec<Mutex<Slot>>,
    /// Jobs not yet sent to a worker, and how many may wait.
    queue: Mutex<VecDeque<Job>>,
    capacity: usize,
    /// Requests running in workers now, and the most that may.
    running: AtomicU64,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Cells {
    /// Start the worker processes (from a thread that lives as long as the daemon).
    pub(super) fn start(
        plan: Plan,
        capacity: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Cells>, String> {
        let cells = Arc::new(Cells {
            slots: (0..plan.processes)
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            plan,
            queue: Mutex::new(VecDeque::new()),
            capacity,
            running: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            metrics,
            stopping: AtomicBool::new(false),
        });
        for i in 0..cells.slots.len() {
            cells.spawn(i)?;
        }
        let weak = Arc::downgrade(&cells);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match weak.upgrade() {
                    Some(c) if !c.stopping.load(Ordering::Relaxed) => c.sweep(),
                    _ => return,
                }
            }
        });
        Ok(cells)
    }

    /// Stop: no more replacements; the workers see their stream end and exit.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for s in &self.slots {
            let mut s = lock(s);
            s.tx = None;
            s.cancel = None;
        }
    }

    pub(super) fn pool(&self) -> usize {
        self.plan.pool as usize
    }

    pub(super) fn queued(&self) -> u64 {
        lock(&self.queue).len() as u64
    }

    pub(super) fn is_known(&self, name: &str) -> bool {
        self.slots
            .iter()
            .any(|s| lock(s).status.functions.iter().any(|f| f.name == name))
    }

    pub(super) fn status(&self) -> Status {
        let mut all: Vec<Status> = self.slots.iter().map(|s| lock(s).status.clone()).collect();
        all.push(Status {
            resident: vmm::pool::resident_bytes().unwrap_or(0),
            ..Status::default()
        });
        super::backend::sum(all)
    }

    /// Worker processes running now.
    fn alive(&self) -> usize {
        self.slots.iter().filter(|s| lock(s).tx.is_some()).count()
    }

    /// Queue a job (false when the queue is full); it is sent as soon as a worker can run it.
    pub(super) fn submit(self: &Arc<Self>, job: Job) -> bool {
        {
            let mut q = lock(&self.queue);
            if q.len() >= self.capacity {
                return false;
            }
            q.push_back(job);
        }
        self.pump();
        true
    }

    /// Send queued jobs to workers while fewer than `--workers` run.
    fn pump(self: &Arc<Self>) {
        loop {
            if self.running.load(Ordering::Acquire) >= self.in_flight() as u64 {
                return;
            }
            let mut q = lock(&self.queue);
            let Some(job) = q.pop_front() else { return };
            if matches!(&job.reply, Reply::Local(tx) if tx.is_closed()) {
                drop(q);
                self.metrics.count(self.is_known(&job.name), &job.name, 499);
                tracing::info!(template = %job.name, status = 499, "the client went away while its request waited");
                continue;
            }
            let Some(i) = self.pick(&job.name) else {
                q.push_front(job);
                return;
            };
            self.running.fetch_add(1, Ordering::AcqRel);
            drop(q);
            self.send(i, job);
        }
    }

    /// Requests sent to workers at most at once (over all, and to one): two per vCPU
    /// thread, so that a thread finds its next request waiting when it ends one.
    fn in_flight(&self) -> usize {
        2 * self.plan.threads as usize
    }

    /// The worker for a request of `name`, of those with room: the first with a ready
    /// instance of it not yet spoken for; else the first that keeps instances of it (its
    /// request waits there for one to be reset rather than have one restored); else the
    /// one with the fewest instances (which restores one).
    fn pick(&self, name: &str) -> Option<usize> {
        let room = self.in_flight();
        let mut keeps: Option<usize> = None;
        let mut fewest: Option<(u64, usize)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            let s = lock(s);
            if s.tx.is_none() || s.pending.len() >= room {
                continue;
            }
            let ready = s.ready_of(name);
            let pending = s.pending_of(name);
            if ready > pending {
                return Some(i);
            }
            if keeps.is_none() && ready + pending > 0 && s.pending.len() < room {
                keeps = Some(i);
            }
            if fewest.is_none_or(|(live, _)| s.status.live < live) {
                fewest = Some((s.status.live, i));
            }
        }
        keeps.or(fewest.map(|(_, i)| i))
    }

    fn send(self: &Arc<Self>, i: usize, job: Job) {
        let Job {
            name,
            body,
            timeout,
            enqueued,
            reply,
            ..
        } = job;
        let Reply::Local(reply) = reply else {
            self.running.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = proto::encode(&ToCell::Invoke {
            id,
            name: name.clone(),
            body: body.to_vec(),
            timeout_ms: timeout.map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64),
        });
        let mut s = lock(&self.slots[i]);
        let refused = match (frame, s.tx.as_ref()) {
            (Ok(frame), Some(wtx)) => match wtx.send(frame) {
                Ok(()) => None,
                Err(_) => Some("its worker process ended; retry".to_string()),
            },
            (Err(e), _) => Some(e),
            (_, None) => Some("its worker process ended; retry".to_string()),
        };
        match refused {
            None => {
                s.pending.insert(
                    id,
                    Pending {
                        tx: reply,
                        cancelled: false,
                        name,
                        queue_ms: enqueued.elapsed().as_secs_f64() * 1e3,
                        sent: Instant::now(),
                    },
                );
            }
            Some(msg) => {
                drop(s);
                self.running.fetch_sub(1, Ordering::AcqRel);
                let _ = reply.send(JobResult::Refused(ErrorKind::Host, msg));
            }
        }
    }

    /// Every 100 ms: the requests whose clients went away are cancelled (their guests
    /// stopped) in their workers.
    /// A worker that has not answered a request within twice --timeout (it may wait
    /// behind one other) and a margin is stuck (its guests are stopped at --timeout): it
    /// is killed, and replaced like any that ends.
    fn sweep(&self) {
        let stuck_after =
            Duration::from_millis(self.plan.timeout_ms.saturating_mul(2)) + Duration::from_secs(10);
        for (i, s) in self.slots.iter().enumerate() {
            let mut s = lock(s);
            if s.tx.is_some() && s.pending.values().any(|p| p.sent.elapsed() > stuck_after) {
                tracing::warn!(worker = i, pid = s.pid, "worker process stuck: a request got no answer within twice --timeout + 10 s; killing it");
                // SAFETY: a signal to our own child: its stream is still open (`tx`), so
                // the task that reaps it has not seen it exit and its pid is not reused.
                unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
                for p in s.pending.values_mut() {
                    p.sent = Instant::now();
                }
            }
            let mut ids = Vec::new();
            for (id, p) in s.pending.iter_mut() {
                if !p.cancelled && p.tx.is_closed() {
                    p.cancelled = true;
                    ids.push(*id);
                }
            }
            if let Some(c) = s.cancel.as_mut() {
                for id in ids {
                    // Non-blocking: a worker that does not read them is stuck anyway (its
                    // guests still end at --timeout).
                    if let Ok(frame) = proto::encode(&ToCell::Cancel { id }) {
                        let _ = std::io::Write::write_all(c, &frame);
                    }
                }
            }
        }
    }

    /// Start worker `i`'s process, and the tasks that talk to it and notice its end.
    fn spawn(self: &Arc<Self>, i: usize) -> Result<(), String> {
        let conf = self.plan.config(i as u32);
        let pair = || {
            std::os::unix::net::UnixStream::pair()
                .map_err(|e| format!("worker process {i}: a socket pair: {e}"))
        };
        let (ours, theirs) = pair()?;
        let (cancel, cancel_theirs) = pair()?;
        cancel
            .set_nonblocking(true)
            .map_err(|e| format!("worker process {i}: its cancellation socket: {e}"))?;
        // The same program (not a path that may have been replaced since it started).
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg0(std::env::args_os().next().unwrap_or_else(|| "vmm".into()))
            .arg("serve-cell")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                theirs,
            )))
            .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                cancel_theirs,
            )))
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start worker process {i}: {e}"))?;
        let pid = child.id();
        let stream = ours
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(ours))
            .map_err(|e| format!("worker process {i}: its socket: {e}"));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = tokio::io::BufReader::with_capacity(64 << 10, rd);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let _ = tx.send(proto::encode(&ToCell::Config(conf))?);
        let generation = {
            let mut s = lock(&self.slots[i]);
            s.generation += 1;
            s.tx = Some(tx);
            s.cancel = Some(cancel);
            s.pid = pid;
            s.started = Some(Instant::now());
            s.status = Status::default();
            s.generation
        };
        self.metrics.worker_processes.set(self.alive() as i64);
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            // Dropping the write half ends the worker's stream: it exits.
        });
        let cells = self.clone();
        tokio::spawn(async move {
            let why = loop {
                let mut prefix = [0u8; 4];
                if let Err(e) = rd.read_exact(&mut prefix).await {
                    break format!("its socket: {e}");
                }
                let len = match proto::frame_len(prefix) {
                    Ok(l) => l,
                    Err(e) => break e,
                };
                let mut payload = vec![0u8; len];
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break format!("its socket: {e}");
                }
                match proto::decode::<FromCell>(&payload) {
                    Ok(m) => cells.received(i, generation, m),
                    Err(e) => break e,
                }
            };
            cells.lost(i, generation, &why);
        });
        let cells = self.clone();
        tokio::spawn(async move {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .ok()
                .and_then(|r| r.ok());
            cells.ended(i, generation, pid, status).await;
        });
        tracing::debug!(worker = i, pid, "worker process started");
        Ok(())
    }

    fn received(self: &Arc<Self>, i: usize, generation: u64, msg: FromCell) {
        match msg {
            FromCell::Done { id, result } => {
                let p = {
                    let mut s = lock(&self.slots[i]);
                    if s.generation != generation {
                        return;
                    }
                    s.pending.remove(&id)
                };
                if let Some(p) = p {
                    self.running.fetch_sub(1, Ordering::AcqRel);
                    let mut r: JobResult = result.into();
                    if let JobResult::Done(f) = &mut r {
                        f.queue_ms += p.queue_ms;
                        self.metrics.queue_wait.observe(f.queue_ms / 1e3);
                        self.metrics.acquire.observe(f.timings.acquire_ms / 1e3);
                        self.metrics.run.observe(f.timings.invoke.run_ms / 1e3);
                    }
                    if p.tx.send(r).is_err() {
                        self.metrics.count(true, &p.name, 499);
                        tracing::info!(template = %p.name, status = 499, "the client went away during its run: guest stopped");
                    }
                }
                self.pump();
            }
            FromCell::Status { mut status, resets } => {
                // A worker's word, bounded: no more templates than a store may hold in
                // its metrics labels, only names a template may have.
                status.functions.truncate(MAX_FUNCTIONS);
                status
                    .functions
                    .retain(|f| snapshot_store::TemplateName::new(&f.name).is_ok());
                for r in resets.into_iter().take(MAX_RESETS) {
                    if r.is_finite() && r >= 0.0 {
                        self.metrics.reset.observe(f64::from(r));
                    }
                }
                let mut s = lock(&self.slots[i]);
                if s.generation == generation {
                    s.status = status;
                }
            }
        }
    }

    /// Worker `i`'s stream ended (or sent nonsense): fail its running requests.
    fn lost(self: &Arc<Self>, i: usize, generation: u64, why: &str) {
        let pending = {
            let mut s = lock(&self.slots[i]);
            if s.generation != generation || s.tx.is_none() {
                return;
            }
            s.tx = None;
            s.cancel = None;
            s.status = Status::default();
            std::mem::take(&mut s.pending)
        };
        if !self.stopping.load(Ordering::Relaxed) {
            tracing::warn!(
                worker = i,
                lost_requests = pending.len(),
                "worker process lost: {why}"
            );
        }
        for (_, p) in pending {
            self.running.fetch_sub(1, Ordering::AcqRel);
            let _ = p.tx.send(JobResult::Refused(
                ErrorKind::Host,
                "the worker process running it ended; retry".into(),
            ));
        }
        self.metrics.worker_processes.set(self.alive() as i64);
        self.pump();
    }

    /// Worker `i`'s process exited: count it, log it, start another (after a pause if it
    /// keeps ending early).
    async fn ended(
        self: Arc<Self>,
        i: usize,
        generation: u64,
        pid: u32,
        status: Option<std::process::ExitStatus>,
    ) {
        self.lost(i, generation, "it exited");
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        self.metrics.worker_exits.inc();
        let pause = {
            let mut s = lock(&self.slots[i]);
            let quick = s
                .started
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
            s.quick_ends = if quick { s.quick_ends + 1 } else { 0 };
            Duration::from_millis(if s.quick_ends == 0 {
                0
            } else {
                250u64 << s.quick_ends.min(5)
            })
        };
        let how = match status {
            Some(st) => describe(st),
            None => "it could not be waited for".into(),
        };
        tracing::warn!(
            worker = i,
            pid,
            "worker process ended ({how}): its instances are lost; starting another{}",
            if pause.is_zero() {
                String::new()
            } else {
                format!(" in {} ms", pause.as_millis())
            }
        );
        tokio::time::sleep(pause).await;
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.spawn(i) {
            tracing::error!(worker = i, "{e}");
        }
    }
}

fn describe(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => st.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_shared_among_workers_and_only_the_first_warms() {
        let plan = Plan {
            processes: 3,
            pool: 10,
            max_instances: 11,
            memory_limit: 3 << 30,
            instance_memory: 0,
            threads: 2,
            timeout_ms: 1000,
            store_dir: "/s".into(),
            seccomp: vmm::seccomp::Mode::On,
        };
        let c: Vec<_> = (0..3).map(|i| plan.config(i)).collect();
        assert_eq!(c.iter().map(|c| c.pool).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(c.iter().map(|c| c.max_instances).sum::<u64>(), 11);
        assert_eq!(c.iter().map(|c| c.warm).collect::<Vec<_>>(), [2, 0, 0]);
        assert!(c.iter().all(|c| c.memory_limit == 1 << 30));
        // A small pool is packed into the first worker (as many as run in it at once);
        // every worker may still hold some.
        for (pool, want) in [
            (1, [1, 0, 0]),
            (2, [2, 0, 0]),
            (6, [4, 2, 0]),
            (0, [0, 0, 0]),
        ] {
            let small = Plan {
                pool,
                max_instances: 12,
                ..plan.clone()
            };
            let c: Vec<_> = (0..3).map(|i| small.config(i)).collect();
            assert_eq!(
                c.iter().map(|c| c.pool).collect::<Vec<_>>(),
                want,
                "pool {pool}"
            );
            assert!(c.iter().all(|c| c.max_instances >= 1));
        }
        // A large one is spread evenly.
        let large = Plan {
            pool: 10_000,
            processes: 40,
            max_instances: 10_016,
            ..plan.clone()
        };
        let c: Vec<_> = (0..40).map(|i| large.config(i)).collect();
        assert!(
            c.iter().all(|c| c.pool == 250),
            "{:?}",
            c.iter().map(|c| c.pool).collect::<Vec<_>>()
        );
        // No worker is asked to keep more than it may hold, and the whole pool is kept
        // when the limits allow it (30,000 over 118 workers: 73 of them were one short).
        for (pool, max, n) in [
            (30_000, 30_016, 118),
            (1000, 1000, 7),
            (5, 3, 3),
            (100, 10, 4),
        ] {
            let p = Plan {
                pool,
                max_instances: max,
                processes: n,
                ..plan.clone()
            };
            let c: Vec<_> = (0..n).map(|i| p.config(i)).collect();
            assert!(
                c.iter().all(|c| c.pool <= c.max_instances),
                "{pool}/{max}/{n}"
            );
            assert_eq!(
                c.iter().map(|c| c.pool).sum::<u64>(),
                pool.min(max),
                "{pool}/{max}/{n}"
            );
        }
    }
}
