//! The compiled-module cache on the `vmm run` path: a second cold run of the QuickJS
//! reactor loads its artifact from the store instead of compiling, and a damaged artifact
//! is refused (never run), recompiled and replaced. Real binary, real store, /dev/kvm.

mod common;
use common::*;

/// `vmm run --json` of `function` under wasmtime with `store` as the cache: its JSON
/// report and its stderr.
fn run_json(store: &TempDir, function: &[String], input: &[u8]) -> (serde_json::Value, String) {
    run_json_with(store, function, input, &[])
}

/// `vmm run --json` of examples/hello.js under wasmtime with `store` as the cache.
fn hello(store: &TempDir, extra: &[&str]) -> (serde_json::Value, String) {
    let mut function: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    function.extend(qjs_function_args("hello.js", &[]));
    let (v, stderr) = run_json(store, &function, br#"{"name":"cache"}"#);
    assert_eq!(v["exit_code"], 0, "{v} / {stderr}");
    assert_eq!(
        v["stdout"], "{\"greeting\":\"Hello, cache!\",\"length\":5}\n",
        "{v}"
    );
    (v["stats"].clone(), stderr)
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

/// An artifact that passes the store's checks but was compiled with other settings (here
/// wasmtime's defaults for the host: another target, signals and memory settings, as a
/// store shared with another build could hold): the guest's wasmtime refuses it before
/// running any of it, and the run and template creation say so, compile the module again,
/// replace the cached artifact and give the right output; never a crash.
#[test]
fn an_artifact_compiled_with_other_settings_is_refused_by_the_guest_and_replaced() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("artifact-foreign");
    let wasm = wat::parse_file(path("examples/upper.wat")).unwrap();
    let foreign = wasmtime::Engine::new(&wasmtime::Config::new())
        .unwrap()
        .precompile_module(&wasm)
        .unwrap();
    let compiler = vmm::aot::Compiler::new(vmm::vm::host().unwrap().cpu).unwrap();
    let key = snapshot_store::ArtifactKey::new(
        &wasm,
        vmm::guest::ARTIFACT_ENGINE,
        compiler.fingerprint(),
    );
    let plant = || {
        let store = snapshot_store::Store::create_or_open(&dir.0).unwrap();
        store.put_artifact(&key, &foreign).unwrap();
        assert_eq!(
            store.get_artifact(&key).unwrap().as_deref(),
            Some(&foreign[..])
        );
    };
    let function = ["--module", &path("examples/upper.wat"), "--arg", "x"].map(String::from);
    let upper = || run_json(&dir, &function, b"some text\n");
    let (clean, _) = upper();
    assert_eq!(clean["exit_code"], 0, "{clean}");
    plant();
    let (v, stderr) = upper();
    assert_eq!(v["status"], 0, "{v} / {stderr}");
    assert_eq!(v["stdout"], clean["stdout"], "{v}");
    assert_eq!(v["stats"]["artifact_cache"], "refused", "{v}");
    assert!(
        stderr.contains("the guest refused the compiled module cached in the store")
            && stderr.contains("cannot load the compiled module"),
        "a warning naming what happened and wasmtime's reason: {stderr}"
    );
    // Replaced: the next run hits and runs.
    let (v, _) = upper();
    assert_eq!(v["stats"]["artifact_cache"], "hit", "{v}");
    assert_eq!(v["stdout"], clean["stdout"], "{v}");
    // Template creation meets the same artifact the same way.
    plant();
    let mut cmd = vmm();
    cmd.args([
        "template",
        "create",
        "up",
        "--engine",
        "wasmtime",
        "--store",
        &dir.arg(),
    ])
    .args(&function);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "{}", c.stderr());
    assert!(
        c.stderr().contains("the guest refused the compiled module"),
        "{}",
        c.stderr()
    );
    let mut cmd = vmm();
    cmd.args(["restore", "up", "--store", &dir.arg()]);
    assert_eq!(
        run_with_input(cmd, b"some text\n").stdout(),
        clean["stdout"].as_str().unwrap()
    );
}
