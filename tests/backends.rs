//! Templates across KVM back ends and CPUs. A template records the back end and the CPU
//! (vendor, the features its guest could see) it was made on; `vmm restore` refuses one
//! made on the other back end, or on a CPU with features this one lacks, before the guest
//! runs, naming both; `vmm-store verify` does not call that damage. Here the template is
//! real (made on this machine's /dev/kvm) and its record is rewritten;
//! `tools/hw-kvm-test.sh` moves real templates between PVM and hardware KVM (an emulated
//! AMD SVM CPU under QEMU) both ways.

mod common;
use common::*;
use std::path::Path;

use snapshot_store::fixtures;
use vmm::persist::VcpuState;

const REQUEST: &[u8] = b"across back ends\n";
const RESPONSE: &str = "ACROSS BACK ENDS\n";

/// A store holding template `up` (examples/upper.wat on its runtime base), made here.
fn make_store(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    let mut cmd = vmm();
    cmd.args(["template", "create", "up", "--store", &dir.arg()])
        .args(["--module", &path("examples/upper.wat")]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "template create: {}", r.stderr());
    dir
}

fn vcpu_state(dir: &Path, name: &str) -> VcpuState {
    VcpuState::decode(&fixtures::read_manifest(dir, name).vcpu_state).expect("a vCPU state")
}

/// Rewrites template `name`'s vCPU state through `edit` (the manifest's checksum stays
/// valid, so only the VMM's own checks can tell).
fn forge(dir: &Path, name: &str, edit: impl FnOnce(&mut VcpuState)) {
    let mut m = fixtures::read_manifest(dir, name);
    let mut s = VcpuState::decode(&m.vcpu_state).expect("a vCPU state");
    edit(&mut s);
    m.vcpu_state = s.encode();
    fixtures::write_manifest(dir, &m);
}

fn restore(dir: &TempDir, memory: &str) -> Run {
    let mut cmd = vmm();
    cmd.args(["restore", "up", "--store", &dir.arg(), "--memory", memory]);
    run_with_input(cmd, REQUEST)
}

fn verify(dir: &TempDir) -> Run {
    let mut cmd = vmm_store();
    cmd.args(["verify", "--store", &dir.arg()]);
    run_with_input(cmd, b"")
}

/// The back end `vmm` runs on here, from its `--stats` banner.
fn backend_here() -> String {
    let mut cmd = vmm();
    cmd.args(["run", "--module", &path("examples/upper.wat"), "--stats"]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    r.stderr()
        .lines()
        .find_map(|l| {
            // "--- cold start on pvm KVM, wasmtime ---": the back end is the word before KVM.
            l.strip_prefix("--- cold start on ")?
                .split_once(" KVM")
                .map(|(backend, _)| backend)
        })
        .unwrap_or_else(|| panic!("no back end in {}", r.stderr()))
        .to_string()
}

/// The record of the template made here: (back end, vendor, features).
fn record(dir: &Path) -> (String, String, Vec<String>) {
    let s = vcpu_state(dir, "up").backend;
    let parts: Vec<&str> = s.splitn(3, '/').collect();
    assert_eq!(parts.len(), 3, "the record {s:?} names no CPU");
    let features = parts[2].split(',').map(String::from).collect();
    (parts[0].into(), parts[1].into(), features)
}

#[test]
fn a_template_records_the_back_end_and_cpu_it_was_made_on() {
    if !kvm_available() {
        return;
    }
    let dir = make_store("backends-record");
    let (backend, vendor, features) = record(&dir.0);
    assert_eq!(backend, backend_here());
    assert_eq!(vendor.len(), 12, "vendor {vendor:?}");
    if backend == "pvm" {
        // The PVM model keeps the vendor of KVM's table: the host's.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        assert!(
            cpuinfo.contains(&format!("vendor_id\t: {vendor}")),
            "vendor {vendor}"
        );
    }
    for f in ["sse", "sse2"] {
        assert!(features.iter().any(|x| x == f), "{f} not in {features:?}");
    }
    // The base too, and both restore here.
    assert_eq!(
        vcpu_state(&dir.0, "up").backend,
        vcpu_state(
            &dir.0,
            fixtures::read_manifest(&dir.0, "up")
                .parent
                .as_deref()
                .unwrap()
        )
        .backend
    );
    let r = restore(&dir, "prefetch");
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (0, RESPONSE),
        "{}",
        r.stderr()
    );
}

/// The restore of `dir`'s `up` is refused with every memory strategy, before the guest
/// runs, with an error that says each of `want`; and verify passes (it is not damage).
fn assert_refused(dir: &TempDir, want: &[&str]) {
    for memory in ["prefetch", "eager", "lazy", "shared"] {
        let r = restore(dir, memory);
        let err = r.stderr();
        assert_eq!(r.code(), 125, "--memory {memory}: {err}");
        assert_eq!(r.stdout(), "", "--memory {memory}: {err}");
        assert!(err.starts_with("vmm: error: restore up: "), "{err}");
        for w in want {
            assert!(err.contains(w), "--memory {memory}: no {w:?} in {err}");
        }
    }
    let v = verify(dir);
    assert_eq!(v.code(), 0, "verify: {}{}", v.stdout(), v.stderr());
}

#[test]
fn a_template_from_the_other_back_end_is_refused_naming_both() {
    if !kvm_available() {
        return;
    }
    let dir = make_store("backends-other");
    let (here, vendor, features) = record(&dir.0);
    let other = if here == "pvm" { "hardware" } else { "pvm" };
    let forged = format!("{other}/AuthenticAMD/{}", features.join(","));
    forge(&dir.0, "up", |s| s.backend = forged);
    assert_refused(
        &dir,
        &[
            &format!("made on {other} KVM (AuthenticAMD)"),
            &format!("cannot be restored on {here} KVM ({vendor})"),
        ],
    );
}

#[test]
fn a_template_needing_a_cpu_feature_this_cpu_lacks_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = make_store("backends-feature");
    let (here, vendor, mut features) = record(&dir.0);
    // Features a guest may use (only those count); sse4a is AMD's only, gfni is not on
    // older AMD CPUs, sha not on older Intel ones.
    let lacking = ["sse4a", "gfni", "sha", "adx", "rdseed", "movbe"]
        .into_iter()
        .find(|f| !features.iter().any(|x| x == f))
        .expect("this CPU model has all of sse4a, gfni, sha, adx, rdseed, movbe");
    features.push(lacking.into());
    let forged = format!("{here}/GenuineIntel/{}", features.join(","));
    forge(&dir.0, "up", |s| s.backend = forged);
    assert_refused(
        &dir,
        &[
            &format!("made on {here} KVM (GenuineIntel)"),
            &format!("that {here} KVM ({vendor}) here lacks ({lacking})"),
        ],
    );
}

#[test]
fn a_template_from_before_the_cpu_was_recorded_still_restores() {
    if !kvm_available() {
        return;
    }
    let dir = make_store("backends-bare");
    let here = backend_here();
    forge(&dir.0, "up", |s| s.backend = here.clone());
    let r = restore(&dir, "prefetch");
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (0, RESPONSE),
        "{}",
        r.stderr()
    );
}

/// Hardware KVM reports PKRU (and AVX, when the CPU marks it in use) in the saved XSAVE
/// header whatever the guest's XCR0 enables (PKRU it never enables): an emulated AMD CPU
/// saved XSTATE_BV 0x207 with XCR0 0x1, and every template made there was refused as
/// forged. Such a header passes; one naming a component outside the 4 KiB area (bit 10) is
/// still reported.
#[test]
fn the_xsave_header_hardware_kvm_saves_passes_the_checks() {
    if !kvm_available() {
        return;
    }
    let dir = make_store("backends-xsave");
    forge(&dir.0, "up", |s| {
        s.xsave[512..520].copy_from_slice(&0x207u64.to_le_bytes())
    });
    let v = verify(&dir);
    assert_eq!(v.code(), 0, "verify: {}{}", v.stdout(), v.stderr());

    forge(&dir.0, "up", |s| {
        s.xsave[512..520].copy_from_slice(&0x603u64.to_le_bytes())
    });
    let v = verify(&dir);
    assert_eq!(v.code(), 1, "verify: {}{}", v.stdout(), v.stderr());
    assert!(v.stdout().contains("xsave header"), "{}", v.stdout());
}
