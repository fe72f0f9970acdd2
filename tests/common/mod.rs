//! Shared helpers for the end-to-end tests: they drive the real `vmm` binary on the real
//! /dev/kvm with the real third-party workloads.
#![allow(dead_code)]

pub mod daemon;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn path(rel: &str) -> String {
    root().join(rel).to_string_lossy().into_owned()
}

/// Whether KVM is usable. Without it the test skips with a reason, unless
/// VMM_REQUIRE_KVM=1 (CI), where a missing /dev/kvm is a failure.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("VMM_REQUIRE_KVM=1 but /dev/kvm cannot be opened read-write");
        }
        eprintln!(
            "SKIPPED: /dev/kvm is not available (set VMM_REQUIRE_KVM=1 to make this a failure)"
        );
    }
    ok
}

/// Path of a fetched third-party workload; panics with the fix if it is missing.
pub fn workload(name: &str) -> String {
    let p = root().join("workloads").join(name);
    assert!(
        p.exists(),
        "{} is missing: run tools/fetch-workloads.sh first",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

/// Path of a fetched workload that only some tests need (python.wasm, 26 MB): `None`
/// when it is missing, and the test skips saying how to get it, unless VMM_REQUIRE_KVM=1
/// (CI), where a missing workload is a failure.
pub fn optional_workload(name: &str) -> Option<String> {
    let p = root().join("workloads").join(name);
    if p.exists() {
        return Some(p.to_string_lossy().into_owned());
    }
    let msg = format!(
        "{} is missing: run tools/fetch-workloads.sh first",
        p.display()
    );
    if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{msg} (VMM_REQUIRE_KVM=1)");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The `vmm-store` tool built beside `vmm` (the workspace must be built whole).
pub fn vmm_store() -> Command {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_vmm")).with_file_name("vmm-store");
    assert!(
        p.exists(),
        "{} is missing: build the whole workspace first (`cargo build --release --workspace`)",
        p.display()
    );
    Command::new(p)
}

pub fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
}

pub struct Run {
    pub output: Output,
    pub elapsed: Duration,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
}

/// A scratch directory under the system temp dir, removed (with its contents) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A path for `tag`, not yet created (anything left there by an earlier run is removed).
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmm-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    /// Like [`TempDir::new`], and the directory exists.
    pub fn created(tag: &str) -> Self {
        let d = Self::new(tag);
        std::fs::create_dir_all(&d.0).expect("create a temp dir");
        d
    }
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A spawned child whose stdin is fed and whose stdout/stderr are drained on threads, so
/// that neither side can block on a full pipe whatever the child writes.
pub struct Piped {
    pub child: std::process::Child,
    pub started: Instant,
    writer: std::thread::JoinHandle<()>,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

impl Piped {
    pub fn spawn(cmd: &mut Command, input: &[u8]) -> Piped {
        use std::io::Read;
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
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
        Piped {
            child,
            started,
            writer,
            out,
            err,
        }
    }

    /// Collect the output once the child has exited with `status`.
    pub fn finish(self, status: std::process::ExitStatus) -> Run {
        let _ = self.writer.join();
        Run {
            output: Output {
                status,
                stdout: self.out.join().unwrap(),
                stderr: self.err.join().unwrap(),
            },
            elapsed: self.started.elapsed(),
        }
    }
}

/// `vmm template create NAME --store STORE FUNCTION...`; fails the test unless it succeeds.
pub fn create(store: &TempDir, name: &str, function: &[String]) {
    let mut cmd = vmm();
    cmd.args(["template", "create", name, "--store", &store.arg()])
        .args(function);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "template create {name}: {}", r.stderr());
}

/// `vmm restore NAME --store STORE` with `input` on stdin.
pub fn restore(store: &TempDir, name: &str, input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.args(["restore", name, "--store", &store.arg()]);
    run_with_input(cmd, input)
}

/// Run `cmd` with `input` on stdin.
pub fn run_with_input(mut cmd: Command, input: &[u8]) -> Run {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    // A child that fails before reading its request (a missing template, a bad option)
    // closes the pipe first: its status and stderr tell, not this write's EPIPE.
    if let Err(e) = child.stdin.take().unwrap().write_all(input) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "write request: {e}"
        );
    }
    let output = child.wait_with_output().expect("wait for vmm");
    Run {
        output,
        elapsed: t0.elapsed(),
    }
}

/// `vmm run --engine wasmtime --store STORE --json FUNCTION...` with `env` set and `input`
/// on stdin: its JSON report and its stderr.
pub fn run_json_with(
    store: &TempDir,
    function: &[String],
    input: &[u8],
    env: &[(&str, &str)],
) -> (serde_json::Value, String) {
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--engine",
        "wasmtime",
        "--store",
        &store.arg(),
        "--json",
    ])
    .args(function)
    .envs(env.iter().copied());
    let r = run_with_input(cmd, input);
    let v = serde_json::from_str(r.stdout().trim())
        .unwrap_or_else(|e| panic!("one JSON object ({e}): {} / {}", r.stdout(), r.stderr()));
    (v, r.stderr())
}

/// `vmm run` of the QuickJS reactor with `script` (an examples/ file).
pub fn qjs_run(script: &str, extra_files: &[String], input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--module",
        &workload("qjs-wasi-reactor.wasm"),
        "--runtime",
        "qjs",
    ]);
    cmd.args([
        "--file",
        &path(&format!("examples/{script}")),
        "--arg",
        script,
    ]);
    for f in extra_files {
        cmd.args(["--file", f]);
    }
    run_with_input(cmd, input)
}

/// The function options of a QuickJS function: `script` is an `examples/` file name, or a
/// path relative to the repository; `extra` are more `--file` arguments.
pub fn qjs_function_args(script: &str, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "--module".into(),
        workload("qjs-wasi-reactor.wasm"),
        "--runtime".into(),
        "qjs".into(),
        "--file".into(),
        if script.contains('/') {
            path(script)
        } else {
            path(&format!("examples/{script}"))
        },
        "--arg".into(),
        Path::new(script)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    ];
    for f in extra {
        a.push("--file".into());
        a.push(f.clone());
    }
    a
}

/// Wait for `child` and reap it with `wait4`, which also gives its peak resident set size
/// (KiB). While it runs, `watch` is asked every 2 ms whether to give up: if it returns a
/// reason, the child is killed and reaped and the test fails with that reason.
// The child is reaped by `wait4`, not `Child::wait`.
#[allow(clippy::zombie_processes)]
pub fn reap_watched(
    child: &mut std::process::Child,
    mut watch: impl FnMut() -> Option<String>,
) -> (std::process::ExitStatus, u64) {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain-old-data out parameter for wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child's pid, with valid out pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4: {}", std::io::Error::last_os_error());
        if let Some(reason) = watch() {
            let _ = child.kill();
            // SAFETY: as above; reaps the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            panic!("{reason}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (
        std::process::ExitStatus::from_raw(status),
        ru.ru_maxrss as u64,
    )
}
