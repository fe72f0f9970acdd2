//! End-to-end tests of what `vmm` reads and how it is told what to do: every input is read
//! with a bound known before reading (guest RAM for the module and files, the request
//! limit for stdin, `--input` and `--trial-input`), `--timeout` out of range is refused,
//! `--runtime qjs` needs its script, and `--env` reaches JavaScript. The real binary, real
//! special files (/dev/zero, an endless pipe), a real store on disk, /dev/kvm where a guest
//! runs.

mod common;
use common::*;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `vmm`'s exit status when it (not the function) fails.
const EXIT_FAILURE: i32 = 125;
/// The documented request limit.
const REQUEST_LIMIT: u64 = 64 << 20;
/// Beyond this, a command is hung (or reading without end).
const DEADLINE: Duration = Duration::from_secs(60);

/// How the child's standard input is fed.
enum Stdin {
    Bytes(Vec<u8>),
    /// An endless stream of `y\n` lines, as from `yes`, until the child closes the pipe.
    Endless,
}

/// A finished child, its peak resident set size and its exit status.
struct Measured {
    code: i32,
    stderr: String,
    stdout: Vec<u8>,
    max_rss_mib: u64,
    elapsed: Duration,
}

/// Resident set size of `pid` in MiB (from /proc), 0 once it is gone.
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| (pages * 4096) >> 20)
        .unwrap_or(0)
}

/// Run `cmd` with `stdin`, watching its memory: if its RSS passes `rss_cap_mib` or it outlives
/// [`DEADLINE`] it is killed and the test fails (an unbounded read would otherwise take the
/// machine's memory). The peak RSS comes from `wait4`.
// The child is reaped by `wait4`, not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_bounded(what: &str, mut cmd: Command, stdin: Stdin, rss_cap_mib: u64) -> Measured {
    use std::io::Read;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut pipe = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || match stdin {
        Stdin::Bytes(b) => {
            let _ = pipe.write_all(&b);
        }
        Stdin::Endless => {
            let chunk = b"y\n".repeat(32 << 10);
            while pipe.write_all(&chunk).is_ok() {}
        }
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let pid = child.id();
    let (status, max_rss_kib) = reap_watched(&mut child, || {
        let rss = rss_mib(pid);
        let hung = started.elapsed() > DEADLINE;
        (rss > rss_cap_mib || hung).then(|| {
            format!(
                "[{what}] killed: RSS {rss} MiB (cap {rss_cap_mib} MiB) after {:?}{}",
                started.elapsed(),
                if hung {
                    ": a hang"
                } else {
                    ": unbounded memory"
                }
            )
        })
    });
    let _ = writer.join();
    let m = Measured {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
        max_rss_mib: max_rss_kib / 1024,
        elapsed: started.elapsed(),
    };
    eprintln!(
        "[{what}] exit {} in {:?}, peak RSS {} MiB: {}",
        m.code,
        m.elapsed,
        m.max_rss_mib,
        m.stderr.trim()
    );
    m
}

/// Refused with `vmm: error:` naming every `expect`, and no VMM panic.
#[track_caller]
fn assert_refused(what: &str, m: &Measured, expect: &[&str]) {
    assert_eq!(m.code, EXIT_FAILURE, "[{what}] exit status: {}", m.stderr);
    assert!(m.stderr.contains("vmm: error:"), "[{what}] {}", m.stderr);
    for e in expect {
        assert!(
            m.stderr.contains(e),
            "[{what}] stderr should mention {e:?}: {}",
            m.stderr
        );
    }
    assert!(
        !m.stderr.contains("panicked") && !m.stderr.contains("RUST_BACKTRACE"),
        "[{what}] the VMM panicked: {}",
        m.stderr
    );
}

fn upper() -> String {
    path("examples/upper.wat")
}

fn run_cmd(extra: &[&str]) -> Command {
    let mut cmd = vmm();
    cmd.arg("run").args(extra);
    cmd
}

// --- endless and oversized inputs ------------------------------------------------------------

#[test]
fn endless_module_and_file_are_refused_within_guest_ram() {
    // No guest runs: the inputs are refused before a VM exists (no /dev/kvm needed).
    // --mem 64: the module and files must fit in 64 MiB, so /dev/zero is cut after 64 MiB.
    for (what, args, expect) in [
        (
            "--module /dev/zero",
            vec!["--module", "/dev/zero", "--mem", "64"],
            &["--module /dev/zero", "64 MiB", "--mem"][..],
        ),
        (
            "--file /dev/zero:z",
            vec!["--module", &upper(), "--file", "/dev/zero:z", "--mem", "64"],
            &["--file /dev/zero", "64 MiB", "--mem"],
        ),
    ] {
        let m = run_bounded(what, run_cmd(&args), Stdin::Bytes(b"x\n".to_vec()), 400);
        assert_refused(what, &m, expect);
        assert!(
            m.max_rss_mib < 200,
            "[{what}] peak RSS {} MiB",
            m.max_rss_mib
        );
    }
    // At the default 512 MiB of guest RAM the bound is 512 MiB (measured for the README).
    let m = run_bounded(
        "--file /dev/zero:z, default --mem",
        run_cmd(&["--module", &upper(), "--file", "/dev/zero:z"]),
        Stdin::Bytes(b"x\n".to_vec()),
        1500,
    );
    assert_refused("--file /dev/zero:z", &m, &["512 MiB"]);
    assert!(m.max_rss_mib < 700, "peak RSS {} MiB", m.max_rss_mib);
}

#[test]
fn endless_request_is_refused_at_the_request_limit() {
    for (what, args, stdin) in [
        (
            "--input /dev/zero",
            vec!["--module", "UPPER", "--input", "/dev/zero"],
            Stdin::Bytes(vec![]),
        ),
        ("endless stdin", vec!["--module", "UPPER"], Stdin::Endless),
    ] {
        let up = upper();
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "UPPER" { up.as_str() } else { a })
            .collect();
        let m = run_bounded(what, run_cmd(&args), stdin, 400);
        let name = if what == "endless stdin" {
            "standard input"
        } else {
            what
        };
        assert_refused(what, &m, &[name, "64 MiB"]);
        assert!(
            m.max_rss_mib < 150,
            "[{what}] peak RSS {} MiB",
            m.max_rss_mib
        );
    }
    // template create --trial-input: refused before the store is even created.
    let store = TempDir::new("inputs-trial");
    let mut cmd = vmm();
    cmd.args(["template", "create", "t", "--store", &store.arg()])
        .args(["--module", &upper(), "--trial-input", "/dev/zero"]);
    let m = run_bounded("--trial-input /dev/zero", cmd, Stdin::Bytes(vec![]), 400);
    assert_refused(
        "--trial-input /dev/zero",
        &m,
        &["--trial-input /dev/zero", "64 MiB"],
    );
    assert!(!store.0.exists(), "a refused create made the store");
}

#[test]
fn an_endless_guest_kernel_override_is_refused() {
    if !kvm_available() {
        return;
    }
    let mut cmd = run_cmd(&["--module", &upper()]);
    cmd.env("VMM_GUEST_KERNEL", "/dev/zero");
    let m = run_bounded("VMM_GUEST_KERNEL=/dev/zero", cmd, Stdin::Bytes(vec![]), 400);
    assert_refused(
        "VMM_GUEST_KERNEL=/dev/zero",
        &m,
        &["$VMM_GUEST_KERNEL", "64 MiB"],
    );
    assert!(m.max_rss_mib < 150, "peak RSS {} MiB", m.max_rss_mib);
}

#[test]
fn oversized_regular_files_are_refused_before_reading() {
    let dir = TempDir::created("inputs-big");
    // Sparse files: their size is known from metadata, nothing needs reading to refuse them.
    let big = |name: &str, len: u64| {
        let p = dir.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.to_string_lossy().into_owned()
    };
    let request = big("request", REQUEST_LIMIT + 1);
    let module = big("module.wasm", 64 << 20 | 1);
    let file = big("data.bin", 40 << 20);
    for (what, args, expect) in [
        (
            "--input of 64 MiB + 1",
            vec![
                "--module".to_string(),
                upper(),
                "--input".into(),
                request.clone(),
            ],
            vec![format!("--input {request}"), "64 MiB".into()],
        ),
        (
            "--module of 64 MiB + 1 in 64 MiB of RAM",
            vec![
                "--module".into(),
                module.clone(),
                "--mem".into(),
                "64".into(),
            ],
            vec![format!("--module {module}"), "64 MiB".into()],
        ),
        (
            "--file that with the module passes 64 MiB",
            vec![
                "--module".into(),
                upper(),
                "--file".into(),
                format!("{file}:a"),
                "--file".into(),
                format!("{file}:b"),
                "--mem".into(),
                "64".into(),
            ],
            vec![format!("--file {file}"), "64 MiB".into()],
        ),
    ] {
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        let m = run_bounded(
            what,
            run_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()),
            Stdin::Bytes(vec![]),
            400,
        );
        assert_refused(what, &m, &expect);
        assert!(
            m.max_rss_mib < 100,
            "[{what}] read it anyway: peak RSS {} MiB",
            m.max_rss_mib
        );
    }
}

#[test]
fn a_request_at_the_limit_is_accepted_and_restore_bounds_its_input() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("inputs-limit");
    let at_limit = dir.0.join("request");
    std::fs::File::create(&at_limit)
        .unwrap()
        .set_len(REQUEST_LIMIT)
        .unwrap();
    // The function exits without reading: the request is read in full and accepted.
    let m = run_bounded(
        "--input of exactly 64 MiB",
        run_cmd(&[
            "--module",
            &path("tests/guests/noread_exit.wat"),
            "--input",
            &at_limit.to_string_lossy(),
        ]),
        Stdin::Bytes(vec![]),
        1000,
    );
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert_eq!(m.stdout, b"no request\n");

    // restore: the same limits for --input and stdin.
    let store = TempDir::new("inputs-restore");
    let mut cmd = vmm();
    cmd.args(["template", "create", "up", "--store", &store.arg()])
        .args(["--module", &upper()]);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    for (what, extra, stdin) in [
        (
            "restore --input /dev/zero",
            vec!["--input", "/dev/zero"],
            Stdin::Bytes(vec![]),
        ),
        ("restore with endless stdin", vec![], Stdin::Endless),
    ] {
        let mut cmd = vmm();
        cmd.args(["restore", "up", "--store", &store.arg()])
            .args(&extra);
        let m = run_bounded(what, cmd, stdin, 400);
        assert_refused(what, &m, &["64 MiB"]);
        assert!(
            m.max_rss_mib < 150,
            "[{what}] peak RSS {} MiB",
            m.max_rss_mib
        );
    }
    let mut cmd = vmm();
    cmd.args(["restore", "up", "--store", &store.arg()]);
    let r = run_with_input(cmd, b"still works\n");
    assert_eq!(r.stdout(), "STILL WORKS\n", "{}", r.stderr());
}

// --- --timeout ---------------------------------------------------------------------------------

#[test]
fn out_of_range_timeouts_are_refused_by_run_restore_and_template_create() {
    let store = TempDir::new("inputs-timeout");
    for t in [
        "1e20", "1.8e19", "inf", "-inf", "nan", "0", "-1", "1e-9", "86401",
    ] {
        let commands: [(&str, Vec<String>); 3] = [
            ("run", vec!["run".into(), "--module".into(), upper()]),
            (
                "restore",
                vec!["restore".into(), "t".into(), "--store".into(), store.arg()],
            ),
            (
                "template create",
                vec![
                    "template".into(),
                    "create".into(),
                    "t".into(),
                    "--store".into(),
                    store.arg(),
                    "--module".into(),
                    upper(),
                ],
            ),
        ];
        for (what, args) in commands {
            let mut cmd = vmm();
            cmd.args(&args).arg(format!("--timeout={t}"));
            let m = run_bounded(
                &format!("{what} --timeout {t}"),
                cmd,
                Stdin::Bytes(b"x".to_vec()),
                400,
            );
            assert_refused(
                &format!("{what} --timeout {t}"),
                &m,
                &["--timeout", "0.001 to 86400"],
            );
        }
        // Also as a separate argument (a leading '-' is the value, not an option).
        let mut cmd = vmm();
        cmd.args(["run", "--module", &upper(), "--timeout", t]);
        let m = run_bounded(
            &format!("run --timeout {t}"),
            cmd,
            Stdin::Bytes(vec![]),
            400,
        );
        assert_refused(&format!("run --timeout {t}"), &m, &["--timeout"]);
    }
    assert!(!store.0.exists(), "a refused create made the store");
}

#[test]
fn the_largest_timeout_runs_normally() {
    if !kvm_available() {
        return;
    }
    let mut cmd = run_cmd(&["--module", &upper(), "--timeout", "86400"]);
    cmd.arg("--json");
    let r = run_with_input(cmd, b"ok");
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).expect("JSON");
    assert_eq!(v["status"], 0, "{v}");
    assert_eq!(v["stdout"], "OK");
}

// --- --runtime qjs without its script --------------------------------------------------------

#[test]
fn qjs_without_a_script_is_refused_before_booting() {
    let qjs = workload("qjs-wasi-reactor.wasm");
    let hello = path("examples/hello.js");
    let m = run_bounded(
        "run --runtime qjs without --arg",
        run_cmd(&["--module", &qjs, "--runtime", "qjs", "--file", &hello]),
        Stdin::Bytes(b"{}".to_vec()),
        400,
    );
    assert_refused("run qjs", &m, &["--runtime qjs", "--arg"]);
    assert!(m.stdout.is_empty());
    let store = TempDir::new("inputs-qjs");
    let mut cmd = vmm();
    cmd.args(["template", "create", "h", "--store", &store.arg()])
        .args(["--module", &qjs, "--runtime", "qjs", "--file", &hello]);
    let m = run_bounded("template create qjs", cmd, Stdin::Bytes(vec![]), 400);
    assert_refused("template create qjs", &m, &["--runtime qjs", "--arg"]);
    assert!(!store.0.exists(), "a refused create made the store");
}

// --- --env reaches JavaScript ------------------------------------------------------------------

const ENV_JS: &str = "const req = std.in.readAsString();\n\
print(JSON.stringify({req, greeting: std.getenv('GREETING'), eq: std.getenv('EQ'), env: std.getenviron()}));\n";

#[test]
fn env_reaches_javascript_in_run_and_from_a_template() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("inputs-env");
    let script = dir.0.join("env.js");
    std::fs::write(&script, ENV_JS).unwrap();
    let function = [
        "--module".to_string(),
        workload("qjs-wasi-reactor.wasm"),
        "--runtime".into(),
        "qjs".into(),
        "--file".into(),
        script.to_string_lossy().into_owned(),
        "--arg".into(),
        "env.js".into(),
        "--env".into(),
        "GREETING=hello there".into(),
        "--env".into(),
        "EQ=a=b".into(),
    ];
    let expect = |req: &str| {
        format!(
            "{{\"req\":\"{req}\",\"greeting\":\"hello there\",\"eq\":\"a=b\",\"env\":{{\"GREETING\":\"hello there\",\"EQ\":\"a=b\"}}}}\n"
        )
    };
    let mut cmd = vmm();
    cmd.arg("run").args(&function);
    let r = run_with_input(cmd, b"cold");
    assert_eq!(r.stdout(), expect("cold"), "stderr: {}", r.stderr());
    assert_eq!(r.code(), 0);

    let store = TempDir::new("inputs-env-store");
    let mut cmd = vmm();
    cmd.args(["template", "create", "env", "--store", &store.arg()])
        .args(&function);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    for memory in ["prefetch", "lazy"] {
        let mut cmd = vmm();
        cmd.args([
            "restore",
            "env",
            "--store",
            &store.arg(),
            "--memory",
            memory,
        ]);
        let r = run_with_input(cmd, b"warm");
        assert_eq!(
            r.stdout(),
            expect("warm"),
            "restore --memory {memory}: {}",
            r.stderr()
        );
        assert_eq!(r.code(), 0);
    }
    // A template created without --env sees none (nothing leaks from another template).
    let mut cmd = vmm();
    cmd.args(["template", "create", "noenv", "--store", &store.arg()])
        .args(&function[..8]);
    let c = run_with_input(cmd, b"");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    let mut cmd = vmm();
    cmd.args(["restore", "noenv", "--store", &store.arg()]);
    let r = run_with_input(cmd, b"x");
    assert_eq!(
        r.stdout(),
        "{\"req\":\"x\",\"env\":{}}\n",
        "stderr: {}",
        r.stderr()
    );
    assert!(Path::new(&store.0).exists());
}
