//! The compiled-module cache on the `vmm run` path: a second cold run of the QuickJS
//! reactor loads its artifact from the store instead of compiling, and a damaged artifact
//! is refused (never run), recompiled and replaced. Real binary, real store, /dev/kvm.

mod common;
use common::*;

/// `vmm run --json` of examples/hello.js under wasmtime with `store` as the cache.
fn hello(store: &TempDir, extra: &[&str]) -> (serde_json::Value, String) {
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--engine",
        "wasmtime",
        "--store",
        &store.arg(),
        "--json",
    ])
    .args(extra)
    .args(qjs_function_args("hello.js", &[]));
    let r = run_with_input(cmd, br#"{"name":"cache"}"#);
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim())
        .unwrap_or_else(|e| panic!("one JSON object ({e}): {} / {}", r.stdout(), r.stderr()));
    assert_eq!(v["exit_code"], 0, "{v} / {}", r.stderr());
    assert_eq!(
        v["stdout"], "{\"greeting\":\"Hello, cache!\",\"length\":5}\n",
        "{v}"
    );
    (v["stats"].clone(), r.stderr())
}

fn artifacts(store: &TempDir) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(store.0.join("artifacts"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "art"));
    v
}

#[test]
fn a_second_cold_run_loads_the_compiled_module_from_the_store() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("artifact-cache");
    let (first, _) = hello(&store, &[]);
    assert_eq!(first["artifact_cache"], "miss", "{first}");
    assert_eq!(artifacts(&store).len(), 1, "one artifact cached");
    let (second, _) = hello(&store, &[]);
    assert_eq!(second["artifact_cache"], "hit", "{second}");
    // Loading is not compiling: the host's part of the second run is a fraction of the
    // first's (a ratio in one run, never an absolute time).
    assert!(
        second["aot_compile_ms"].as_f64().unwrap() * 4.0
            < first["aot_compile_ms"].as_f64().unwrap(),
        "{first} / {second}"
    );
    // --no-artifact-cache compiles and leaves the cache alone.
    let (off, _) = hello(&store, &["--no-artifact-cache"]);
    assert_eq!(off["artifact_cache"], "off", "{off}");
    // wasmi compiles in the guest: nothing to cache.
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--engine",
        "wasmi",
        "--store",
        &store.arg(),
        "--json",
    ])
    .args(qjs_function_args("hello.js", &[]));
    let r = run_with_input(cmd, br#"{"name":"cache"}"#);
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["stats"]["artifact_cache"], "off", "{v}");
    assert_eq!(artifacts(&store).len(), 1);
}

#[test]
fn a_damaged_cached_artifact_is_refused_recompiled_and_replaced() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("artifact-damaged");
    hello(&store, &[]);
    let art = artifacts(&store).pop().expect("an artifact");
    let good = std::fs::read(&art).unwrap();
    // Damage inside the compiled code: a byte that, if the artifact were run, would be
    // executed or read by the guest.
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0xff;
    let mut perm = std::fs::metadata(&art).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&art, perm).unwrap();
    std::fs::write(&art, &bad).unwrap();
    let (stats, stderr) = hello(&store, &[]);
    assert_eq!(stats["artifact_cache"], "refused", "{stats}");
    assert!(
        stderr.contains("refused") && stderr.contains("checksum"),
        "a clear warning: {stderr}"
    );
    // Replaced by a fresh compilation: the next run hits, and verify is clean.
    let (stats, _) = hello(&store, &[]);
    assert_eq!(stats["artifact_cache"], "hit", "{stats}");
    let r = run_with_input(
        {
            let mut c = std::process::Command::new(
                std::path::Path::new(env!("CARGO_BIN_EXE_vmm")).with_file_name("vmm-store"),
            );
            c.args(["verify", "--store", &store.arg()]);
            c
        },
        b"",
    );
    assert_eq!(r.code(), 0, "{} {}", r.stdout(), r.stderr());
}
