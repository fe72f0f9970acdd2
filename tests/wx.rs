//! W^X inside the guest: the guest kernel's fault-injection self tests (`\0vmm-selftest:wx-*`
//! modules, which exist only with `VMM_TEST_HOSTCALLS=1`) each do one thing W^X forbids:
//! write the kernel's own text, its read-only data or its page tables; execute its data,
//! stack or heap; execute, write or write-behind wasmtime's memory against its protection.
//! Each must end the guest with a page fault (vector 14) that the VMM reports with the
//! faulting address, which this test checks against the address the self test used.

mod common;
use common::*;

/// The guest-physical layout (vmm_abi::layout) the expected addresses come from.
const KERNEL_BASE: u64 = 0x20_0000;
const KERNEL_END_MAX: u64 = 0xc0_0000;
const PML4_GPA: u64 = 0x2000;
const STACK: std::ops::Range<u64> = 0xe0_0000..0x160_0000;
const HEAP_START: u64 = 0x160_0000;
const MEM: u64 = 64 << 20;
/// wasmtime's memory: PML4 slots 1 up to the alias window's slot 255.
const VMEM: std::ops::Range<u64> = (1 << 39)..(255 << 39);

/// #PF error code bits.
const PF_PRESENT: u64 = 1;
const PF_WRITE: u64 = 2;
const PF_FETCH: u64 = 0x10;

/// What the VMM reported about a guest CPU exception.
#[derive(Debug)]
struct Fault {
    vector: u64,
    error_code: u64,
    rip: u64,
    cr2: u64,
}

fn hex_after(s: &str, key: &str) -> u64 {
    let v = s
        .split(key)
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_hexdigit()).next())
        .unwrap_or_else(|| panic!("no {key:?} in {s}"));
    u64::from_str_radix(v, 16).unwrap_or_else(|e| panic!("{key:?} in {s}: {e}"))
}

/// Run self test `what` and return the fault the VMM reported.
fn fault_of(dir: &TempDir, what: &str) -> Fault {
    let module = dir.0.join(format!("selftest-{what}"));
    std::fs::write(&module, format!("\0vmm-selftest:{what}")).unwrap();
    let mut cmd = vmm();
    cmd.env("VMM_TEST_HOSTCALLS", "1").args([
        "run",
        "--module",
        &module.to_string_lossy(),
        "--mem",
        &(MEM >> 20).to_string(),
        "--timeout",
        "10",
    ]);
    let r = run_with_input(cmd, b"");
    let err = r.stderr();
    eprintln!("[{what}] exit {}: {}", r.code(), err.trim());
    assert_eq!(r.code(), 125, "{what}: the guest must fail: {err}");
    assert!(
        err.contains("guest CPU exception: page fault (#PF) (vector 14)"),
        "{what}: not a page fault: {err}"
    );
    let vector = err
        .split("(vector ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no vector in {err}"));
    Fault {
        vector,
        error_code: hex_after(&err, "error code 0x"),
        rip: hex_after(&err, "at rip 0x"),
        cr2: hex_after(&err, "cr2 0x"),
    }
}

/// A write to a present page (protection, not a missing page) at `addr`.
#[track_caller]
fn assert_write_fault(what: &str, f: &Fault, addr: std::ops::Range<u64>) {
    assert_eq!(f.vector, 14, "{what}: {f:?}");
    assert_eq!(
        f.error_code & (PF_PRESENT | PF_WRITE | PF_FETCH),
        PF_PRESENT | PF_WRITE,
        "{what}: a write to a present page: {f:?}"
    );
    assert!(
        addr.contains(&f.cr2),
        "{what}: cr2 not in {addr:#x?}: {f:?}"
    );
    assert!(
        (KERNEL_BASE..KERNEL_END_MAX).contains(&f.rip),
        "{what}: the write is the kernel's: {f:?}"
    );
}

/// An instruction fetch from a present page at `addr` (the jump target itself faults).
#[track_caller]
fn assert_fetch_fault(what: &str, f: &Fault, addr: std::ops::Range<u64>) {
    assert_eq!(f.vector, 14, "{what}: {f:?}");
    assert_eq!(
        f.error_code & (PF_PRESENT | PF_WRITE | PF_FETCH),
        PF_PRESENT | PF_FETCH,
        "{what}: an instruction fetch from a present page: {f:?}"
    );
    assert_eq!(
        f.rip, f.cr2,
        "{what}: the fetch faults at its target: {f:?}"
    );
    assert!(
        addr.contains(&f.cr2),
        "{what}: cr2 not in {addr:#x?}: {f:?}"
    );
}

#[test]
fn guest_w_xor_x_violations_fault_with_vector_14_and_their_address() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("wx-selftest");
    let image = KERNEL_BASE..KERNEL_END_MAX;
    let one = |a: u64| a..a + 1;

    // The kernel's own text (`_start`, the first byte of the image), its read-only data,
    // and its page tables (the PML4, through the identity map).
    assert_write_fault(
        "write text",
        &fault_of(&dir, "wx-write-text"),
        one(KERNEL_BASE),
    );
    let f = fault_of(&dir, "wx-write-rodata");
    assert_write_fault("write rodata", &f, image.clone());
    assert_ne!(
        f.cr2 >> 21,
        f.rip >> 21,
        "rodata lies apart from text: {f:?}"
    );
    assert_write_fault(
        "write page table",
        &fault_of(&dir, "wx-write-page-table"),
        one(PML4_GPA),
    );

    // Data, stack and heap are not executable.
    assert_fetch_fault("exec data", &fault_of(&dir, "wx-exec-data"), image);
    assert_fetch_fault("exec stack", &fault_of(&dir, "wx-exec-stack"), STACK);
    assert_fetch_fault(
        "exec heap",
        &fault_of(&dir, "wx-exec-heap"),
        HEAP_START..MEM,
    );

    // wasmtime's memory: read-write is not executable; read-execute code runs (the self
    // test checks that it returned) but is writable neither at its address nor through the
    // identity map of the memory behind it; read-only is not writable.
    assert_fetch_fault(
        "exec wasmtime data",
        &fault_of(&dir, "wx-vmem-exec-data"),
        VMEM,
    );
    let code = fault_of(&dir, "wx-vmem-write-code");
    assert_write_fault("write wasmtime code", &code, VMEM);
    let behind = fault_of(&dir, "wx-vmem-write-code-identity");
    assert_write_fault("write wasmtime code's memory", &behind, HEAP_START..MEM);
    assert_write_fault(
        "write wasmtime read-only data",
        &fault_of(&dir, "wx-vmem-write-read-only"),
        VMEM,
    );
}

#[test]
fn wx_self_tests_do_not_exist_without_the_test_switch() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("wx-no-switch");
    let module = dir.0.join("selftest");
    std::fs::write(&module, "\0vmm-selftest:wx-write-text").unwrap();
    let mut cmd = vmm();
    cmd.env_remove("VMM_TEST_HOSTCALLS")
        .args(["run", "--module", &module.to_string_lossy()]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 125, "{}", r.stderr());
    assert!(
        r.stderr().contains("not valid WebAssembly"),
        "{}",
        r.stderr()
    );
    assert!(!r.stderr().contains("#PF"), "{}", r.stderr());
}
