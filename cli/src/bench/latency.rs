//! Section `latency`: time to response of every function, cold and restored with each
//! memory strategy, as whole processes; and restores in this process with the store open.

use super::process::{create_template, invoke_json, s, Timed};
use super::util::{count_or_dash, finite_or_zero, percentile};
use super::{BenchArgs, Function};
use std::path::Path;
use std::time::Instant;
use vmm::instance::Backing;
use vmm::stats::ms;

/// Time to response of one function in one mode (`cold` or a restore memory strategy).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyRow {
    pub function: &'static str,
    pub mode: &'static str,
    /// Median of the `total_ms` the processes reported: from `main` to the response.
    pub vmm_median_ms: f64,
    /// The cold row's `vmm_median_ms` over this one's.
    pub vmm_speedup: f64,
    /// Median wall time of the whole process.
    pub median_ms: f64,
    pub p90_ms: f64,
    /// The cold row's `median_ms` over this one's.
    pub speedup: f64,
    /// Restore counters of the last invocation; `None` for cold runs.
    pub pages_installed: Option<u64>,
    pub uffd_faults: Option<u64>,
    pub bytes_from_store: Option<u64>,
    /// VM exits of the last invocation.
    pub guest_exits: Option<u64>,
}

/// Restores of one function in this process, with the store kept open.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WarmRow {
    pub function: &'static str,
    pub strategy: Backing,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// The cold run's median `total_ms` over this median.
    pub vs_cold_in_vmm: f64,
}

/// The modes the latency section compares: a cold boot, then each restore memory strategy.
pub(super) const MODES: [&str; 5] = ["cold", "eager", "prefetch", "lazy", "shared"];

/// Section `latency`: time to response of every function, cold and restored with each
/// memory strategy, as whole `vmm` processes.
pub(super) fn latency(
    a: &BenchArgs,
    store: &Path,
    functions: &[Function],
) -> Result<Vec<LatencyRow>, String> {
    let mut rows = Vec::new();
    let mut created: Vec<&str> = Vec::new();
    for f in functions {
        if !created.contains(&f.name) {
            created.push(f.name);
            create_template(f.name, store, &f.args)?;
        }
        let samples = latency_samples(a.iterations, store, f)?;
        rows.extend(latency_rows(f.label, &samples));
    }
    Ok(rows)
}

/// `iterations` invocations of `f` in every mode, interleaved round-robin so that the noise of
/// a shared machine falls on every mode alike; `samples[m]` holds those of `MODES[m]`.
pub(super) fn latency_samples(
    iterations: usize,
    store: &Path,
    f: &Function,
) -> Result<Vec<Vec<Timed>>, String> {
    let mut samples: Vec<Vec<Timed>> = MODES.iter().map(|_| Vec::new()).collect();
    for _ in 0..iterations {
        for (m, mode) in MODES.iter().enumerate() {
            let args: Vec<String> = if *mode == "cold" {
                let mut v = vec!["run".to_string(), "--json".into()];
                v.extend(f.args.clone());
                v
            } else {
                vec![
                    "restore".to_string(),
                    f.name.into(),
                    "--json".into(),
                    "--memory".into(),
                    mode.to_string(),
                    "--store".into(),
                    s(store),
                ]
            };
            samples[m].push(invoke_json(&args, f.input, &[])?);
        }
    }
    Ok(samples)
}

/// One row per mode from `latency_samples`; speedups are against the cold row.
pub(super) fn latency_rows(label: &'static str, samples: &[Vec<Timed>]) -> Vec<LatencyRow> {
    let process_ms = |s: &[Timed]| s.iter().map(|x| x.ms).collect::<Vec<_>>();
    let in_vmm_ms = |s: &[Timed]| s.iter().map(|x| x.stats.total_ms).collect::<Vec<_>>();
    let cold = samples.first().map(Vec::as_slice).unwrap_or_default();
    let cold_median = percentile(&process_ms(cold), 0.5);
    let cold_inproc_median = percentile(&in_vmm_ms(cold), 0.5);
    MODES
        .iter()
        .zip(samples)
        .map(|(mode, s)| {
            let times = process_ms(s);
            let median = percentile(&times, 0.5);
            let inproc_median = percentile(&in_vmm_ms(s), 0.5);
            let last = s.last().map(|x| &x.stats);
            let restore = last.and_then(|x| x.restore.as_ref());
            LatencyRow {
                function: label,
                mode,
                vmm_median_ms: inproc_median,
                vmm_speedup: cold_inproc_median / inproc_median,
                median_ms: median,
                p90_ms: percentile(&times, 0.9),
                speedup: cold_median / median,
                pages_installed: restore.map(|r| r.pages_installed),
                uffd_faults: restore.map(|r| r.uffd_faults),
                bytes_from_store: restore.map(|r| r.bytes_from_store),
                guest_exits: last.map(|x| x.exits),
            }
        })
        .collect()
}

pub(super) fn print_latency(iterations: usize, rows: &[LatencyRow]) {
    println!("## Time to response ({iterations} invocations each, interleaved)\n");
    println!(
        "Process: wall time of the whole `vmm` process, as a caller sees it. In vmm: from `main`"
    );
    println!(
        "to the response (`total_ms`), i.e. without process start-up, which costs any process"
    );
    println!("3-5 ms on this VM.\n");
    println!(
        "| function | mode | process median ms | p90 ms | vs cold | in vmm median ms | vs cold | pages installed | uffd faults | KiB from store | exits |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1}x | {:.2} | {:.1}x | {} | {} | {} | {} |",
            r.function,
            r.mode,
            finite_or_zero(r.median_ms),
            finite_or_zero(r.p90_ms),
            finite_or_zero(r.speedup),
            finite_or_zero(r.vmm_median_ms),
            finite_or_zero(r.vmm_speedup),
            count_or_dash(r.pages_installed),
            count_or_dash(r.uffd_faults),
            count_or_dash(r.bytes_from_store.map(|b| b / 1024)),
            count_or_dash(r.guest_exits),
        );
    }
    println!();
}

/// Section `latency`, second table: a worker that keeps its store open restores in this
/// process, one after another, each a fresh VM (manifest load, page install, vCPU restore,
/// run to response).
pub(super) fn warm(
    a: &BenchArgs,
    store: &Path,
    functions: &[Function],
    latency: &[LatencyRow],
) -> Result<Vec<WarmRow>, String> {
    let st = vmm::engine::Engine::new(vmm::engine::Config::new(store))
        .map(std::sync::Arc::new)
        .map_err(|e| format!("open the store {}: {e}", store.display()))?;
    let mut rows = Vec::new();
    for f in functions {
        let cold = latency
            .iter()
            .find(|r| r.function == f.label && r.mode == "cold")
            .map(|r| r.vmm_median_ms)
            .unwrap_or(0.0);
        for strategy in [Backing::Eager, Backing::Prefetch] {
            let t = in_process_restores(&st, f, strategy, a.iterations)?;
            let median = percentile(&t, 0.5);
            rows.push(WarmRow {
                function: f.label,
                strategy,
                median_ms: median,
                p90_ms: percentile(&t, 0.9),
                vs_cold_in_vmm: cold / median,
            });
        }
    }
    Ok(rows)
}

/// Times in ms of `iterations` restores of `f` by `st` (template loaded, instantiated,
/// invoked), each run to its response.
pub(super) fn in_process_restores(
    st: &std::sync::Arc<vmm::engine::Engine>,
    f: &Function,
    strategy: Backing,
    iterations: usize,
) -> Result<Vec<f64>, String> {
    let mut t = Vec::new();
    for _ in 0..iterations {
        let t0 = Instant::now();
        let mut instance = st
            .load_template(f.name)
            .and_then(|t| t.instantiate_with(strategy))
            .map_err(|e| e.to_string())?;
        let report = instance.invoke(f.input, &vmm::guest::RunLimits::default());
        report.result.map_err(|e| e.to_string())?;
        t.push(ms(t0.elapsed()));
    }
    Ok(t)
}

/// The name `--memory` takes for `strategy`.
pub(super) fn strategy_name(strategy: Backing) -> String {
    strategy.name().to_string()
}

pub(super) fn print_warm(iterations: usize, rows: &[WarmRow]) {
    println!("## Restores in one process with the store kept open ({iterations} each)\n");
    println!("| function | memory | median ms | p90 ms | vs cold (in vmm) |");
    println!("|---|---|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1}x |",
            r.function,
            strategy_name(r.strategy),
            finite_or_zero(r.median_ms),
            finite_or_zero(r.p90_ms),
            finite_or_zero(r.vs_cold_in_vmm)
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::process::{RestoreStatsJson, StatsJson};

    fn timed(ms: f64, total_ms: f64, restore: Option<(u64, u64, u64)>) -> Timed {
        Timed {
            ms,
            stats: StatsJson {
                total_ms,
                function_ms: 0.0,
                exits: if restore.is_some() { 1 } else { 3 },
                restore: restore.map(|(p, f, b)| RestoreStatsJson {
                    strategy: None,
                    pages_installed: p,
                    uffd_faults: f,
                    bytes_from_store: b,
                }),
            },
        }
    }

    #[test]
    fn latency_rows_compare_every_mode_with_cold() {
        let samples: Vec<Vec<Timed>> = MODES
            .iter()
            .enumerate()
            .map(|(m, _)| {
                let restore = (m > 0).then_some((m as u64, 10 * m as u64, 4096 * m as u64));
                // Process times 40, 20, 60 ms over the modes' divisor; in vmm a constant 4 less.
                [40.0, 20.0, 60.0]
                    .iter()
                    .map(|t| timed(t / (m + 1) as f64, t / (m + 1) as f64 - 4.0, restore))
                    .collect()
            })
            .collect();
        let rows = latency_rows("f", &samples);
        assert_eq!(rows.len(), MODES.len());
        let cold = &rows[0];
        assert_eq!(
            (cold.mode, cold.median_ms, cold.p90_ms),
            ("cold", 40.0, 60.0)
        );
        assert_eq!(
            (cold.speedup, cold.vmm_median_ms, cold.vmm_speedup),
            (1.0, 36.0, 1.0)
        );
        assert_eq!(
            (
                cold.pages_installed,
                cold.uffd_faults,
                cold.bytes_from_store,
                cold.guest_exits
            ),
            (None, None, None, Some(3))
        );
        let eager = &rows[1];
        assert_eq!(
            (eager.mode, eager.median_ms, eager.speedup),
            ("eager", 20.0, 2.0)
        );
        assert_eq!(
            (eager.vmm_median_ms, eager.vmm_speedup),
            (16.0, 36.0 / 16.0)
        );
        assert_eq!(
            (
                eager.pages_installed,
                eager.uffd_faults,
                eager.bytes_from_store,
                eager.guest_exits
            ),
            (Some(1), Some(10), Some(4096), Some(1))
        );
    }
}
