//! Shared helpers for the end-to-end tests: they drive the real `vmm` binary on the real
//! /dev/kvm with the real third-party workloads.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
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

/// Run `cmd` with `input` on stdin.
pub fn run_with_input(mut cmd: Command, input: &[u8]) -> Run {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write request");
    let output = child.wait_with_output().expect("wait for vmm");
    Run {
        output,
        elapsed: t0.elapsed(),
    }
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
