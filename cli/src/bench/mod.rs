//! `vmm bench`: every figure the README quotes, measured side by side in one run.
//!
//! Times to response are wall-clock times of whole `vmm run` / `vmm restore` processes
//! (what a user waits for), interleaved round-robin so that the noise of a shared machine
//! falls on every mode alike. Ratios are only meaningful within one run.

mod engines;
mod floor;
mod latency;
mod native;
mod oneshot;
mod process;
mod shapes;
mod store;
mod throughput;
mod util;

pub use engines::EnginesReport;
pub use floor::FloorReport;
pub use latency::{LatencyRow, WarmRow};
pub use native::NativeReport;
pub use oneshot::OneShotRow;
pub use shapes::ShapesReport;
pub use store::StoreReport;
pub use throughput::ThroughputRow;

use process::s;
use std::path::{Path, PathBuf};

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
    /// Directory with the example functions (hello.js, markdown.js, compute.wat, the
    /// `shapes` section's alloc.js, imports.py and primes.js).
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
    /// Number of function templates for the dedup measurement.
    #[arg(long, default_value_t = 20)]
    pub templates: usize,
    /// Seconds per restores-per-second measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// CPython for WASI (fetched by tools/fetch-workloads.sh); the Python rows of the
    /// `engines` and `shapes` sections say it is missing when it is not there.
    #[arg(long, default_value = "workloads/python.wasm")]
    pub python: PathBuf,
    /// Runs of each workload per engine in the `engines` section (each cell is their median).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub engine_runs: u32,
    /// Iterations of the `engines` section's loops inside the runtime (renders of the
    /// Markdown document, Python requests), after a warm-up of a fifth as many.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub loop_iterations: u32,
    /// Processes of each command in the `oneshot` section (interleaved).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub oneshot_runs: u64,
    /// Rounds of the `shapes` section: processes of each of its process columns (cold run,
    /// each restore) per shape, and rounds of served requests.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub shape_runs: u32,
    /// Requests per round, shape and served column in the `shapes` section.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub shape_requests: u32,
    /// Only some sections: any of latency, throughput, store, floor, native, engines,
    /// oneshot, shapes.
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engines: Option<EnginesReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oneshot: Option<Vec<OneShotRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shapes: Option<ShapesReport>,
}

/// The Markdown request of the latency, engines and shapes sections.
const MARKDOWN_REQUEST: &[u8] =
    b"# Bench\n\nSome *emphasis*, a [link](https://example.com) and a list:\n\n- one\n- two\n";

struct Function {
    /// Row label: the function and the size of its request.
    label: &'static str,
    /// Template name (two rows may share a template and differ in the request).
    name: &'static str,
    args: Vec<String>,
    input: &'static [u8],
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
        let latency = latency::latency(a, store, &functions)?;
        if !a.json {
            latency::print_latency(a.iterations, &latency);
        }
        let warm = latency::warm(a, store, &functions, &latency)?;
        if !a.json {
            latency::print_warm(a.iterations, &warm);
        }
        report.latency = Some(latency);
        report.warm = Some(warm);
    }
    if want("throughput") {
        let rows = throughput::throughput(a, store, &functions[0])?;
        if !a.json {
            throughput::print_throughput(a.seconds, &rows);
        }
        report.throughput = Some(rows);
    }
    if want("store") {
        let r = store::store_dedup(a, store)?;
        if !a.json {
            store::print_store(&r);
        }
        report.store = Some(r);
    }
    if want("floor") {
        let r = floor::floor()?;
        if !a.json {
            floor::print_floor(&r);
        }
        report.floor = Some(r);
    }
    if want("native") {
        let r = native::native(a)?;
        if !a.json {
            native::print_native(&r);
        }
        report.native = Some(r);
    }
    if want("oneshot") {
        let rows = oneshot::oneshot(a, store, &functions[0])?;
        if !a.json {
            oneshot::print_oneshot(&rows);
        }
        report.oneshot = Some(rows);
    }
    if want("engines") {
        let r = engines::engines(a, store)?;
        if !a.json {
            engines::print_engines(&r);
        }
        report.engines = Some(r);
    }
    if want("shapes") {
        let r = shapes::shapes_section(a, store)?;
        if !a.json {
            shapes::print_shapes(&r);
        }
        report.shapes = Some(r);
    }
    Ok(report)
}

/// `vmm run` / `vmm template create` arguments of `script` in the examples directory, run
/// by the QuickJS reactor, with `extra` files (`--file` arguments) beside it.
fn qjs_args(a: &BenchArgs, script: &str, extra: &[String]) -> Vec<String> {
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
}

/// The functions the latency sections measure; the first (hello) also the throughput one.
fn functions(a: &BenchArgs) -> [Function; 3] {
    let qjs = |script: &str, extra: &[String]| qjs_args(a, script, extra);
    [
        Function {
            label: "hello",
            name: "hello",
            args: qjs("hello.js", &[]),
            input: br#"{"name":"bench"}"#,
        },
        Function {
            label: "markdown (86-byte request)",
            name: "markdown",
            args: qjs("markdown.js", &[format!("{}:marked.esm.js", s(&a.marked))]),
            input: MARKDOWN_REQUEST,
        },
        Function {
            label: "markdown (7-byte request)",
            name: "markdown",
            args: qjs("markdown.js", &[format!("{}:marked.esm.js", s(&a.marked))]),
            input: b"# Bench",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::latency::{latency_rows, strategy_name, MODES};
    use super::process::Timed;
    use super::*;
    use vmm::instance::Backing;

    #[test]
    fn the_json_report_keeps_its_shape() {
        let samples: Vec<Vec<Timed>> = MODES.iter().map(|_| Vec::new()).collect();
        let report = BenchReport {
            latency: Some(latency_rows("hello", &samples)),
            warm: Some(vec![WarmRow {
                function: "hello",
                strategy: Backing::Eager,
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
        assert_eq!(strategy_name(Backing::Eager), "eager");
        assert!(warm["vs_cold_in_vmm"].is_null());
        assert_eq!(keys(&v["floor"]), ["exit_us", "vm_create_ms"]);
    }
}
