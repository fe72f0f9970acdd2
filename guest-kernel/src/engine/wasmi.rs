//! wasmi: the module is WebAssembly, translated to wasmi's bytecode (lazily, or all at once
//! for a runtime base) and interpreted.

use crate::runner::{self, RunOptions, Stop};
use crate::wasi::link::StoreData;
use crate::{Host, RunError, RunOutput, Runtime};
use alloc::format;
use alloc::string::ToString;
use vmm_abi::{ERR_INSTANTIATE, ERR_MODULE_INVALID};
use wasmi::{Engine, Error, Linker, Memory, Module, Store};

/// A compiled module and its engine.
pub struct Compiled {
    engine: Engine,
    module: Module,
}

/// Compile `module`. The bytes are not needed afterwards: the kernel zeroes them so that
/// they cost nothing in snapshots.
pub fn compile(module: &[u8], opts: RunOptions) -> Result<Compiled, RunError> {
    let mut config = wasmi::Config::default();
    if opts.eager_compile {
        config.compilation_mode(wasmi::CompilationMode::Eager);
    }
    let engine = Engine::new(&config);
    let module = Module::new(&engine, module).map_err(|e| RunError {
        code: ERR_MODULE_INVALID,
        message: format!("module is not valid WebAssembly: {e}"),
    })?;
    Ok(Compiled { engine, module })
}

crate::engine_glue!(
    wasmi,
    Error::new("WASI call from a module that exports no memory"),
    [Host]
);

fn proc_exit(code: i32) -> Result<(), Error> {
    Err(Error::i32_exit(code))
}

fn add_to_linker<H: Host>(
    linker: &mut Linker<StoreData<H, Memory>>,
    test_hostcalls: bool,
) -> Result<(), wasmi::errors::LinkerError> {
    crate::define_wasi!(linker, test_hostcalls);
    Ok(())
}

fn classify(e: Error) -> Stop {
    match e.i32_exit_status() {
        Some(code) => Stop::Exit(code),
        None => Stop::Trap(e.to_string()),
    }
}

/// Instantiate `compiled` with WASI over `host` and run it (see [`runner::drive`]).
pub fn run<H: Host>(
    host: H,
    compiled: &Compiled,
    runtime: Runtime,
    opts: RunOptions,
) -> Result<RunOutput, RunError> {
    let mut linker = Linker::<StoreData<H, Memory>>::new(&compiled.engine);
    add_to_linker(&mut linker, opts.test_hostcalls).map_err(|e| RunError {
        code: ERR_INSTANTIATE,
        message: format!("cannot set up WASI: {e}"),
    })?;
    let imports = compiled.module.imports().map(|i| {
        let func = matches!(i.ty(), wasmi::ExternType::Func(_));
        (i.module(), i.name(), func)
    });
    if let Some(e) = runner::missing_import(imports, opts.test_hostcalls) {
        return Err(e);
    }
    let mut store = Store::new(&compiled.engine, StoreData::new(host));
    let instance = match linker.instantiate_and_start(&mut store, &compiled.module) {
        Ok(i) => i,
        Err(e) => {
            let d = store.data_mut();
            let msg = runner::instantiate_message(classify(e));
            return Err(runner::fail(&mut d.wasi, &mut d.host, ERR_INSTANTIATE, msg));
        }
    };
    store.data_mut().memory = instance.get_memory(&store, "memory");
    runner::drive(&mut EngineSession { store, instance }, runtime)
}
