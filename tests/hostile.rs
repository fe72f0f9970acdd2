//! End-to-end tests with hostile guests (tests/guests/*.wat and the guest kernel's
//! fault-injection self tests): every one must end quickly with a clear error or a clean
//! exit, the VMM must never panic or hang, its memory use stays bounded, and other
//! instances running at the same time are unaffected.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `vmm`'s exit status for "the guest failed" and "stopped by --timeout".
const EXIT_FAILURE: i32 = 125;
const EXIT_TIMEOUT: i32 = 124;
/// No single command may take longer than this: beyond it, it is a hang.
const DEADLINE: Duration = Duration::from_secs(60);

/// A finished child with its peak resident set size (from `wait4`'s rusage).
struct Measured {
    run: Run,
    max_rss_kib: u64,
}

/// Run `cmd` with `input` on stdin and reap it with `wait4` to learn its peak RSS;
/// kill it and fail if it outlives `DEADLINE`.
fn run_measured(mut cmd: Command, input: &[u8]) -> Measured {
    let mut p = Piped::spawn(&mut cmd, input);
    let started = p.started;
    let (status, max_rss_kib) = reap_watched(&mut p.child, || {
        (started.elapsed() > DEADLINE)
            .then(|| format!("{cmd:?} still running after {DEADLINE:?}: a hang"))
    });
    Measured {
        run: p.finish(status),
        max_rss_kib,
    }
}

fn run(cmd: Command) -> Run {
    run_measured(cmd, b"").run
}

/// A VMM panic (not a guest kernel panic, which is reported as "guest kernel panicked").
fn vmm_panicked(stderr: &str) -> bool {
    stderr.contains("panicked at")
        || stderr.contains("RUST_BACKTRACE")
        || stderr.contains("thread '")
}

/// Fails with exit `code`, a `vmm: error:` line containing every `expect`, and no VMM panic.
#[track_caller]
fn assert_fails(what: &str, r: &Run, code: i32, expect: &[&str]) {
    let err = r.stderr();
    eprintln!(
        "[{what}] exit {} in {:?}: {}",
        r.code(),
        r.elapsed,
        err.trim()
    );
    assert_eq!(r.code(), code, "{what}: exit status; stderr: {err}");
    assert!(err.contains("vmm: error:"), "{what}: no error line: {err}");
    for e in expect {
        assert!(
            err.contains(e),
            "{what}: stderr should mention {e:?}: {err}"
        );
    }
    assert!(!vmm_panicked(&err), "{what}: the VMM panicked: {err}");
}

fn guest(name: &str) -> String {
    path(&format!("tests/guests/{name}"))
}

fn run_guest(name: &str, extra: &[&str]) -> Command {
    let mut cmd = vmm();
    cmd.args(["run", "--module", &guest(name)]).args(extra);
    cmd
}

// --- output flood ------------------------------------------------------------------------

#[test]
fn stdout_flood_is_capped_and_stopped_by_the_timeout_with_bounded_memory() {
    if !kvm_available() {
        return;
    }
    let m = run_measured(run_guest("flood.wat", &["--timeout", "5"]), b"");
    let r = &m.run;
    // The WASI layer stops forwarding at 64 MiB (EFBIG, which the guest ignores); only the
    // timeout ends it.
    assert_fails("flood", r, EXIT_TIMEOUT, &["timeout"]);
    assert!(r.elapsed < Duration::from_secs(15), "took {:?}", r.elapsed);
    let out = &r.output.stdout;
    assert!(
        out.len() as u64 <= 64 << 20,
        "more than the 64 MiB output cap: {} bytes",
        out.len()
    );
    assert!(
        out.len() >= 32 << 20,
        "the flood produced only {} bytes in 5 s",
        out.len()
    );
    assert!(
        out.iter().all(|&b| b == b'x'),
        "the output is not the guest's"
    );
    eprintln!(
        "[flood] {} bytes of stdout, peak RSS {} MiB",
        out.len(),
        m.max_rss_kib / 1024
    );
    // 512 MiB of sparse guest RAM (the guest touches little of it) + the 64 MiB of
    // captured output: memory must not grow with the flood.
    assert!(
        m.max_rss_kib < 320 * 1024,
        "peak RSS of the flooded vmm is {} MiB",
        m.max_rss_kib / 1024
    );
}

// --- memory exhaustion ---------------------------------------------------------------------

#[test]
fn growing_memory_until_it_fails_ends_cleanly() {
    if !kvm_available() {
        return;
    }
    let r = run(run_guest(
        "grow_memory.wat",
        &["--mem", "64", "--timeout", "10"],
    ));
    eprintln!(
        "[grow_memory] exit {} in {:?}: {} {}",
        r.code(),
        r.elapsed,
        r.stdout().trim(),
        r.stderr().trim()
    );
    assert!(!vmm_panicked(&r.stderr()), "{}", r.stderr());
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    // memory.grow fails (returns -1) before 64 MiB of guest RAM can back 1024 wasm pages;
    // the guest then writes the last byte of the last page it got and reports.
    let out = r.stdout();
    let pages: u32 = out
        .strip_prefix("grew ")
        .and_then(|s| s.strip_suffix(" pages\n"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {out:?}; stderr: {}", r.stderr()));
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(
        (2..1024).contains(&pages),
        "grew to {pages} pages in 64 MiB"
    );
}

#[test]
fn huge_memory_grow_and_table_grow_are_refused_cleanly() {
    if !kvm_available() {
        return;
    }
    for (g, expect) in [
        ("grow_memory_big.wat", "big grow refused\n"),
        ("grow_table.wat", "table full\n"),
    ] {
        let r = run(run_guest(g, &["--mem", "64", "--timeout", "10"]));
        eprintln!(
            "[{g}] exit {} in {:?}: {:?} {}",
            r.code(),
            r.elapsed,
            r.stdout(),
            r.stderr().trim()
        );
        assert!(!vmm_panicked(&r.stderr()), "{}", r.stderr());
        assert!(
            r.elapsed < Duration::from_secs(10),
            "{g} took {:?}",
            r.elapsed
        );
        assert_eq!(r.stdout(), expect, "{g}: stderr: {}", r.stderr());
        assert_eq!(r.code(), 0, "{g}: {}", r.stderr());
    }
}

// --- guests that never read their request --------------------------------------------------

#[test]
fn a_guest_that_never_reads_stdin_is_stopped_by_the_timeout() {
    if !kvm_available() {
        return;
    }
    let r = run_measured(
        run_guest("noread_loop.wat", &["--timeout", "1"]),
        b"a request nobody reads",
    )
    .run;
    assert_fails("noread_loop", &r, EXIT_TIMEOUT, &["timeout"]);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
}

#[test]
fn template_create_refuses_functions_that_never_read_their_request() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::created("hostile-noread");
    let create = |name: &str, guest_file: &str| {
        let mut cmd = vmm();
        cmd.args(["template", "create", name, "--store", &store.arg()])
            .args(["--module", &guest(guest_file), "--timeout", "1"]);
        run(cmd)
    };
    let r = create("exits", "noread_exit.wat");
    assert_fails(
        "template create noread_exit",
        &r,
        EXIT_FAILURE,
        &["template create exits", "before reading its request"],
    );
    let r = create("spins", "noread_loop.wat");
    assert_ne!(r.code(), 0, "{}", r.stderr());
    assert_fails("template create noread_loop", &r, r.code(), &["timeout"]);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    // Neither left a function template behind.
    for name in ["exits", "spins"] {
        assert!(
            !Path::new(&store.0)
                .join(format!("templates/{name}.tmpl"))
                .exists(),
            "a failed create left template {name}"
        );
    }
}

// --- malformed hostcalls -------------------------------------------------------------------

#[test]
fn hostile_mailbox_variants_are_refused() {
    if !kvm_available() {
        return;
    }
    for (g, expect) in [
        (
            "mailbox_stdin_oob.wat",
            &[
                "malformed hostcall",
                "stdin buffer: range gpa=0x3ffff00 len=0x1000 is outside guest memory",
            ][..],
        ),
        (
            "mailbox_getfn_len.wat",
            &[
                "malformed hostcall",
                "function config buffer: length 18446744073709551615 exceeds the limit",
            ],
        ),
        (
            "mailbox_panic_len.wat",
            &[
                "malformed hostcall",
                "panic message: length 1073741824 exceeds the limit of 65536",
            ],
        ),
        (
            "mailbox_grant_unaligned.wat",
            &[
                "malformed hostcall",
                "memory grant: range gpa=0x201000 len=0x200000 is not a non-empty run of 2 MiB regions",
            ],
        ),
        (
            "mailbox_grant_oob.wat",
            &[
                "malformed hostcall",
                "memory grant: range gpa=0x3e00000 len=0x400000 is outside guest memory",
            ],
        ),
        (
            "mailbox_fault.wat",
            &["guest CPU exception: general protection (#GP) (vector 13) error code 0x18 at rip 0xdeadbeef, cr2 0x1234"],
        ),
    ] {
        let mut cmd = run_guest(g, &["--mem", "64", "--timeout", "10"]);
        cmd.env("VMM_TEST_HOSTCALLS", "1");
        let r = run(cmd);
        assert_fails(g, &r, EXIT_FAILURE, expect);
        assert!(r.elapsed < Duration::from_secs(10), "{g} took {:?}", r.elapsed);
    }
}

/// A guest that fragments its grants (every other region of 1 GiB, one request each) gets
/// them all, in one slot over the gaps too once there would be too many, and runs on.
#[test]
fn fragmented_memory_grants_stay_bounded() {
    if !kvm_available() {
        return;
    }
    let mut cmd = run_guest(
        "grant_fragments.wat",
        &["--mem", "1024", "--timeout", "20", "--json"],
    );
    cmd.env("VMM_TEST_HOSTCALLS", "1");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["stdout"].as_str(), Some("ok"), "{v}");
    let slots = v["stats"]["memory_slots"].as_u64().unwrap();
    assert!(slots <= 64, "{slots} slots");
    assert!(
        v["stats"]["slot_bytes"].as_u64().unwrap() >= 512 << 20,
        "{v}"
    );
    assert!(r.elapsed < Duration::from_secs(20), "took {:?}", r.elapsed);
}

// --- guest kernel fault injection ----------------------------------------------------------

fn selftest_module(dir: &TempDir, what: &str) -> String {
    let p = dir.0.join(format!("selftest-{what}"));
    std::fs::write(&p, format!("\0vmm-selftest:{what}")).unwrap();
    p.to_string_lossy().into_owned()
}

/// The `rip` the fault report names; it must lie in the guest kernel image.
fn rip_of(stderr: &str) -> u64 {
    let hex = stderr
        .split("at rip 0x")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next())
        .unwrap_or_else(|| panic!("no rip in {stderr}"));
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn guest_kernel_faults_are_reported_with_vector_rip_and_cr2() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("hostile-selftest");
    for (what, expect) in [
        (
            "ud",
            &["guest CPU exception: invalid opcode (#UD) (vector 6)"][..],
        ),
        (
            "pf",
            &[
                "guest CPU exception: page fault (#PF) (vector 14)",
                "cr2 0xc00000,",
            ],
        ),
        (
            "so",
            &["guest CPU exception: double fault (#DF) (vector 8)"],
        ),
        ("oom", &["guest ran out of memory", "out of memory"]),
        ("panic", &["guest kernel panicked: selftest panic"]),
    ] {
        let module = selftest_module(&dir, what);
        let mut cmd = vmm();
        cmd.env("VMM_TEST_HOSTCALLS", "1").args([
            "run",
            "--module",
            &module,
            "--mem",
            "64",
            "--timeout",
            "10",
        ]);
        let r = run(cmd);
        assert_fails(&format!("selftest {what}"), &r, EXIT_FAILURE, expect);
        assert!(
            r.elapsed < Duration::from_secs(10),
            "{what} took {:?}",
            r.elapsed
        );
        if ["ud", "pf", "so"].contains(&what) {
            let rip = rip_of(&r.stderr());
            // The kernel is loaded at 2 MiB and ends below the guard range at 12 MiB.
            assert!(
                (0x20_0000..0xc0_0000).contains(&rip),
                "selftest {what}: rip {rip:#x} is not in the guest kernel"
            );
        }
    }
    // Without the test switch the fault injection does not exist: the file is just not wasm.
    let mut cmd = vmm();
    cmd.env_remove("VMM_TEST_HOSTCALLS")
        .args(["run", "--module", &selftest_module(&dir, "ud")]);
    let r = run(cmd);
    assert_fails(
        "selftest ud without VMM_TEST_HOSTCALLS",
        &r,
        EXIT_FAILURE,
        &["not valid WebAssembly"],
    );
    assert!(!r.stderr().contains("#UD"), "{}", r.stderr());
}

// --- isolation -----------------------------------------------------------------------------

#[test]
fn other_instances_are_unaffected_by_hostile_ones() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::created("hostile-isolation");
    let hello_args = [
        "--module".to_string(),
        workload("qjs-wasi-reactor.wasm"),
        "--runtime".into(),
        "qjs".into(),
        "--file".into(),
        path("examples/hello.js"),
        "--arg".into(),
        "hello.js".into(),
    ];
    let mut cmd = vmm();
    cmd.args(["template", "create", "hello", "--store", &store.arg()])
        .args(&hello_args);
    let c = run(cmd);
    assert_eq!(c.code(), 0, "template create hello: {}", c.stderr());

    // Hostile neighbours: an output flood and a guest that eats all its memory.
    let dir = TempDir::created("hostile-isolation-oom");
    let oom = selftest_module(&dir, "oom");
    let spawn_hostile = |mut cmd: Command| {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hostile vmm")
    };
    // Long enough to outlast the normal instances even on a loaded CI machine (each cold run
    // below compiles QuickJS on the host for wasmtime, 1-2 s on a busy 2-core machine, unless
    // a compiled artifact is cached).
    let mut flood = spawn_hostile(run_guest("flood.wat", &["--timeout", "20"]));
    let mut oom_cmd = vmm();
    oom_cmd
        .env("VMM_TEST_HOSTCALLS", "1")
        // It ends as soon as its memory is exhausted; the timeout only bounds a hang (a
        // loaded machine once took over 3 s to get there).
        .args(["run", "--module", &oom, "--timeout", "30"]);
    let eater = spawn_hostile(oom_cmd);
    std::thread::sleep(Duration::from_millis(200));

    let expect = |name: &str| {
        format!(
            "{{\"greeting\":\"Hello, {name}!\",\"length\":{}}}\n",
            name.len()
        )
    };
    for (i, name) in ["neighbour", "of", "hostiles"].iter().enumerate() {
        let input = format!("{{\"name\":\"{name}\"}}");
        let mut cold = vmm();
        cold.arg("run").args(&hello_args);
        let r = run_measured(cold, input.as_bytes()).run;
        assert_eq!(r.stdout(), expect(name), "cold run {i}: {}", r.stderr());
        assert_eq!(r.code(), 0);
        let mut restore = vmm();
        restore.args(["restore", "hello", "--store", &store.arg()]);
        let r = run_measured(restore, input.as_bytes()).run;
        assert_eq!(r.stdout(), expect(name), "restore {i}: {}", r.stderr());
        assert_eq!(r.code(), 0);
    }
    // The flood was still running the whole time (so the check above was concurrent).
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the flood ended before the normal instances were done"
    );
    let flood_out = flood.wait_with_output().unwrap();
    assert_eq!(flood_out.status.code(), Some(EXIT_TIMEOUT));
    let eater_out = eater.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&eater_out.stderr);
    assert_eq!(eater_out.status.code(), Some(EXIT_FAILURE), "{err}");
    assert!(err.contains("out of memory"), "{err}");
}
