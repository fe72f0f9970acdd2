//! The daemon's Prometheus metrics (`GET /metrics`): requests by template and status,
//! the time each step of a request took, and the pools' instances.

use super::proto::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    template: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TemplateLabels {
    template: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

/// The metrics label of requests for a template the daemon does not know.
const UNKNOWN_TEMPLATE: &str = "(unknown)";

/// The daemon's metrics, each registered in `registry` under the prefix `vmm_`.
pub(super) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    pub(super) queue_wait: Histogram,
    pub(super) acquire: Histogram,
    pub(super) run: Histogram,
    pub(super) reset: Histogram,
    ready: Family<TemplateLabels, Gauge>,
    busy: Family<TemplateLabels, Gauge>,
    live: Gauge,
    resident: Gauge,
    queued: Gauge,
    /// Time at the daemon from a request's arrival to its answer, by the path it took
    /// (cold: its template was built for it; warm: an instance was restored; hot: a ready
    /// instance served it).
    paths: Family<PathLabels, Histogram>,
    /// Worker processes that ended unexpectedly (their instances lost and replaced).
    pub(super) worker_exits: Counter,
    /// Worker processes running now (0: instances live in the daemon's own process).
    pub(super) worker_processes: Gauge,
}

impl Metrics {
    pub(super) fn new() -> Metrics {
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
            "Resident memory of the vmm serve process and its worker processes",
            resident.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a worker",
            queued.clone(),
        );
        fn path_histogram() -> Histogram {
            Histogram::new(exponential_buckets(0.000_025, 2.0, 24))
        }
        let paths = Family::<PathLabels, Histogram>::new_with_constructor(
            path_histogram as fn() -> Histogram,
        );
        registry.register(
            "invoke_path_seconds",
            "Time from a request's arrival to its answer, by SEUSS's paths: cold (template built for it), warm (instance restored), hot (ready instance)",
            paths.clone(),
        );
        let (worker_exits, worker_processes) = (Counter::default(), Gauge::default());
        registry.register(
            "worker_process_exits",
            "Worker processes that ended unexpectedly (their instances were lost and replaced)",
            worker_exits.clone(),
        );
        registry.register(
            "worker_processes",
            "Worker processes holding instances (0: they live in the daemon's own process)",
            worker_processes.clone(),
        );
        Metrics {
            registry,
            paths,
            worker_exits,
            worker_processes,
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

    /// Count a request. The template label is the name only for a template the pools know:
    /// names a client makes up (404s, bodies refused before the lookup) share one label,
    /// so that they cannot grow the metrics without bound.
    pub(super) fn count(&self, known: bool, name: &str, status: u16) {
        let template = if known {
            name.to_string()
        } else {
            UNKNOWN_TEMPLATE.to_string()
        };
        self.requests
            .get_or_create(&RequestLabels { template, status })
            .inc();
    }

    /// Record a request's time on its path (`cold`, `warm` or `hot`).
    pub(super) fn path(&self, path: &'static str, seconds: f64) {
        self.paths
            .get_or_create(&PathLabels { path })
            .observe(seconds);
    }

    /// The metrics in OpenMetrics text, with the gauges of the pools and of the queue
    /// (`queued` requests waiting for a worker) read now.
    pub(super) fn encode(&self, status: &Status, queued: u64) -> Result<String, std::fmt::Error> {
        for f in &status.functions {
            let l = TemplateLabels {
                template: f.name.clone(),
            };
            self.ready.get_or_create(&l).set(f.ready as i64);
            self.busy.get_or_create(&l).set(f.busy as i64);
        }
        self.live.set(status.live as i64);
        self.resident.set(status.resident as i64);
        self.queued.set(queued as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
