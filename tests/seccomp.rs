//! Seccomp filters per thread kind (issue 21): every thread of a real `vmm serve` and of
//! its worker processes runs under a filter once it serves (`/proc/PID/task/TID/status`:
//! `Seccomp: 2`), with the filter its kind's name says, and a daemon asked for `--seccomp
//! off` has none. (That a thread making a call outside its list stops the process is
//! tested per kind in the library: `vmm::seccomp::tests`, through a test-only hook.)

mod common;
use common::daemon::Daemon;
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Each thread of `pid`: (name, Seccomp mode, Seccomp_filters).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(u32::MAX),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out.sort();
    out
}

/// The child processes of `pid` (the daemon's worker processes).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The names this program gives its threads, and the kind each runs as.
fn expected_kind(name: &str) -> Option<&'static str> {
    Some(match name {
        "vmm" | "vmm-http" => "api",
        "vmm-serve-cell" => "vcpu",
        n if n.starts_with("vmm-worker-") => "vcpu",
        "vmm-pool-keeper" => "keeper",
        "vmm-watchdog" => "watchdog",
        "vmm-reaper" => "reaper",
        "vmm-cancel" => "cancel",
        "vmm-faults" => "faults",
        // KVM's own worker (NX huge page recovery), a kernel thread counted among the
        // process's tasks: it inherits the filter of the thread that made the VM and
        // never returns to user space.
        n if n.starts_with("kvm-") => "kernel",
        _ => return None,
    })
}

/// Every thread of `pid` is filtered (mode 2, at least one filter) and has a name whose
/// kind is known; returns the threads by kind.
fn assert_all_filtered(pid: u32, what: &str, log: &dyn Fn() -> String) -> BTreeMap<String, usize> {
    let ts = threads(pid);
    assert!(!ts.is_empty(), "{what}: no threads in /proc/{pid}");
    let mut kinds = BTreeMap::new();
    for (name, mode, filters) in &ts {
        let kind = expected_kind(name)
            .unwrap_or_else(|| panic!("{what}: thread {name:?} of no known kind: {ts:?}"));
        assert_eq!(
            *mode,
            2,
            "{what}: thread {name} ({kind}) is not filtered: {ts:?}\n{}",
            log()
        );
        assert!(*filters >= 1, "{what}: thread {name}: {ts:?}");
        *kinds.entry(kind.to_string()).or_insert(0) += 1;
    }
    eprintln!("{what} (pid {pid}): {ts:?}");
    kinds
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_thread_of_the_daemon_and_its_worker_processes_is_filtered_by_kind() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("seccomp-serve");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    for extra in [
        &["--pool", "2"][..],
        &["--pool", "2", "--processes", "2"][..],
    ] {
        let d = Daemon::start(&store, extra);
        d.wait_pools(1, 2);
        for i in 0..20 {
            let (status, body, _) = d.invoke("hello", format!(r#"{{"name":"s{i}"}}"#).as_bytes());
            assert_eq!(status, 200, "{body}\n{}", d.log());
            assert!(body.contains(&format!("Hello, s{i}!")), "{body}");
        }
        let log = || d.log();
        let kinds = assert_all_filtered(d.child.id(), &format!("vmm serve {extra:?}"), &log);
        assert!(kinds.contains_key("api"), "{kinds:?}");
        assert!(kinds.contains_key("watchdog"), "{kinds:?}");
        if extra.contains(&"--processes") {
            let cells = wait_for("two worker processes", || {
                let c = children(d.child.id());
                (c.len() == 2).then_some(c)
            });
            for c in cells {
                let kinds = assert_all_filtered(c, "a worker process", &log);
                for k in ["vcpu", "keeper", "cancel", "reaper", "watchdog"] {
                    assert!(
                        kinds.contains_key(k),
                        "worker process: no {k} thread: {kinds:?}"
                    );
                }
            }
        } else {
            for k in ["vcpu", "keeper", "reaper"] {
                assert!(kinds.contains_key(k), "daemon: no {k} thread: {kinds:?}");
            }
        }
        assert!(
            d.logged("system call filters seccomp=\"on\"") || d.logged("seccomp=on"),
            "{}",
            d.log()
        );
    }
}

#[test]
fn seccomp_off_installs_no_filter() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("seccomp-off");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    let d = Daemon::start(&store, &["--pool", "1", "--seccomp", "off"]);
    d.wait_pools(1, 1);
    let (status, body, _) = d.invoke("hello", br#"{"name":"off"}"#);
    assert_eq!(status, 200, "{body}");
    let ts = threads(d.child.id());
    assert!(ts.iter().all(|(_, mode, _)| *mode == 0), "{ts:?}");
}

#[test]
fn restore_runs_its_guest_under_the_vcpu_filter_with_every_memory_strategy() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("seccomp-restore");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    for m in ["eager", "prefetch", "lazy", "shared"] {
        let mut cmd = vmm();
        cmd.args(["restore", "hello", "--store", &store.arg(), "--memory", m]);
        let r = run_with_input(cmd, br#"{"name":"f"}"#);
        assert_eq!(r.code(), 0, "--memory {m}: {}", r.stderr());
        assert!(r.stdout().contains("Hello, f!"), "{}", r.stdout());
        assert!(!r.stderr().contains("seccomp"), "{}", r.stderr());
    }
}
