//! Section `engines`: the same workloads under each engine the guest has and under wasmtime in
//! this host process, side by side in one run; then cold runs (with and without a cached
//! compiled artifact) and restores per engine.
//!
//! Guest wasmtime exists only in builds whose `vmm run` takes `--engine`; the section asks
//! this binary's `--help` and says "not available in this build" otherwise, so it runs on
//! builds with and without it. Run times of the loops are measured inside the runtime (the
//! scripts print them), so that process start, compilation and restore are left out.

use super::process::{invoke, invoke_with_env, parse_stats, s, Invocation};
use super::util::percentile;
use super::BenchArgs;
use crate::hostwasm::{HostEngine, HostRuntime, WasiInvocation};
use std::path::{Path, PathBuf};
use vmm::stats::ms;

/// What a cell shows for guest wasmtime in a build without `--engine`.
pub(super) const NOT_AVAILABLE: &str = "not available in this build";

/// Everything the section measured; `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnginesReport {
    /// Whether this build's `vmm run` takes `--engine` (and so runs wasmtime in the guest).
    pub guest_wasmtime_available: bool,
    /// Whether this build's `vmm template create` takes `--engine`.
    pub template_engine_available: bool,
    /// Runs per cell (each cell is the median).
    pub runs: usize,
    /// Iterations of each loop inside the runtime, after a warm-up of a fifth of them.
    pub loop_iterations: u32,
    pub workloads: Vec<EngineRow>,
    pub starts: Vec<StartRow>,
}

/// One workload under every engine. Times in ms per iteration (per run of compute.wat, per
/// render, per Python request); `None` where the engine is not there (see `missing`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineRow {
    pub workload: &'static str,
    pub unit: &'static str,
    pub guest_wasmi_ms: Option<f64>,
    pub guest_wasmtime_ms: Option<f64>,
    pub host_wasmtime_ms: Option<f64>,
    pub guest_wasmtime_over_host_wasmtime: Option<f64>,
    pub guest_wasmi_over_guest_wasmtime: Option<f64>,
    /// Why the whole row could not be measured (a workload that is not fetched).
    pub missing: Option<String>,
}

/// Time to response of one function with one guest engine: cold `vmm run` processes without
/// and with a compiled artifact cached in the store, and `vmm restore` processes of a template
/// created with that engine. Medians of whole-process wall times, ms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartRow {
    pub function: &'static str,
    pub engine: &'static str,
    /// Whether this build has the engine (see [`NOT_AVAILABLE`]).
    pub available: bool,
    pub cold_uncached_ms: Option<f64>,
    /// `None` when the run's `--json` stats say nothing of a compiled-artifact cache.
    pub cold_cached_ms: Option<f64>,
    /// What the stats of the last uncached and the last cached run said of the cache (the
    /// field's name and value); `None` when they say nothing of it.
    pub artifact_cache_uncached: Option<String>,
    pub artifact_cache: Option<String>,
    /// `None` when `template create` cannot be given this engine.
    pub restore_ms: Option<f64>,
    /// The cold median (with the artifact cached, where there is a cache) over the restore
    /// median.
    pub cold_over_restore: Option<f64>,
    pub missing: Option<String>,
}

/// What this build's command line offers.
#[derive(Debug, Clone, Copy)]
struct Capabilities {
    run_engine: bool,
    template_engine: bool,
    run_store: bool,
}

/// Whether `vmm <args> --help` lists `flag`.
fn help_lists(args: &[&str], flag: &str) -> Result<bool, String> {
    let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    v.push("--help".into());
    let help = invoke(&v, b"")?;
    Ok(String::from_utf8_lossy(&help.stdout)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .any(|w| w == flag))
}

fn capabilities() -> Result<Capabilities, String> {
    Ok(Capabilities {
        run_engine: help_lists(&["run"], "--engine")?,
        template_engine: help_lists(&["template", "create"], "--engine")?,
        run_store: help_lists(&["run"], "--store")?,
    })
}

/// `vmm run [--json] ARGS` with `input` on stdin, its store (where builds that cache compiled
/// artifacts keep them) at `store_dir`: through `$VMM_STORE`, and `--store` where the build
/// takes it. Never the user's default store.
fn guest_run(
    caps: &Capabilities,
    store_dir: &Path,
    json: bool,
    args: impl IntoIterator<Item = String>,
    input: &[u8],
) -> Result<(Vec<String>, Invocation), String> {
    let mut v = vec!["run".to_string()];
    if json {
        v.push("--json".into());
    }
    if caps.run_store {
        v.extend(["--store".into(), s(store_dir)]);
    }
    v.extend(args);
    let store_env = s(store_dir);
    let inv = invoke_with_env(&v, input, &[("VMM_STORE", &store_env)])?;
    Ok((v, inv))
}

/// The guest engines, in column order.
const GUEST_ENGINES: [&str; 2] = ["wasmi", "wasmtime"];

/// The arguments that select `engine` where the build takes `--engine` (`has_flag`); `None`
/// if the build cannot run it. Builds without the flag run wasmi only.
fn engine_args(engine: &str, has_flag: bool) -> Option<Vec<String>> {
    match (has_flag, engine) {
        (true, e) => Some(vec!["--engine".into(), e.into()]),
        (false, "wasmi") => Some(Vec::new()),
        (false, _) => None,
    }
}

/// The line the loop scripts print last: `per-iteration ms=M iterations=N check=C`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PerIteration {
    pub(super) ms: f64,
    pub(super) check: String,
}

/// The longest `check` a loop may print.
const MAX_CHECK_LEN: usize = 64;

/// Read the `per-iteration` line of a loop's output (the last one if several): its time must
/// be a finite, non-negative number of ms, its iteration count `iterations`, its check a short
/// word. Anything else is an error saying what was wrong.
pub(super) fn parse_per_iteration(stdout: &[u8], iterations: u32) -> Result<PerIteration, String> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix("per-iteration "))
        .ok_or("no `per-iteration` line in its output")?;
    let (mut ms, mut n, mut check) = (None, None, None);
    for field in line.split_ascii_whitespace() {
        match field.split_once('=') {
            Some(("ms", v)) => ms = v.parse::<f64>().ok(),
            Some(("iterations", v)) => n = v.parse::<u32>().ok(),
            Some(("check", v)) => check = Some(v),
            _ => {
                return Err(format!(
                    "unexpected field {field:?} in `per-iteration {line}`"
                ))
            }
        }
    }
    let ms = ms
        .filter(|m| m.is_finite() && *m >= 0.0)
        .ok_or_else(|| format!("no valid ms= in `per-iteration {line}`"))?;
    if n != Some(iterations) {
        return Err(format!(
            "`per-iteration {line}`: expected iterations={iterations}"
        ));
    }
    let check = check
        .filter(|c| {
            !c.is_empty()
                && c.len() <= MAX_CHECK_LEN
                && c.bytes().all(|b| b.is_ascii_alphanumeric())
        })
        .ok_or_else(|| format!("no valid check= in `per-iteration {line}`"))?;
    Ok(PerIteration {
        ms,
        check: check.to_string(),
    })
}

/// `a / b` where both are there.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

/// A ratio as the table shows it: `-` where either side is missing or it is undefined.
pub(super) fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}x"),
        _ => "-".into(),
    }
}

/// A time as the table shows it; `absent` where there is none.
fn fmt_ms(v: Option<f64>, absent: &str) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => absent.into(),
    }
}

/// Section `engines`.
pub(super) fn engines(a: &BenchArgs, store: &Path) -> Result<EnginesReport, String> {
    let caps = capabilities()?;
    let host = HostEngine::new().map_err(|e| e.to_string())?;
    let runs = a.engine_runs as usize;
    let scratch = store.join("engines");
    std::fs::create_dir_all(&scratch).map_err(|e| format!("create {}: {e}", scratch.display()))?;
    let workloads = vec![
        compute_row(a, &caps, &host, &scratch)?,
        markdown_row(a, &caps, &host, &scratch)?,
        python_row(a, &caps, &host, &scratch)?,
    ];
    let starts = start_rows(a, &caps, &scratch)?;
    Ok(EnginesReport {
        guest_wasmtime_available: caps.run_engine,
        template_engine_available: caps.template_engine,
        runs,
        loop_iterations: a.loop_iterations,
        workloads,
        starts,
    })
}

/// One cell per column, `runs` samples each, the columns interleaved run by run.
struct Columns {
    guest: [Option<Vec<f64>>; 2],
    host: Vec<f64>,
}

impl Columns {
    fn new(caps: &Capabilities) -> Columns {
        Columns {
            guest: GUEST_ENGINES.map(|e| engine_args(e, caps.run_engine).map(|_| Vec::new())),
            host: Vec::new(),
        }
    }

    fn row(&self, workload: &'static str, unit: &'static str) -> EngineRow {
        let med = |v: &Vec<f64>| percentile(v, 0.5);
        let [wasmi, wasmtime] = self.guest.each_ref().map(|c| c.as_ref().map(med));
        let host = Some(med(&self.host));
        EngineRow {
            workload,
            unit,
            guest_wasmi_ms: wasmi,
            guest_wasmtime_ms: wasmtime,
            host_wasmtime_ms: host,
            guest_wasmtime_over_host_wasmtime: ratio(wasmtime, host),
            guest_wasmi_over_guest_wasmtime: ratio(wasmi, wasmtime),
            missing: None,
        }
    }
}

/// examples/compute.wat: `_start` (40 rounds of `run`) in the guest (`function_ms` of
/// `vmm run --json`) and in this process (the call alone).
fn compute_row(
    a: &BenchArgs,
    caps: &Capabilities,
    host: &HostEngine,
    scratch: &Path,
) -> Result<EngineRow, String> {
    let path = a.examples.join("compute.wat");
    let wasm = crate::cli::read_module(&path).map_err(|e| e.to_string())?;
    let module = host
        .compile(&wasm)
        .map_err(|e| format!("compute.wat in this process: {e}"))?;
    let mut cols = Columns::new(caps);
    for _ in 0..a.engine_runs {
        for (engine, col) in GUEST_ENGINES.iter().zip(cols.guest.iter_mut()) {
            let (Some(col), Some(flags)) = (col, engine_args(engine, caps.run_engine)) else {
                continue;
            };
            let args = ["--module".to_string(), s(&path)].into_iter().chain(flags);
            let (args, inv) = guest_run(caps, &scratch.join("store"), true, args, b"")?;
            col.push(parse_stats(&args, &inv.stdout)?.function_ms);
        }
        let t = host
            .time_start(&module)
            .map_err(|e| format!("compute.wat in this process: {e}"))?;
        cols.host.push(ms(t));
    }
    Ok(cols.row("compute.wat (`_start`: 40 sieve rounds)", "ms per run"))
}

/// A loop script under every engine: what to run and where its files are.
struct Loop<'a> {
    name: &'static str,
    module: &'a Path,
    /// `vmm run` arguments after `--module` (runtime, files, arguments), engine left out.
    guest_args: Vec<String>,
    runtime: HostRuntime,
    /// The whole argv in this process.
    host_argv: Vec<String>,
    /// The files of the guest's tree: host path, name in the tree.
    files: Vec<(PathBuf, &'static str)>,
}

/// Run `l` `engine_runs` times under each engine; every run must print the same check.
fn loop_row(
    a: &BenchArgs,
    caps: &Capabilities,
    host: &HostEngine,
    scratch: &Path,
    l: &Loop<'_>,
    unit: &'static str,
) -> Result<EngineRow, String> {
    let dir = scratch.join(l.name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    for (from, to) in &l.files {
        std::fs::copy(from, dir.join(to))
            .map_err(|e| format!("copy {} for {}: {e}", from.display(), l.name))?;
    }
    let wasm = crate::cli::read_module(l.module).map_err(|e| e.to_string())?;
    let module = host
        .compile(&wasm)
        .map_err(|e| format!("{} in this process: {e}", l.name))?;
    let mut cols = Columns::new(caps);
    let mut checks: Vec<(String, String)> = Vec::new();
    for _ in 0..a.engine_runs {
        for (engine, col) in GUEST_ENGINES.iter().zip(cols.guest.iter_mut()) {
            let (Some(col), Some(flags)) = (col, engine_args(engine, caps.run_engine)) else {
                continue;
            };
            let args = ["--module".to_string(), s(l.module)]
                .into_iter()
                .chain(l.guest_args.iter().cloned())
                .chain(flags);
            let (_, out) = guest_run(caps, &scratch.join("store"), false, args, b"")?;
            let p = parse_per_iteration(&out.stdout, a.loop_iterations)
                .map_err(|e| format!("{} under guest {engine}: {e}", l.name))?;
            col.push(p.ms);
            checks.push((format!("guest {engine}"), p.check));
        }
        let out = host
            .run_wasi(
                &module,
                &WasiInvocation {
                    runtime: l.runtime,
                    argv: &l.host_argv,
                    dir: &dir,
                    stdin: b"",
                },
            )
            .map_err(|e| format!("{} in this process: {e}", l.name))?;
        if out.exit_code != 0 {
            return Err(format!(
                "{} in this process exited with code {}: {}",
                l.name,
                out.exit_code,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let p = parse_per_iteration(&out.stdout, a.loop_iterations)
            .map_err(|e| format!("{} in this process: {e}", l.name))?;
        cols.host.push(p.ms);
        checks.push(("host wasmtime".into(), p.check));
    }
    if let Some((who, c)) = checks.iter().find(|(_, c)| *c != checks[0].1) {
        return Err(format!(
            "{}: {} printed check={c}, {} check={}: the engines computed different results",
            l.name, who, checks[0].0, checks[0].1
        ));
    }
    Ok(cols.row(l.name, unit))
}

fn markdown_row(
    a: &BenchArgs,
    caps: &Capabilities,
    host: &HostEngine,
    scratch: &Path,
) -> Result<EngineRow, String> {
    let script = a.examples.join("bench").join("markdown-loop.js");
    let n = a.loop_iterations.to_string();
    let l = Loop {
        name: "QuickJS markdown loop",
        module: &a.qjs,
        guest_args: vec![
            "--runtime".into(),
            "qjs".into(),
            "--file".into(),
            format!("{}:markdown-loop.js", s(&script)),
            "--file".into(),
            format!("{}:marked.esm.js", s(&a.marked)),
            "--arg".into(),
            "markdown-loop.js".into(),
            "--arg".into(),
            n.clone(),
        ],
        runtime: HostRuntime::Qjs,
        host_argv: vec!["qjs".into(), "--std".into(), "markdown-loop.js".into(), n],
        files: vec![
            (script.clone(), "markdown-loop.js"),
            (a.marked.clone(), "marked.esm.js"),
        ],
    };
    loop_row(a, caps, host, scratch, &l, "ms per render")
}

/// What the Python rows say when python.wasm is not there.
pub(super) fn python_missing(a: &BenchArgs) -> String {
    format!(
        "{} is missing: run tools/fetch-workloads.sh",
        a.python.display()
    )
}

const PYTHON_LOOP: &str = "Python request loop";

fn python_row(
    a: &BenchArgs,
    caps: &Capabilities,
    host: &HostEngine,
    scratch: &Path,
) -> Result<EngineRow, String> {
    let unit = "ms per request";
    if !a.python.exists() {
        return Ok(EngineRow {
            workload: PYTHON_LOOP,
            unit,
            guest_wasmi_ms: None,
            guest_wasmtime_ms: None,
            host_wasmtime_ms: None,
            guest_wasmtime_over_host_wasmtime: None,
            guest_wasmi_over_guest_wasmtime: None,
            missing: Some(python_missing(a)),
        });
    }
    let script = a.examples.join("bench").join("python-loop.py");
    let n = a.loop_iterations.to_string();
    let l = Loop {
        name: PYTHON_LOOP,
        module: &a.python,
        guest_args: vec![
            "--file".into(),
            format!("{}:python-loop.py", s(&script)),
            "--arg".into(),
            "python-loop.py".into(),
            "--arg".into(),
            n.clone(),
        ],
        runtime: HostRuntime::Command,
        host_argv: vec!["python.wasm".into(), "python-loop.py".into(), n],
        files: vec![(script.clone(), "python-loop.py")],
    };
    loop_row(a, caps, host, scratch, &l, unit)
}

/// A function of the start rows.
struct StartFunction {
    label: &'static str,
    /// `vmm run` / `template create` arguments, engine left out.
    args: Vec<String>,
    input: &'static [u8],
    missing: Option<String>,
}

fn start_functions(a: &BenchArgs) -> Vec<StartFunction> {
    let python = a.examples.join("hello.py");
    vec![
        StartFunction {
            label: "markdown (86-byte request)",
            args: vec![
                "--module".into(),
                s(&a.qjs),
                "--runtime".into(),
                "qjs".into(),
                "--file".into(),
                s(&a.examples.join("markdown.js")),
                "--arg".into(),
                "markdown.js".into(),
                "--file".into(),
                format!("{}:marked.esm.js", s(&a.marked)),
            ],
            input: super::MARKDOWN_REQUEST,
            missing: None,
        },
        StartFunction {
            label: "Python hello",
            args: vec![
                "--module".into(),
                s(&a.python),
                "--runtime".into(),
                "python".into(),
                "--file".into(),
                s(&python),
                "--arg".into(),
                "hello.py".into(),
            ],
            input: br#"{"name":"bench"}"#,
            missing: (!a.python.exists()).then(|| python_missing(a)),
        },
    ]
}

/// The field of `stats` (of `vmm run --json`) that tells about a compiled-artifact cache, as
/// `name=value`: the first key, at the top or one object down, whose name mentions a cache.
pub(super) fn artifact_cache_field(stats: &serde_json::Value) -> Option<String> {
    let obj = stats.as_object()?;
    let is_cache = |k: &str| k.to_ascii_lowercase().contains("cache");
    let found = obj
        .iter()
        .find(|(k, _)| is_cache(k))
        .map(|(k, v)| (k.clone(), v))
        .or_else(|| {
            obj.iter().find_map(|(k, v)| {
                let inner = v.as_object()?;
                inner
                    .iter()
                    .find(|(ik, _)| is_cache(ik))
                    .map(|(ik, iv)| (format!("{k}.{ik}"), iv))
            })
        })?;
    let (name, value) = found;
    let value = match value {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    // Bounded: what a build prints there is shown in a table cell.
    Some(format!("{name}={value}").chars().take(80).collect())
}

/// One cold `vmm run --json` of `f` with `engine_flags`, the store (for compiled artifacts)
/// at `store_dir`; its wall time and its stats.
fn cold_run(
    f: &StartFunction,
    engine_flags: &[String],
    caps: &Capabilities,
    store_dir: &Path,
) -> Result<(f64, serde_json::Value), String> {
    let args = f.args.iter().chain(engine_flags).cloned();
    let (args, inv) = guest_run(caps, store_dir, true, args, f.input)?;
    let v: serde_json::Value = serde_json::from_slice(&inv.stdout)
        .map_err(|e| format!("read the JSON report of `vmm {}`: {e}", args.join(" ")))?;
    Ok((inv.ms, v.get("stats").cloned().unwrap_or_default()))
}

/// Cold runs without and with a cached artifact and restores, per function and guest engine.
fn start_rows(a: &BenchArgs, caps: &Capabilities, scratch: &Path) -> Result<Vec<StartRow>, String> {
    let mut rows = Vec::new();
    for (fi, f) in start_functions(a).iter().enumerate() {
        for engine in GUEST_ENGINES {
            let mut row = StartRow {
                function: f.label,
                engine,
                available: engine_args(engine, caps.run_engine).is_some(),
                cold_uncached_ms: None,
                cold_cached_ms: None,
                artifact_cache_uncached: None,
                artifact_cache: None,
                restore_ms: None,
                cold_over_restore: None,
                missing: f.missing.clone(),
            };
            if row.missing.is_none() {
                if let Some(flags) = engine_args(engine, caps.run_engine) {
                    let tag = format!("f{fi}-{engine}");
                    measure_starts(a, caps, &scratch.join(tag), f, engine, &flags, &mut row)?;
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

fn measure_starts(
    a: &BenchArgs,
    caps: &Capabilities,
    dir: &Path,
    f: &StartFunction,
    engine: &str,
    flags: &[String],
    row: &mut StartRow,
) -> Result<(), String> {
    // A store kept for the cached runs and the template (filled by one run first), and one
    // per uncached run.
    let cached_store = dir.join("cached");
    cold_run(f, flags, caps, &cached_store)?;
    // Templates record their engine only in builds whose `template create` takes `--engine`;
    // a build with no `--engine` anywhere has wasmi alone.
    let template_flags = if caps.template_engine {
        Some(vec!["--engine".to_string(), engine.into()])
    } else {
        engine_args(engine, caps.run_engine).filter(|_| !caps.run_engine)
    };
    let template = template_flags.is_some();
    if let Some(flags) = template_flags {
        let mut args = vec![
            "template".to_string(),
            "create".into(),
            "fn".into(),
            "--store".into(),
            s(&cached_store),
        ];
        args.extend(f.args.iter().cloned());
        args.extend(flags);
        invoke(&args, b"")?;
    }
    let (mut uncached, mut cached, mut restored) = (Vec::new(), Vec::new(), Vec::new());
    let (mut uncached_field, mut cache_field) = (None, None);
    for i in 0..a.engine_runs {
        let fresh = dir.join(format!("uncached-{i}"));
        let (t, stats) = cold_run(f, flags, caps, &fresh)?;
        uncached_field = artifact_cache_field(&stats);
        uncached.push(t);
        let _ = std::fs::remove_dir_all(&fresh);
        let (t, stats) = cold_run(f, flags, caps, &cached_store)?;
        cache_field = artifact_cache_field(&stats);
        cached.push(t);
        if template {
            let args = vec![
                "restore".to_string(),
                "fn".into(),
                "--store".into(),
                s(&cached_store),
            ];
            restored.push(invoke(&args, f.input)?.ms);
        }
    }
    let med = |v: &[f64]| (!v.is_empty()).then(|| percentile(v, 0.5));
    row.cold_uncached_ms = med(&uncached);
    let has_cache = uncached_field.is_some() || cache_field.is_some();
    row.cold_cached_ms = med(&cached).filter(|_| has_cache);
    row.artifact_cache_uncached = uncached_field;
    row.artifact_cache = cache_field;
    row.restore_ms = med(&restored);
    row.cold_over_restore = ratio(row.cold_cached_ms.or(row.cold_uncached_ms), row.restore_ms);
    Ok(())
}

/// What the start table shows of the cache: the uncached and the cached run's fields.
fn cache_cell(s: &StartRow) -> String {
    match (&s.artifact_cache_uncached, &s.artifact_cache) {
        (None, None) => "-".into(),
        (u, c) => format!(
            "{} / {}",
            u.as_deref().unwrap_or("-"),
            c.as_deref().unwrap_or("-")
        ),
    }
}

pub(super) fn print_engines(r: &EnginesReport) {
    println!(
        "## Engines: the same work under each engine (median of {} runs each; loops of {} iterations after {} of warm-up, timed inside the runtime)\n",
        r.runs,
        r.loop_iterations,
        r.loop_iterations.div_ceil(5)
    );
    let absent_wasmtime = if r.guest_wasmtime_available {
        "-"
    } else {
        NOT_AVAILABLE
    };
    println!("| workload | unit | guest wasmi | guest wasmtime | host wasmtime | guest wasmtime / host wasmtime | guest wasmi / guest wasmtime |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for w in &r.workloads {
        if let Some(m) = &w.missing {
            println!("| {} | {} | {m} | - | - | - | - |", w.workload, w.unit);
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            w.workload,
            w.unit,
            fmt_ms(w.guest_wasmi_ms, "-"),
            fmt_ms(w.guest_wasmtime_ms, absent_wasmtime),
            fmt_ms(w.host_wasmtime_ms, "-"),
            fmt_ratio(w.guest_wasmtime_over_host_wasmtime),
            fmt_ratio(w.guest_wasmi_over_guest_wasmtime),
        );
    }
    println!();
    println!(
        "## Engines: time to response per guest engine (whole processes, median of {} each)\n",
        r.runs
    );
    println!("Cold: `vmm run` with no compiled artifact in its store, then with one cached there (`-` when the run's stats report no artifact cache; the cache column shows what they report, uncached run / cached run). Restore: `vmm restore` of a template created with that engine. Cold / restore: the cached cold run where there is a cache.\n");
    println!("| function | engine | cold, nothing cached ms | cold, artifact cached ms | cache (--json stats) | restore ms | cold / restore |");
    println!("|---|---|---:|---:|---|---:|---:|");
    for s in &r.starts {
        if let Some(m) = &s.missing {
            println!("| {} | {} | {m} | - | - | - | - |", s.function, s.engine);
            continue;
        }
        if !s.available {
            println!(
                "| {} | {} | {NOT_AVAILABLE} | - | - | - | - |",
                s.function, s.engine
            );
            continue;
        }
        let restore_absent = if r.template_engine_available {
            "-"
        } else {
            NOT_AVAILABLE
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            s.function,
            s.engine,
            fmt_ms(s.cold_uncached_ms, "-"),
            fmt_ms(s.cold_cached_ms, "-"),
            cache_cell(s),
            fmt_ms(s.restore_ms, restore_absent),
            fmt_ratio(s.cold_over_restore),
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_per_iteration_line() {
        let out = b"warming up\nper-iteration ms=3.5712 iterations=200 check=b67321a5\n";
        assert_eq!(
            parse_per_iteration(out, 200).unwrap(),
            PerIteration {
                ms: 3.5712,
                check: "b67321a5".into()
            }
        );
        // The last line counts; trailing spaces and a missing final newline are fine.
        let out = b"per-iteration ms=9 iterations=5 check=a\nper-iteration ms=0.25 iterations=5 check=ff  ";
        assert_eq!(parse_per_iteration(out, 5).unwrap().ms, 0.25);
    }

    #[test]
    fn a_bad_per_iteration_line_is_an_error_saying_what_is_wrong() {
        for (out, wanted) in [
            (&b""[..], "no `per-iteration` line"),
            (b"3.5 ms per render\n", "no `per-iteration` line"),
            (b"per-iteration ms=NaN iterations=5 check=a", "no valid ms="),
            (b"per-iteration ms=inf iterations=5 check=a", "no valid ms="),
            (b"per-iteration ms=-1 iterations=5 check=a", "no valid ms="),
            (
                b"per-iteration ms=fast iterations=5 check=a",
                "no valid ms=",
            ),
            (b"per-iteration iterations=5 check=a", "no valid ms="),
            (
                b"per-iteration ms=1 iterations=4 check=a",
                "expected iterations=5",
            ),
            (b"per-iteration ms=1 check=a", "expected iterations=5"),
            (b"per-iteration ms=1 iterations=5", "no valid check="),
            (b"per-iteration ms=1 iterations=5 check=", "no valid check="),
            (
                b"per-iteration ms=1 iterations=5 check=a|b",
                "no valid check=",
            ),
            (
                b"per-iteration ms=1 iterations=5 check=a speed=2",
                "unexpected field",
            ),
        ] {
            let e = parse_per_iteration(out, 5).unwrap_err();
            assert!(
                e.contains(wanted),
                "{:?}: {e}",
                String::from_utf8_lossy(out)
            );
        }
        let long = format!("per-iteration ms=1 iterations=5 check={}", "a".repeat(65));
        assert!(parse_per_iteration(long.as_bytes(), 5).is_err());
    }

    #[test]
    fn ratios_are_shown_only_where_both_sides_are_there() {
        assert_eq!(fmt_ratio(ratio(Some(3.0), Some(2.0))), "1.50x");
        assert_eq!(fmt_ratio(ratio(None, Some(2.0))), "-");
        assert_eq!(fmt_ratio(ratio(Some(3.0), None)), "-");
        assert_eq!(fmt_ratio(ratio(Some(3.0), Some(0.0))), "-");
        assert_eq!(fmt_ratio(ratio(Some(0.0), Some(0.0))), "-");
        assert_eq!(fmt_ms(Some(0.3312), "-"), "0.331");
        assert_eq!(fmt_ms(None, NOT_AVAILABLE), NOT_AVAILABLE);
        assert_eq!(fmt_ms(Some(f64::NAN), "-"), "-");
    }

    #[test]
    fn engines_are_selected_only_where_the_build_has_them() {
        assert_eq!(
            engine_args("wasmtime", true),
            Some(vec!["--engine".to_string(), "wasmtime".into()])
        );
        assert_eq!(
            engine_args("wasmi", true),
            Some(vec!["--engine".to_string(), "wasmi".into()])
        );
        // Before `--engine` existed the guest ran wasmi only, without any flag.
        assert_eq!(engine_args("wasmi", false), Some(Vec::new()));
        assert_eq!(engine_args("wasmtime", false), None);
    }

    fn start_row(available: bool) -> StartRow {
        StartRow {
            function: "Python hello",
            engine: "wasmtime",
            available,
            cold_uncached_ms: available.then_some(900.0),
            cold_cached_ms: None,
            artifact_cache_uncached: None,
            artifact_cache: None,
            restore_ms: available.then_some(9.0),
            cold_over_restore: ratio(available.then_some(900.0), available.then_some(9.0)),
            missing: None,
        }
    }

    #[test]
    fn the_json_report_keeps_its_shape() {
        let r = EnginesReport {
            guest_wasmtime_available: false,
            template_engine_available: false,
            runs: 1,
            loop_iterations: 3,
            workloads: vec![EngineRow {
                workload: "QuickJS markdown loop",
                unit: "ms per render",
                guest_wasmi_ms: Some(3.5),
                guest_wasmtime_ms: None,
                host_wasmtime_ms: Some(0.25),
                guest_wasmtime_over_host_wasmtime: None,
                guest_wasmi_over_guest_wasmtime: None,
                missing: None,
            }],
            starts: vec![start_row(false)],
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&v),
            [
                "guest_wasmtime_available",
                "loop_iterations",
                "runs",
                "starts",
                "template_engine_available",
                "workloads"
            ]
        );
        let w = &v["workloads"][0];
        assert_eq!(
            keys(w),
            [
                "guest_wasmi_ms",
                "guest_wasmi_over_guest_wasmtime",
                "guest_wasmtime_ms",
                "guest_wasmtime_over_host_wasmtime",
                "host_wasmtime_ms",
                "missing",
                "unit",
                "workload"
            ]
        );
        // An engine the build does not have is null, not zero.
        assert!(w["guest_wasmtime_ms"].is_null() && w["guest_wasmi_over_guest_wasmtime"].is_null());
        assert_eq!(w["host_wasmtime_ms"], 0.25);
        let s = &v["starts"][0];
        assert_eq!(
            keys(s),
            [
                "artifact_cache",
                "artifact_cache_uncached",
                "available",
                "cold_cached_ms",
                "cold_over_restore",
                "cold_uncached_ms",
                "engine",
                "function",
                "missing",
                "restore_ms"
            ]
        );
        assert_eq!(s["available"], false);
        assert!(s["cold_uncached_ms"].is_null());
    }

    #[test]
    fn the_cache_cell_shows_both_runs_or_a_dash() {
        let mut s = start_row(true);
        assert_eq!(cache_cell(&s), "-");
        s.artifact_cache_uncached = Some("compile.cache=miss".into());
        s.artifact_cache = Some("compile.cache=hit".into());
        assert_eq!(cache_cell(&s), "compile.cache=miss / compile.cache=hit");
        s.artifact_cache_uncached = None;
        assert_eq!(cache_cell(&s), "- / compile.cache=hit");
        assert_eq!(start_row(true).cold_over_restore, Some(100.0));
    }

    #[test]
    fn the_artifact_cache_is_read_from_whatever_stats_field_names_it() {
        use serde_json::json;
        assert_eq!(
            artifact_cache_field(&json!({"total_ms": 1.0, "exits": 3})),
            None
        );
        assert_eq!(artifact_cache_field(&json!(null)), None);
        assert_eq!(
            artifact_cache_field(&json!({"total_ms": 1.0, "artifact_cache": "hit"})).as_deref(),
            Some("artifact_cache=hit")
        );
        assert_eq!(
            artifact_cache_field(&json!({"compile": {"ms": 0.0, "cache_hit": true}})).as_deref(),
            Some("compile.cache_hit=true")
        );
        let long = artifact_cache_field(&json!({"cache": "x".repeat(500)})).unwrap();
        assert_eq!(long.chars().count(), 80);
    }
}
