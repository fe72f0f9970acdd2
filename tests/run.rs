//! End-to-end tests of `vmm run`: the real binary boots the real guest on /dev/kvm.

mod common;
use common::*;

const MARKDOWN_IN: &str =
    "# Hello\n\nSome *emphasis* and a [link](https://example.com).\n\n- one\n- two\n";
const MARKDOWN_OUT: &str = "<h1>Hello</h1>\n<p>Some <em>emphasis</em> and a <a href=\"https://example.com\">link</a>.</p>\n<ul>\n<li>one</li>\n<li>two</li>\n</ul>\n\n";

#[test]
fn hello_js_prints_exact_json() {
    if !kvm_available() {
        return;
    }
    let r = qjs_run("hello.js", &[], br#"{"name":"x"}"#);
    assert_eq!(
        r.stdout(),
        "{\"greeting\":\"Hello, x!\",\"length\":1}\n",
        "stderr: {}",
        r.stderr()
    );
    assert_eq!(r.code(), 0);
}

#[test]
fn markdown_js_renders_with_marked_from_npm() {
    if !kvm_available() {
        return;
    }
    let marked = format!("{}:marked.esm.js", workload("marked.esm.js"));
    let r = qjs_run("markdown.js", &[marked], MARKDOWN_IN.as_bytes());
    assert_eq!(r.stdout(), MARKDOWN_OUT, "stderr: {}", r.stderr());
    assert_eq!(r.code(), 0);
}

#[test]
fn wat_command_module_gets_stdin_and_args() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--module",
        &path("examples/upper.wat"),
        "--arg",
        "first",
        "--arg",
        "-second",
    ]);
    let r = run_with_input(cmd, b"hello, world\n");
    assert_eq!(
        r.stdout(),
        "HELLO, WORLD\nfirst\n-second\n",
        "stderr: {}",
        r.stderr()
    );
    assert_eq!(r.code(), 0);
}

#[test]
fn stats_json_reports_every_phase() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("examples/upper.wat"), "--json"]);
    let r = run_with_input(cmd, b"abc");
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).expect("one JSON object");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["stdout"], "ABC");
    let stats = &v["stats"];
    for key in ["vm_create_ms", "compile_ms", "function_ms", "total_ms"] {
        assert!(
            stats[key].as_f64().unwrap() > 0.0,
            "{key} missing in {stats}"
        );
    }
    assert!(stats["exits"].as_u64().unwrap() >= 3, "{stats}");
}

fn assert_clean_failure(r: &Run, expect_in_stderr: &str) {
    assert_ne!(r.code(), 0, "must fail; stderr: {}", r.stderr());
    assert!(
        r.stderr().contains(expect_in_stderr),
        "stderr should mention {expect_in_stderr:?}: {}",
        r.stderr()
    );
    assert!(
        !r.stderr().contains("panicked"),
        "the VMM must not panic: {}",
        r.stderr()
    );
}

#[test]
fn hostile_module_that_is_not_wasm() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("examples/hello.js")]);
    let r = run_with_input(cmd, b"");
    assert_clean_failure(&r, "not valid WebAssembly");
    assert_eq!(r.code(), 125);
}

#[test]
fn hostile_missing_file() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--module",
        &path("examples/upper.wat"),
        "--file",
        "/nonexistent/x.js",
    ]);
    let r = run_with_input(cmd, b"");
    assert_clean_failure(&r, "/nonexistent/x.js");
    let mut cmd = vmm();
    cmd.args(["run", "--module", "/nonexistent/m.wasm"]);
    assert_clean_failure(&run_with_input(cmd, b""), "/nonexistent/m.wasm");
}

#[test]
fn hostile_unsupported_import() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("tests/guests/import.wat")]);
    let r = run_with_input(cmd, b"");
    assert_clean_failure(&r, "launch_missiles");
}

#[test]
fn hostile_guest_traps() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("tests/guests/trap.wat")]);
    let r = run_with_input(cmd, b"");
    assert_clean_failure(&r, "trap");
    assert_eq!(
        r.stdout(),
        "before the trap\n",
        "output written before the trap is kept"
    );
}

#[test]
fn hostile_guest_loops_forever() {
    if !kvm_available() {
        return;
    }
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--module",
        &path("tests/guests/loop.wat"),
        "--timeout",
        "1",
    ]);
    let r = run_with_input(cmd, b"");
    assert_clean_failure(&r, "timeout");
    assert_eq!(r.code(), 124);
    assert!(
        r.stderr().contains("raise --timeout"),
        "the CLI names the flag that helps: {}",
        r.stderr()
    );
    assert!(
        r.elapsed.as_secs() < 20,
        "stopped long after the timeout: {:?}",
        r.elapsed
    );
}

#[test]
fn hostile_mailbox_lengths_and_ops() {
    if !kvm_available() {
        return;
    }
    for (guest, expect) in [
        ("tests/guests/mailbox.wat", "outside guest memory"),
        ("tests/guests/mailbox_len.wat", "exceeds the limit"),
        ("tests/guests/mailbox_op.wat", "unknown hostcall op"),
    ] {
        let mut cmd = vmm();
        cmd.env("VMM_TEST_HOSTCALLS", "1").args([
            "run",
            "--module",
            &path(guest),
            "--timeout",
            "10",
        ]);
        let r = run_with_input(cmd, b"");
        assert_clean_failure(&r, expect);
        assert!(r.stderr().contains("malformed hostcall"), "{}", r.stderr());
    }
    // Without the test switch the raw hostcall import does not exist at all.
    let mut cmd = vmm();
    cmd.env_remove("VMM_TEST_HOSTCALLS").args([
        "run",
        "--module",
        &path("tests/guests/mailbox.wat"),
    ]);
    assert_clean_failure(&run_with_input(cmd, b""), "vmm_test");
}

// --- exit status -------------------------------------------------------------------------------

/// A QuickJS function that exits with the code its request names.
const EXIT_JS: &str = "std.exit(Number(std.in.readAsString()));\n";

fn exit_function(dir: &TempDir) -> Vec<String> {
    let script = dir.0.join("exit.js");
    std::fs::write(&script, EXIT_JS).unwrap();
    vec![
        "--module".into(),
        workload("qjs-wasi-reactor.wasm"),
        "--runtime".into(),
        "qjs".into(),
        "--file".into(),
        script.to_string_lossy().into_owned(),
        "--arg".into(),
        "exit.js".into(),
    ]
}

fn json_of(r: &Run) -> serde_json::Value {
    serde_json::from_str(r.stdout().trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {} / {}", r.stdout(), r.stderr()))
}

#[test]
fn exit_status_never_wraps_to_success_and_says_when_it_collides() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("run-exit");
    let function = exit_function(&dir);
    for (code, status, note) in [
        (0, 0, None),
        (3, 3, None),
        (124, 124, Some("the function itself exited with code 124 (it was not stopped by the timeout)")),
        (125, 125, Some("the function itself exited with code 125 (the VMM did not fail)")),
        (255, 255, None),
        (256, 1, Some("exited with code 256, which does not fit in an exit status (0-255); exiting with 1")),
        (512, 1, Some("code 512")),
        (-1, 1, Some("code -1")),
    ] {
        let mut cmd = vmm();
        cmd.arg("run").args(&function);
        let r = run_with_input(cmd, code.to_string().as_bytes());
        assert_eq!(r.code(), status, "proc_exit({code}): {}", r.stderr());
        match note {
            Some(n) => assert!(r.stderr().contains(n), "proc_exit({code}): {}", r.stderr()),
            None => assert_eq!(r.stderr(), "", "proc_exit({code})"),
        }
        let mut cmd = vmm();
        cmd.arg("run").args(&function).arg("--json");
        let r = run_with_input(cmd, code.to_string().as_bytes());
        let v = json_of(&r);
        assert_eq!(r.code(), status, "--json proc_exit({code}): {v}");
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["exit_code"], code, "the full code: {v}");
        assert_eq!(v["reason"], "exit", "{v}");
        assert_eq!(v["error"], serde_json::Value::Null, "{v}");
    }
    // The same from a template.
    let store = TempDir::new("run-exit-store");
    let mut cmd = vmm();
    cmd.args(["template", "create", "exit", "--store", &store.arg()])
        .args(&function);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    let mut cmd = vmm();
    cmd.args(["restore", "exit", "--store", &store.arg()]);
    let r = run_with_input(cmd, b"256");
    assert_eq!(r.code(), 1, "{}", r.stderr());
    assert!(r.stderr().contains("code 256"), "{}", r.stderr());
    let mut cmd = vmm();
    cmd.args(["restore", "exit", "--store", &store.arg(), "--json"]);
    let v = json_of(&run_with_input(cmd, b"124"));
    assert_eq!(
        (v["status"].as_i64(), v["exit_code"].as_i64()),
        (Some(124), Some(124)),
        "{v}"
    );
    assert_eq!(v["reason"], "exit", "{v}");
}

#[test]
fn json_names_the_reason_when_the_function_did_not_exit() {
    if !kvm_available() {
        return;
    }
    for (what, args, status, reason, expect) in [
        (
            "timeout",
            vec![
                "--module".to_string(),
                path("tests/guests/loop.wat"),
                "--timeout".into(),
                "1".into(),
            ],
            124,
            "timeout",
            "timeout",
        ),
        (
            "not wasm",
            vec!["--module".to_string(), path("examples/hello.js")],
            125,
            "guest_error",
            "not valid WebAssembly",
        ),
        (
            "missing module",
            vec!["--module".to_string(), "/nonexistent/m.wasm".into()],
            125,
            "vmm_error",
            "/nonexistent/m.wasm",
        ),
    ] {
        let mut cmd = vmm();
        cmd.arg("run").args(&args).arg("--json");
        let r = run_with_input(cmd, b"");
        let v = json_of(&r);
        assert_eq!(r.code(), status, "{what}: {v}");
        assert_eq!(v["status"], status, "{what}: {v}");
        assert_eq!(v["reason"], reason, "{what}: {v}");
        assert_eq!(v["exit_code"], serde_json::Value::Null, "{what}: {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(expect),
            "{what}: {v}"
        );
    }
}

// --- output cap --------------------------------------------------------------------------------

#[test]
fn output_past_the_cap_is_reported_and_not_a_success() {
    if !kvm_available() {
        return;
    }
    // tests/guests/overflow.wat writes 65 MiB, ignores EFBIG past 64 MiB, and exits 0.
    for (fd, extra) in [("stdout", vec![]), ("stderr", vec!["--arg", "to-stderr"])] {
        let mut cmd = vmm();
        cmd.args(["run", "--module", &path("tests/guests/overflow.wat")])
            .args(&extra);
        let r = run_with_input(cmd, b"");
        let (captured, other) = if fd == "stdout" {
            (&r.output.stdout, &r.output.stderr)
        } else {
            (&r.output.stderr, &r.output.stdout)
        };
        let err =
            String::from_utf8_lossy(&r.output.stderr[r.output.stderr.len().saturating_sub(400)..])
                .into_owned();
        assert_eq!(r.code(), 125, "{fd}: {err}");
        assert!(
            err.contains(&format!(
                "vmm: error: the function wrote more than the 64 MiB output cap; its {fd} was cut there (the function exited with code 0)"
            )),
            "{fd}: {err}"
        );
        let ys = captured.iter().take_while(|&&b| b == b'y').count();
        assert_eq!(ys, 64 << 20, "{fd}: the output up to the cap is kept");
        if fd == "stdout" {
            assert!(other.starts_with(b"vmm: error:"), "nothing else on stderr");
        } else {
            assert!(other.is_empty());
        }

        let mut cmd = vmm();
        cmd.args([
            "run",
            "--module",
            &path("tests/guests/overflow.wat"),
            "--json",
        ])
        .args(&extra);
        let r = run_with_input(cmd, b"");
        let v: serde_json::Value = serde_json::from_slice(&r.output.stdout).expect("JSON");
        assert_eq!(r.code(), 125);
        assert_eq!(v["status"], 125);
        assert_eq!(v["reason"], "output_truncated");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v[format!("{fd}_truncated")], true);
        let other_fd = if fd == "stdout" { "stderr" } else { "stdout" };
        assert_eq!(v[format!("{other_fd}_truncated")], false);
        assert_eq!(v[fd].as_str().map(str::len), Some(64 << 20));
    }
    // Output within the cap is not flagged.
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("examples/upper.wat"), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(run_with_input(cmd, b"abc").stdout().trim()).unwrap();
    assert_eq!(v["stdout_truncated"], false);
    assert_eq!(v["stderr_truncated"], false);
    assert_eq!(v["reason"], "exit");
}

/// A reader of stdout that went away (`vmm run --json | head -c1`, `vmm template ls |
/// head -1`) is not a panic: the JSON object and the listing are written like the response,
/// whose write errors are ignored.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("run-closed-stdout");
    let mut cmd = vmm();
    cmd.args(["template", "create", "up", "--store", &store.arg()])
        .args(["--module", &path("examples/upper.wat")]);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    let runs: [&[&str]; 4] = [
        &["run", "--module", &path("examples/upper.wat"), "--json"],
        &["restore", "up", "--store", &store.arg(), "--json"],
        &["template", "ls", "--store", &store.arg()],
        &["template", "ls", "--store", &store.arg(), "--json"],
    ];
    for args in runs {
        // A pipe whose read end is closed before vmm writes: every write fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = vmm()
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}
