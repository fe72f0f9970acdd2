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

struct Sample {
    ms: f64,
    json: serde_json::Value,
}

fn exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| "vmm".into())
}

fn invoke(args: &[String], input: &[u8]) -> Result<Sample, String> {
    use std::io::Write;
    let t0 = Instant::now();
    let mut child = Command::new(exe())
        .args(args)
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
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    Ok(Sample { ms: elapsed, json })
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
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
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
    let result = run_sections(a, &store, &want);
    let _ = std::fs::remove_dir_all(&store);
    let report = result?;
    if a.json {
        println!("{report}");
    }
    Ok(())
}

fn run_sections(
    a: &BenchArgs,
    store: &Path,
    want: &dyn Fn(&str) -> bool,
) -> Result<serde_json::Value, String> {
    let mut report = serde_json::Map::new();
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
    let functions = [
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
    ];

    let store_args = vec!["--store".to_string(), s(store)];

    if want("latency") {
        let mut rows = Vec::new();
        let mut created: Vec<&str> = Vec::new();
        for f in &functions {
            if !created.contains(&f.name) {
                created.push(f.name);
                let mut create = vec![
                    "template".into(),
                    "create".into(),
                    f.name.to_string(),
                    "--json".into(),
                ];
                create.extend(store_args.clone());
                create.extend(f.args.clone());
                invoke(&create, b"")?;
            }
            let modes = ["cold", "eager", "prefetch", "lazy", "shared"];
            let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
            for _ in 0..a.iterations {
                for (m, mode) in modes.iter().enumerate() {
                    let args: Vec<String> = if *mode == "cold" {
                        let mut v = vec!["run".to_string(), "--json".into()];
                        v.extend(f.args.clone());
                        v
                    } else {
                        let mut v = vec![
                            "restore".to_string(),
                            f.name.into(),
                            "--json".into(),
                            "--memory".into(),
                            mode.to_string(),
                        ];
                        v.extend(store_args.clone());
                        v
                    };
                    samples[m].push(invoke(&args, f.input)?);
                }
            }
            let cold_median = percentile(&samples[0].iter().map(|x| x.ms).collect::<Vec<_>>(), 0.5);
            let cold_inproc_median = percentile(
                &samples[0]
                    .iter()
                    .filter_map(|x| x.json["stats"]["total_ms"].as_f64())
                    .collect::<Vec<_>>(),
                0.5,
            );
            for (m, mode) in modes.iter().enumerate() {
                let times: Vec<f64> = samples[m].iter().map(|x| x.ms).collect();
                let last = &samples[m]
                    .last()
                    .map(|x| x.json.clone())
                    .unwrap_or_default();
                let r = &last["stats"]["restore"];
                let median = percentile(&times, 0.5);
                let inproc: Vec<f64> = samples[m]
                    .iter()
                    .filter_map(|x| x.json["stats"]["total_ms"].as_f64())
                    .collect();
                let inproc_median = percentile(&inproc, 0.5);
                rows.push(serde_json::json!({
                    "function": f.label,
                    "mode": mode,
                    "vmm_median_ms": inproc_median,
                    "vmm_speedup": cold_inproc_median / inproc_median,
                    "median_ms": median,
                    "p90_ms": percentile(&times, 0.9),
                    "speedup": cold_median / median,
                    "pages_installed": r["pages_installed"],
                    "uffd_faults": r["uffd_faults"],
                    "bytes_from_store": r["bytes_from_store"],
                    "guest_exits": last["stats"]["exits"],
                }));
            }
        }
        if !a.json {
            println!(
                "## Time to response ({} invocations each, interleaved)\n",
                a.iterations
            );
            println!("Process: wall time of the whole `vmm` process, as a caller sees it. In vmm: from `main`");
            println!("to the response (`total_ms`), i.e. without process start-up, which costs any process");
            println!("3-5 ms on this VM.\n");
            println!(
                "| function | mode | process median ms | p90 ms | vs cold | in vmm median ms | vs cold | pages installed | uffd faults | KiB from store | exits |"
            );
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for r in &rows {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.1}x | {:.2} | {:.1}x | {} | {} | {} | {} |",
                    r["function"].as_str().unwrap_or(""),
                    r["mode"].as_str().unwrap_or(""),
                    r["median_ms"].as_f64().unwrap_or(0.0),
                    r["p90_ms"].as_f64().unwrap_or(0.0),
                    r["speedup"].as_f64().unwrap_or(0.0),
                    r["vmm_median_ms"].as_f64().unwrap_or(0.0),
                    r["vmm_speedup"].as_f64().unwrap_or(0.0),
                    r["pages_installed"]
                        .as_u64()
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    r["uffd_faults"]
                        .as_u64()
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                    r["bytes_from_store"]
                        .as_u64()
                        .map(|v| (v / 1024).to_string())
                        .unwrap_or("-".into()),
                    r["guest_exits"]
                        .as_u64()
                        .map(|v| v.to_string())
                        .unwrap_or("-".into()),
                );
            }
            println!();
        }
        report.insert("latency".into(), rows.clone().into());

        // A worker that keeps its store open: restores in this process, one after another,
        // each a fresh VM (manifest load, page install, vCPU restore, run to response).
        let mut warm = Vec::new();
        let mut st = snapshot_store::Store::open(store).map_err(|e| e.to_string())?;
        for f in &functions {
            for strategy in [MemoryStrategy::Eager, MemoryStrategy::Prefetch] {
                let mut t = Vec::new();
                for _ in 0..a.iterations {
                    let t0 = Instant::now();
                    let (report, _, _) = crate::snapshot::restore_and_run(
                        &mut st,
                        f.name,
                        strategy,
                        f.input,
                        &crate::run::RunLimits::default(),
                    )
                    .map_err(|e| e.to_string())?;
                    report.result.map_err(|e| e.to_string())?;
                    t.push(ms(t0.elapsed()));
                }
                let cold = rows
                    .iter()
                    .find(|r| r["function"] == f.label && r["mode"] == "cold")
                    .and_then(|r| r["vmm_median_ms"].as_f64())
                    .unwrap_or(0.0);
                let median = percentile(&t, 0.5);
                warm.push(serde_json::json!({
                    "function": f.label,
                    "strategy": strategy,
                    "median_ms": median,
                    "p90_ms": percentile(&t, 0.9),
                    "vs_cold_in_vmm": cold / median,
                }));
            }
        }
        if !a.json {
            println!(
                "## Restores in one process with the store kept open ({} each)\n",
                a.iterations
            );
            println!("| function | memory | median ms | p90 ms | vs cold (in vmm) |");
            println!("|---|---|---:|---:|---:|");
            for r in &warm {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.1}x |",
                    r["function"].as_str().unwrap_or(""),
                    r["strategy"].as_str().unwrap_or(""),
                    r["median_ms"].as_f64().unwrap_or(0.0),
                    r["p90_ms"].as_f64().unwrap_or(0.0),
                    r["vs_cold_in_vmm"].as_f64().unwrap_or(0.0)
                );
            }
            println!();
        }
        report.insert("warm".into(), warm.into());
    }

    if want("throughput") {
        let mut create = vec!["template".into(), "create".into(), "tput".into()];
        create.extend(store_args.clone());
        create.extend(functions[0].args.clone());
        invoke(&create, b"")?;
        let mut rows = Vec::new();
        for workers in [1usize, 2] {
            let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
            let t0 = Instant::now();
            let counts: Vec<Result<u64, String>> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..workers)
                    .map(|_| {
                        sc.spawn(|| {
                            let mut n = 0u64;
                            let mut args = vec!["restore".to_string(), "tput".into()];
                            args.extend(store_args.clone());
                            while Instant::now() < deadline {
                                invoke(&args, functions[0].input)?;
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
            rows.push(serde_json::json!({"restorers": workers, "restores": total, "per_second": total as f64 / secs}));
        }
        if !a.json {
            println!(
                "## Restores per second (hello, `vmm restore` processes, {} s each)\n",
                a.seconds
            );
            println!("| concurrent restorers | restores | per second |");
            println!("|---:|---:|---:|");
            for r in &rows {
                println!(
                    "| {} | {} | {:.1} |",
                    r["restorers"],
                    r["restores"],
                    r["per_second"].as_f64().unwrap_or(0.0)
                );
            }
            println!();
        }
        report.insert("throughput".into(), rows.into());
    }

    if want("store") {
        let dedup_store = store.join("dedup");
        let scripts = std::env::temp_dir().join(format!("vmm-bench-fns-{}", std::process::id()));
        std::fs::create_dir_all(&scripts)
            .map_err(|e| format!("create {}: {e}", scripts.display()))?;
        let hello =
            std::fs::read_to_string(a.examples.join("hello.js")).map_err(|e| e.to_string())?;
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
            let mut create = vec![
                "template".into(),
                "create".into(),
                format!("fn{i}"),
                "--json".into(),
                "--store".into(),
                s(&dedup_store),
            ];
            create.extend([
                "--module".into(),
                s(&a.qjs),
                "--runtime".into(),
                "qjs".into(),
            ]);
            create.extend([
                "--file".into(),
                s(&file),
                "--arg".into(),
                format!("fn{i}.js"),
            ]);
            invoke(&create, b"")?;
            sizes.push(dir_bytes(&dedup_store));
        }
        let _ = std::fs::remove_dir_all(&scripts);
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
        // Logical bytes: what full snapshots of every function template would take.
        let logical = {
            let mut st = snapshot_store::Store::open(&dedup_store).map_err(|e| e.to_string())?;
            let mut total = 0u64;
            for i in 0..a.templates {
                let t = st.load(&format!("fn{i}")).map_err(|e| e.to_string())?;
                let r = t.resolve(&st).map_err(|e| e.to_string())?;
                total += r.nonzero_frames() * 4096;
            }
            total
        };
        let physical = sizes.last().copied().unwrap_or(0);
        let row = serde_json::json!({
            "templates": a.templates,
            "first_template_bytes": first,
            "max_increment_bytes": max_inc,
            "avg_increment_bytes": avg_inc,
            "max_increment_pct_of_first": 100.0 * max_inc as f64 / first.max(1) as f64,
            "logical_bytes": logical,
            "physical_bytes": physical,
            "dedup_ratio": logical as f64 / physical.max(1) as f64,
        });
        if !a.json {
            println!(
                "## Store: {} JavaScript function templates on one runtime base\n",
                a.templates
            );
            println!("| first template (with its base) | largest later increment | average increment | logical (full snapshots) | physical on disk | dedup |");
            println!("|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {:.2} MiB | {:.1} KiB ({:.1}% of first) | {:.1} KiB | {:.1} MiB | {:.2} MiB | {:.1}x |",
                first as f64 / 1048576.0,
                max_inc as f64 / 1024.0,
                row["max_increment_pct_of_first"].as_f64().unwrap_or(0.0),
                avg_inc / 1024.0,
                logical as f64 / 1048576.0,
                physical as f64 / 1048576.0,
                row["dedup_ratio"].as_f64().unwrap_or(0.0)
            );
            println!();
        }
        report.insert("store".into(), row);
    }

    if want("floor") {
        // VM creation alone, in this process: KVM_CREATE_VM, memory slot, vCPU.
        let mut create = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let mem = crate::memory::GuestMemory::new(64 << 20).map_err(|e| e.to_string())?;
            let vm = crate::vm::Vm::new(mem).map_err(|e| e.to_string())?;
            create.push(ms(t.elapsed()));
            drop(vm);
        }
        // One exit: a guest that makes N hostcalls, against one that makes none.
        let dir = std::env::temp_dir().join(format!("vmm-bench-exits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let per_exit = |n: u32| -> Result<f64, String> {
            let file = dir.join(format!("exits{n}.wat"));
            std::fs::write(&file, EXITS_WAT.replace("COUNT", &n.to_string()))
                .map_err(|e| e.to_string())?;
            let mut t = Vec::new();
            for _ in 0..5 {
                let mut cmd = Command::new(exe());
                cmd.env("VMM_TEST_HOSTCALLS", "1");
                let out = cmd
                    .args(["run", "--json", "--module", &s(&file)])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
                t.push(v["stats"]["function_ms"].as_f64().unwrap_or(0.0));
            }
            Ok(percentile(&t, 0.5))
        };
        let (with, without) = (per_exit(2000)?, per_exit(0)?);
        let _ = std::fs::remove_dir_all(&dir);
        let exit_us = (with - without) * 1e3 / 2000.0;
        let row = serde_json::json!({"vm_create_ms": percentile(&create, 0.5), "exit_us": exit_us});
        if !a.json {
            println!("## Floor on this machine\n");
            println!(
                "| VM creation (VM + memory slot + vCPU) | one exit (guest -> vmm -> guest) |"
            );
            println!("|---:|---:|");
            println!(
                "| {:.3} ms | {:.1} us |",
                row["vm_create_ms"].as_f64().unwrap_or(0.0),
                exit_us
            );
            println!();
        }
        report.insert("floor".into(), row);
    }

    if want("native") {
        let wasm =
            crate::cli::read_module(&a.examples.join("compute.wat")).map_err(|e| e.to_string())?;
        let mut guest = Vec::new();
        let mut host = Vec::new();
        let wat = s(&a.examples.join("compute.wat"));
        for _ in 0..5 {
            let g = invoke(
                &[
                    "run".into(),
                    "--module".into(),
                    wat.clone(),
                    "--json".into(),
                ],
                b"",
            )?;
            guest.push(g.json["stats"]["function_ms"].as_f64().unwrap_or(0.0));
            host.push(host_wasmi_ms(&wasm)?);
        }
        let (g, h) = (percentile(&guest, 0.5), percentile(&host, 0.5));
        let row = serde_json::json!({"guest_ms": g, "host_ms": h, "ratio": g / h});
        if !a.json {
            println!("## Native speed: examples/compute.wat under wasmi, guest vs host process (median of 5)\n");
            println!("| in the guest (vmm run) | in a host process | guest / host |");
            println!("|---:|---:|---:|");
            println!("| {g:.1} ms | {h:.1} ms | {:.2} |", g / h);
            println!();
        }
        report.insert("native".into(), row);
    }
    Ok(serde_json::Value::Object(report))
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
