//! wasmtime: the module arrives compiled, an artifact the VMM made with Cranelift for this
//! guest (`vmm/src/aot.rs`, the same engine settings: `abi/src/wasmtime_config.rs`), and is
//! loaded with `Module::deserialize`: no compiler in the guest. Linear memories are
//! reservations in the guest's own page tables with guard pages instead of bounds checks;
//! traps arrive as CPU exceptions that the kernel hands to wasmtime's handler first (the
//! kernel's `arch::x86_64::{vmem, capi, exceptions}`).

use crate::runner::{self, RunOptions, Stop};
use crate::wasi::link::StoreData;
use crate::{Host, RunError, RunOutput, Runtime};
use alloc::format;
use alloc::string::{String, ToString};
use vmm_abi::{ERR_INSTANTIATE, ERR_MODULE_INVALID};
use wasmtime::{Config, Engine, Error, Linker, Memory, Module, Store, Trap};

include!("../../../abi/src/wasmtime_config.rs");

/// A loaded module and its engine.
pub struct Loaded {
    engine: Engine,
    module: Module,
}

/// Whether this CPU has `feature` (named as wasmtime asks: "sse4.1", "bmi2", ...), from
/// this guest's `cpuid`, decided by the same function the VMM's compiler uses on the CPUID
/// table it gives the guest (`vmm_abi::cpu::wasmtime_feature`). `None` for a feature it
/// does not know, which refuses the artifact; AVX and what needs it are reported missing.
fn detect_feature(feature: &str) -> Option<bool> {
    vmm_abi::cpu::wasmtime_feature(&crate::cpuid_regs(), feature)
}

/// The guest's engine: the shared settings, CPU features from CPUID.
fn engine() -> Result<Engine, Error> {
    let mut config = Config::new();
    apply_shared_settings(&mut config);
    // SAFETY: `detect_feature` answers from CPUID, so a feature it reports is usable.
    unsafe { config.detect_host_feature(detect_feature) };
    // SAFETY: the kernel's own code is built with hardware floats (vmm/build.rs), the ABI
    // Cranelift's code uses, and a build check refuses calls into the soft-float library.
    unsafe { config.x86_float_abi_ok(true) };
    Engine::new(&config)
}

/// `{e}` with its causes, one after another.
fn chain(e: &Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(": ");
        s.push_str(&cause.to_string());
    }
    s
}

/// Load an artifact compiled by the VMM for this guest. A mismatch (other engine settings,
/// wasmtime version, CPU features this CPU lacks) is an invalid module, not a crash.
pub fn load(artifact: &[u8]) -> Result<Loaded, RunError> {
    let invalid = |what: &str, e: &Error| RunError {
        code: ERR_MODULE_INVALID,
        message: format!("{what}: {}", chain(e)),
    };
    let engine = engine().map_err(|e| invalid("cannot set up wasmtime", &e))?;
    // SAFETY: the artifact is what the VMM compiled (and checked against its cache key and
    // hash) for exactly this engine configuration; wasmtime still checks its header,
    // version and settings against this engine and refuses a mismatch.
    let module = unsafe { Module::deserialize(&engine, artifact) }
        .map_err(|e| invalid("cannot load the compiled module", &e))?;
    Ok(Loaded { engine, module })
}

/// `proc_exit(code)`, as the error that ends the run.
#[derive(Debug)]
struct ProcExit(i32);

impl core::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "proc_exit({})", self.0)
    }
}

impl core::error::Error for ProcExit {}

/// Room kept free when deciding whether a growth fits: the heap's own bookkeeping, the page
/// tables and 2 MiB alignment of linear memory chunks.
const GROWTH_SLACK: usize = 4 << 20;
/// Bytes per table element (wasmtime keeps one pointer per element).
const TABLE_ELEMENT_BYTES: usize = 8;

/// A growth that the guest's memory cannot hold returns -1 to wasm, as under wasmi (wasmtime
/// would otherwise trap when the allocation fails).
impl<H: Host + Send + 'static> wasmtime::ResourceLimiter for StoreData<H, Memory> {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool, Error> {
        let more = desired.saturating_sub(current);
        Ok(more.saturating_add(GROWTH_SLACK) <= self.host.memory_available())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool, Error> {
        // The elements move to a new allocation of the new size.
        let bytes = desired.saturating_mul(TABLE_ELEMENT_BYTES);
        Ok(bytes.saturating_add(GROWTH_SLACK) <= self.host.memory_available())
    }
}

crate::engine_glue!(
    wasmtime,
    Error::msg("WASI call from a module that exports no memory"),
    [Host + Send + 'static]
);

fn proc_exit(code: i32) -> Result<(), Error> {
    Err(Error::new(ProcExit(code)))
}

fn add_to_linker<H: Host + Send + 'static>(
    linker: &mut Linker<StoreData<H, Memory>>,
    test_hostcalls: bool,
) -> Result<(), Error> {
    crate::define_wasi!(linker, test_hostcalls);
    Ok(())
}

fn classify(e: Error) -> Stop {
    if let Some(exit) = e.downcast_ref::<ProcExit>() {
        return Stop::Exit(exit.0);
    }
    match e.downcast_ref::<Trap>() {
        // "wasm trap: <what>": the runner says "wasm trap: " itself.
        Some(t) => {
            let text = t.to_string();
            Stop::Trap(
                text.strip_prefix("wasm trap: ")
                    .unwrap_or(&text)
                    .to_string(),
            )
        }
        None => Stop::Trap(chain(&e)),
    }
}

/// Instantiate `loaded` with WASI over `host` and run it (see [`runner::drive`]). The
/// store, its instance and memories are left in place (never dropped): this is the run the
/// guest exists for.
pub fn run<H: Host + Send + 'static>(
    host: H,
    loaded: &Loaded,
    runtime: Runtime,
    opts: RunOptions,
) -> Result<RunOutput, RunError> {
    let mut linker = Linker::<StoreData<H, Memory>>::new(&loaded.engine);
    add_to_linker(&mut linker, opts.test_hostcalls).map_err(|e| RunError {
        code: ERR_INSTANTIATE,
        message: format!("cannot set up WASI: {}", chain(&e)),
    })?;
    let imports = loaded.module.imports().map(|i| {
        let func = matches!(i.ty(), wasmtime::ExternType::Func(_));
        (i.module(), i.name(), func)
    });
    if let Some(e) = runner::missing_import(imports, opts.test_hostcalls) {
        return Err(e);
    }
    let mut store = Store::new(&loaded.engine, StoreData::new(host));
    store.limiter(|data| data as &mut dyn wasmtime::ResourceLimiter);
    let instance = match linker.instantiate(&mut store, &loaded.module) {
        Ok(i) => i,
        Err(e) => {
            let d = store.data_mut();
            let msg = runner::instantiate_message(classify(e));
            return Err(runner::fail(&mut d.wasi, &mut d.host, ERR_INSTANTIATE, msg));
        }
    };
    store.data_mut().memory = instance.get_memory(&mut store, "memory");
    let mut session = EngineSession { store, instance };
    let result = runner::drive(&mut session, runtime);
    // Not dropped: the kernel reports the result and halts, and tearing the store down
    // first would unmap every page of its memories one by one (an `invlpg`, a VM exit on
    // PVM, per page: ~6 ms for QuickJS) before the response goes out.
    core::mem::forget(session);
    result
}
