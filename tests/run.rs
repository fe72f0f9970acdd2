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
