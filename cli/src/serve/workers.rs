//! The worker threads that run the vCPUs (never on the async executor), and the bounded
//! queue of jobs that feeds them.

use super::metrics::Metrics;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;
use vmm::error::ErrorKind;
use vmm::guest::RunLimits;
use vmm::pool::{Pools, Timings};

/// One queued invocation.
pub(super) struct Job {
    pub(super) name: String,
    pub(super) body: Bytes,
    /// The function's own timeout (at most --timeout), if it has one.
    pub(super) timeout: Option<std::time::Duration>,
    /// Fired when the client goes away, to stop the guest early.
    pub(super) interrupt: vmm::watchdog::InterruptHandle,
    pub(super) enqueued: Instant,
    pub(super) reply: Reply,
}

/// Where a job's answer goes.
pub(super) enum Reply {
    /// To the HTTP handler waiting in this process.
    Local(oneshot::Sender<JobResult>),
    /// Back over a worker process's socket (see `cell.rs`).
    Remote(Box<dyn FnOnce(JobResult) + Send>),
}

impl Reply {
    pub(super) fn send(self, r: JobResult) {
        match self {
            Reply::Local(tx) => {
                let _ = tx.send(r);
            }
            Reply::Remote(f) => f(r),
        }
    }
}

impl Job {
    /// Whether nobody waits for this job any more.
    fn abandoned(&self) -> bool {
        match &self.reply {
            Reply::Local(tx) => tx.is_closed(),
            Reply::Remote(_) => self.interrupt.is_interrupted(),
        }
    }
}

/// A worker's answer to a [`Job`].
pub(super) enum JobResult {
    /// The function ran (to its exit, or until the guest failed).
    Done(Finished),
    /// No instance of the template could be had.
    Refused(ErrorKind, String),
}

/// What came of a job that ran.
pub(super) struct Finished {
    pub(super) exit: Result<i32, (ErrorKind, String)>,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) truncated: vmm::vm::Truncated,
    pub(super) timings: Timings,
    pub(super) queue_ms: f64,
}

/// The jobs of the invocations waiting for a worker.
pub(super) struct Queue {
    jobs: SyncSender<Job>,
    queued: Arc<AtomicU64>,
}

impl Queue {
    /// Queue `job`; false (the job dropped) when the queue is full or the workers are gone.
    pub(super) fn submit(&self, job: Job) -> bool {
        self.submit_or_return(job).is_ok()
    }

    /// [`Queue::submit`] that gives the job back when it cannot be queued.
    pub(super) fn submit_or_return(&self, job: Job) -> Result<(), Job> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(j)) | Err(TrySendError::Disconnected(j)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err(j)
            }
        }
    }

    /// Requests waiting for a worker.
    pub(super) fn len(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Start `workers` worker threads behind a queue of at most `capacity` jobs; each runs
/// its jobs with `limits` (and the job's interrupt handle).
pub(super) fn start(
    workers: u32,
    capacity: usize,
    pools: &Arc<Pools>,
    metrics: &Arc<Metrics>,
    limits: &RunLimits,
) -> Queue {
    let (tx, rx) = sync_channel::<Job>(capacity);
    let rx = Arc::new(Mutex::new(rx));
    let queued = Arc::new(AtomicU64::new(0));
    for i in 0..workers {
        let (rx, pools, metrics, limits, queued) = (
            rx.clone(),
            pools.clone(),
            metrics.clone(),
            limits.clone(),
            queued.clone(),
        );
        std::thread::Builder::new()
            .name(format!("vmm-worker-{i}"))
            .spawn(move || worker(&rx, &pools, &metrics, &limits, &queued))
            .expect("spawn a worker thread");
    }
    Queue { jobs: tx, queued }
}

/// One worker thread: take jobs until the queue is closed.
fn worker(
    rx: &Mutex<Receiver<Job>>,
    pools: &Pools,
    metrics: &Metrics,
    limits: &RunLimits,
    queued: &AtomicU64,
) {
    vmm::seccomp::install_or_exit(vmm::seccomp::Kind::Vcpu);
    loop {
        let job = {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        queued.fetch_sub(1, Ordering::Relaxed);
        run(job, pools, metrics, limits);
    }
}

/// Run one job on this thread: take an instance, run the guest, answer, then reset (or
/// destroy) the instance.
pub(super) fn run(job: Job, pools: &Pools, metrics: &Metrics, limits: &RunLimits) {
    {
        let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
        metrics.queue_wait.observe(queue_ms / 1e3);
        let gone = |step: &str| {
            metrics.count(pools.is_loaded(&job.name), &job.name, 499);
            tracing::info!(template = %job.name, status = 499, "the client went away {step}");
        };
        if job.abandoned() {
            gone("while its request waited");
            return;
        }
        let limits = RunLimits {
            interrupt: Some(job.interrupt.clone()),
            timeout: job
                .timeout
                .map_or(limits.timeout, |t| t.min(limits.timeout)),
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
                job.reply.send(JobResult::Done(Finished {
                    exit,
                    stdout: resp.stdout,
                    stderr: resp.stderr,
                    truncated: resp.truncated,
                    timings,
                    queue_ms,
                }));
                drop(checkout); // reset (or destroy) after the response is on its way
            }
            Err(e) => {
                job.reply.send(JobResult::Refused(e.kind(), e.to_string()));
            }
        }
    }
}
