//! End-to-end tests of `vmm serve --user` (issue 21): the real daemon, started as root,
//! jails itself and drops to `nobody`; it then serves every example (JavaScript, Python,
//! WASI) from templates and deploys a function through its API (which records the
//! working set through the jail's /dev/userfaultfd), and the kernel's own account of the
//! daemon and its worker process (/proc/PID/status, /proc/PID/root) shows the user, no
//! capabilities, no_new_privs and a root where nothing of the host but the store is.
//! Also: the hardened systemd unit passes `systemd-analyze verify`.

mod common;
#[path = "common/garage.rs"]
mod garage;
use common::daemon::Daemon;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NOBODY: u32 = 65534;
const DEPLOYER: &str = "jail-deployer-token";

/// Whether the test runs as root (the daemon must start as root to jail itself); else it
/// skips, or fails under VMM_REQUIRE_KVM=1 (where CI runs as root).
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0;
    if !ok {
        if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("VMM_REQUIRE_KVM=1 but the tests do not run as root, which `vmm serve --user` needs");
        }
        eprintln!("SKIPPED: `vmm serve --user` must start as root and the tests do not run as root (set VMM_REQUIRE_KVM=1 to make this a failure)");
    }
    ok
}

/// The user `nobody` must be uid 65534 here (Debian, Fedora, Alpine all agree).
fn nobody_exists() -> bool {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ok = passwd
        .lines()
        .any(|l| l.starts_with(&format!("nobody:x:{NOBODY}:")));
    assert!(
        ok,
        "no user nobody with uid {NOBODY} in /etc/passwd: add one (`useradd -u {NOBODY} nobody`)"
    );
    ok
}

fn chown_r(p: &Path, uid: u32, gid: u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            chown_r(&e.unwrap().path(), uid, gid);
        }
    }
}

/// A `/proc/PID/status` field's values.
fn status_field(pid: u32, name: &str) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{s}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// What the kernel says `pid` is: the user, no groups, no capabilities, no_new_privs.
fn assert_jailed(pid: u32, what: &str) {
    let n = NOBODY.to_string();
    assert_eq!(status_field(pid, "Uid"), [n.as_str(); 4], "{what}'s uids");
    assert_eq!(status_field(pid, "Gid"), [n.as_str(); 4], "{what}'s gids");
    assert_eq!(
        status_field(pid, "Groups"),
        Vec::<String>::new(),
        "{what}'s groups"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, cap),
            ["0000000000000000"],
            "{what}'s {cap}"
        );
    }
    assert_eq!(
        status_field(pid, "NoNewPrivs"),
        ["1"],
        "{what}'s NoNewPrivs"
    );
    let core = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = core
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap()
        .split_whitespace()
        .skip(4)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(core, ["0", "0"], "{what}'s core-file limit");
}

/// What `pid` sees at `p` (through /proc/PID/root, from outside).
fn seen_by(pid: u32, p: &Path) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap())
}

/// Its root: only the store, /dev, /proc and the dynamic loader's libraries; no file of
/// the host that root can read.
fn assert_confined(pid: u32, store: &Path, secret: &Path, what: &str) {
    assert!(secret.exists());
    assert!(
        !seen_by(pid, secret).exists(),
        "{what} sees {}",
        secret.display()
    );
    for p in [
        "/etc/shadow",
        "/etc/passwd",
        "/root",
        "/home",
        "/work",
        "/bin/sh",
        "/sys",
    ] {
        assert!(!seen_by(pid, Path::new(p)).exists(), "{what} sees {p}");
    }
    // The host's /tmp is not there either: only the store's own directory in it.
    let tmp: Vec<_> = std::fs::read_dir(seen_by(pid, Path::new("/tmp")))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(tmp.len() <= 1, "{what}'s /tmp: {tmp:?}");
    // What it needs is there: the store (the same one), /dev/kvm as its own.
    assert!(
        seen_by(pid, &store.join("store.cfg")).is_file(),
        "{what} lacks the store"
    );
    use std::os::unix::fs::MetadataExt;
    let kvm = std::fs::metadata(seen_by(pid, Path::new("/dev/kvm"))).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.mode() & 0o777),
        (NOBODY, 0o600),
        "{what}'s /dev/kvm"
    );
    let dev: Vec<String> = std::fs::read_dir(seen_by(pid, Path::new("/dev")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for d in &dev {
        assert!(
            ["kvm", "userfaultfd", "null", "zero", "random", "urandom"].contains(&d.as_str()),
            "{what}'s /dev has {d}"
        );
    }
}

/// The worker processes of `d` (children of any of its threads).
fn worker_pids(d: &Daemon) -> Vec<u32> {
    let mut pids = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.child.id())).unwrap();
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}

fn sha_hex(t: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(t.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn marked() -> String {
    format!("{}:marked.esm.js", workload("marked.esm.js"))
}

fn python_args(python: &str, script: &str) -> Vec<String> {
    vec![
        "--module".into(),
        python.into(),
        "--runtime".into(),
        "python".into(),
        "--file".into(),
        path(&format!("examples/{script}")),
        "--arg".into(),
        script.into(),
    ]
}

const HTTP_EVENT: &[u8] = br#"{"version":"2.0","rawPath":"/svm","rawQueryString":"a=1","headers":{"x-test":"y"},"requestContext":{"http":{"method":"POST"}},"body":"nested svm","isBase64Encoded":false}"#;

/// Every example that is a function (compute.wat is not: it never reads a request; `vmm
/// run` only), as (template, function options, request).
fn examples(python: &str) -> Vec<(&'static str, Vec<String>, &'static [u8])> {
    vec![
        (
            "hello-js",
            qjs_function_args("hello.js", &[]),
            br#"{"name":"jail"}"#,
        ),
        (
            "markdown-js",
            qjs_function_args("markdown.js", &[marked()]),
            b"# Title\n\n*em* and `code`\n",
        ),
        (
            "primes-js",
            qjs_function_args("primes.js", &[]),
            br#"{"limit":10000}"#,
        ),
        ("alloc-js", qjs_function_args("alloc.js", &[]), b"x"),
        ("http-js", qjs_function_args("http.js", &[]), HTTP_EVENT),
        (
            "upper-wasi",
            vec![
                "--module".into(),
                path("examples/upper.wat"),
                "--arg".into(),
                "one".into(),
            ],
            b"some text\n",
        ),
        (
            "hello-py",
            python_args(python, "hello.py"),
            br#"{"name":"jail"}"#,
        ),
        (
            "wordfreq-py",
            python_args(python, "wordfreq.py"),
            b"the quick brown fox jumps over the lazy dog. The dog sleeps!\n",
        ),
        (
            "imports-py",
            python_args(python, "imports.py"),
            b"an import path request from 10.0.0.1\n",
        ),
        ("http-py", python_args(python, "http.py"), HTTP_EVENT),
    ]
}

fn run_cold(function: &[String], input: &[u8]) -> String {
    let mut cmd = vmm();
    cmd.arg("run").args(function);
    let r = run_with_input(cmd, input);
    assert_eq!(r.code(), 0, "vmm run: {}", r.stderr());
    r.stdout()
}

/// Deploy a JS function on `d` and invoke it. A deploy builds a template in the jail: its
/// working set is recorded through userfaultfd, which an unprivileged process gets only
/// from the jail's /dev/userfaultfd (vm.unprivileged_userfaultfd=0 here).
fn deploy_and_invoke(d: &Daemon, fname: &str) {
    let spec = serde_json::json!({"runtime": "js", "source":
        "const input = std.in.readAsString();\nprint(\"jailed:\" + input);\n"});
    let r = ureq::put(&d.url(&format!("/v1/functions/{fname}")))
        .set("authorization", &format!("Bearer {DEPLOYER}"))
        .timeout(Duration::from_secs(180))
        .send_string(&spec.to_string());
    match r {
        Ok(r) => assert_eq!(r.status(), 201),
        Err(ureq::Error::Status(s, r)) => {
            panic!("deploy: {s} {}\n{}", r.into_string().unwrap(), d.log())
        }
        Err(e) => panic!("deploy: {e}\n{}", d.log()),
    }
    let r = ureq::post(&d.url(&format!("/v1/functions/{fname}/invoke")))
        .set("authorization", &format!("Bearer {DEPLOYER}"))
        .timeout(Duration::from_secs(120))
        .send_bytes(b"in")
        .unwrap_or_else(|e| panic!("invoke the deployed one: {e}\n{}", d.log()));
    assert_eq!(r.into_string().unwrap(), "jailed:in\n");
}

/// Every file and directory under `dir` is nobody's.
fn assert_all_nobodys(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.uid(), NOBODY, "{} is not nobody's", p.display());
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

#[test]
fn as_nobody_jailed_serves_every_example_and_deploys_with_no_privilege_left() {
    if !root() || !kvm_available() || !nobody_exists() {
        return;
    }
    let Some(python) = optional_workload("python.wasm") else {
        return;
    };
    let store = TempDir::new("jail-examples");
    let cases = examples(&python);
    for (name, function, _) in &cases {
        create(&store, name, function);
    }
    // A file outside the jail that root can read (and everyone: mode 0644).
    let etc = TempDir::created("jail-etc");
    let secret = etc.0.join("secret");
    std::fs::write(&secret, "not for the jail\n").unwrap();
    let tokens = etc.0.join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "deployer sha256:{} deploy,invoke,metrics\n",
            sha_hex(DEPLOYER)
        ),
    )
    .unwrap();
    let js = format!("js={}", workload("qjs-wasi-reactor.wasm"));

    // The store is root's (templates made by root): refused, with the command to run.
    let mut cmd = vmm();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", &store.arg()])
        .args(["--user", "nobody"]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(
        r.stderr()
            .contains(&format!("`chown -R {NOBODY}:{NOBODY} {}`", store.arg())),
        "{}",
        r.stderr()
    );
    chown_r(&store.0, NOBODY, NOBODY);

    for processes in ["0", "1"] {
        let d = Daemon::start(
            &store,
            &[
                "--user",
                "nobody",
                "--processes",
                processes,
                "--pool",
                "1",
                "--auth",
                tokens.to_str().unwrap(),
                "--runtime-module",
                &js,
            ],
        );
        assert!(d.log().contains("jailed"), "{}", d.log());
        // Every example answers exactly what `vmm run` prints.
        for (name, function, input) in &cases {
            let want = run_cold(function, input);
            for _ in 0..2 {
                let r = ureq::post(&d.url(&format!("/v1/functions/{name}/invoke")))
                    .set("authorization", &format!("Bearer {DEPLOYER}"))
                    .timeout(Duration::from_secs(120))
                    .send_bytes(input);
                let resp = match r {
                    Ok(r) | Err(ureq::Error::Status(_, r)) => r,
                    Err(e) => panic!("{name}: {e}\n{}", d.log()),
                };
                let status = resp.status();
                let body = resp.into_string().unwrap();
                assert_eq!(status, 200, "{name}: {body}\n{}", d.log());
                assert_eq!(
                    body, want,
                    "{name} from the jailed daemon differs from vmm run"
                );
            }
        }
        // The kernel's account of the daemon and its worker.
        let pid = d.child.id();
        assert_jailed(pid, "the daemon");
        assert_confined(pid, &store.0, &secret, "the daemon");
        let workers = worker_pids(&d);
        if processes == "1" {
            assert_eq!(workers.len(), 1, "{workers:?}");
            assert_jailed(workers[0], "the worker process");
            assert_confined(workers[0], &store.0, &secret, "the worker process");
        } else {
            assert!(workers.is_empty(), "{workers:?}");
        }
        assert!(!d.log().contains("panicked"), "{}", d.log());
    }
    assert_all_nobodys(&store.0);

    // Deploys, into a store the daemon makes for the user (a fresh one: the deploy API
    // builds its own runtime bases).
    for processes in ["0", "1"] {
        let fresh = TempDir::new(&format!("jail-deploy-{processes}"));
        let d = Daemon::start(
            &fresh,
            &[
                "--user",
                "nobody",
                "--processes",
                processes,
                "--auth",
                tokens.to_str().unwrap(),
                "--runtime-module",
                &js,
            ],
        );
        deploy_and_invoke(&d, "deployed");
        assert_jailed(d.child.id(), "the deploying daemon");
        for w in worker_pids(&d) {
            assert_jailed(w, "the deploying daemon's worker");
        }
        assert!(!d.log().contains("panicked"), "{}", d.log());
        drop(d);
        // What the daemon wrote as root (the store's files, the runtime module) and as
        // the user (the deployed function's templates) is the user's.
        assert_all_nobodys(&fresh.0);
    }
}

/// With `--remote`, the jailed daemon pulls a template it lacks from S3 on its first
/// request: the network and name resolution (the endpoint is `localhost`, found through
/// the jail's /etc/hosts) work from the jail, and what it pulls is the user's.
#[test]
fn with_a_remote_the_jailed_daemon_resolves_and_pulls_a_template() {
    if !root() || !kvm_available() || !nobody_exists() {
        return;
    }
    let Some(g) = garage::Garage::start(1, "jail") else {
        return;
    };
    let a = TempDir::new("jail-remote-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    let store_bin = Path::new(env!("CARGO_BIN_EXE_vmm")).with_file_name("vmm-store");
    let mut push = std::process::Command::new(&store_bin);
    g.env(&mut push, "jail");
    push.arg("--store").arg(&a.0).args(["push", "hello"]);
    let r = run_with_input(push, b"");
    assert_eq!(r.code(), 0, "push: {}", r.stderr());
    let input = br#"{"name":"remote"}"#;
    let want = restore(&a, "hello", input).stdout();

    // An empty worker store, made by the daemon for the user.
    let w = TempDir::new("jail-remote-w");
    let mut cmd = vmm();
    g.env(&mut cmd, "jail");
    let endpoint = g.endpoint().replace("127.0.0.1", "localhost");
    cmd.env("VMM_REMOTE_ENDPOINT", &endpoint)
        .args(["serve", "--listen", "127.0.0.1:0", "--pool", "1"])
        .args(["--user", "nobody", "--store", &w.arg()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let d = Daemon::spawned(cmd.spawn().expect("spawn vmm serve"));
    assert!(d.log().contains("jailed"), "{}", d.log());
    for _ in 0..2 {
        let r = ureq::post(&d.url("/v1/functions/hello/invoke"))
            .timeout(Duration::from_secs(120))
            .send_bytes(input);
        let body = match r {
            Ok(r) => r.into_string().unwrap(),
            Err(ureq::Error::Status(s, r)) => {
                panic!("{s} {}\n{}", r.into_string().unwrap(), d.log())
            }
            Err(e) => panic!("{e}\n{}", d.log()),
        };
        assert_eq!(body, want);
    }
    assert_jailed(d.child.id(), "the daemon with a remote");
    drop(d);
    assert!(w.0.join("templates/hello.tmpl").exists());
    assert_all_nobodys(&w.0);
}

#[test]
fn user_mistakes_are_refused_with_what_to_do() {
    if !root() || !nobody_exists() {
        return;
    }
    let store = TempDir::new("jail-refusals");
    let refused = |args: &[&str], want: &str| {
        let mut cmd = vmm();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", &store.arg()])
            .args(args);
        let r = run_with_input(cmd, b"");
        assert_eq!(r.code(), 2, "{args:?}: {}", r.stderr());
        assert!(r.stderr().contains(want), "{args:?}: {}", r.stderr());
    };
    refused(
        &["--user", "no-such-user-here"],
        "no such user in /etc/passwd",
    );
    refused(&["--user", "root"], "unprivileged user");
    refused(&["--user", "0:0"], "unprivileged user");
    refused(&["--jail", "/tmp"], "--user");
    // A store that does not exist is made for the user (then refused as empty, like any).
    refused(&["--user", "nobody"], "no template store");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&store.0).unwrap().uid(), NOBODY);
}

/// `tools/systemd/vmm-serve.service` passes `systemd-analyze verify`; its exposure
/// (`systemd-analyze security --offline=yes`) is printed for the record.
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(&path("tools/systemd/vmm-serve.service")).to_path_buf();
    assert!(unit.is_file(), "{} is missing", unit.display());
    let have = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    // verify resolves ExecStart=: point it at this build's binary, in a copy of the unit.
    let dir = TempDir::created("jail-unit");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains("ExecStart=/usr/local/bin/vmm serve"),
        "{text}"
    );
    let text = text.replace("/usr/local/bin/vmm", env!("CARGO_BIN_EXE_vmm"));
    let copy = dir.0.join("vmm-serve.service");
    std::fs::write(&copy, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("vmm-serve.service:"),
        "systemd-analyze verify: {err}"
    );
    let sec = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&sec.stdout);
    match text
        .lines()
        .rev()
        .find(|l| l.contains("Overall exposure level"))
    {
        Some(l) => eprintln!("systemd-analyze security: {}", l.trim()),
        None => eprintln!(
            "systemd-analyze security --offline=yes gave no score here: {}",
            String::from_utf8_lossy(&sec.stderr)
        ),
    }
}
