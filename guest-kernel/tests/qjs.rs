//! The real QuickJS-NG WASI reactor (workloads/, fetched by tools/fetch-workloads.sh).

mod common;

use common::{example, workload, TestHost};
use guest_kernel::{runner::run, Phase, Runtime};

fn run_js(
    script_name: &str,
    script: &[u8],
    extra: &[(&str, &[u8])],
    stdin: &[u8],
) -> (TestHost, guest_kernel::RunOutput) {
    let wasm = workload("qjs-wasi-reactor.wasm");
    let mut files: Vec<(&str, &[u8])> = vec![(script_name, script)];
    files.extend_from_slice(extra);
    let mut host = TestHost::new(&["qjs-wasi-reactor.wasm", script_name], &[], &files, stdin);
    let out = run(&mut host, &wasm, Runtime::Qjs, false)
        .unwrap_or_else(|e| panic!("run failed: {} ({})", e.message, e.code));
    (host, out)
}

fn all_stdout(host: &TestHost, out: &guest_kernel::RunOutput) -> String {
    let mut s = host.flushed_stdout.clone();
    s.extend_from_slice(&out.stdout);
    String::from_utf8(s).unwrap()
}

fn all_stderr(host: &TestHost, out: &guest_kernel::RunOutput) -> String {
    let mut s = host.flushed_stderr.clone();
    s.extend_from_slice(&out.stderr);
    String::from_utf8_lossy(&s).into_owned()
}

#[test]
fn hello_js() {
    let (host, out) = run_js("hello.js", &example("hello.js"), &[], br#"{"name":"x"}"#);
    assert_eq!(
        all_stdout(&host, &out),
        "{\"greeting\":\"Hello, x!\",\"length\":1}\n",
        "stderr: {}",
        all_stderr(&host, &out)
    );
    assert_eq!(out.exit_code, 0);
    assert_eq!(host.write_calls, 0, "small output stays buffered");
    assert_eq!(host.stdin_reads, 1, "one stdin hostcall suffices");
    assert_eq!(host.get_function_calls, 1);
    assert_eq!(
        host.marks,
        vec![
            Phase::Compiled,
            Phase::Instantiated,
            Phase::RuntimeInitialized,
            Phase::FunctionStart,
            Phase::FunctionEnd
        ]
    );
}

#[test]
fn markdown_js() {
    let marked = workload("marked.esm.js");
    let (host, out) = run_js(
        "markdown.js",
        &example("markdown.js"),
        &[("marked.esm.js", &marked)],
        b"# Hi\n\n*there*",
    );
    assert_eq!(
        all_stdout(&host, &out),
        "<h1>Hi</h1>\n<p><em>there</em></p>\n\n",
        "stderr: {}",
        all_stderr(&host, &out)
    );
    assert_eq!(out.exit_code, 0);
}

#[test]
fn script_in_subdirectory_imports_sibling() {
    let (host, out) = run_js(
        "app/main.js",
        b"import { v } from './lib/x.js'; print(v + scriptArgs.length);",
        &[("app/lib/x.js", b"export const v = 40;")],
        b"",
    );
    assert_eq!(
        all_stdout(&host, &out),
        "41\n",
        "stderr: {}",
        all_stderr(&host, &out)
    );
}

#[test]
fn throwing_script_exits_1_with_message_on_stderr() {
    let (host, out) = run_js("bad.js", b"throw new Error('boom');", &[], b"");
    assert_eq!(out.exit_code, 1);
    let err = all_stderr(&host, &out);
    assert!(err.contains("boom"), "stderr: {err}");
}

#[test]
fn std_exit_sets_exit_code() {
    let (host, out) = run_js("exit.js", b"print('a'); std.exit(3);", &[], b"");
    assert_eq!(out.exit_code, 3);
    assert_eq!(all_stdout(&host, &out), "a\n");
}

#[test]
fn large_output_is_flushed_in_1mib_chunks() {
    // 3 MiB of output: at least two flushes, nothing lost.
    let (host, out) = run_js(
        "big.js",
        b"const line = 'x'.repeat(1023); for (let i = 0; i < 3072; i++) print(line);",
        &[],
        b"",
    );
    let s = all_stdout(&host, &out);
    assert_eq!(s.len(), 3 * 1024 * 1024);
    assert!(host.write_calls >= 2, "write calls: {}", host.write_calls);
    assert!(out.stdout.len() <= 1 << 20);
}

#[test]
fn math_random_and_date() {
    let (host, out) = run_js(
        "r.js",
        b"print(Math.random()); print(Math.random()); print(Date.now());",
        &[],
        b"",
    );
    let s = all_stdout(&host, &out);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3, "{s}");
    let a: f64 = lines[0].parse().unwrap();
    let b: f64 = lines[1].parse().unwrap();
    assert!((0.0..1.0).contains(&a) && (0.0..1.0).contains(&b));
    assert_ne!(a, b);
    let now: f64 = lines[2].parse().unwrap();
    assert!(
        now > 1.6e12,
        "Date.now() comes from the realtime clock: {now}"
    );
    eprintln!(
        "Math.random: {a} {b}; clocks read {:?}, clock calls at marks {:?}, entropy calls {}",
        host.clock_log, host.clock_calls_at_mark, host.entropy_calls
    );
}

#[test]
fn math_random_seed_depends_on_the_clock_read_after_the_snapshot() {
    // Same clock readings -> same Math.random sequence (QuickJS seeds its xorshift from
    // clock_time_get, not random_get). What matters for snapshots: the seeding read
    // happens after get_function (the runtime base snapshot), so restored runs differ.
    let script: &[u8] = b"print(Math.random());";
    let (h1, o1) = run_js("r.js", script, &[], b"");
    let (h2, o2) = run_js("r.js", script, &[], b"");
    assert_eq!(all_stdout(&h1, &o1), all_stdout(&h2, &o2));
    eprintln!(
        "clocks read {:?} at marks {:?}",
        h1.clock_log, h1.clock_calls_at_mark
    );
    let at_runtime_init = h1.clock_calls_at_mark[2];
    assert_eq!(
        at_runtime_init, 0,
        "no clock read before the runtime snapshot"
    );
    assert!(h1.clock_calls > 0);
}
