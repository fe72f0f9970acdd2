//! The hostile guest kernel (guest-kernel feature `hostile`, guest-kernel/src/hostile.rs)
//! through real KVM: out-of-range, overlapping, oversized and repeated hostcalls, and
//! malformed exits. With `vmm run` each attack ends the instance with a clear error (or,
//! for those the VMM may serve, runs on correctly); with `vmm serve`, a hostile template
//! next to a normal one in one store, the daemon keeps serving both after every attack,
//! and no request sees what an attack left in guest memory, its grants or its code.
//!
//! The hostile kernel is built by [`hostile_kernel`] into `target/hostile-guest` (seeded
//! from `target/guest`, where vmm/build.rs builds the real one, so that only the kernel
//! crate itself is compiled again); the image the VMM embeds is never touched.

mod common;
use common::daemon::Daemon;
use common::*;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// `vmm`'s exit status for "the guest failed".
const EXIT_FAILURE: i32 = 125;

/// Build the hostile guest kernel (once per test process) and return its image.
fn hostile_kernel() -> PathBuf {
    static IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let root = root();
            let dir = root.join("target").join("hostile-guest");
            let seed = root.join("target").join("guest");
            if !dir.exists() && seed.exists() {
                // A copy (mtimes kept) of the real kernel's build: its dependencies are up
                // to date there. Not hard links: cargo rewrites some of its files in place.
                let tmp = root.join("target").join("hostile-guest.tmp");
                let _ = std::fs::remove_dir_all(&tmp);
                let ok = Command::new("cp")
                    .arg("-a")
                    .arg(&seed)
                    .arg(&tmp)
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    let _ = std::fs::rename(&tmp, &dir);
                }
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(&root)
                .args([
                    "build",
                    "--release",
                    "--locked",
                    "-p",
                    "guest-kernel",
                    "--features",
                    "kernel,hostile",
                    "--bin",
                    "guest-kernel",
                    "--target",
                    "x86_64-unknown-none",
                    "--config",
                    "profile.release.panic=\"abort\"",
                ])
                .arg("--target-dir")
                .arg(&dir)
                // As vmm/build.rs builds the real kernel.
                .env(
                    "CARGO_ENCODED_RUSTFLAGS",
                    "-Crelocation-model=static\x1f-Ctarget-feature=-soft-float,+sse,+sse2",
                );
            for var in [
                "RUSTFLAGS",
                "CARGO_BUILD_RUSTFLAGS",
                "CARGO_TARGET_DIR",
                "CARGO_BUILD_TARGET",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
                "CARGO_PROFILE_RELEASE_DEBUG",
            ] {
                cmd.env_remove(var);
            }
            let out = cmd
                .output()
                .expect("run cargo to build the hostile guest kernel");
            assert!(
                out.status.success(),
                "building the hostile guest kernel failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            dir.join("x86_64-unknown-none/release/guest-kernel")
        })
        .clone()
}

/// A request naming `attack`: the name padded to the 32 bytes the guest reads first, then
/// `payload`.
fn request(attack: &str, payload: &[u8]) -> Vec<u8> {
    let mut r = format!("{attack}\n").into_bytes();
    r.resize(32, b' ');
    r.extend_from_slice(payload);
    r
}

/// `ud2` x 32: code that faults wherever it runs.
fn ud2s() -> Vec<u8> {
    [0x0f, 0x0b].repeat(32)
}

/// The module the hostile kernel is given (it never runs it).
fn module() -> String {
    path("tests/guests/behave.wat")
}

/// Attacks the VMM must refuse, and what its error says.
const REFUSED: &[(&str, &[&str])] = &[
    (
        "oob-stdin",
        &[
            "malformed hostcall",
            "stdin buffer: range",
            "outside guest memory",
        ],
    ),
    (
        "oob-write",
        &[
            "malformed hostcall",
            "output: range",
            "outside guest memory",
        ],
    ),
    (
        "oob-exit",
        &[
            "malformed hostcall",
            "stdout: range gpa=0xfffffffffffffff7",
            "outside guest memory",
        ],
    ),
    (
        "oob-grant",
        &[
            "malformed hostcall",
            "memory grant: range",
            "outside guest memory",
        ],
    ),
    (
        "unaligned-grant",
        &[
            "malformed hostcall",
            "memory grant: range gpa=0x201000",
            "2 MiB regions",
        ],
    ),
    (
        "oversize-write",
        &[
            "malformed hostcall",
            "output: length 67108865 exceeds the limit of 67108864",
        ],
    ),
    (
        "oversize-panic",
        &[
            "malformed hostcall",
            "panic message: length 1073741824 exceeds the limit of 65536",
        ],
    ),
    ("flood", &["bytes of output and was stopped"]),
    (
        "unknown-op",
        &["malformed hostcall", "unknown hostcall op 99"],
    ),
    (
        "bad-fd",
        &[
            "malformed hostcall",
            "write to fd 7: only 1 and 2 are outputs",
        ],
    ),
    ("bad-port", &["port I/O to unknown port 0x3f8"]),
    ("in-port", &["port I/O to unknown port 0x7e0"]),
    (
        "overlap-code",
        &["guest CPU exception: invalid opcode (#UD) (vector 6)"],
    ),
    (
        "mark-fail",
        &[
            "malformed hostcall",
            "output: range",
            "outside guest memory",
        ],
    ),
];

fn payload(attack: &str) -> Vec<u8> {
    match attack {
        "overlap-code" => ud2s(),
        _ => Vec::new(),
    }
}

fn run_hostile(input: &[u8], extra: &[&str]) -> Run {
    let mut cmd = vmm();
    cmd.env("VMM_GUEST_KERNEL", hostile_kernel())
        .args([
            "run",
            "--module",
            &module(),
            "--mem",
            "64",
            "--timeout",
            "20",
        ])
        .args(extra);
    run_with_input(cmd, input)
}

#[test]
fn every_hostile_hostcall_ends_a_vmm_run_with_a_clear_error() {
    if !kvm_available() {
        return;
    }
    for (attack, expect) in REFUSED {
        let r = run_hostile(&request(attack, &payload(attack)), &[]);
        let err = r.stderr();
        eprintln!(
            "[{attack}] exit {} in {:?}: {}",
            r.code(),
            r.elapsed,
            err.trim()
        );
        assert_eq!(
            r.code(),
            EXIT_FAILURE,
            "{attack}: exit status; stderr: {err}"
        );
        assert!(
            err.contains("vmm: error:"),
            "{attack}: no error line: {err}"
        );
        for e in *expect {
            assert!(
                err.contains(e),
                "{attack}: stderr should mention {e:?}: {err}"
            );
        }
        assert!(
            !err.contains("panicked at") && !err.contains("hostile: the VMM answered"),
            "{attack}: {err}"
        );
        assert!(
            r.elapsed < Duration::from_secs(20),
            "{attack} took {:?}",
            r.elapsed
        );
    }
    // What the VMM may serve, it serves correctly.
    let ok = run_hostile(&request("ok", b""), &[]);
    assert_eq!(ok.code(), 0, "{}", ok.stderr());
    let clean = ok.stdout();
    assert!(
        clean.starts_with("marker=none mid=ungranted grants=") && clean.ends_with("victim=42"),
        "{clean}"
    );
    // Repeated: the same grant 20000 times (one new region, no new slot after it), reads of
    // stdin after its end (each an empty, final read).
    let r = run_hostile(&request("repeat-grant", b""), &["--json"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert!(v["stats"]["memory_slots"].as_u64().unwrap() <= 64, "{v}");
    assert!(v["stdout"].as_str().unwrap().contains("victim=42"), "{v}");
    let r = run_hostile(&request("repeat-stdin", b"tail"), &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stdout().ends_with("eofs=10000"), "{}", r.stdout());
    // Overlapping: the request read over the mailbox (its own loss: the VMM serves on), and
    // stdout and stderr over the same bytes.
    let r = run_hostile(&request("overlap-mailbox", &[0xee; 5000]), &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stdout().ends_with("read=5000"), "{}", r.stdout());
    let r = run_hostile(&request("overlap-output", b""), &["--json"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    // The function asked for twice: the run stops there, with an error that says so.
    let r = run_hostile(&request("repeat-function", b""), &[]);
    assert_eq!(r.code(), EXIT_FAILURE, "{}", r.stderr());
    assert!(r.stderr().contains("vmm: error:"), "{}", r.stderr());
    assert!(!r.stderr().contains("panicked at"), "{}", r.stderr());
}

#[test]
fn a_daemon_serves_on_after_every_hostile_request_and_nothing_leaks_between_instances() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("hostile-serve");
    // The hostile template (made with the hostile kernel: the kernel is part of a
    // template's memory), and a normal one in the same store.
    let mut cmd = vmm();
    cmd.env("VMM_GUEST_KERNEL", hostile_kernel()).args([
        "template",
        "create",
        "hostile",
        "--store",
        &store.arg(),
        "--module",
        &module(),
        "--mem",
        "64",
    ]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "template create hostile: {}", r.stderr());
    create(
        &store,
        "upper",
        &["--module".into(), path("examples/upper.wat")],
    );
    // One worker and a pool of one per template: a reused instance serves the next request.
    let d = Daemon::start(
        &store,
        &["--pool", "1", "--workers", "1", "--timeout", "20"],
    );
    d.wait_pools(2, 1);
    let (s, clean, _) = d.invoke("hostile", &request("ok", b""));
    assert_eq!(s, 200, "{clean}");
    assert!(
        clean.starts_with("marker=none mid=ungranted grants=") && clean.ends_with("victim=42"),
        "{clean}"
    );
    // A request after any other sees no marker (in kernel data or in memory granted to an
    // earlier request: a reset instance keeps such grants, so that its guest does not ask
    // again, but not what was written there), and runs its own code.
    let normal = |d: &Daemon| {
        let (s, b, _) = d.invoke("upper", b"still serving\n");
        assert_eq!((s, b.as_str()), (200, "STILL SERVING\n"), "{}", d.log());
        let (s, b, _) = d.invoke("hostile", &request("ok", b""));
        assert_eq!(s, 200, "{b}");
        assert!(
            b.starts_with("marker=none mid=") && !b.contains("set") && b.ends_with("victim=42"),
            "a request saw what an earlier, hostile one left: {b} (fresh: {clean})"
        );
    };
    // A marker and a grant left by a request that ended normally: its instance is reset
    // and serves the next one.
    let (s, b, _) = d.invoke("hostile", &request("mark", b""));
    assert_eq!(s, 200, "{b}");
    assert!(b.starts_with("marker=set mid=set"), "{b}");
    normal(&d);
    for (attack, expect) in REFUSED {
        if *attack == "flood" {
            // A guest stopped at the output cap: the response is the output it wrote up to
            // the cap (64 MiB), marked truncated and as a guest fault.
            let r = ureq::post(&d.url("/v1/functions/hostile/invoke"))
                .timeout(Duration::from_secs(60))
                .send_bytes(&request(attack, b""));
            let r = match r {
                Err(ureq::Error::Status(_, r)) => r,
                other => panic!("flood: {other:?}"),
            };
            eprintln!("[flood] {} {:?}", r.status(), r.header("x-vmm-error"));
            assert_eq!(r.status(), 502);
            assert_eq!(r.header("x-vmm-error"), Some("guest_fault"));
            assert_eq!(r.header("x-vmm-output-truncated"), Some("true"));
            let mut body = Vec::new();
            r.into_reader()
                .take(128 << 20)
                .read_to_end(&mut body)
                .unwrap();
            assert_eq!(body.len(), 64 << 20);
            assert!(body.iter().all(|&b| b == b'f'));
            normal(&d);
            continue;
        }
        let (s, b, _) = d.invoke("hostile", &request(attack, &payload(attack)));
        eprintln!("[{attack}] {s}: {}", b.trim());
        assert_eq!(s, 502, "{attack}: {b}");
        assert!(b.contains("run the function: "), "{attack}: {b}");
        for e in *expect {
            assert!(
                b.contains(e),
                "{attack}: the response should mention {e:?}: {b}"
            );
        }
        normal(&d);
    }
    for attack in ["repeat-grant", "repeat-stdin", "overlap-mailbox"] {
        let (s, b, _) = d.invoke("hostile", &request(attack, &[0xee; 100]));
        assert_eq!(s, 200, "{attack}: {b}");
        normal(&d);
    }
    let (s, _) = d.get("/healthz");
    assert_eq!(s, 200);
}

/// A guest that tries to leave a grant map of alternating regions where its template is
/// taken (so that every restore would register one slot per run): the grant map page is
/// the VMM's, read-only in the guest's page tables (W^X), so the write faults and no
/// template is made. (A forged map in a store is registered as at most 64 slots:
/// `vmm::vm` unit tests and the hostcall fuzz target's seeds.)
#[test]
fn a_guest_cannot_write_the_vmms_grant_map() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("hostile-fragment-map");
    let mut cmd = vmm();
    cmd.env("VMM_GUEST_KERNEL", hostile_kernel()).args([
        "template",
        "create",
        "fragmented",
        "--store",
        &store.arg(),
        "--module",
        &module(),
        "--arg",
        "fragment-map",
        "--mem",
        "1024",
    ]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 125, "template create: {}", r.stderr());
    let err = r.stderr();
    assert!(err.contains("page fault (#PF) (vector 14)"), "{err}");
    assert!(err.contains("cr2 0xa000"), "{err}");
    let mut cmd = vmm();
    cmd.args(["restore", "fragmented", "--store", &store.arg()]);
    let r = run_with_input(cmd, &request("ok", b""));
    assert_ne!(r.code(), 0, "no template was made: {}", r.stdout());
}
