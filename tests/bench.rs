//! End-to-end tests of `vmm bench --only engines`, `--only oneshot` and `--only shapes`: the
//! real binary runs the real workloads under the guest's engines on /dev/kvm and under
//! wasmtime in its own process, and prints its tables. Checked: every row is there with finite numbers where the engine exists (no
//! timing comparisons: the machine is shared).

mod common;
use common::*;

/// The rows of the markdown table that follows `heading` (a line starting with it).
fn table_rows(out: &str, heading: &str) -> Vec<Vec<String>> {
    let mut lines = out.lines().skip_while(|l| !l.starts_with(heading));
    assert!(lines.next().is_some(), "no table {heading:?} in:\n{out}");
    lines
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and alignment rows
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// A time cell: a finite number of ms greater than zero.
fn assert_time(cell: &str, what: &str) {
    let v: f64 = cell
        .parse()
        .unwrap_or_else(|_| panic!("{what}: {cell:?} is not a number"));
    assert!(v.is_finite() && v > 0.0, "{what}: {cell:?}");
}

/// A ratio cell: a finite, positive number followed by `x`.
fn assert_ratio(cell: &str, what: &str) {
    let v: f64 = cell
        .strip_suffix('x')
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{what}: {cell:?} is not a ratio"));
    assert!(v.is_finite() && v > 0.0, "{what}: {cell:?}");
}

/// Whether `vmm <args> --help` lists `--engine`.
fn has_engine_flag(args: &[&str]) -> bool {
    let out = vmm()
        .args(args)
        .arg("--help")
        .output()
        .expect("run vmm --help");
    String::from_utf8_lossy(&out.stdout).contains("--engine")
}

const NOT_AVAILABLE: &str = "not available in this build";

/// `vmm bench --only SECTION ARGS...` with the workloads and examples of this checkout, in a
/// scratch directory of its own; its standard output (it must succeed).
fn bench(section: &str, args: &[&str]) -> String {
    let scratch = TempDir::created(&format!("bench-{section}"));
    let (qjs, marked, examples) = (
        workload("qjs-wasi-reactor.wasm"),
        workload("marked.esm.js"),
        path("examples"),
    );
    let mut cmd = vmm();
    cmd.current_dir(&scratch.0)
        .args([
            "bench", "--only", section, "--qjs", &qjs, "--marked", &marked,
        ])
        .args(["--examples", &examples])
        .args(args);
    let r = run_with_input(cmd, b"");
    let out = r.stdout();
    assert_eq!(r.code(), 0, "stdout: {out}\nstderr: {}", r.stderr());
    out
}

#[test]
fn the_engines_section_prints_every_row_with_finite_numbers() {
    if !kvm_available() {
        return;
    }
    let python = root().join("workloads").join("python.wasm");
    let out = bench(
        "engines",
        &[
            "--engine-runs",
            "1",
            "--loop-iterations",
            "3",
            "--python",
            &python.to_string_lossy(),
        ],
    );
    let guest_wasmtime = has_engine_flag(&["run"]);
    let template_engine = has_engine_flag(&["template", "create"]);
    let have_python = python.exists();

    let rows = table_rows(&out, "## Engines: the same work");
    let labels: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        labels,
        [
            "compute.wat (`_start`: 40 sieve rounds)",
            "QuickJS markdown loop",
            "Python request loop"
        ],
        "{out}"
    );
    for row in &rows {
        assert_eq!(row.len(), 7, "{row:?}");
        let what = |col: &str| format!("{} / {col}", row[0]);
        if row[0] == "Python request loop" && !have_python {
            assert!(
                row[2].contains("is missing: run tools/fetch-workloads.sh"),
                "{row:?}"
            );
            continue;
        }
        assert_time(&row[2], &what("guest wasmi"));
        assert_time(&row[4], &what("host wasmtime"));
        if guest_wasmtime {
            assert_time(&row[3], &what("guest wasmtime"));
            assert_ratio(&row[5], &what("guest wasmtime / host wasmtime"));
            assert_ratio(&row[6], &what("guest wasmi / guest wasmtime"));
        } else {
            assert_eq!(row[3], NOT_AVAILABLE, "{row:?}");
            assert_eq!((row[5].as_str(), row[6].as_str()), ("-", "-"), "{row:?}");
        }
    }

    let rows = table_rows(&out, "## Engines: time to response per guest engine");
    let keys: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("markdown (86-byte request)", "wasmi"),
            ("markdown (86-byte request)", "wasmtime"),
            ("Python hello", "wasmi"),
            ("Python hello", "wasmtime"),
        ],
        "{out}"
    );
    for row in &rows {
        assert_eq!(row.len(), 7, "{row:?}");
        let what = |col: &str| format!("{} / {} / {col}", row[0], row[1]);
        if row[0] == "Python hello" && !have_python {
            assert!(
                row[2].contains("is missing: run tools/fetch-workloads.sh"),
                "{row:?}"
            );
            continue;
        }
        if row[1] == "wasmtime" && !guest_wasmtime {
            assert_eq!(row[2], NOT_AVAILABLE, "{row:?}");
            continue;
        }
        assert_time(&row[2], &what("cold, nothing cached"));
        // A cached-artifact time is shown exactly when the stats name the cache.
        assert_eq!(row[3] == "-", row[4] == "-", "{row:?}");
        if row[3] != "-" {
            assert_time(&row[3], &what("cold, artifact cached"));
        }
        if template_engine || (row[1] == "wasmi" && !guest_wasmtime) {
            assert_time(&row[5], &what("restore"));
            assert_ratio(&row[6], &what("cold / restore"));
        } else {
            assert_eq!(row[5], NOT_AVAILABLE, "{row:?}");
        }
    }
}

#[test]
fn the_oneshot_section_times_restore_and_cold_processes_to_first_byte_and_exit() {
    if !kvm_available() {
        return;
    }
    let out = bench("oneshot", &["--oneshot-runs", "2"]);
    let rows = table_rows(&out, "## One request per process");
    let commands: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        commands,
        [
            "`vmm restore`",
            "`vmm run` (cold)",
            "`vmm --version` (any process)"
        ],
        "{out}"
    );
    for row in &rows {
        assert_eq!(row.len(), 7, "{row:?}");
        assert_eq!(
            (row[0].as_str(), row[2].as_str()),
            ("hello", "2"),
            "{row:?}"
        );
        for (i, col) in [
            (3, "first byte"),
            (4, "first byte p90"),
            (5, "gone"),
            (6, "gone p90"),
        ] {
            assert_time(&row[i], &format!("{} / {col}", row[1]));
        }
        // A process is gone only after it wrote its response.
        let (first, gone): (f64, f64) = (row[3].parse().unwrap(), row[5].parse().unwrap());
        assert!(first <= gone, "{row:?}");
    }
}

/// The header of the markdown table that follows `heading`.
fn table_header(out: &str, heading: &str) -> Vec<String> {
    let line = out
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .find(|l| l.starts_with('|'))
        .unwrap_or_else(|| panic!("no table {heading:?} in:\n{out}"));
    line.trim_matches('|')
        .split('|')
        .map(|c| c.trim().to_string())
        .collect()
}

/// The numbers a cell starts with (`TIME (TIME)`, `TIME (COUNT) WORD`, `TIME / TIME (TIME)`),
/// each checked to be finite and non-negative.
fn cell_numbers(cell: &str, what: &str) -> Vec<f64> {
    cell.split([' ', '(', ')', '/'])
        .filter(|w| !w.is_empty())
        .map_while(|w| w.parse::<f64>().ok())
        .inspect(|v| assert!(v.is_finite() && *v >= 0.0, "{what}: {cell:?}"))
        .collect()
}

#[test]
fn the_shapes_section_measures_every_shape_in_every_column() {
    if !kvm_available() {
        return;
    }
    let python = root().join("workloads").join("python.wasm");
    let out = bench(
        "shapes",
        &[
            "--shape-runs",
            "1",
            "--shape-requests",
            "1",
            "--python",
            &python.to_string_lossy(),
        ],
    );
    let have_python = python.exists();
    let heading = "## Function shapes";
    let header = table_header(&out, heading);
    for col in [
        "shape",
        "function",
        "cold",
        "restore eager",
        "restore prefetch",
        "restore lazy",
        "restore shared",
        "restore default",
        "served shared",
        "served copy",
        "served on demand",
    ] {
        assert!(
            header.iter().any(|h| h == col),
            "no column {col:?}: {header:?}"
        );
    }
    // The strategies `restore default` may name: the other restore columns.
    let strategies: Vec<&str> = header
        .iter()
        .filter_map(|h| h.strip_prefix("restore "))
        .filter(|s| *s != "default")
        .collect();
    let rows = table_rows(&out, heading);
    let shapes: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        shapes,
        ["hello", "markdown", "alloc", "imports", "compute"],
        "{out}"
    );
    for row in &rows {
        assert_eq!(row.len(), header.len(), "{row:?}");
        if row[0] == "imports" && !have_python {
            assert!(
                row[2].contains("is missing: run tools/fetch-workloads.sh"),
                "{row:?}"
            );
            continue;
        }
        for (col, cell) in header.iter().zip(row).skip(2) {
            let what = format!("{} / {col}", row[0]);
            let n = cell_numbers(cell, &what);
            if col == "cold" {
                // Process time (the function's own run).
                assert_eq!(n.len(), 2, "{what}: {cell:?}");
                assert!(n[0] > 0.0 && n[1] > 0.0, "{what}: {cell:?}");
            } else if col.starts_with("restore ") {
                // Process time (userfaultfd faults), and for the default its strategy.
                assert_eq!(n.len(), 2, "{what}: {cell:?}");
                assert!(n[0] > 0.0 && n[1].fract() == 0.0, "{what}: {cell:?}");
                if col == "restore default" {
                    let named = cell.rsplit(' ').next().unwrap_or("");
                    assert!(strategies.contains(&named), "{what}: {cell:?}");
                }
            } else if col == "served on demand" {
                // p50 / p90: the instance is destroyed, not reset.
                assert_eq!(n.len(), 2, "{what}: {cell:?}");
                assert!(n[0] > 0.0 && n[0] <= n[1], "{what}: {cell:?}");
            } else {
                // p50 / p90 (mean reset).
                assert!(col.starts_with("served "), "{col}");
                assert_eq!(n.len(), 3, "{what}: {cell:?}");
                assert!(n[0] > 0.0 && n[0] <= n[1] && n[2] > 0.0, "{what}: {cell:?}");
            }
        }
    }

    // Best against default: every measured shape, with ratios.
    let rows = table_rows(&out, "Best against default");
    let shapes: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        shapes,
        ["hello", "markdown", "alloc", "imports", "compute"],
        "{out}"
    );
    for row in &rows {
        assert_eq!(row.len(), 9, "{row:?}");
        if row[0] == "imports" && !have_python {
            assert!(row[1..].iter().all(|c| c == "-"), "{row:?}");
            continue;
        }
        for i in [3, 6, 7, 8] {
            assert_ratio(&row[i], &format!("{} / column {i}", row[0]));
        }
    }
}
