//! `vmm bench`: every figure the README quotes, measured side by side in one run.
//!
//! Times to response are wall-clock times of whole `vmm run` / `vmm restore` processes
//! (what a user waits for), interleaved round-robin so that the noise of a shared machine
//! falls on every mode alike. Ratios are only meaningful within one run.

use crate::run::ms;
use crate::snapshot::MemoryStrategy;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Invocations per function and mode.
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
    /// The QuickJS-NG reactor (fetched by tools/fetch-workloads.sh).
    #[arg(long, default_value = "workloads/qjs-wasi-reactor.wasm")]
    pub qjs: PathBuf,
    /// marked's ES module (fetched by tools/fetch-workloads.sh).
    #[arg(long, default_value = "workloads/marked.esm.js")]
    pub marked: PathBuf,
    /// Directory with hello.js, markdown.js and compute.wat.
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
    /// Number of function templates for the dedup measurement.
    #[arg(long, default_value_t = 20)]
    pub templates: usize,
    /// Seconds per restores-per-second measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Only some sections: any of latency, throughput, store, floor, native.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Everything one `vmm bench` run measured: `--json` prints this. A section that `--only`
/// left out is absent.
#[derive(Debug, Default, serde::Serialize)]
pub struct BenchReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Vec<LatencyRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<Vec<WarmRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Vec<ThroughputRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floor: Option<FloorReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native: Option<NativeReport>,
}

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
    pub strategy: MemoryStrategy,
    pub median_ms: f64,
    pub p90_ms: f64,
    /// The cold run's median `total_ms` over this median.
    pub vs_cold_in_vmm: f64,
}

/// `vmm restore` processes completed by `restorers` concurrent callers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputRow {
    pub restorers: usize,
    pub restores: u64,
    pub per_second: f64,
}

/// Disk use of `templates` JavaScript function templates on one runtime base.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreReport {
    pub templates: usize,
    pub first_template_bytes: u64,
    pub max_increment_bytes: u64,
    pub avg_increment_bytes: f64,
    pub max_increment_pct_of_first: f64,
    /// What full snapshots of every function template would take.
    pub logical_bytes: u64,
    /// What the store takes on disk.
    pub physical_bytes: u64,
    pub dedup_ratio: f64,
}

/// What any start costs on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorReport {
    /// KVM_CREATE_VM, a memory slot and a vCPU.
    pub vm_create_ms: f64,
    /// One guest -> vmm -> guest round trip.
    pub exit_us: f64,
}

/// examples/compute.wat under wasmi in the guest and in a host process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NativeReport {
    pub guest_ms: f64,
    pub host_ms: f64,
    pub ratio: f64,
}

/// The part of what `vmm run --json` and `vmm restore --json` print that the bench reads.
#[derive(Debug, serde::Deserialize)]
struct InvocationJson {
    stats: StatsJson,
}

/// `stats` of one invocation (`run::Stats`): the fields the bench uses.
#[derive(Debug, serde::Deserialize)]
struct StatsJson {
    /// From `main` to the response.
    total_ms: f64,
    /// The function's own run in the guest.
    function_ms: f64,
    exits: u64,
    /// Present for restores only.
    #[serde(default)]
    restore: Option<RestoreStatsJson>,
}

/// `stats.restore` of one invocation (`snapshot::RestoreStats`): the fields the bench uses.
#[derive(Debug, serde::Deserialize)]
struct RestoreStatsJson {
    pages_installed: u64,
    uffd_faults: u64,
    bytes_from_store: u64,
}

/// One `vmm` process: its wall time and what it printed on stdout.
struct Invocation {
    ms: f64,
    stdout: Vec<u8>,
}

/// One `vmm ... --json` process: its wall time and the stats it reported.
struct Timed {
    ms: f64,
    stats: StatsJson,
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "vmm".into())
}

fn invoke(args: &[String], input: &[u8]) -> Result<Invocation, String> {
    invoke_with_env(args, input, &[])
}

/// Run this binary with `args` (and `env` added), `input` on stdin; fails unless it exits 0.
fn invoke_with_env(
    args: &[String],
    input: &[u8],
    env: &[(&str, &str)],
) -> Result<Invocation, String> {
    use std::io::Write;
    let t0 = Instant::now();
    let mut child = Command::new(exe())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn vmm: {e}"))?;
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for vmm: {e}"))?;
    let elapsed = ms(t0.elapsed());
    if !out.status.success() {
        return Err(format!(
            "vmm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Invocation {
        ms: elapsed,
        stdout: out.stdout,
    })
}

/// Run `vmm run --json ...` or `vmm restore --json ...` (`args`) and read the stats it reports.
fn invoke_json(args: &[String], input: &[u8], env: &[(&str, &str)]) -> Result<Timed, String> {
    let inv = invoke_with_env(args, input, env)?;
    let stats = parse_stats(args, &inv.stdout)?;
    Ok(Timed { ms: inv.ms, stats })
}

/// The stats in what `vmm <args>` printed with `--json`.
fn parse_stats(args: &[String], stdout: &[u8]) -> Result<StatsJson, String> {
    serde_json::from_slice::<InvocationJson>(stdout)
        .map(|r| r.stats)
        .map_err(|e| format!("read the JSON report of `vmm {}`: {e}", args.join(" ")))
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let idx = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

/// A ratio or median as the tables show it: 0 where it is undefined (no samples), as in the
/// JSON report, where it is null.
fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// A counter as the tables show it: `-` where there is none.
fn count_or_dash(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

struct Function {
    /// Row label: the function and the size of its request.
    label: &'static str,
    /// Template name (two rows may share a template and differ in the request).
    name: &'static str,
    args: Vec<String>,
    input: &'static [u8],
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn bench(a: &BenchArgs) -> Result<(), String> {
    for p in [&a.qjs, &a.marked] {
        if !p.exists() {
            return Err(format!(
                "{} is missing: run tools/fetch-workloads.sh first",
                p.display()
            ));
        }
    }
    let store = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let result = run_sections(a, &store);
    let _ = std::fs::remove_dir_all(&store);
    let report = result?;
    if a.json {
        // Through a `Value`, whose objects keep their keys sorted, as this output always has.
        let v = serde_json::to_value(&report).map_err(|e| format!("encode the report: {e}"))?;
        println!("{v}");
    }
    Ok(())
}

/// Run the sections `--only` asks for (all by default); unless `--json`, print each one's
/// table as soon as it is measured.
fn run_sections(a: &BenchArgs, store: &Path) -> Result<BenchReport, String> {
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let functions = functions(a);
    let mut report = BenchReport::default();
    if want("latency") {
        let latency = latency(a, store, &functions)?;
        if !a.json {
            print_latency(a.iterations, &latency);
        }
        let warm = warm(a, store, &functions, &latency)?;
        if !a.json {
            print_warm(a.iterations, &warm);
        }
        report.latency = Some(latency);
        report.warm = Some(warm);
    }
    if want("throughput") {
        let rows = throughput(a, store, &functions[0])?;
        if !a.json {
            print_throughput(a.seconds, &rows);
        }
        report.throughput = Some(rows);
    }
    if want("store") {
        let r = store_dedup(a, store)?;
        if !a.json {
            print_store(&r);
        }
        report.store = Some(r);
    }
    if want("floor") {
        let r = floor()?;
        if !a.json {
            print_floor(&r);
        }
        report.floor = Some(r);
    }
    if want("native") {
        let r = native(a)?;
        if !a.json {
            print_native(&r);
        }
        report.native = Some(r);
    }
    Ok(report)
}

/// The functions the latency sections measure; the first (hello) also the throughput one.
fn functions(a: &BenchArgs) -> [Function; 3] {
    let qjs = |script: &str, extra: &[String]| {
        let mut v = vec![
            "--module".into(),
            s(&a.qjs),
            "--runtime".into(),
            "qjs".into(),
        ];
        v.extend([
            "--file".into(),
            s(&a.examples.join(script)),
            "--arg".into(),
            script.into(),
        ]);
        for f in extra {
            v.extend(["--file".into(), f.clone()]);
        }
        v
    };
    [
        Function { label: "hello", name: "hello", args: qjs("hello.js", &[]), input: br#"{"name":"bench"}"# },
        Function {
            label: "markdown (86-byte request)",
            name: "markdown",
            args: qjs("markdown.js", &[format!("{}:marked.esm.js", s(&a.marked))]),
            input: b"# Bench\n\nSome *emphasis*, a [link](https://example.com) and a list:\n\n- one\n- two\n",
        },
        Function {
            label: "markdown (7-byte request)",
            name: "markdown",
            args: qjs("markdown.js", &[format!("{}:marked.esm.js", s(&a.marked))]),
            input: b"# Bench",
        },
    ]
}

/// `vmm template create NAME --store STORE FUNCTION_ARGS`.
fn create_template(name: &str, store: &Path, function_args: &[String]) -> Result<(), String> {
    let mut args = vec![
        "template".into(),
        "create".into(),
        name.to_string(),
        "--json".into(),
        "--store".into(),
        s(store),
    ];
    args.extend_from_slice(function_args);
    invoke(&args, b"").map(|_| ())
}

/// The modes the latency section compares: a cold boot, then each restore memory strategy.
const MODES: [&str; 5] = ["cold", "eager", "prefetch", "lazy", "shared"];

/// Section `latency`: time to response of every function, cold and restored with each
/// memory strategy, as whole `vmm` processes.
fn latency(a: &BenchArgs, store: &Path, functions: &[Function]) -> Result<Vec<LatencyRow>, String> {
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
fn latency_samples(
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
fn latency_rows(label: &'static str, samples: &[Vec<Timed>]) -> Vec<LatencyRow> {
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

fn print_latency(iterations: usize, rows: &[LatencyRow]) {
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
fn warm(
    a: &BenchArgs,
    store: &Path,
    functions: &[Function],
    latency: &[LatencyRow],
) -> Result<Vec<WarmRow>, String> {
    let st = snapshot_store::Store::open(store)
        .map_err(|e| format!("open the store {}: {e}", store.display()))?;
    let mut rows = Vec::new();
    for f in functions {
        let cold = latency
            .iter()
            .find(|r| r.function == f.label && r.mode == "cold")
            .map(|r| r.vmm_median_ms)
            .unwrap_or(0.0);
        for strategy in [MemoryStrategy::Eager, MemoryStrategy::Prefetch] {
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

/// Times in ms of `iterations` restores of `f` from `st`, each run to its response.
fn in_process_restores(
    st: &snapshot_store::Store,
    f: &Function,
    strategy: MemoryStrategy,
    iterations: usize,
) -> Result<Vec<f64>, String> {
    let mut t = Vec::new();
    for _ in 0..iterations {
        let t0 = Instant::now();
        let (report, _, _) = crate::snapshot::restore_and_run(
            st,
            f.name,
            strategy,
            f.input,
            &crate::run::RunLimits::default(),
        )
        .map_err(|e| e.to_string())?;
        report.result.map_err(|e| e.to_string())?;
        t.push(ms(t0.elapsed()));
    }
    Ok(t)
}

/// The name `--memory` takes for `strategy`.
fn strategy_name(strategy: MemoryStrategy) -> String {
    strategy.name().to_string()
}

fn print_warm(iterations: usize, rows: &[WarmRow]) {
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

/// Section `throughput`: `vmm restore` processes of `hello` per second, from one and from two
/// concurrent callers, `--seconds` each.
fn throughput(a: &BenchArgs, store: &Path, hello: &Function) -> Result<Vec<ThroughputRow>, String> {
    create_template("tput", store, &hello.args)?;
    [1usize, 2]
        .into_iter()
        .map(|workers| restores_per_second(store, hello, workers, a.seconds))
        .collect()
}

/// `workers` threads each restore `tput` from `store` in a loop for `seconds`.
fn restores_per_second(
    store: &Path,
    f: &Function,
    workers: usize,
    seconds: f64,
) -> Result<ThroughputRow, String> {
    let args = vec![
        "restore".to_string(),
        "tput".into(),
        "--store".into(),
        s(store),
    ];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t0 = Instant::now();
    let counts: Vec<Result<u64, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                sc.spawn(|| {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        invoke(&args, f.input)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let total: u64 = counts
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .sum();
    let secs = t0.elapsed().as_secs_f64();
    Ok(ThroughputRow {
        restorers: workers,
        restores: total,
        per_second: total as f64 / secs,
    })
}

fn print_throughput(seconds: f64, rows: &[ThroughputRow]) {
    println!("## Restores per second (hello, `vmm restore` processes, {seconds} s each)\n");
    println!("| concurrent restorers | restores | per second |");
    println!("|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} |",
            r.restorers,
            r.restores,
            finite_or_zero(r.per_second)
        );
    }
    println!();
}

/// Section `store`: `--templates` different JavaScript functions on one runtime base, in a
/// store of their own; what each adds on disk, against what full snapshots would take.
fn store_dedup(a: &BenchArgs, store: &Path) -> Result<StoreReport, String> {
    let dedup_store = store.join("dedup");
    let scripts = std::env::temp_dir().join(format!("vmm-bench-fns-{}", std::process::id()));
    std::fs::create_dir_all(&scripts).map_err(|e| format!("create {}: {e}", scripts.display()))?;
    let sizes = create_function_templates(a, &dedup_store, &scripts);
    let _ = std::fs::remove_dir_all(&scripts);
    let sizes = sizes?;
    let first = sizes.first().copied().unwrap_or(0);
    let increments: Vec<u64> = sizes
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    let max_inc = increments.iter().copied().max().unwrap_or(0);
    let avg_inc = if increments.is_empty() {
        0.0
    } else {
        increments.iter().sum::<u64>() as f64 / increments.len() as f64
    };
    let logical = logical_bytes(&dedup_store, a.templates)?;
    let physical = sizes.last().copied().unwrap_or(0);
    Ok(StoreReport {
        templates: a.templates,
        first_template_bytes: first,
        max_increment_bytes: max_inc,
        avg_increment_bytes: avg_inc,
        max_increment_pct_of_first: 100.0 * max_inc as f64 / first.max(1) as f64,
        logical_bytes: logical,
        physical_bytes: physical,
        dedup_ratio: logical as f64 / physical.max(1) as f64,
    })
}

/// Create templates `fn0`.. in `dedup_store`, each from its own script written to `scripts`;
/// returns the store's size on disk after each.
fn create_function_templates(
    a: &BenchArgs,
    dedup_store: &Path,
    scripts: &Path,
) -> Result<Vec<u64>, String> {
    let hello = std::fs::read_to_string(a.examples.join("hello.js")).map_err(|e| e.to_string())?;
    let mut sizes = Vec::new();
    for i in 0..a.templates {
        // Twenty different functions: each greets differently and computes its own field.
        let src = format!(
            "{}\nconst extra{i} = Array.from({{ length: {n} }}, (_, k) => k * {i}).reduce((x, y) => x + y, 0);\n",
            hello.replace("Hello", &format!("Greeting{i}")),
            n = 10 + i
        );
        let file = scripts.join(format!("fn{i}.js"));
        std::fs::write(&file, src).map_err(|e| e.to_string())?;
        let function_args = [
            "--module".into(),
            s(&a.qjs),
            "--runtime".into(),
            "qjs".into(),
            "--file".into(),
            s(&file),
            "--arg".into(),
            format!("fn{i}.js"),
        ];
        create_template(&format!("fn{i}"), dedup_store, &function_args)?;
        sizes.push(dir_bytes(dedup_store));
    }
    Ok(sizes)
}

/// What full snapshots of templates `fn0`.. in `dedup_store` would take: their non-zero pages.
fn logical_bytes(dedup_store: &Path, templates: usize) -> Result<u64, String> {
    let st = snapshot_store::Store::open(dedup_store).map_err(|e| e.to_string())?;
    let mut total = 0u64;
    for i in 0..templates {
        let t = st.load(&format!("fn{i}")).map_err(|e| e.to_string())?;
        let r = t.resolve(&st).map_err(|e| e.to_string())?;
        total += r.nonzero_frames() * 4096;
    }
    Ok(total)
}

fn print_store(r: &StoreReport) {
    println!(
        "## Store: {} JavaScript function templates on one runtime base\n",
        r.templates
    );
    println!("| first template (with its base) | largest later increment | average increment | logical (full snapshots) | physical on disk | dedup |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.2} MiB | {:.1} KiB ({:.1}% of first) | {:.1} KiB | {:.1} MiB | {:.2} MiB | {:.1}x |",
        r.first_template_bytes as f64 / 1048576.0,
        r.max_increment_bytes as f64 / 1024.0,
        finite_or_zero(r.max_increment_pct_of_first),
        r.avg_increment_bytes / 1024.0,
        r.logical_bytes as f64 / 1048576.0,
        r.physical_bytes as f64 / 1048576.0,
        finite_or_zero(r.dedup_ratio)
    );
    println!();
}

/// Hostcalls the exit measurement's guest makes.
const EXIT_HOSTCALLS: u32 = 2000;

/// Section `floor`: VM creation alone, in this process, and the cost of one exit: a guest
/// that makes `EXIT_HOSTCALLS` hostcalls against one that makes none.
fn floor() -> Result<FloorReport, String> {
    let vm_create_ms = vm_create_median_ms()?;
    let dir = std::env::temp_dir().join(format!("vmm-bench-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let times = hostcall_function_ms(&dir, EXIT_HOSTCALLS)
        .and_then(|with| Ok((with, hostcall_function_ms(&dir, 0)?)));
    let _ = std::fs::remove_dir_all(&dir);
    let (with, without) = times?;
    Ok(FloorReport {
        vm_create_ms,
        exit_us: (with - without) * 1e3 / f64::from(EXIT_HOSTCALLS),
    })
}

/// Median of 20 creations of a VM (KVM_CREATE_VM, memory slot, vCPU), in ms.
fn vm_create_median_ms() -> Result<f64, String> {
    let mut create = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mem = crate::memory::GuestMemory::new(64 << 20).map_err(|e| e.to_string())?;
        let vm = crate::vm::Vm::new(mem).map_err(|e| e.to_string())?;
        create.push(ms(t.elapsed()));
        drop(vm);
    }
    Ok(percentile(&create, 0.5))
}

/// Median `function_ms` of 5 `vmm run`s of a guest (written to `dir`) that makes `n` hostcalls.
fn hostcall_function_ms(dir: &Path, n: u32) -> Result<f64, String> {
    let file = dir.join(format!("exits{n}.wat"));
    std::fs::write(&file, EXITS_WAT.replace("COUNT", &n.to_string())).map_err(|e| e.to_string())?;
    let args = ["run".into(), "--json".into(), "--module".into(), s(&file)];
    let mut t = Vec::new();
    for _ in 0..5 {
        let run = invoke_json(&args, b"", &[("VMM_TEST_HOSTCALLS", "1")])?;
        t.push(run.stats.function_ms);
    }
    Ok(percentile(&t, 0.5))
}

fn print_floor(r: &FloorReport) {
    println!("## Floor on this machine\n");
    println!("| VM creation (VM + memory slot + vCPU) | one exit (guest -> vmm -> guest) |");
    println!("|---:|---:|");
    println!(
        "| {:.3} ms | {:.1} us |",
        finite_or_zero(r.vm_create_ms),
        r.exit_us
    );
    println!();
}

/// Section `native`: examples/compute.wat under wasmi in the guest (`vmm run`) and in this
/// process, median of 5 each.
fn native(a: &BenchArgs) -> Result<NativeReport, String> {
    let wasm =
        crate::cli::read_module(&a.examples.join("compute.wat")).map_err(|e| e.to_string())?;
    let args = [
        "run".into(),
        "--module".into(),
        s(&a.examples.join("compute.wat")),
        "--json".into(),
    ];
    let mut guest = Vec::new();
    let mut host = Vec::new();
    for _ in 0..5 {
        guest.push(invoke_json(&args, b"", &[])?.stats.function_ms);
        host.push(host_wasmi_ms(&wasm)?);
    }
    let (g, h) = (percentile(&guest, 0.5), percentile(&host, 0.5));
    Ok(NativeReport {
        guest_ms: g,
        host_ms: h,
        ratio: g / h,
    })
}

fn print_native(r: &NativeReport) {
    println!(
        "## Native speed: examples/compute.wat under wasmi, guest vs host process (median of 5)\n"
    );
    println!("| in the guest (vmm run) | in a host process | guest / host |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.1} ms | {:.1} ms | {:.2} |",
        r.guest_ms, r.host_ms, r.ratio
    );
    println!();
}

/// A guest that makes COUNT hostcalls (GetFunction with an empty buffer: the VMM answers
/// with the config length and writes nothing) through the test-only raw hostcall import.
const EXITS_WAT: &str = r#"(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start") (local $i i32)
    (block $d (loop $l
      (br_if $d (i32.ge_u (local.get $i) (i32.const COUNT)))
      (drop (call $hc (i64.const 1) (i64.const 0) (i64.const 0) (i64.const 0) (i64.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))))"#;

/// Run `_start` of `wasm` with wasmi in this process; returns its duration in ms.
fn host_wasmi_ms(wasm: &[u8]) -> Result<f64, String> {
    let engine = wasmi::Engine::default();
    let module = wasmi::Module::new(&engine, wasm).map_err(|e| e.to_string())?;
    let mut store = wasmi::Store::new(&engine, ());
    let linker = wasmi::Linker::<()>::new(&engine);
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| e.to_string())?;
    let start = instance
        .get_typed_func::<(), ()>(&store, "_start")
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    start.call(&mut store, ()).map_err(|e| e.to_string())?;
    Ok(ms(t0.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    /// What `vmm run --json` / `vmm restore --json` print (`cli::finish`), around real `Stats`.
    fn printed(stats: &crate::run::Stats) -> Vec<u8> {
        serde_json::json!({
            "status": 0,
            "reason": "exit",
            "exit_code": 0,
            "error": null,
            "stdout": "{}",
            "stderr": "",
            "stdout_truncated": false,
            "stderr_truncated": false,
            "stats": stats,
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn reads_the_stats_that_run_and_restore_print() {
        let mut stats = crate::run::Stats {
            mode: "cold",
            total_ms: 12.5,
            function_ms: 3.25,
            exits: 7,
            ..Default::default()
        };
        let cold = parse_stats(&args("run --json"), &printed(&stats)).unwrap();
        assert_eq!(
            (cold.total_ms, cold.function_ms, cold.exits),
            (12.5, 3.25, 7)
        );
        assert!(cold.restore.is_none());

        stats.restore = Some(crate::snapshot::RestoreStats {
            strategy: Some(MemoryStrategy::Lazy),
            pages_installed: 11,
            uffd_faults: 13,
            bytes_from_store: 17 * 4096,
            ..Default::default()
        });
        let restored = parse_stats(&args("restore hello --json"), &printed(&stats)).unwrap();
        let r = restored.restore.unwrap();
        assert_eq!(
            (r.pages_installed, r.uffd_faults, r.bytes_from_store),
            (11, 13, 17 * 4096)
        );
    }

    #[test]
    fn an_unreadable_report_is_an_error_naming_the_command() {
        for stdout in [
            &b"Hello, bench!"[..],
            b"",
            // What a failure before any run prints: no stats.
            br#"{"status":1,"reason":"vmm_error","exit_code":null,"error":"x"}"#,
            br#"{"stats":{"total_ms":"fast","function_ms":1.0,"exits":1}}"#,
        ] {
            let e = parse_stats(&args("restore hello --json"), stdout).unwrap_err();
            assert!(
                e.contains("JSON report of `vmm restore hello --json`"),
                "{e}"
            );
        }
    }

    fn timed(ms: f64, total_ms: f64, restore: Option<(u64, u64, u64)>) -> Timed {
        Timed {
            ms,
            stats: StatsJson {
                total_ms,
                function_ms: 0.0,
                exits: if restore.is_some() { 1 } else { 3 },
                restore: restore.map(|(p, f, b)| RestoreStatsJson {
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

    #[test]
    fn the_json_report_keeps_its_shape() {
        let samples: Vec<Vec<Timed>> = MODES.iter().map(|_| Vec::new()).collect();
        let report = BenchReport {
            latency: Some(latency_rows("hello", &samples)),
            warm: Some(vec![WarmRow {
                function: "hello",
                strategy: MemoryStrategy::Eager,
                median_ms: 2.0,
                p90_ms: 3.0,
                vs_cold_in_vmm: f64::NAN,
            }]),
            floor: Some(FloorReport {
                vm_create_ms: 0.25,
                exit_us: 40.0,
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&report).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        // Sections left out are absent, not null; keys are sorted as they always were.
        assert_eq!(keys(&v), ["floor", "latency", "warm"]);
        let row = &v["latency"][0];
        assert_eq!(
            keys(row),
            [
                "bytes_from_store",
                "function",
                "guest_exits",
                "median_ms",
                "mode",
                "p90_ms",
                "pages_installed",
                "speedup",
                "uffd_faults",
                "vmm_median_ms",
                "vmm_speedup"
            ]
        );
        // No samples: no counters, and ratios that are undefined are null.
        assert!(row["pages_installed"].is_null() && row["guest_exits"].is_null());
        assert!(row["speedup"].is_null() && row["vmm_speedup"].is_null());
        assert_eq!(row["median_ms"], 0.0);
        let warm = &v["warm"][0];
        assert_eq!(
            keys(warm),
            [
                "function",
                "median_ms",
                "p90_ms",
                "strategy",
                "vs_cold_in_vmm"
            ]
        );
        // The JSON and the table name a strategy as `--memory` does.
        assert_eq!(warm["strategy"], "eager");
        assert_eq!(strategy_name(MemoryStrategy::Eager), "eager");
        assert!(warm["vs_cold_in_vmm"].is_null());
        assert_eq!(keys(&v["floor"]), ["exit_us", "vm_create_ms"]);
    }
}
