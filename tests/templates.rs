//! End-to-end tests of templates and restore: the real `vmm` binary, a real store on
//! disk, the real QuickJS reactor, on /dev/kvm.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn create(store: &TempDir, name: &str, function: &[String]) -> Run {
    let mut cmd = vmm();
    cmd.args(["template", "create", name, "--store", &store.arg()])
        .args(function);
    run_with_input(cmd, b"")
}

fn restore(store: &TempDir, name: &str, memory: &str, input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.args(["restore", name, "--store", &store.arg(), "--memory", memory]);
    run_with_input(cmd, input)
}

fn run_cold(function: &[String], input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.arg("run").args(function);
    run_with_input(cmd, input)
}

fn marked() -> String {
    format!("{}:marked.esm.js", workload("marked.esm.js"))
}

#[test]
fn restore_prints_what_run_prints_for_every_example_and_strategy() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("examples");
    let cases: Vec<(&str, Vec<String>, &[u8])> = vec![
        (
            "hello",
            qjs_function_args("hello.js", &[]),
            br#"{"name":"x"}"#,
        ),
        (
            "markdown",
            qjs_function_args("markdown.js", &[marked()]),
            b"# Title\n\n*em* and `code`\n",
        ),
        (
            "upper",
            vec![
                "--module".into(),
                path("examples/upper.wat"),
                "--arg".into(),
                "one".into(),
            ],
            b"some text\n",
        ),
    ];
    for (name, function, input) in &cases {
        let c = create(&store, name, function);
        assert_eq!(c.code(), 0, "template create {name}: {}", c.stderr());
        let cold = run_cold(function, input);
        assert_eq!(cold.code(), 0, "{}", cold.stderr());
        assert!(!cold.stdout().is_empty());
        for memory in ["prefetch", "eager", "lazy", "shared"] {
            let r = restore(&store, name, memory, input);
            assert_eq!(
                r.stdout(),
                cold.stdout(),
                "restore {name} --memory {memory}: {}",
                r.stderr()
            );
            assert_eq!(r.code(), 0);
        }
    }
    // A second function of the same module reuses the runtime base: one base in all.
    let mut ls = vmm();
    ls.args(["template", "ls", "--json", "--store", &store.arg()]);
    let v: serde_json::Value = serde_json::from_str(&run_with_input(ls, b"").stdout()).unwrap();
    let bases = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["parent"].is_null())
        .count();
    assert_eq!(
        bases, 2,
        "one base for the qjs module, one for upper.wat: {v}"
    );
}

#[test]
fn restores_draw_fresh_entropy_and_see_the_current_time() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("entropy");
    let c = create(
        &store,
        "entropy",
        &["--module".into(), path("tests/guests/entropy.wat")],
    );
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let a = restore(&store, "entropy", "prefetch", b"go");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = restore(&store, "entropy", "prefetch", b"go");
    let (ra, rb) = (&a.output.stdout, &b.output.stdout);
    assert_eq!(ra.len(), 24, "{}", a.stderr());
    assert_eq!(rb.len(), 24, "{}", b.stderr());
    assert_ne!(
        ra[..16],
        rb[..16],
        "two restores drew the same random bytes"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    for out in [ra, rb] {
        let t = u64::from_le_bytes(out[16..24].try_into().unwrap()) as i128;
        assert!(
            (now - t).abs() < 30_000_000_000,
            "guest clock {t} is not the current time {now}"
        );
    }
    let ta = u64::from_le_bytes(ra[16..24].try_into().unwrap());
    let tb = u64::from_le_bytes(rb[16..24].try_into().unwrap());
    assert!(tb > ta, "the second restore must see a later time");

    // QuickJS: Math.random must not repeat across restores of one template.
    let c = create(
        &store,
        "random",
        &qjs_function_args("tests/guests/random.js", &[]),
    );
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let outs: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let r = restore(&store, "random", "prefetch", b"");
            serde_json::from_str(r.stdout().trim())
                .unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout(), r.stderr()))
        })
        .collect();
    assert_ne!(
        outs[0]["random"], outs[1]["random"],
        "Math.random repeated across restores: {outs:?}"
    );
    let now_ms = (now / 1_000_000) as f64;
    for o in &outs {
        assert!(
            (o["now"].as_f64().unwrap() - now_ms).abs() < 30_000.0,
            "Date.now() is stale: {o}"
        );
    }
}

#[test]
fn template_errors_are_clear() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("errors");
    let r = restore(&store, "nothing", "prefetch", b"");
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("store"), "{}", r.stderr());
    let c = create(&store, "hello", &qjs_function_args("hello.js", &[]));
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let r = restore(&store, "missing", "prefetch", b"");
    assert!(
        r.code() != 0 && r.stderr().contains("does not exist"),
        "{}",
        r.stderr()
    );
    // The base cannot serve requests, and cannot be removed while hello is layered on it.
    let mut ls = vmm();
    ls.args(["template", "ls", "--json", "--store", &store.arg()]);
    let v: serde_json::Value = serde_json::from_str(&run_with_input(ls, b"").stdout()).unwrap();
    let base = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["parent"].is_null())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let r = restore(&store, &base, "prefetch", b"");
    assert!(
        r.code() != 0 && r.stderr().contains("runtime base"),
        "{}",
        r.stderr()
    );
    let mut rm = vmm();
    rm.args(["template", "rm", &base, "--store", &store.arg()]);
    let r = run_with_input(rm, b"");
    assert!(
        r.code() != 0 && r.stderr().contains("hello"),
        "rm must refuse and name the child: {}",
        r.stderr()
    );
    let c = create(&store, "hello", &qjs_function_args("hello.js", &[]));
    assert!(
        c.code() != 0 && c.stderr().contains("already exists"),
        "{}",
        c.stderr()
    );
    let mut rm = vmm();
    rm.args(["template", "rm", "hello", "--store", &store.arg()]);
    assert_eq!(run_with_input(rm, b"").code(), 0);
}

#[test]
fn concurrent_creates_of_different_names_both_succeed() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("concurrent");
    let spawn = |name: &str, script: &str, extra: &[String]| {
        let mut cmd: Command = vmm();
        cmd.args(["template", "create", name, "--store", &store.arg()])
            .args(qjs_function_args(script, extra));
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn("a", "hello.js", &[]);
    let b = spawn("b", "markdown.js", &[marked()]);
    for (name, child) in [("a", a), ("b", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        restore(&store, "a", "prefetch", br#"{"name":"y"}"#).stdout(),
        "{\"greeting\":\"Hello, y!\",\"length\":1}\n"
    );
    assert_eq!(
        restore(&store, "b", "prefetch", b"*x*").stdout(),
        "<p><em>x</em></p>\n\n"
    );
}

#[test]
fn killing_template_create_never_corrupts_the_store() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("kill");
    let c = create(&store, "hello", &qjs_function_args("hello.js", &[]));
    assert_eq!(c.code(), 0, "{}", c.stderr());
    // Kill creates of new templates at spread-out moments (from "at once" to "nearly done").
    for (i, delay_ms) in [0u64, 5, 20, 60, 120, 200, 300, 450].iter().enumerate() {
        let mut cmd = vmm();
        cmd.args([
            "template",
            "create",
            &format!("victim{i}"),
            "--store",
            &store.arg(),
        ])
        .args(qjs_function_args("markdown.js", &[marked()]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(*delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let s = snapshot_store::Store::open(&store.0).expect("the store still opens");
        let corrupt: Vec<_> = s
            .verify()
            .into_iter()
            .filter(|p| p.is_corruption())
            .collect();
        assert!(
            corrupt.is_empty(),
            "after a kill at {delay_ms} ms: {corrupt:?}"
        );
        let r = restore(&store, "hello", "prefetch", br#"{"name":"k"}"#);
        assert_eq!(
            r.stdout(),
            "{\"greeting\":\"Hello, k!\",\"length\":1}\n",
            "{}",
            r.stderr()
        );
    }
}

fn create_on(store: &TempDir, name: &str, base: &str, function: &[String]) -> Run {
    let mut cmd = vmm();
    cmd.args([
        "template",
        "create",
        name,
        "--base",
        base,
        "--store",
        &store.arg(),
    ])
    .args(function);
    run_with_input(cmd, b"")
}

fn template_names(store: &TempDir) -> Vec<String> {
    let mut ls = vmm();
    ls.args(["template", "ls", "--json", "--store", &store.arg()]);
    let v: serde_json::Value = serde_json::from_str(&run_with_input(ls, b"").stdout()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// Issue 7, item 5: `--base B` where B was made from another module used to run B's
/// module under the new template's name. The base records what it was made from; a layer
/// whose options differ is refused, naming each option.
#[test]
fn a_layer_whose_options_differ_from_its_base_is_refused() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("provenance");
    let hello = qjs_function_args("hello.js", &[]);
    let c = create_on(&store, "hello", "B", &hello);
    assert_eq!(c.code(), 0, "{}", c.stderr());

    // upper.wat with hello.js as its file and argument: under the old code this "worked"
    // and ran QuickJS (B's module) on hello.js.
    let mut upper = hello.clone();
    upper[1] = path("examples/upper.wat");
    upper.drain(2..4); // --runtime qjs
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        (
            "up",
            upper,
            vec![
                "module upper.wat",
                "differs from B's module qjs-wasi-reactor.wasm",
                "runtime wasi differs from B's runtime qjs",
            ],
        ),
        (
            "js-as-wasi",
            {
                let mut f = hello.clone();
                f[3] = "wasi".into();
                f
            },
            vec!["runtime wasi differs from B's runtime qjs"],
        ),
        (
            "smaller",
            {
                let mut f = hello.clone();
                f.extend(["--mem".to_string(), "256".into()]);
                f
            },
            vec!["guest memory size 256 MiB differs from B's 512 MiB"],
        ),
    ];
    for (name, function, want) in &cases {
        let c = create_on(&store, name, "B", function);
        let err = c.stderr();
        assert_eq!(c.code(), 125, "create {name} must be refused: {err}");
        assert!(
            err.contains(&format!(
                "vmm: error: template create {name}: check the runtime base: cannot layer {name} on B"
            )),
            "{err}"
        );
        for w in want {
            assert!(err.contains(w), "create {name}: no {w:?} in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !template_names(&store).contains(&name.to_string()),
            "the refused {name} was stored"
        );
    }
    // The same options as the base's: accepted, and it runs its own script.
    let c = create_on(&store, "hello2", "B", &hello);
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let r = restore(&store, "hello2", "prefetch", br#"{"name":"p"}"#);
    assert_eq!(
        r.stdout(),
        "{\"greeting\":\"Hello, p!\",\"length\":1}\n",
        "{}",
        r.stderr()
    );
    // And upper.wat without a base gets a base of its own.
    let c = create(
        &store,
        "up",
        &["--module".into(), path("examples/upper.wat")],
    );
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let r = restore(&store, "up", "prefetch", b"abc\n");
    assert_eq!(r.stdout(), "ABC\n", "{}", r.stderr());
}

/// The version 1 device state (before provenance was recorded), as older vmm builds wrote it.
#[derive(bincode::Encode)]
struct DeviceStateV1 {
    version: u32,
    pending_op: u64,
    buf_gpa: u64,
    buf_len: u64,
    runtime: String,
    module_name: String,
    args: Vec<String>,
}

/// Rewrites `name`'s device state in the version 1 layout (checksum kept valid).
fn make_v1(store: &TempDir, name: &str) {
    let mut m = snapshot_store::fixtures::read_manifest(&store.0, name);
    let d = vmm::template::device::DeviceState::decode(&m.device_state).unwrap();
    let v1 = DeviceStateV1 {
        version: 1,
        pending_op: d.pending_op,
        buf_gpa: d.buf_gpa,
        buf_len: d.buf_len,
        runtime: d.runtime,
        module_name: d.module_name,
        args: d.args,
    };
    m.device_state = bincode::encode_to_vec(v1, bincode::config::standard()).unwrap();
    snapshot_store::fixtures::write_manifest(&store.0, &m);
}

/// Templates made before provenance was recorded keep restoring, but nothing new is
/// layered on such a base: what it runs cannot be checked, so the user is told to make a
/// new base.
#[test]
fn templates_without_provenance_restore_but_take_no_new_layers() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("v1");
    let hello = qjs_function_args("hello.js", &[]);
    let c = create_on(&store, "hello", "B", &hello);
    assert_eq!(c.code(), 0, "{}", c.stderr());
    make_v1(&store, "B");
    make_v1(&store, "hello");
    for memory in ["prefetch", "eager", "lazy", "shared"] {
        let r = restore(&store, "hello", memory, br#"{"name":"v1"}"#);
        assert_eq!(
            r.stdout(),
            "{\"greeting\":\"Hello, v1!\",\"length\":2}\n",
            "--memory {memory}: {}",
            r.stderr()
        );
    }
    let c = create_on(&store, "hello2", "B", &hello);
    let err = c.stderr();
    assert_eq!(c.code(), 125, "{err}");
    assert!(
        err.contains("cannot layer hello2 on B: B was made by an older vmm")
            && err.contains("create them again"),
        "{err}"
    );
    // Without a base named, the module gets a new base that records its provenance.
    let c = create(&store, "hello3", &hello);
    assert_eq!(c.code(), 0, "{}", c.stderr());
    let r = restore(&store, "hello3", "prefetch", br#"{"name":"new"}"#);
    assert_eq!(r.stdout(), "{\"greeting\":\"Hello, new!\",\"length\":3}\n");
    let mut verify = Command::new(
        Path::new(env!("CARGO_BIN_EXE_vmm"))
            .parent()
            .unwrap()
            .join("vmm-store"),
    );
    verify.args(["verify", "--store", &store.arg()]);
    let v = run_with_input(verify, b"");
    assert_eq!(v.code(), 0, "old templates are not damage: {}", v.stdout());
}

/// Issue 7, item 11: an invalid name is an invalid name, not a damaged template.
#[test]
fn invalid_template_names_are_reported_as_such() {
    let store = TempDir::new("names");
    let upper = ["--module".to_string(), path("examples/upper.wat")];
    for (name, base) in [
        ("bad/name", None),
        (".hidden", None),
        ("ok", Some("bad name")),
    ] {
        let mut cmd = vmm();
        cmd.args(["template", "create", name, "--store", &store.arg()])
            .args(&upper);
        if let Some(b) = base {
            cmd.args(["--base", b]);
        }
        let c = run_with_input(cmd, b"");
        let err = c.stderr();
        let bad = base.unwrap_or(name);
        assert_eq!(c.code(), 125, "{err}");
        assert!(
            err.contains(&format!("invalid template name {bad:?}"))
                && err.contains("[A-Za-z0-9._-]"),
            "{err}"
        );
        assert!(
            !err.contains("damaged") && !err.contains("verify"),
            "an invalid name is not damage: {err}"
        );
    }
}

/// `function_ms` of a restore is the function's work after its request arrived, inside the
/// host's run of the restored VM; it once counted from the template's creation.
#[test]
fn a_restore_times_the_function_from_its_request() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("function-ms");
    let c = create(&store, "hello", &qjs_function_args("hello.js", &[]));
    assert_eq!(c.code(), 0, "{}", c.stderr());
    // Long enough that a time counted from the creation would stand out.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut cmd = vmm();
    cmd.args(["restore", "hello", "--store", &store.arg(), "--json"]);
    let r = run_with_input(cmd, br#"{"name":"t"}"#);
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let (function, run) = (
        v["stats"]["function_ms"].as_f64().unwrap(),
        v["stats"]["restore"]["run_ms"].as_f64().unwrap(),
    );
    assert!(function > 0.0 && function <= run, "{v}");
}
