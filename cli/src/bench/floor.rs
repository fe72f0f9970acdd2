//! Section `floor`: what any start costs on this machine.

use super::process::{invoke_json, s};
use super::util::{finite_or_zero, percentile};
use std::path::Path;
use std::time::Instant;
use vmm::stats::ms;

/// What any start costs on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorReport {
    /// KVM_CREATE_VM, a memory slot and a vCPU.
    pub vm_create_ms: f64,
    /// One guest -> vmm -> guest round trip.
    pub exit_us: f64,
}

/// Hostcalls the exit measurement's guest makes.
pub(super) const EXIT_HOSTCALLS: u32 = 2000;

/// Section `floor`: VM creation alone, in this process, and the cost of one exit: a guest
/// that makes `EXIT_HOSTCALLS` hostcalls against one that makes none.
pub(super) fn floor() -> Result<FloorReport, String> {
    let vm_create_ms = vm_create_median_ms()?;
    let dir = std::env::temp_dir().join(format!("vmm-bench-exits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let times = hostcall_function_ms(&dir, EXIT_HOSTCALLS)
        .and_then(|with| Ok((with, hostcall_function_ms(&dir, 0)?)));
    let _ = std::fs::remove_dir_all(&dir);
    let (with, without) = times?;
    Ok(FloorReport {
        vm_create_ms,
        exit_us: (with - without) * 1e3 / f64::from(EXIT_HOSTCALLS),
    })
}

/// Median of 20 creations of a VM (KVM_CREATE_VM, memory slot, vCPU), in ms.
pub(super) fn vm_create_median_ms() -> Result<f64, String> {
    let mut create = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mem = vmm::memory::GuestMemory::new(64 << 20).map_err(|e| e.to_string())?;
        let vm = vmm::vm::Vm::new(mem).map_err(|e| e.to_string())?;
        create.push(ms(t.elapsed()));
        drop(vm);
    }
    Ok(percentile(&create, 0.5))
}

/// Median `function_ms` of 5 `vmm run`s of a guest (written to `dir`) that makes `n` hostcalls.
pub(super) fn hostcall_function_ms(dir: &Path, n: u32) -> Result<f64, String> {
    let file = dir.join(format!("exits{n}.wat"));
    std::fs::write(&file, EXITS_WAT.replace("COUNT", &n.to_string())).map_err(|e| e.to_string())?;
    let args = ["run".into(), "--json".into(), "--module".into(), s(&file)];
    let mut t = Vec::new();
    for _ in 0..5 {
        let run = invoke_json(&args, b"", &[("VMM_TEST_HOSTCALLS", "1")])?;
        t.push(run.stats.function_ms);
    }
    Ok(percentile(&t, 0.5))
}

pub(super) fn print_floor(r: &FloorReport) {
    println!("## Floor on this machine\n");
    println!("| VM creation (VM + memory slot + vCPU) | one exit (guest -> vmm -> guest) |");
    println!("|---:|---:|");
    println!(
        "| {:.3} ms | {:.1} us |",
        finite_or_zero(r.vm_create_ms),
        r.exit_us
    );
    println!();
}

/// A guest that makes COUNT hostcalls (GetFunction with an empty buffer: the VMM answers
/// with the config length and writes nothing) through the test-only raw hostcall import.
pub(super) const EXITS_WAT: &str = r#"(module
  (import "vmm_test" "hostcall" (func $hc (param i64 i64 i64 i64 i64) (result i64)))
  (func (export "_start") (local $i i32)
    (block $d (loop $l
      (br_if $d (i32.ge_u (local.get $i) (i32.const COUNT)))
      (drop (call $hc (i64.const 1) (i64.const 0) (i64.const 0) (i64.const 0) (i64.const 0)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))))"#;
