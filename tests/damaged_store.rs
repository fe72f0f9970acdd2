//! End-to-end tests of damaged template stores: a REAL store (the QuickJS hello function
//! on its runtime base, made by the real `vmm template create`) is damaged in every way
//! `snapshot_store::fixtures::DAMAGES` knows, and then
//! - `vmm-store verify` must exit 1 and name the damage, and
//! - `vmm restore` (every --memory strategy) must refuse cleanly: non-zero exit, a clear
//!   error, no panic, no hang. A damaged store must never run a function, except where
//!   the damage lies outside everything restore reads (a pack index: restores locate
//!   pages by their templates' location records): then it runs exactly as before.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snapshot_store::fixtures::{self, Damage};

const REQUEST: &[u8] = br#"{"name":"store"}"#;
const RESPONSE: &str = "{\"greeting\":\"Hello, store!\",\"length\":5}\n";
const STRATEGIES: [&str; 3] = ["prefetch", "eager", "lazy"];
/// A hang is a failure: no single command may take longer than this.
const DEADLINE: Duration = Duration::from_secs(30);

/// The `vmm-store` binary of the same build as `vmm` (another package of the workspace,
/// so cargo does not build it for this test: the README builds the workspace first).
fn vmm_store_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_vmm")).parent().unwrap();
    let p = dir.join("vmm-store");
    assert!(
        p.exists(),
        "{} is missing: build the whole workspace first (`cargo build --release --workspace`, \
         or `cargo build --workspace` for a debug test run)",
        p.display()
    );
    p
}

/// Run `cmd` with `input` on stdin; kill it and fail if it outlives `DEADLINE`.
fn run_deadline(mut cmd: Command, input: &[u8], what: &str) -> Run {
    let mut p = Piped::spawn(&mut cmd, input);
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("wait") {
            break s;
        }
        if p.started.elapsed() > DEADLINE {
            let _ = p.child.kill();
            let _ = p.child.wait();
            panic!("{what}: still running after {DEADLINE:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    p.finish(status)
}

fn restore(store: &Path, memory: &str) -> Run {
    let mut cmd = vmm();
    cmd.args(["restore", "fn", "--store"])
        .arg(store)
        .args(["--memory", memory, "--timeout", "10"]);
    run_deadline(cmd, REQUEST, &format!("restore --memory {memory}"))
}

fn verify(store: &Path) -> Run {
    let mut cmd = Command::new(vmm_store_bin());
    cmd.arg("verify").arg("--store").arg(store);
    run_deadline(cmd, b"", "vmm-store verify")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// Flips one bit in every page of the first pack: whatever frames a restore reads, with
/// whichever strategy, it reads a damaged one.
fn flipped_bit_all(d: &Path) {
    let p = d.join("packs/0000000000000001.pack");
    let mut b = std::fs::read(&p).unwrap();
    for page in b.chunks_mut(4096) {
        if let Some(x) = page.get_mut(17) {
            *x ^= 0x10;
        }
    }
    std::fs::write(&p, b).unwrap();
}

/// Points EVERY entry of the first pack's index 1 GiB past the end of the pack (the
/// index itself stays well-formed, checksum included): unlike the fixture's
/// `index_entry_past_end`, which adds an entry for a page no template uses, this one
/// breaks pages restore must read.
fn index_all_past_end(d: &Path) {
    use snapshot_store::fuzzing as f;
    let p = d.join("packs/0000000000000001.idx");
    let b = std::fs::read(&p).unwrap();
    let mut body = b[f::IDX_HEADER..].to_vec();
    assert_eq!(body.len() % f::IDX_ENTRY, 0, "unexpected index layout");
    for e in body.chunks_exact_mut(f::IDX_ENTRY) {
        let o = u64::from_le_bytes(e[20..28].try_into().unwrap());
        e[20..28].copy_from_slice(&(o + (1 << 30)).to_le_bytes());
    }
    std::fs::write(&p, f::encode_idx(f::pack_id(1), &body)).unwrap();
}

/// What `vmm restore` must do with each damage.
enum Expect {
    /// Fail cleanly, with this text in the error.
    Refuse(&'static str),
    /// The damage provably lies outside everything restore reads: exact output.
    Unaffected,
}

fn restore_expect(damage: &str) -> Expect {
    Expect::Refuse(match damage {
        "truncated-pack" => "is not in any pack index (or lies past the end of its pack)",
        "flipped-bit" | "flipped-bit-all" => "does not match its hash",
        "manifest-checksum" => "checksum mismatch",
        "missing-parent" => "layered on base, which does not exist",
        // The fixture ADDS an index entry for page id 123.0, which no template references
        // (real page ids are content hashes): restore never looks it up, so it must run
        // the function exactly as before. `index-all-past-end` covers damaged entries that
        // restore does use.
        "index-past-end" => return Expect::Unaffected,
        // A restore locates the template's pages by its location records
        // (`templates/<name>.loc`), not by the pack indexes, and verifies every page by
        // its hash: a damaged index leaves the pages it needs intact and readable, so it
        // runs exactly as before (verify still reports the index; gc refuses to touch it).
        "index-all-past-end" | "deleted-index" | "foreign-index" | "stale-index"
        | "forged-offsets" => return Expect::Unaffected,
        "future-version" => "format version 7",
        "parent-cycle" => "cycle",
        "working-set-outside-ram" => "working set frame",
        // A damage added to the fixtures later: at least a clear `vmm: error:` line.
        _ => "vmm: error:",
    })
}

fn vmm_panicked(stderr: &str) -> bool {
    stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE")
}

/// The healthy store: `fn` (QuickJS hello.js) on the runtime base `base`.
fn make_healthy(dir: &TempDir) {
    let mut cmd = vmm();
    cmd.args([
        "template",
        "create",
        "fn",
        "--base",
        "base",
        "--store",
        &dir.arg(),
    ])
    .args([
        "--module",
        &workload("qjs-wasi-reactor.wasm"),
        "--runtime",
        "qjs",
        "--file",
        &path("examples/hello.js"),
        "--arg",
        "hello.js",
    ]);
    let c = run_deadline(cmd, b"", "template create");
    assert_eq!(c.code(), 0, "template create: {}", c.stderr());
    // The fixtures hard-code the first pack's name and the template names.
    for f in [
        "packs/0000000000000001.pack",
        "packs/0000000000000001.idx",
        "templates/base.tmpl",
        "templates/fn.tmpl",
    ] {
        assert!(dir.0.join(f).exists(), "a fresh store has no {f}");
    }
    let v = verify(&dir.0);
    assert_eq!(v.code(), 0, "the fresh store must verify: {}", v.stdout());
}

/// Applies `damage` to a copy of `healthy` and checks verify and every restore strategy.
/// Returns the problems found (empty: as it should be).
fn check_damage(healthy: &TempDir, name: &str, apply: fn(&Path), expect: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = TempDir::new(&format!("damaged-{name}"));
    copy_dir(&healthy.0, &dir.0);
    let ok = restore(&dir.0, "prefetch");
    if ok.code() != 0 || ok.stdout() != RESPONSE {
        problems.push(format!(
            "{name}: the healthy copy does not restore: {} {}",
            ok.stdout(),
            ok.stderr()
        ));
        return problems;
    }
    apply(&dir.0);

    let v = verify(&dir.0);
    let report = format!("{}{}", v.stdout(), v.stderr());
    eprintln!(
        "[{name}] vmm-store verify exit {}: {}",
        v.code(),
        report.trim()
    );
    if v.code() != 1 {
        problems.push(format!(
            "{name}: verify exited {}, not 1: {report}",
            v.code()
        ));
    }
    if !report.contains(expect) {
        problems.push(format!(
            "{name}: verify does not mention {expect:?}: {report}"
        ));
    }
    if vmm_panicked(&report) {
        problems.push(format!("{name}: verify panicked: {report}"));
    }

    for memory in STRATEGIES {
        let r = restore(&dir.0, memory);
        let err = r.stderr();
        eprintln!(
            "[{name}] restore --memory {memory}: exit {} in {:?}: {}",
            r.code(),
            r.elapsed,
            err.trim()
        );
        if vmm_panicked(&err) {
            problems.push(format!("{name}: restore --memory {memory} panicked: {err}"));
        }
        match restore_expect(name) {
            Expect::Unaffected => {
                if r.code() != 0 || r.stdout() != RESPONSE {
                    problems.push(format!(
                        "{name}: restore --memory {memory} must be unaffected, got exit {} stdout {:?}: {err}",
                        r.code(),
                        r.stdout()
                    ));
                }
            }
            Expect::Refuse(want) => {
                if r.code() == 0 {
                    problems.push(format!(
                        "{name}: restore --memory {memory} ran the damaged template (exit 0, stdout {:?})",
                        r.stdout()
                    ));
                } else if !err.contains("vmm: error:") || !err.contains(want) {
                    problems.push(format!(
                        "{name}: restore --memory {memory} (exit {}) should fail with {want:?}: {err}",
                        r.code()
                    ));
                }
                if !r.stdout().is_empty() {
                    problems.push(format!(
                        "{name}: restore --memory {memory} printed a response from a damaged store: {:?}",
                        r.stdout()
                    ));
                }
            }
        }
    }
    problems
}

/// A damage: its name, how to apply it, what `vmm-store verify` must say about it.
type Case = (&'static str, fn(&Path), &'static str);

#[test]
fn every_damage_is_reported_by_verify_and_refused_by_restore() {
    if !kvm_available() {
        return;
    }
    let _ = vmm_store_bin();
    let t0 = Instant::now();
    let healthy = TempDir::new("damaged-healthy");
    make_healthy(&healthy);

    let mut damages: Vec<Case> = fixtures::DAMAGES
        .iter()
        .map(|d: &Damage| (d.name, d.apply, d.expect))
        .collect();
    damages.push(("flipped-bit-all", flipped_bit_all, "is damaged"));
    damages.push((
        "index-all-past-end",
        index_all_past_end,
        "past the end of its pack",
    ));
    assert!(damages.len() >= 10);

    // The damages are independent (one copy each): check them side by side.
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = damages
            .iter()
            .map(|&(name, apply, expect)| {
                let healthy = &healthy;
                s.spawn(move || check_damage(healthy, name, apply, expect))
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a damage check panicked"))
            .collect()
    });
    eprintln!("checked {} damages in {:?}", damages.len(), t0.elapsed());
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

// ------------------------------------------------------------------------------------
// Forged manifests (valid checksums) whose vCPU state, device state or parent the VMM
// would trip over: `vmm restore` must refuse them before running anything, with a message
// that names the problem (no Rust debug text), and `vmm-store verify` must report them.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use snapshot_store::fuzzing::ManifestV1;
use vmm::persist::VcpuState;
use zerocopy::{FromBytes, IntoBytes};

/// Rewrites template `name`'s manifest in the store at `dir` through `edit`; the checksum
/// stays valid, so only the VMM's own checks can tell.
fn forge(dir: &Path, name: &str, edit: impl FnOnce(&mut ManifestV1)) {
    let mut m = fixtures::read_manifest(dir, name);
    edit(&mut m);
    fixtures::write_manifest(dir, &m);
}

/// Decodes `m`'s vCPU state, lets `edit` change it and encodes it back.
fn forge_vcpu(m: &mut ManifestV1, edit: impl FnOnce(&mut VcpuState)) {
    let mut s = VcpuState::decode(&m.vcpu_state).expect("the healthy vCPU state decodes");
    edit(&mut s);
    m.vcpu_state = s.encode();
}

fn forge_regs(m: &mut ManifestV1, edit: impl FnOnce(&mut kvm_regs)) {
    forge_vcpu(m, |s| {
        let mut r = kvm_regs::read_from_bytes(&s.regs).unwrap();
        edit(&mut r);
        s.regs = r.as_bytes().to_vec();
    })
}

fn forge_sregs(m: &mut ManifestV1, edit: impl FnOnce(&mut kvm_sregs)) {
    forge_vcpu(m, |s| {
        let mut r = kvm_sregs::read_from_bytes(&s.sregs).unwrap();
        edit(&mut r);
        s.sregs = r.as_bytes().to_vec();
    })
}

/// Text that only Rust's `{:?}` formatting produces (struct/enum debug output).
fn looks_like_debug_text(s: &str) -> bool {
    [
        " { ",
        "Some(",
        "None",
        "Err(",
        "UnexpectedEnd",
        "LimitExceeded",
        "SizeLimitExceeded",
        "kvm_",
        "\\u{",
    ]
    .iter()
    .any(|p| s.contains(p))
}

/// `restore fn` must refuse with `want` in the message and verify must report `want`.
fn check_refused(dir: &Path, case: &str, want: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let v = verify(dir);
    let report = format!("{}{}", v.stdout(), v.stderr());
    eprintln!(
        "[{case}] vmm-store verify exit {}: {}",
        v.code(),
        report.trim()
    );
    if v.code() != 1 {
        problems.push(format!(
            "{case}: verify exited {}, not 1: {report}",
            v.code()
        ));
    }
    for w in want {
        if !report.contains(w) {
            problems.push(format!("{case}: verify does not mention {w:?}: {report}"));
        }
    }
    if vmm_panicked(&report) || looks_like_debug_text(&report) {
        problems.push(format!(
            "{case}: verify printed a panic or debug text: {report}"
        ));
    }
    for memory in ["prefetch", "eager", "lazy", "shared"] {
        let r = restore(dir, memory);
        let err = r.stderr();
        eprintln!(
            "[{case}] restore --memory {memory}: exit {}: {}",
            r.code(),
            err.trim()
        );
        if r.code() != 125 || !r.stdout().is_empty() {
            problems.push(format!(
                "{case}: restore --memory {memory} must refuse (exit 125, no output), got exit {} stdout {:?}: {err}",
                r.code(),
                r.stdout()
            ));
        }
        if !err.contains("vmm: error: restore fn:") {
            problems.push(format!(
                "{case}: restore --memory {memory}: no clear error: {err}"
            ));
        }
        for w in want {
            if !err.contains(w) {
                problems.push(format!(
                    "{case}: restore --memory {memory} does not say {w:?}: {err}"
                ));
            }
        }
        if vmm_panicked(&err) || looks_like_debug_text(&err) {
            problems.push(format!(
                "{case}: restore --memory {memory} printed a panic or debug text: {err}"
            ));
        }
    }
    problems
}

/// A forgery of the healthy store: its name, how to apply it, what both must say.
type Forgery = (&'static str, fn(&Path), &'static [&'static str]);

fn run_forgeries(healthy: &TempDir, forgeries: &[Forgery]) {
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = forgeries
            .iter()
            .map(|&(case, apply, want)| {
                s.spawn(move || {
                    let dir = TempDir::new(&format!("forged-{case}"));
                    copy_dir(&healthy.0, &dir.0);
                    apply(&dir.0);
                    check_refused(&dir.0, case, want)
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a forgery check panicked"))
            .collect()
    });
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn forged_vcpu_state_is_refused_by_restore_and_reported_by_verify() {
    if !kvm_available() {
        return;
    }
    let _ = vmm_store_bin();
    let healthy = TempDir::new("forged-vcpu-healthy");
    make_healthy(&healthy);
    let forgeries: &[Forgery] = &[
        (
            "vcpu-garbage",
            |d| {
                forge(d, "fn", |m| {
                    m.vcpu_state = b"\x01\x05not a vCPU state".to_vec()
                })
            },
            &["fn", "vCPU state"],
        ),
        (
            "vcpu-truncated",
            |d| {
                forge(d, "fn", |m| {
                    let n = m.vcpu_state.len();
                    m.vcpu_state.truncate(n - 9);
                })
            },
            &["fn", "vCPU state"],
        ),
        (
            "vcpu-rip",
            |d| forge(d, "fn", |m| forge_regs(m, |r| r.rip = 0x7fff_dead_0000)),
            &["fn", "vCPU state", "rip"],
        ),
        (
            "vcpu-rsp",
            |d| forge(d, "fn", |m| forge_regs(m, |r| r.rsp = 8)),
            &["fn", "vCPU state", "rsp"],
        ),
        (
            "vcpu-trap-flag",
            |d| forge(d, "fn", |m| forge_regs(m, |r| r.rflags |= 1 << 8)),
            &["fn", "vCPU state", "rflags"],
        ),
        (
            "vcpu-cr3",
            |d| forge(d, "fn", |m| forge_sregs(m, |s| s.cr3 = 0x7fff_f000)),
            &["fn", "vCPU state", "cr3"],
        ),
        (
            "vcpu-no-long-mode",
            |d| forge(d, "fn", |m| forge_sregs(m, |s| s.efer = 0)),
            &["fn", "vCPU state", "efer"],
        ),
        (
            "vcpu-idt-outside-ram",
            |d| forge(d, "fn", |m| forge_sregs(m, |s| s.idt.base = 1 << 40)),
            &["fn", "vCPU state", "idt"],
        ),
        (
            "vcpu-pending-exception",
            |d| {
                forge(d, "fn", |m| {
                    forge_vcpu(m, |s| {
                        let mut e = kvm_vcpu_events::read_from_bytes(&s.events).unwrap();
                        e.exception.injected = 1;
                        e.exception.nr = 13;
                        s.events = e.as_bytes().to_vec();
                    })
                })
            },
            &["fn", "vCPU state", "exception"],
        ),
        (
            "vcpu-too-many-msrs",
            |d| {
                forge(d, "fn", |m| {
                    forge_vcpu(m, |s| s.msrs.extend((0..300).map(|i| (0x1000 + i, 0))))
                })
            },
            &["fn", "vCPU state", "MSR"],
        ),
        (
            "vcpu-vif-msr",
            |d| {
                forge(d, "fn", |m| {
                    forge_vcpu(m, |s| {
                        for e in &mut s.msrs {
                            if e.0 == vmm::platform::MSR_PVM_VIF {
                                e.1 = 0x7000_0400;
                            }
                        }
                    })
                })
            },
            &["fn", "vCPU state", "VIF"],
        ),
        (
            "vcpu-backend",
            |d| {
                forge(d, "fn", |m| {
                    forge_vcpu(m, |s| s.backend = "\u{1b}[31m".repeat(40))
                })
            },
            &["fn", "vCPU state", "back end"],
        ),
        (
            "vcpu-xsave-header",
            |d| {
                forge(d, "fn", |m| {
                    forge_vcpu(m, |s| s.xsave[512..520].copy_from_slice(&[0xff; 8]))
                })
            },
            &["fn", "vCPU state", "xsave"],
        ),
    ];
    // The VIF MSR exists only on the PVM back end.
    let m = fixtures::read_manifest(&healthy.0, "fn");
    let made_on = VcpuState::decode(&m.vcpu_state).unwrap().made_on().unwrap();
    let pvm = made_on.backend == vmm::platform::Backend::Pvm;
    let forgeries: Vec<Forgery> = forgeries
        .iter()
        .copied()
        .filter(|f| pvm || f.0 != "vcpu-vif-msr")
        .collect();
    run_forgeries(&healthy, &forgeries);
}

#[test]
fn forged_device_state_and_parents_are_refused_by_restore_and_reported_by_verify() {
    if !kvm_available() {
        return;
    }
    let _ = vmm_store_bin();
    let healthy = TempDir::new("forged-parent-healthy");
    make_healthy(&healthy);
    // A second function on the same base, and a base of another module.
    for (name, base, function) in [
        (
            "fn2",
            "base",
            vec![
                "--module".to_string(),
                workload("qjs-wasi-reactor.wasm"),
                "--runtime".into(),
                "qjs".into(),
                "--file".into(),
                path("examples/hello.js"),
                "--arg".into(),
                "hello.js".into(),
            ],
        ),
        (
            "up",
            "base2",
            vec!["--module".to_string(), path("examples/upper.wat")],
        ),
    ] {
        let mut cmd = vmm();
        cmd.args(["template", "create", name, "--base", base, "--store"])
            .arg(&healthy.0)
            .args(&function);
        let c = run_deadline(cmd, b"", "template create");
        assert_eq!(c.code(), 0, "template create {name}: {}", c.stderr());
    }
    let forgeries: &[Forgery] = &[
        // The issue's case: fn layered on another function template.
        (
            "parent-is-a-function",
            |d| forge(d, "fn", |m| m.parent = Some("fn2".into())),
            &["fn", "fn2", "function template", "not a runtime base"],
        ),
        // fn moved onto the base of another module.
        (
            "parent-is-another-base",
            |d| forge(d, "fn", |m| m.parent = Some("base2".into())),
            &["fn", "base2", "was made on runtime base base"],
        ),
        // fn without any base under it.
        (
            "function-without-base",
            |d| forge(d, "fn", |m| m.parent = None),
            &["fn", "no runtime base"],
        ),
        (
            "device-garbage",
            |d| forge(d, "fn", |m| m.device_state = vec![2, 0xff, 0xff, 0xff]),
            &["fn", "device state"],
        ),
        (
            "device-buffer-outside-ram",
            |d| {
                forge(d, "fn", |m| {
                    let mut s =
                        vmm::template::device::DeviceState::decode(&m.device_state).unwrap();
                    s.buf_gpa = 1 << 40;
                    m.device_state = s.encode();
                })
            },
            &["fn", "device state", "outside guest memory"],
        ),
        (
            "device-newer-version",
            |d| {
                forge(d, "fn", |m| {
                    let mut s =
                        vmm::template::device::DeviceState::decode(&m.device_state).unwrap();
                    s.version = 9;
                    m.device_state = s.encode();
                })
            },
            &["fn", "newer vmm"],
        ),
    ];
    run_forgeries(&healthy, forgeries);
}

/// Issue 7 item 4: `template create` into a store that lost its store.cfg is refused; no
/// new secret is written (it would make every stored template unreadable). No KVM
/// needed: the store is opened before any VM.
#[test]
fn template_create_refuses_a_store_without_its_config() {
    let dir = TempDir::new("no-config");
    drop(fixtures::healthy_store(&dir.0));
    fixtures::missing_config(&dir.0);
    let mut cmd = vmm();
    cmd.args(["template", "create", "new", "--module"])
        .arg(path("examples/upper.wat"))
        .arg("--store")
        .arg(&dir.0);
    let r = run_deadline(cmd, b"", "template create");
    assert_ne!(r.code(), 0, "{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("vmm: error:") && err.contains("no store.cfg") && err.contains("backup"),
        "{err}"
    );
    assert!(
        !dir.0.join("store.cfg").exists(),
        "a new config was written"
    );
    assert!(!dir.0.join("templates/new.tmpl").exists());
}

/// Issue 7 item 11: one unreadable manifest does not hide the others from `template ls`;
/// it is flagged, and the listing exits non-zero. No KVM needed.
#[test]
fn template_ls_lists_the_readable_templates_and_flags_a_damaged_one() {
    let dir = TempDir::new("ls-damaged");
    drop(fixtures::healthy_store(&dir.0));
    fixtures::bad_manifest_checksum(&dir.0); // fn
    let mut cmd = vmm();
    cmd.args(["template", "ls", "--store"]).arg(&dir.0);
    let r = run_deadline(cmd, b"", "template ls");
    assert_ne!(r.code(), 0, "{}", r.stdout());
    let out = r.stdout();
    assert!(out.lines().any(|l| l.starts_with("base ")), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("fn ") && l.contains("UNREADABLE")),
        "{out}"
    );
    let err = r.stderr();
    assert!(
        err.contains("template fn cannot be read") && err.contains("checksum mismatch"),
        "{err}"
    );
    let mut cmd = vmm();
    cmd.args(["template", "ls", "--json", "--store"])
        .arg(&dir.0);
    let r = run_deadline(cmd, b"", "template ls --json");
    let j: serde_json::Value = serde_json::from_str(&r.stdout()).unwrap();
    assert_eq!(j[0]["name"], "base");
    assert_eq!(
        (&j[1]["name"], &j[1]["unreadable"]),
        (&"fn".into(), &true.into())
    );
}

/// Issue 7 item 6: the `--memory shared` image cache is checked before use. Its bytes are
/// altered (the greeting in a data page, then a page that must be zero): `vmm-store verify`
/// reports it, and `restore --memory shared` never runs the altered bytes (it rebuilds the
/// image from the verified pages). `template rm` and `gc` remove the images and the temp
/// files of killed restores.
#[test]
fn altered_shared_memory_image_is_detected_and_never_run() {
    if !kvm_available() {
        return;
    }
    let _ = vmm_store_bin();
    let dir = TempDir::new("shared-cache");
    make_healthy(&dir);
    let r = restore(&dir.0, "shared");
    assert_eq!(
        (r.code(), r.stdout()),
        (0, RESPONSE.to_string()),
        "{}",
        r.stderr()
    );
    let images: Vec<PathBuf> = std::fs::read_dir(dir.0.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let image = &images[0];
    let make_writable = || {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(image, std::fs::Permissions::from_mode(0o644)).unwrap();
    };

    // 1. The greeting in the template's data pages.
    make_writable();
    let mut bytes = std::fs::read(image).unwrap();
    let mut altered = 0;
    for i in 0..bytes.len().saturating_sub(5) {
        if &bytes[i..i + 5] == b"Hello" {
            bytes[i] = b'J';
            altered += 1;
        }
    }
    assert!(altered > 0, "no greeting found in the image");
    std::fs::write(image, &bytes).unwrap();
    drop(bytes);
    let v = verify(&dir.0);
    assert_eq!(
        v.code(),
        1,
        "verify must report the altered image: {}",
        v.stdout()
    );
    assert!(
        v.stdout().contains("memory image") && v.stdout().contains("delete it"),
        "{}",
        v.stdout()
    );
    let r = restore(&dir.0, "shared");
    assert!(
        !r.stdout().contains("Jello"),
        "altered output: {}",
        r.stdout()
    );
    assert!(
        (r.code() == 0 && r.stdout() == RESPONSE) || (r.code() != 0 && r.stdout().is_empty()),
        "exit {}: {} {}",
        r.code(),
        r.stdout(),
        r.stderr()
    );
    assert!(r.stderr().contains("did not match"), "{}", r.stderr());
    let v = verify(&dir.0);
    assert_eq!(v.code(), 0, "the rebuilt image must verify: {}", v.stdout());

    // 2. Data where the template has zeros (the image's last page).
    make_writable();
    let len = std::fs::metadata(image).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let mut last = vec![0u8; 4096];
        f.read_exact_at(&mut last, len - 4096).unwrap();
        assert!(last.iter().all(|&b| b == 0), "the last page is not zero");
        f.write_all_at(b"planted", len - 4096).unwrap();
    }
    drop(f);
    let v = verify(&dir.0);
    assert_eq!(v.code(), 1, "{}", v.stdout());
    assert!(v.stdout().contains("must be zero"), "{}", v.stdout());
    let r = restore(&dir.0, "shared");
    assert_eq!(
        (r.code(), r.stdout()),
        (0, RESPONSE.to_string()),
        "{}",
        r.stderr()
    );

    // 3. gc removes stale images and dead restores' temp files; `template rm` the rest.
    let cache = dir.0.join("cache");
    std::fs::write(cache.join("gone.1.img"), b"stale").unwrap();
    std::fs::write(cache.join(".fn.2147483647.tmp"), b"half").unwrap();
    let mut gc = Command::new(vmm_store_bin());
    gc.arg("gc").arg("--store").arg(&dir.0);
    let g = run_deadline(gc, b"", "vmm-store gc");
    assert_eq!(g.code(), 0, "{}", g.stderr());
    assert!(!cache.join("gone.1.img").exists());
    assert!(!cache.join(".fn.2147483647.tmp").exists());
    assert!(image.exists(), "gc removed the current image");
    std::fs::write(cache.join(".fn.2147483647.tmp"), b"half").unwrap();
    let mut rm = vmm();
    rm.args(["template", "rm", "fn", "--store"]).arg(&dir.0);
    let r = run_deadline(rm, b"", "template rm");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let left: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

// ------------------------------------------------------------------------------------
// Location records (`templates/<name>.loc`): a restore uses them, runs the same without
// them (a store from before they existed) or with a damaged one, and `vmm-store gc`
// writes the missing ones, saying so.

#[test]
fn restores_run_with_without_or_with_damaged_location_records_and_gc_writes_them() {
    if !kvm_available() {
        return;
    }
    let _ = vmm_store_bin();
    let dir = TempDir::new("location-records");
    make_healthy(&dir);
    let locs = ["templates/base.loc", "templates/fn.loc"];
    for f in locs {
        assert!(dir.0.join(f).exists(), "template create wrote no {f}");
    }
    let expect_ok = |what: &str| {
        for memory in STRATEGIES {
            let r = restore(&dir.0, memory);
            assert_eq!(
                (r.code(), r.stdout()),
                (0, RESPONSE.to_string()),
                "{what}, --memory {memory}: {}",
                r.stderr()
            );
        }
    };
    expect_ok("with records");
    // An old store: no records.
    for f in locs {
        std::fs::remove_file(dir.0.join(f)).unwrap();
    }
    expect_ok("without records");
    let mut cmd = Command::new(vmm_store_bin());
    cmd.arg("gc").arg("--store").arg(&dir.0);
    let g = run_deadline(cmd, b"", "vmm-store gc");
    assert_eq!(g.code(), 0, "gc: {}", g.stderr());
    assert!(
        g.stdout()
            .contains("wrote the location records of 2 template(s)"),
        "{}",
        g.stdout()
    );
    for f in locs {
        assert!(dir.0.join(f).exists(), "gc wrote no {f}");
    }
    expect_ok("with records written by gc");
    // A damaged record is passed over.
    std::fs::write(dir.0.join("templates/fn.loc"), b"VMMTLOC1 damaged").unwrap();
    expect_ok("with a damaged record");
    let v = verify(&dir.0);
    assert!(
        v.stdout().contains("unusable location record") && !vmm_panicked(&v.stderr()),
        "{}",
        v.stdout()
    );
}
