//! Section `native`: examples/compute.wat under wasmi in the guest and in this process.

use super::process::{invoke_json, s};
use super::util::percentile;
use super::BenchArgs;
use std::time::Instant;
use vmm::stats::ms;

/// examples/compute.wat under wasmi in the guest and in a host process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NativeReport {
    pub guest_ms: f64,
    pub host_ms: f64,
    pub ratio: f64,
}

/// Section `native`: examples/compute.wat under wasmi in the guest (`vmm run`) and in this
/// process, median of 5 each.
pub(super) fn native(a: &BenchArgs) -> Result<NativeReport, String> {
    let wasm =
        crate::cli::read_module(&a.examples.join("compute.wat")).map_err(|e| e.to_string())?;
    // wasmi on both sides (the default engine is wasmtime: the `engines` section compares
    // it with wasmtime in a host process).
    let args = [
        "run".into(),
        "--engine".into(),
        "wasmi".into(),
        "--module".into(),
        s(&a.examples.join("compute.wat")),
        "--json".into(),
    ];
    let mut guest = Vec::new();
    let mut host = Vec::new();
    for _ in 0..5 {
        guest.push(invoke_json(&args, b"", &[])?.stats.function_ms);
        host.push(host_wasmi_ms(&wasm)?);
    }
    let (g, h) = (percentile(&guest, 0.5), percentile(&host, 0.5));
    Ok(NativeReport {
        guest_ms: g,
        host_ms: h,
        ratio: g / h,
    })
}

pub(super) fn print_native(r: &NativeReport) {
    println!(
        "## Native speed: examples/compute.wat under wasmi, guest vs host process (median of 5)\n"
    );
    println!("| in the guest (vmm run) | in a host process | guest / host |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.1} ms | {:.1} ms | {:.2} |",
        r.guest_ms, r.host_ms, r.ratio
    );
    println!();
}

/// Run `_start` of `wasm` with wasmi in this process; returns its duration in ms.
pub(super) fn host_wasmi_ms(wasm: &[u8]) -> Result<f64, String> {
    let engine = wasmi::Engine::default();
    let module = wasmi::Module::new(&engine, wasm).map_err(|e| e.to_string())?;
    let mut store = wasmi::Store::new(&engine, ());
    let linker = wasmi::Linker::<()>::new(&engine);
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| e.to_string())?;
    let start = instance
        .get_typed_func::<(), ()>(&store, "_start")
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    start.call(&mut store, ()).map_err(|e| e.to_string())?;
    Ok(ms(t0.elapsed()))
}
