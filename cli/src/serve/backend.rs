//! Where the daemon's instances live: in its own process (one set of pools and worker
//! threads) or in worker processes, each holding a bounded share of them (`cells.rs`).
//! The HTTP side sees only this.

use super::cells::Cells;
use super::proto::{FunctionStatus, Status};
use super::workers::{Job, Queue};
use std::sync::Arc;
use vmm::pool::Pools;

pub(super) enum Backend {
    /// Pools and vCPU threads in this process.
    Local { pools: Arc<Pools>, queue: Queue },
    /// Worker processes.
    Cells(Arc<Cells>),
}

impl Backend {
    /// Queue a job; false (the job dropped) when the queue is full or nothing can run it.
    pub(super) fn submit(&self, job: Job) -> bool {
        match self {
            Backend::Local { queue, .. } => queue.submit(job),
            Backend::Cells(c) => c.submit(job),
        }
    }

    /// Requests waiting for a worker.
    pub(super) fn queued(&self) -> u64 {
        match self {
            Backend::Local { queue, .. } => queue.len(),
            Backend::Cells(c) => c.queued(),
        }
    }

    /// Ready instances kept per template (over all worker processes).
    pub(super) fn pool(&self) -> usize {
        match self {
            Backend::Local { pools, .. } => pools.config().pool,
            Backend::Cells(c) => c.pool(),
        }
    }

    /// Whether `name` is a template the pools know (loaded and not removed since).
    pub(super) fn is_known(&self, name: &str) -> bool {
        match self {
            Backend::Local { pools, .. } => pools.is_loaded(name),
            Backend::Cells(c) => c.is_known(name),
        }
    }

    /// The pools now (per template, summed over worker processes).
    pub(super) fn status(&self) -> Status {
        match self {
            Backend::Local { pools, .. } => local_status(pools),
            Backend::Cells(c) => c.status(),
        }
    }
}

/// The pools of this process, read now.
pub(super) fn local_status(pools: &Pools) -> Status {
    Status {
        functions: pools
            .entries()
            .into_iter()
            .map(|(name, e)| FunctionStatus {
                name,
                ready: e.ready() as u64,
                busy: e.busy() as u64,
                served: e.served(),
                shared: e.backing(pools.config()) == vmm::instance::Backing::Shared,
                maps_memory: e.maps_memory(),
                data_pages: e.template().data_pages(),
                image_bytes: e.template().image_bytes(),
            })
            .collect(),
        live: pools.live_instances() as u64,
        resident: vmm::pool::resident_bytes().unwrap_or(0),
    }
}

/// Several workers' statuses as one: per template, counts summed.
pub(super) fn sum(statuses: impl IntoIterator<Item = Status>) -> Status {
    let mut by_name: std::collections::BTreeMap<String, FunctionStatus> = Default::default();
    let mut total = Status::default();
    for s in statuses {
        total.live += s.live;
        total.resident += s.resident;
        for f in s.functions {
            let e = by_name
                .entry(f.name.clone())
                .or_insert_with(|| FunctionStatus {
                    name: f.name.clone(),
                    ..FunctionStatus::default()
                });
            e.ready += f.ready;
            e.busy += f.busy;
            e.served += f.served;
            // Copies anywhere: the template's requests map memory.
            e.shared = if e.data_pages == 0 {
                f.shared
            } else {
                e.shared && f.shared
            };
            e.maps_memory |= f.maps_memory;
            e.data_pages = e.data_pages.max(f.data_pages);
            e.image_bytes = e.image_bytes.max(f.image_bytes);
        }
    }
    total.functions = by_name.into_values().collect();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_of_workers_sum_per_template() {
        let f = |name: &str, ready, shared| FunctionStatus {
            name: name.into(),
            ready,
            busy: 1,
            served: 10,
            shared,
            maps_memory: !shared,
            data_pages: 99,
            image_bytes: 4096,
        };
        let a = Status {
            functions: vec![f("hello", 3, true), f("alloc", 1, true)],
            live: 6,
            resident: 100,
        };
        let b = Status {
            functions: vec![f("hello", 2, true), f("alloc", 0, false)],
            live: 3,
            resident: 50,
        };
        let s = sum([a, b]);
        assert_eq!((s.live, s.resident), (9, 150));
        let names: Vec<_> = s.functions.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["alloc", "hello"]);
        let (alloc, hello) = (&s.functions[0], &s.functions[1]);
        assert_eq!((hello.ready, hello.busy, hello.served), (5, 2, 20));
        assert!(hello.shared && !hello.maps_memory);
        assert!(!alloc.shared && alloc.maps_memory);
    }
}
