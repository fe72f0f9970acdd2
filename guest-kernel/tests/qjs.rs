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

/// Run `script` with `entropy` from the host (and `after` once stdin has been read).
fn run_random(
    script: &[u8],
    entropy: [u8; 32],
    after: Option<[u8; 32]>,
    stdin: &[u8],
) -> (TestHost, String) {
    let wasm = workload("qjs-wasi-reactor.wasm");
    let mut host = TestHost::new(
        &["qjs-wasi-reactor.wasm", "r.js"],
        &[],
        &[("r.js", script)],
        stdin,
    );
    host.entropy = Some(entropy);
    host.entropy_after_stdin = after;
    let out = run(&mut host, &wasm, Runtime::Qjs, false)
        .unwrap_or_else(|e| panic!("run failed: {} ({})", e.message, e.code));
    let s = all_stdout(&host, &out);
    assert_eq!(out.exit_code, 0, "stderr: {}", all_stderr(&host, &out));
    (host, s)
}

fn floats(s: &str) -> Vec<f64> {
    s.lines().map(|l| l.parse().unwrap()).collect()
}

#[test]
fn math_random_follows_host_entropy_not_the_clock() {
    // The TestHost clock is deterministic, so both runs read identical times (as two
    // restores of one template would see the same clock state when QuickJS seeded).
    let script: &[u8] = b"for (let i = 0; i < 4; i++) print(Math.random());";
    let (h1, o1) = run_random(script, [1; 32], None, b"");
    let (h2, o2) = run_random(script, [2; 32], None, b"");
    assert_eq!(h1.clock_log, h2.clock_log);
    assert_eq!(h1.clock, h2.clock, "identical clock readings");
    assert_ne!(o1, o2, "different entropy, different Math.random");
    let (a, b) = (floats(&o1), floats(&o2));
    assert_eq!(a.len(), 4);
    for x in a.iter().chain(&b) {
        assert!((0.0..1.0).contains(x), "{x}");
    }
    for i in 0..4 {
        assert_ne!(a[i], b[i]);
    }
    // Same entropy, same clock: same values (the entropy alone decides them).
    let (_, o3) = run_random(script, [1; 32], None, b"");
    assert_eq!(o1, o3);
    // Each call reads the device, which asks the host for entropy first.
    assert!(h1.entropy_calls >= 4, "{}", h1.entropy_calls);
    // No clock read before the runtime base snapshot.
    assert_eq!(h1.clock_calls_at_mark[2], 0);
}

#[test]
fn math_random_thousand_draws() {
    let script: &[u8] = b"for (let i = 0; i < 1000; i++) print(Math.random());";
    let (_, o) = run_random(script, [7; 32], None, b"");
    let v = floats(&o);
    assert_eq!(v.len(), 1000);
    assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    // Standard error of the mean is ~0.009.
    assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    let low = v.iter().filter(|&&x| x < 0.5).count();
    assert!((400..=600).contains(&low), "{low} below 0.5");
    let mut sorted = v.clone();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    assert_eq!(sorted.len(), 1000, "no repeats");
    // Fine-grained: not just a few bits of randomness.
    assert!(
        v.iter().any(|x| x * 2f64.powi(32) % 1.0 != 0.0),
        "53-bit values"
    );
}

#[test]
fn math_random_looks_native() {
    let script: &[u8] = br#"
        const d = Object.getOwnPropertyDescriptor(Math, 'random');
        print(Math.random.name, Math.random.length, d.enumerable, d.writable, d.configurable);
        print(Object.keys(Math).includes('random'), typeof Math.random());
        const root = os.readdir('/')[0].sort();
        print(root.join(','));
        print(os.readdir('/dev')[0].sort().join(','));
        // The device opens by relative and absolute path; std FILEs are not used.
        for (const p of ['dev/urandom', '/dev/urandom']) {
            const fd = os.open(p, os.O_RDONLY);
            const b = new Uint8Array(16);
            print(fd >= 0, os.read(fd, b.buffer, 0, 16));
            os.close(fd);
        }
        print(os.open('.vmm/prelude.js', os.O_RDONLY) >= 0);
        print(scriptArgs.join(' '));
    "#;
    let (_, o) = run_random(script, [3; 32], None, b"");
    let lines: Vec<&str> = o.lines().collect();
    assert_eq!(lines[0], "random 0 false true true", "{o}");
    assert_eq!(lines[1], "false number", "{o}");
    assert_eq!(lines[2], ".,..,dev,r.js", "prelude directory hidden: {o}");
    assert_eq!(lines[3], ".,..,urandom", "{o}");
    assert_eq!(lines[4], "true 16", "{o}");
    assert_eq!(lines[5], "true 16", "{o}");
    assert_eq!(lines[6], "true", "{o}");
    assert_eq!(
        lines[7], "r.js",
        "the prelude is not a script argument: {o}"
    );
}

#[test]
fn entropy_after_the_template_point_changes_later_values() {
    // The template is taken at the first stdin read; after a restore the host supplies
    // new entropy. Values drawn before the read agree, values drawn after it differ.
    let script: &[u8] = br#"
        print(Math.random());
        std.in.readAsString();
        print(Math.random());
        print(Math.random());
    "#;
    let (h1, o1) = run_random(script, [1; 32], None, b"input");
    let (h2, o2) = run_random(script, [1; 32], Some([9; 32]), b"input");
    let (_, o3) = run_random(script, [1; 32], Some([10; 32]), b"input");
    assert_eq!(h1.clock_log, h2.clock_log, "identical clock readings");
    let (a, b, c) = (floats(&o1), floats(&o2), floats(&o3));
    assert_eq!(a.len(), 3);
    assert_eq!(a[0], b[0], "before the template point: same state");
    assert_eq!(a[0], c[0]);
    for i in 1..3 {
        assert_ne!(a[i], b[i], "restore entropy must change later values");
        assert_ne!(b[i], c[i], "different restores, different values");
    }
    assert!(
        h2.entropy_after_stdin.is_none(),
        "the new entropy was taken"
    );
}

/// `--env` reaches JavaScript: wasi-libc reads `environ` during `_initialize` (before the
/// function's configuration exists: that is where the runtime base is taken), so the
/// runner must hand the function's environment to QuickJS's libc afterwards.
#[test]
fn env_reaches_std_getenv_and_getenviron() {
    let wasm = workload("qjs-wasi-reactor.wasm");
    let script: &[u8] = b"print(std.getenv('FOO')); print(std.getenv('EQ')); \
        print(std.getenv('EMPTY') === '' ? 'empty' : 'missing'); \
        print(std.getenv('NOPE')); print(JSON.stringify(std.getenviron()));";
    let mut host = TestHost::new(
        &["qjs-wasi-reactor.wasm", "env.js"],
        &["FOO=bar baz", "EQ=a=b", "EMPTY=", "UNI=\u{e9}\u{1f600}"],
        &[("env.js", script)],
        b"",
    );
    let out = run(&mut host, &wasm, Runtime::Qjs, false)
        .unwrap_or_else(|e| panic!("run failed: {} ({})", e.message, e.code));
    assert_eq!(out.exit_code, 0, "stderr: {}", all_stderr(&host, &out));
    assert_eq!(
        all_stdout(&host, &out),
        "bar baz\na=b\nempty\nundefined\n\
         {\"FOO\":\"bar baz\",\"EQ\":\"a=b\",\"EMPTY\":\"\",\"UNI\":\"\u{e9}\u{1f600}\"}\n"
    );
}
