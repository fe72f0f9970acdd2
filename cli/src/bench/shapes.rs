//! Section `shapes`: functions of different shapes (a tiny one, a library-heavy one, one
//! that allocates 48 MiB per request, one whose request imports what its template's trial
//! request did not, a compute loop) against every way of starting or serving them, in one
//! table: a cold `vmm run`; `vmm restore` with each `--memory` strategy and with none (the
//! default, whatever it is); and serving in this process through the pools `vmm serve`
//! uses (`--pool 2 --instance-memory shared|copy`, and `--pool 0`), minus HTTP.
//!
//! Every cell is measured in every round, the rounds one after another, so that the noise
//! of a shared machine falls on all of them alike; each round starts one column later, so
//! that what a process leaves behind (memory the host takes back, for one) does not always
//! fall on the same next column.

use super::process::{create_template, invoke_json, s, Timed};
use super::util::percentile;
use super::BenchArgs;
use crate::cli::MemoryArg;
use crate::serve::{InstanceMemory, ServeArgs};
use clap::ValueEnum;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::guest::RunLimits;
use vmm::pool::{PoolConfig, Pools};
use vmm::stats::ms;

/// Ready instances per template in the pooled serving columns, as `vmm serve --pool 2`.
const SERVED_POOL: usize = 2;

/// Requests per served column and shape before the measured ones (after the pools were
/// filled, as `vmm serve` fills them): the instance that serves them has served before.
const SERVED_WARM_UP: usize = 2;

/// The column label of serving with `--pool 0`.
const ON_DEMAND: &str = "on demand";

/// The label of the restore column without `--memory`.
const DEFAULT: &str = "default";

/// The imports shape's request: text with a little HTML, a URL and an address in it.
const IMPORTS_REQUEST: &[u8] = b"<p>Hello <b>shapes</b>, from the bench</p>\nvisit https://example.com/a?b=c from 192.168.1.20\nthe quick brown fox, jumps over; the lazy dog\n";

/// Everything the section measured; `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShapesReport {
    /// Rounds: each cell's process count, and the rounds of served requests.
    pub runs: u32,
    /// Served requests per column, shape and round.
    pub served_requests_per_run: u32,
    /// What `vmm serve` does without flags (its default `--pool` and `--instance-memory`),
    /// named as a served column is.
    pub served_default: String,
    pub rows: Vec<ShapeRow>,
}

/// One shape: every column.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShapeRow {
    pub shape: &'static str,
    /// The function and its runtime.
    pub function: String,
    pub request_bytes: usize,
    /// Why the row could not be measured (a workload that is not fetched).
    pub missing: Option<String>,
    pub cold: Option<ColdCell>,
    /// `vmm restore` with each `--memory` strategy, then without `--memory` (`default`).
    pub restore: Vec<RestoreCell>,
    /// Served from pools with each `--instance-memory`, then with `--pool 0`.
    pub served: Vec<ServedCell>,
    pub summary: Option<Summary>,
}

/// Cold `vmm run --json` processes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ColdCell {
    /// Wall time of the whole process.
    pub median_ms: f64,
    pub p90_ms: f64,
    /// The function's own run in the guest (`function_ms`).
    pub function_median_ms: f64,
}

/// `vmm restore --json` processes with one `--memory` (or none).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreCell {
    /// The `--memory` given, or `default` for none.
    pub memory: String,
    /// The strategy the last process's stats said it used.
    pub strategy: Option<String>,
    /// Wall time of the whole process.
    pub median_ms: f64,
    pub p90_ms: f64,
    /// From `main` to the response (`total_ms`).
    pub vmm_median_ms: f64,
    /// Pages that arrived through userfaultfd (median over the processes).
    pub uffd_faults: u64,
    pub pages_installed: u64,
}

/// Requests served in this process by one pool configuration, one at a time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServedCell {
    /// `shared`, `copy` (as `--instance-memory`) or `on demand` (`--pool 0`).
    pub mode: String,
    pub pool: usize,
    pub requests: usize,
    /// `Pools::invoke` until the response is back: acquire (take a ready instance, or
    /// restore one) and run.
    pub p50_ms: f64,
    pub p90_ms: f64,
    /// The guest's run alone (`run_ms`), median.
    pub run_p50_ms: f64,
    /// The reset after each response (pooled modes; `None` for `--pool 0`, whose instances
    /// are destroyed on the pools' reaper thread).
    pub reset_mean_ms: Option<f64>,
    /// Resets that replaced the VM by a fresh restore instead of resetting it in place.
    pub resets_restored: usize,
    /// Requests that found no ready instance and restored one.
    pub restored_on_demand: usize,
}

/// The best restore strategy and served mode of one shape, and the defaults against them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub best_restore: String,
    pub best_restore_ms: f64,
    /// The strategy `vmm restore` without `--memory` used.
    pub default_restore: Option<String>,
    pub default_restore_ms: f64,
    pub default_restore_over_best: f64,
    pub best_served: String,
    pub best_served_p50_ms: f64,
    pub default_served: String,
    pub default_served_p50_ms: f64,
    pub default_served_over_best: f64,
    /// The default restore's median process over the cold run's.
    pub default_restore_over_cold: f64,
    /// The default served mode's p50 over the cold run's `function_ms`.
    pub default_served_over_cold_function: f64,
}

/// One function of the section.
struct Shape {
    name: &'static str,
    function: String,
    /// `vmm run` / `vmm template create` arguments.
    args: Vec<String>,
    input: &'static [u8],
    missing: Option<String>,
}

fn shapes(a: &BenchArgs) -> Vec<Shape> {
    let qjs = |name, script: &str, extra: &[String], input| Shape {
        name,
        function: format!("{script} (QuickJS)"),
        args: super::qjs_args(a, script, extra),
        input,
        missing: None,
    };
    vec![
        qjs("hello", "hello.js", &[], br#"{"name":"world"}"#),
        qjs(
            "markdown",
            "markdown.js",
            &[format!("{}:marked.esm.js", s(&a.marked))],
            super::MARKDOWN_REQUEST,
        ),
        qjs("alloc", "alloc.js", &[], b"allocate"),
        Shape {
            name: "imports",
            function: "imports.py (CPython)".into(),
            args: vec![
                "--module".into(),
                s(&a.python),
                "--runtime".into(),
                "python".into(),
                "--file".into(),
                s(&a.examples.join("imports.py")),
                "--arg".into(),
                "imports.py".into(),
            ],
            input: IMPORTS_REQUEST,
            missing: (!a.python.exists()).then(|| super::engines::python_missing(a)),
        },
        qjs("compute", "primes.js", &[], br#"{"limit":100000}"#),
    ]
}

/// The `--memory` strategies `vmm restore` takes, as it names them.
fn memory_strategies() -> Vec<String> {
    MemoryArg::value_variants()
        .iter()
        .filter_map(|m| m.to_possible_value())
        .map(|v| v.get_name().to_string())
        .collect()
}

/// The default value `vmm serve` declares for its argument `id` (not the environment).
fn serve_default(id: &str) -> Option<String> {
    let cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
    let arg = cmd.get_arguments().find(|a| a.get_id() == id)?;
    let v = arg.get_default_values().first()?;
    v.to_str().map(String::from)
}

/// One served column: a `Pools` over the section's store, configured as `vmm serve` is.
struct Served {
    mode: String,
    pool: usize,
    pools: Pools,
    /// What each reset cost (ms) and whether it restored, since last drained.
    resets: Arc<Mutex<Vec<(f64, bool)>>>,
}

impl Served {
    fn new(
        store: &Path,
        mode: String,
        pool: usize,
        memory: InstanceMemory,
    ) -> Result<Served, String> {
        let (backing, adapt) = memory.pool_backing();
        // As `vmm serve`: restores on demand run on the calling thread alone.
        let engine = vmm::engine::Engine::new(vmm::engine::Config {
            parallel_restore: false,
            ..vmm::engine::Config::new(store)
        })
        .map_err(|e| format!("open the store {}: {e}", store.display()))?;
        let pools = Pools::new(
            Arc::new(engine),
            PoolConfig {
                pool,
                backing,
                adapt,
                ..PoolConfig::default()
            },
        );
        let resets = Arc::new(Mutex::new(Vec::new()));
        let r = resets.clone();
        pools.set_reset_observer(move |_, s| {
            if let Ok(mut r) = r.lock() {
                r.push((s.reset_ms, s.restored));
            }
        });
        Ok(Served {
            mode,
            pool,
            pools,
            resets,
        })
    }

    fn take_resets(&self) -> Vec<(f64, bool)> {
        self.resets
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// Serve one request of `shape` as a `vmm serve` worker does: take an instance, run,
    /// and, once the response is in hand, reset the instance (or hand it to the reaper).
    fn request(&self, shape: &Shape, samples: &mut ServedSamples) -> Result<(), String> {
        let limits = RunLimits::default();
        let t0 = Instant::now();
        let (resp, timings, checkout) = self
            .pools
            .invoke(shape.name, shape.input, &limits)
            .map_err(|e| format!("{}: served ({}): {e}", shape.name, self.mode))?;
        let elapsed = ms(t0.elapsed());
        drop(checkout);
        match resp.result {
            Ok(0) if !resp.stdout.is_empty() => {}
            Ok(code) => {
                return Err(format!(
                    "{}: served ({}): exit code {code}, stdout {:?}, stderr {:?}",
                    shape.name,
                    self.mode,
                    String::from_utf8_lossy(&resp.stdout),
                    String::from_utf8_lossy(&resp.stderr)
                ))
            }
            Err(e) => return Err(format!("{}: served ({}): {e}", shape.name, self.mode)),
        }
        samples.invoke_ms.push(elapsed);
        samples.run_ms.push(timings.invoke.run_ms);
        samples.on_demand += usize::from(timings.restored_on_demand);
        for (reset_ms, restored) in self.take_resets() {
            samples.reset_ms.push(reset_ms);
            samples.resets_restored += usize::from(restored);
        }
        Ok(())
    }

    /// Wait (a few seconds at most) until the reaper destroyed the instances restored on
    /// demand, so that their teardown does not fall on the next measurement.
    fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.pool == 0 && self.pools.live_instances() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[derive(Default)]
struct ServedSamples {
    invoke_ms: Vec<f64>,
    run_ms: Vec<f64>,
    reset_ms: Vec<f64>,
    resets_restored: usize,
    on_demand: usize,
}

/// The samples of one shape, per column.
struct Samples {
    /// Per process column: the cold run, then `vmm restore` with each strategy, then
    /// without `--memory` (as [`process_args`] orders them).
    processes: Vec<Vec<Timed>>,
    served: Vec<ServedSamples>,
}

/// The order in which round `round` measures `n` columns: each round starts one column
/// later, so that no column always follows the same one (what a process leaves behind,
/// such as memory to give back, falls on the next one).
fn rotation(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round) % n)
}

/// The arguments of the cold column and of each restore column (strategies, then none).
fn process_args(shape: &Shape, store: &Path, memories: &[String]) -> Vec<Vec<String>> {
    let mut cold = vec![
        "run".to_string(),
        "--json".into(),
        "--store".into(),
        s(store),
    ];
    cold.extend(shape.args.iter().cloned());
    let restore = |memory: Option<&String>| {
        let mut v = vec![
            "restore".to_string(),
            shape.name.into(),
            "--json".into(),
            "--store".into(),
            s(store),
        ];
        if let Some(m) = memory {
            v.extend(["--memory".into(), m.clone()]);
        }
        v
    };
    std::iter::once(cold)
        .chain(memories.iter().map(|m| restore(Some(m))))
        .chain(std::iter::once(restore(None)))
        .collect()
}

/// Section `shapes`.
pub(super) fn shapes_section(a: &BenchArgs, store: &Path) -> Result<ShapesReport, String> {
    let store = store.join("shapes");
    let shapes = shapes(a);
    let measured: Vec<&Shape> = shapes.iter().filter(|s| s.missing.is_none()).collect();
    for shape in &measured {
        create_template(shape.name, &store, &shape.args)?;
    }
    let memories = memory_strategies();
    let served_default = default_served_mode()?;
    let mut served = Vec::new();
    for m in InstanceMemory::value_variants() {
        let name = m
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_else(|| format!("{m:?}"));
        served.push(Served::new(&store, name, SERVED_POOL, *m)?);
    }
    // `--pool 0` with the default `--instance-memory`: every request restores an instance
    // of its own (the pools give it a copy, whatever `--instance-memory` says).
    let default_memory = serve_default("instance_memory")
        .and_then(|m| InstanceMemory::from_str(&m, false).ok())
        .ok_or("`vmm serve` declares no default --instance-memory")?;
    served.push(Served::new(&store, ON_DEMAND.into(), 0, default_memory)?);
    let args: Vec<Vec<Vec<String>>> = measured
        .iter()
        .map(|shape| process_args(shape, &store, &memories))
        .collect();

    // Not measured: one process of each column (the page cache holds the binary, the
    // store, the compiled artifacts and the images of `--memory shared`), the pools filled
    // as `vmm serve` fills them (a shared instance is warmed up with an empty request), and
    // a few requests served by each.
    for (shape, args) in measured.iter().zip(&args) {
        for argv in args {
            invoke_json(argv, shape.input, &[])?;
        }
    }
    for sv in &served {
        sv.pools.maintain(true);
        for shape in &measured {
            for _ in 0..SERVED_WARM_UP {
                sv.request(shape, &mut ServedSamples::default())?;
            }
            sv.settle();
        }
    }

    let mut samples: Vec<Samples> = measured
        .iter()
        .map(|_| Samples {
            // The cold run, the strategies, the default.
            processes: (0..memories.len() + 2).map(|_| Vec::new()).collect(),
            served: served.iter().map(|_| ServedSamples::default()).collect(),
        })
        .collect();
    for round in 0..a.shape_runs as usize {
        for ((shape, args), smp) in measured.iter().zip(&args).zip(&mut samples) {
            for c in rotation(round, args.len()) {
                smp.processes[c].push(invoke_json(&args[c], shape.input, &[])?);
            }
            for m in rotation(round, served.len()) {
                let sv = &served[m];
                // As the daemon's pool keeper would have by now.
                sv.pools.maintain(false);
                sv.take_resets();
                for _ in 0..a.shape_requests {
                    sv.request(shape, &mut smp.served[m])?;
                }
                sv.settle();
            }
        }
    }

    let mut measured_samples = measured.iter().zip(samples);
    let rows = shapes
        .iter()
        .map(|shape| {
            let missing = || ShapeRow {
                shape: shape.name,
                function: shape.function.clone(),
                request_bytes: shape.input.len(),
                missing: shape.missing.clone(),
                cold: None,
                restore: Vec::new(),
                served: Vec::new(),
                summary: None,
            };
            if shape.missing.is_some() {
                return missing();
            }
            let (_, smp) = measured_samples
                .next()
                .expect("a sample per measured shape");
            shape_row(shape, &memories, &served, &served_default, smp)
        })
        .collect();
    Ok(ShapesReport {
        runs: a.shape_runs,
        served_requests_per_run: a.shape_requests,
        served_default,
        rows,
    })
}

/// The served column `vmm serve` without flags matches: `on demand` if its default pool is
/// 0, else its default `--instance-memory`.
fn default_served_mode() -> Result<String, String> {
    let pool = serve_default("pool")
        .and_then(|p| p.parse::<u64>().ok())
        .ok_or("`vmm serve` declares no default --pool")?;
    if pool == 0 {
        return Ok(ON_DEMAND.into());
    }
    serve_default("instance_memory")
        .ok_or_else(|| "`vmm serve` declares no default --instance-memory".into())
}

fn median_u64(v: impl Iterator<Item = u64>) -> u64 {
    let mut v: Vec<u64> = v.collect();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

fn shape_row(
    shape: &Shape,
    memories: &[String],
    served: &[Served],
    served_default: &str,
    smp: Samples,
) -> ShapeRow {
    let wall = |t: &[Timed]| t.iter().map(|x| x.ms).collect::<Vec<_>>();
    let none = Vec::new();
    let (cold, restores) = smp.processes.split_first().unwrap_or((&none, &[]));
    let cold = ColdCell {
        median_ms: percentile(&wall(cold), 0.5),
        p90_ms: percentile(&wall(cold), 0.9),
        function_median_ms: percentile(
            &cold.iter().map(|x| x.stats.function_ms).collect::<Vec<_>>(),
            0.5,
        ),
    };
    let restore: Vec<RestoreCell> = memories
        .iter()
        .map(String::as_str)
        .chain([DEFAULT])
        .zip(restores)
        .map(|(memory, t)| {
            let r = || t.iter().filter_map(|x| x.stats.restore.as_ref());
            RestoreCell {
                memory: memory.to_string(),
                strategy: r().next_back().and_then(|r| r.strategy.clone()),
                median_ms: percentile(&wall(t), 0.5),
                p90_ms: percentile(&wall(t), 0.9),
                vmm_median_ms: percentile(
                    &t.iter().map(|x| x.stats.total_ms).collect::<Vec<_>>(),
                    0.5,
                ),
                uffd_faults: median_u64(r().map(|r| r.uffd_faults)),
                pages_installed: median_u64(r().map(|r| r.pages_installed)),
            }
        })
        .collect();
    let served: Vec<ServedCell> = served
        .iter()
        .zip(&smp.served)
        .map(|(sv, s)| ServedCell {
            mode: sv.mode.clone(),
            pool: sv.pool,
            requests: s.invoke_ms.len(),
            p50_ms: percentile(&s.invoke_ms, 0.5),
            p90_ms: percentile(&s.invoke_ms, 0.9),
            run_p50_ms: percentile(&s.run_ms, 0.5),
            reset_mean_ms: (!s.reset_ms.is_empty())
                .then(|| s.reset_ms.iter().sum::<f64>() / s.reset_ms.len() as f64),
            resets_restored: s.resets_restored,
            restored_on_demand: s.on_demand,
        })
        .collect();
    let summary = summary(&cold, &restore, &served, served_default);
    ShapeRow {
        shape: shape.name,
        function: shape.function.clone(),
        request_bytes: shape.input.len(),
        missing: None,
        cold: Some(cold),
        restore,
        served,
        summary,
    }
}

/// The best restore strategy (lowest median process) and served mode (lowest p50), and
/// the defaults against them and against the cold run. `None` without the cells it needs.
fn summary(
    cold: &ColdCell,
    restore: &[RestoreCell],
    served: &[ServedCell],
    served_default: &str,
) -> Option<Summary> {
    let lowest = |a: &f64, b: &f64| a.total_cmp(b);
    let best_restore = restore
        .iter()
        .filter(|r| r.memory != DEFAULT)
        .min_by(|a, b| lowest(&a.median_ms, &b.median_ms))?;
    let default_restore = restore.iter().find(|r| r.memory == DEFAULT)?;
    let best_served = served.iter().min_by(|a, b| lowest(&a.p50_ms, &b.p50_ms))?;
    let default_served = served.iter().find(|s| s.mode == served_default)?;
    Some(Summary {
        best_restore: best_restore.memory.clone(),
        best_restore_ms: best_restore.median_ms,
        default_restore: default_restore.strategy.clone(),
        default_restore_ms: default_restore.median_ms,
        default_restore_over_best: default_restore.median_ms / best_restore.median_ms,
        best_served: best_served.mode.clone(),
        best_served_p50_ms: best_served.p50_ms,
        default_served: default_served.mode.clone(),
        default_served_p50_ms: default_served.p50_ms,
        default_served_over_best: default_served.p50_ms / best_served.p50_ms,
        default_restore_over_cold: default_restore.median_ms / cold.median_ms,
        default_served_over_cold_function: default_served.p50_ms / cold.function_median_ms,
    })
}

/// A ratio as the tables show it.
fn ratio(r: f64) -> String {
    super::engines::fmt_ratio(Some(r))
}

pub(super) fn print_shapes(r: &ShapesReport) {
    println!(
        "## Function shapes ({} rounds, every cell measured in each, interleaved; each round starts one column later)\n",
        r.runs
    );
    println!("Times in ms. cold: median wall time of a `vmm run` process (the function's own run in the guest, `function_ms`). restore: median wall time of a `vmm restore` process with that `--memory` (median userfaultfd faults); `default` gives no `--memory` and names the strategy its stats report. served: requests served one at a time in this process by the pools `vmm serve --pool {SERVED_POOL} --instance-memory ...` uses ({} per round each, after the pools were filled and warmed as `vmm serve` does and {SERVED_WARM_UP} requests), from taking an instance to the response: p50 / p90 (mean reset after the response); `{ON_DEMAND}` is `--pool 0`, an instance restored per request and destroyed after.\n", r.served_requests_per_run);
    let Some(cols) = r.rows.iter().find(|row| row.missing.is_none()) else {
        println!("(no shape could be measured)\n");
        return;
    };
    let mut header = vec!["shape".to_string(), "function".into(), "cold".into()];
    header.extend(cols.restore.iter().map(|c| format!("restore {}", c.memory)));
    header.extend(cols.served.iter().map(|c| format!("served {}", c.mode)));
    println!("| {} |", header.join(" | "));
    println!("|---|---|{}", "---:|".repeat(header.len() - 2));
    for row in &r.rows {
        let mut cells = vec![
            row.shape.to_string(),
            format!("{}, {}-byte request", row.function, row.request_bytes),
        ];
        match (&row.missing, &row.cold) {
            (None, Some(cold)) => {
                cells.push(format!(
                    "{:.2} ({:.2})",
                    cold.median_ms, cold.function_median_ms
                ));
                for c in &row.restore {
                    let mut cell = format!("{:.2} ({})", c.median_ms, c.uffd_faults);
                    if c.memory == DEFAULT {
                        cell.push(' ');
                        cell.push_str(c.strategy.as_deref().unwrap_or("strategy not reported"));
                    }
                    cells.push(cell);
                }
                for c in &row.served {
                    cells.push(match c.reset_mean_ms {
                        Some(reset) => format!("{:.2} / {:.2} ({reset:.2})", c.p50_ms, c.p90_ms),
                        None => format!("{:.2} / {:.2}", c.p50_ms, c.p90_ms),
                    });
                }
            }
            (missing, _) => {
                cells.push(missing.clone().unwrap_or_else(|| "not measured".into()));
                cells.extend(std::iter::repeat_n("-".to_string(), header.len() - 3));
            }
        }
        println!("| {} |", cells.join(" | "));
    }
    println!();
    println!("Best against default, per shape. restore: the `--memory` with the lowest median process against `vmm restore` without `--memory` (when that is the default's own strategy, the two columns run the same command: their ratio is this run's noise); served: the mode with the lowest p50 against what `vmm serve` does without flags (`{}`); then the defaults against the cold run.\n", r.served_default);
    println!("| shape | best restore | default restore | default / best | best served | default served | default / best | default restore / cold | default served p50 / cold function_ms |");
    println!("|---|---|---|---:|---|---|---:|---:|---:|");
    for row in &r.rows {
        let Some(s) = &row.summary else {
            println!("| {} | - | - | - | - | - | - | - | - |", row.shape);
            continue;
        };
        println!(
            "| {} | {} {:.2} | {} {:.2} | {} | {} {:.2} | {} {:.2} | {} | {} | {} |",
            row.shape,
            s.best_restore,
            s.best_restore_ms,
            s.default_restore.as_deref().unwrap_or("?"),
            s.default_restore_ms,
            ratio(s.default_restore_over_best),
            s.best_served,
            s.best_served_p50_ms,
            s.default_served,
            s.default_served_p50_ms,
            ratio(s.default_served_over_best),
            ratio(s.default_restore_over_cold),
            ratio(s.default_served_over_cold_function),
        );
    }
    println!();
    let notes: Vec<String> = r
        .rows
        .iter()
        .flat_map(|row| {
            row.served.iter().filter_map(move |c| {
                let mut n = Vec::new();
                if c.resets_restored > 0 {
                    n.push(format!(
                        "{} of {} resets restored the instance anew",
                        c.resets_restored, c.requests
                    ));
                }
                if c.pool > 0 && c.restored_on_demand > 0 {
                    n.push(format!(
                        "{} of {} requests found no ready instance",
                        c.restored_on_demand, c.requests
                    ));
                }
                (!n.is_empty())
                    .then(|| format!("{} served {}: {}", row.shape, c.mode, n.join(", ")))
            })
        })
        .collect();
    for n in &notes {
        println!("* {n}");
    }
    if !notes.is_empty() {
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restore_cell(memory: &str, strategy: &str, median_ms: f64) -> RestoreCell {
        RestoreCell {
            memory: memory.into(),
            strategy: Some(strategy.into()),
            median_ms,
            p90_ms: median_ms + 1.0,
            vmm_median_ms: median_ms - 1.0,
            uffd_faults: 3,
            pages_installed: 100,
        }
    }

    fn served_cell(mode: &str, pool: usize, p50_ms: f64) -> ServedCell {
        ServedCell {
            mode: mode.into(),
            pool,
            requests: 5,
            p50_ms,
            p90_ms: p50_ms * 2.0,
            run_p50_ms: p50_ms / 2.0,
            reset_mean_ms: (pool > 0).then_some(0.25),
            resets_restored: 0,
            restored_on_demand: if pool == 0 { 5 } else { 0 },
        }
    }

    #[test]
    fn the_summary_sets_the_defaults_against_the_best_and_the_cold_run() {
        let cold = ColdCell {
            median_ms: 40.0,
            p90_ms: 50.0,
            function_median_ms: 8.0,
        };
        let restore = [
            restore_cell("eager", "eager", 6.0),
            restore_cell("prefetch", "prefetch", 8.0),
            restore_cell("lazy", "lazy", 20.0),
            // Faster than every strategy, but not a strategy: never the best.
            restore_cell(DEFAULT, "prefetch", 5.0),
        ];
        let served = [
            served_cell("shared", 2, 0.5),
            served_cell("copy", 2, 0.25),
            served_cell(ON_DEMAND, 0, 2.0),
        ];
        let s = summary(&cold, &restore, &served, "shared").unwrap();
        assert_eq!((s.best_restore.as_str(), s.best_restore_ms), ("eager", 6.0));
        assert_eq!(
            (s.default_restore.as_deref(), s.default_restore_ms),
            (Some("prefetch"), 5.0)
        );
        assert_eq!(s.default_restore_over_best, 5.0 / 6.0);
        assert_eq!(
            (s.best_served.as_str(), s.default_served.as_str()),
            ("copy", "shared")
        );
        assert_eq!(s.default_served_over_best, 2.0);
        assert_eq!(s.default_restore_over_cold, 5.0 / 40.0);
        assert_eq!(s.default_served_over_cold_function, 0.5 / 8.0);
        // A default served mode that is not a column, or no cells: no summary.
        assert!(summary(&cold, &restore, &served, "elsewhere").is_none());
        assert!(summary(&cold, &[], &served, "shared").is_none());
    }

    #[test]
    fn the_columns_follow_the_command_line() {
        // Every `--memory` strategy of `vmm restore` is a column, named as the flag takes it.
        let memories = memory_strategies();
        assert_eq!(memories.len(), MemoryArg::value_variants().len());
        for m in &memories {
            assert!(MemoryArg::from_str(m, false).is_ok(), "{m}");
        }
        // `vmm serve`'s defaults are read from its declaration, and name a served column.
        assert!(serve_default("pool").unwrap().parse::<u32>().is_ok());
        let memory = serve_default("instance_memory").unwrap();
        assert!(InstanceMemory::from_str(&memory, false).is_ok(), "{memory}");
        let mode = default_served_mode().unwrap();
        assert!(mode == ON_DEMAND || mode == memory, "{mode}");
        assert!(serve_default("no_such_argument").is_none());
    }

    #[test]
    fn every_round_measures_every_column_once_starting_one_later() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|r| rotation(r, 3).collect()).collect();
        assert_eq!(rounds, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
        assert_eq!(rotation(5, 1).collect::<Vec<_>>(), [0]);
        assert_eq!(rotation(5, 0).count(), 0);
    }

    #[test]
    fn a_restore_cell_reads_the_median_count() {
        assert_eq!(median_u64([5, 1, 9].into_iter()), 5);
        assert_eq!(median_u64([4, 1].into_iter()), 1);
        assert_eq!(median_u64(std::iter::empty()), 0);
    }

    #[test]
    fn the_json_report_keeps_its_shape() {
        let mut missing = ShapeRow {
            shape: "imports",
            function: "imports.py (CPython)".into(),
            request_bytes: 3,
            missing: Some("python.wasm is missing".into()),
            cold: None,
            restore: vec![],
            served: vec![],
            summary: None,
        };
        let v = serde_json::to_value(ShapesReport {
            runs: 1,
            served_requests_per_run: 2,
            served_default: "shared".into(),
            rows: vec![missing.clone()],
        })
        .unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&v),
            ["rows", "runs", "served_default", "served_requests_per_run"]
        );
        let row = &v["rows"][0];
        assert_eq!(
            keys(row),
            [
                "cold",
                "function",
                "missing",
                "request_bytes",
                "restore",
                "served",
                "shape",
                "summary"
            ]
        );
        assert!(row["cold"].is_null() && row["summary"].is_null());
        missing.restore = vec![restore_cell(DEFAULT, "prefetch", 5.0)];
        missing.served = vec![served_cell(ON_DEMAND, 0, 2.0)];
        let v = serde_json::to_value(&missing).unwrap();
        assert_eq!(
            keys(&v["restore"][0]),
            [
                "median_ms",
                "memory",
                "p90_ms",
                "pages_installed",
                "strategy",
                "uffd_faults",
                "vmm_median_ms"
            ]
        );
        assert_eq!(
            keys(&v["served"][0]),
            [
                "mode",
                "p50_ms",
                "p90_ms",
                "pool",
                "requests",
                "reset_mean_ms",
                "resets_restored",
                "restored_on_demand",
                "run_p50_ms"
            ]
        );
        // `--pool 0` instances are destroyed, not reset.
        assert!(v["served"][0]["reset_mean_ms"].is_null());
    }
}
