//! Compile, link, instantiate and run a module under WASI (a command's `_start`, or the
//! QuickJS-NG reactor's `_initialize` + `qjs_init_argv`).

use crate::wasi::link::{self, StoreData};
use crate::{Host, Phase, RunError, RunOutput, Runtime};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use vmm_abi::{ERR_CONFIG, ERR_INSTANTIATE, ERR_MODULE_INVALID, ERR_RUNTIME_INIT, ERR_TRAP};
use wasmi::{Engine, Error, Instance, Linker, Module, Store, TypedFunc};

/// Where the QuickJS prelude is served, relative to the preopen `/` (hidden from
/// directory listings).
pub const QJS_PRELUDE_PATH: &str = ".vmm/prelude.js";

/// Where the function's environment is served for the QuickJS prelude (hidden, like the
/// prelude): every `KEY=VALUE` entry of the configuration followed by a NUL byte.
pub const QJS_ENV_PATH: &str = ".vmm/env";

/// Evaluated by QuickJS (`-I`) after `--std` and before the function's script.
///
/// The environment: wasi-libc reads `environ` (through `environ_sizes_get`/`environ_get`)
/// once, in `_initialize`, which runs before the function's configuration exists (that is
/// where the runtime base is taken), so QuickJS's libc starts with an empty environment.
/// The prelude reads the function's entries from [`QJS_ENV_PATH`] and `std.setenv`s them,
/// so that `std.getenv`/`std.getenviron` and the libc see them.
///
/// QuickJS-NG seeds Math.random's xorshift from the clock when the context is created,
/// which is before the function template is taken, so every restore of a template
/// would replay the same sequence. This Math.random draws 53 bits per call from
/// `/dev/urandom` instead, which takes fresh host entropy on every read. It reads the
/// raw fd (`os.read`), never a stdio `FILE`, whose libc buffer would hold bytes
/// across a snapshot and replay them after every restore.
pub const QJS_PRELUDE: &str = r#"(() => {
  const env = std.loadFile('.vmm/env');
  if (env === null) throw new Error('cannot read the function environment (.vmm/env)');
  for (const entry of env.split('\0')) {
    const eq = entry.indexOf('=');
    if (eq > 0) std.setenv(entry.slice(0, eq), entry.slice(eq + 1));
  }
})();
(() => {
  const fd = os.open('/dev/urandom', os.O_RDONLY);
  if (fd < 0) throw new Error('cannot open /dev/urandom: ' + std.strerror(-fd));
  const buf = new ArrayBuffer(8);
  const words = new Uint32Array(buf);
  const read = os.read;
  const random = function random() {
    if (read(fd, buf, 0, 8) !== 8) throw new Error('cannot read /dev/urandom');
    // 21 + 32 = 53 random bits, scaled into [0, 1).
    return ((words[1] >>> 11) * 4294967296 + words[0]) / 9007199254740992;
  };
  Object.defineProperty(Math, 'random', {
    value: random, writable: true, enumerable: false, configurable: true,
  });
})();
"#;

fn err(code: u64, message: String) -> RunError {
    RunError { code, message }
}

/// How a call into wasm ended, other than by returning.
enum Stop {
    /// `proc_exit(code)`.
    Exit(i32),
    /// A trap or a host error.
    Trap(String),
}

fn classify(e: Error) -> Stop {
    match e.i32_exit_status() {
        Some(code) => Stop::Exit(code),
        None => Stop::Trap(e.to_string()),
    }
}

/// Hand buffered output to the host, then build the error (the output must not be lost).
fn fail<H: Host>(store: &mut Store<StoreData<'_, H>>, code: u64, message: String) -> RunError {
    let d = store.data_mut();
    d.wasi.flush(&mut *d.host);
    err(code, message)
}

/// The first import that the linker does not define, as `module.name`.
fn missing_import(module: &Module, test_hostcalls: bool) -> Option<String> {
    module
        .imports()
        .find(|i| {
            !matches!(i.ty(), wasmi::ExternType::Func(_))
                || !link::provides(i.module(), i.name(), test_hostcalls)
        })
        .map(|i| format!("{}.{}", i.module(), i.name()))
}

/// Run `module` to completion. See the crate docs for the phases reported via
/// [`Host::mark`]. Output not yet handed to [`Host::write_output`] is returned in
/// [`RunOutput`]; on error it has been flushed through `write_output`.
pub fn run<H: Host>(
    host: &mut H,
    module: &[u8],
    runtime: Runtime,
    test_hostcalls: bool,
) -> Result<RunOutput, RunError> {
    run_with(
        host,
        module,
        runtime,
        RunOptions {
            test_hostcalls,
            eager_compile: false,
        },
    )
}

/// How [`run_with`] treats the module.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Provide the raw `vmm_test.hostcall` import.
    pub test_hostcalls: bool,
    /// Translate every function to wasmi bytecode before running anything. A cold run is
    /// fastest with wasmi's default lazy translation; a runtime base that is snapshotted
    /// wants everything translated, or every restore translates again what it calls.
    pub eager_compile: bool,
}

/// [`run`] with options.
pub fn run_with<H: Host>(
    host: &mut H,
    module: &[u8],
    runtime: Runtime,
    opts: RunOptions,
) -> Result<RunOutput, RunError> {
    let (engine, module) = compile(module, opts)?;
    host.mark(Phase::Compiled);
    run_compiled(host, &engine, &module, runtime, opts)
}

/// Compile `module` (the first phase of [`run_with`]). The bytes are not needed afterwards:
/// the kernel zeroes them so that they cost nothing in snapshots.
pub fn compile(module: &[u8], opts: RunOptions) -> Result<(Engine, Module), RunError> {
    let mut config = wasmi::Config::default();
    if opts.eager_compile {
        config.compilation_mode(wasmi::CompilationMode::Eager);
    }
    let engine = Engine::new(&config);
    let module = Module::new(&engine, module).map_err(|e| {
        err(
            ERR_MODULE_INVALID,
            format!("module is not valid WebAssembly: {e}"),
        )
    })?;
    Ok((engine, module))
}

/// The phases of [`run_with`] after compilation (the caller marks [`Phase::Compiled`]).
pub fn run_compiled<H: Host>(
    host: &mut H,
    engine: &Engine,
    module: &Module,
    runtime: Runtime,
    opts: RunOptions,
) -> Result<RunOutput, RunError> {
    let test_hostcalls = opts.test_hostcalls;
    let mut linker = Linker::<StoreData<'_, H>>::new(engine);
    link::add_to_linker(&mut linker, test_hostcalls)
        .map_err(|e| err(ERR_INSTANTIATE, format!("cannot set up WASI: {e}")))?;
    if let Some(name) = missing_import(module, test_hostcalls) {
        return Err(err(
            ERR_INSTANTIATE,
            format!("module imports {name}, which this runtime does not provide"),
        ));
    }
    let mut store = Store::new(engine, StoreData::new(host));
    let instance = match linker.instantiate_and_start(&mut store, module) {
        Ok(i) => i,
        Err(e) => {
            let msg = match classify(e) {
                Stop::Exit(code) => format!("start function exited with code {code}"),
                Stop::Trap(t) => format!("cannot instantiate module: {t}"),
            };
            return Err(fail(&mut store, ERR_INSTANTIATE, msg));
        }
    };
    store.data_mut().memory = instance.get_memory(&store, "memory");
    let start = match runtime {
        Runtime::Wasi => match instance.get_typed_func::<(), ()>(&store, "_start") {
            Ok(f) => Some(f),
            Err(_) => {
                return Err(err(
                    ERR_INSTANTIATE,
                    "module has no _start export".to_string(),
                ))
            }
        },
        Runtime::Qjs => None,
    };
    store.data_mut().host.mark(Phase::Instantiated);

    // Runtime initialisation (part of the runtime base snapshot: nothing
    // function-specific may happen before get_function below).
    let init = instance
        .get_typed_func::<(), ()>(&store, "_initialize")
        .ok();
    match (runtime, init) {
        (Runtime::Qjs, None) => {
            return Err(err(
                ERR_RUNTIME_INIT,
                "QuickJS module has no _initialize export".to_string(),
            ))
        }
        (_, Some(f)) => {
            if let Err(e) = f.call(&mut store, ()) {
                let msg = match classify(e) {
                    Stop::Exit(code) => format!("_initialize exited with code {code}"),
                    Stop::Trap(t) => format!("_initialize failed: wasm trap: {t}"),
                };
                return Err(fail(&mut store, ERR_RUNTIME_INIT, msg));
            }
        }
        (Runtime::Wasi, None) => {}
    }
    store.data_mut().host.mark(Phase::RuntimeInitialized);

    // The function: config, then run it.
    let blob = store.data_mut().host.get_function();
    let config = match vmm_abi::FunctionConfig::decode(&blob) {
        Ok(c) => c,
        Err(e) => return Err(fail(&mut store, ERR_CONFIG, e.to_string())),
    };
    if runtime == Runtime::Qjs {
        // Before the function's files, so a config file at this path is a conflict.
        if let Err(e) = store
            .data_mut()
            .wasi
            .add_hidden_file(QJS_PRELUDE_PATH.as_bytes(), QJS_PRELUDE.as_bytes())
        {
            let msg = format!("cannot install the QuickJS prelude: {e:?}");
            return Err(fail(&mut store, ERR_CONFIG, msg));
        }
        let env = qjs_env_file(&config.env);
        if let Err(e) = store
            .data_mut()
            .wasi
            .add_hidden_file(QJS_ENV_PATH.as_bytes(), &env)
        {
            let msg = format!("cannot install the QuickJS environment file: {e:?}");
            return Err(fail(&mut store, ERR_CONFIG, msg));
        }
    }
    if let Err(e) = store.data_mut().wasi.configure(&config) {
        return Err(fail(&mut store, ERR_CONFIG, e.to_string()));
    }

    store.data_mut().host.mark(Phase::FunctionStart);
    let outcome = match &start {
        Some(f) => run_start(&mut store, f),
        None => run_qjs(&mut store, &instance, &config.args),
    };
    drop(config);
    store.data_mut().host.mark(Phase::FunctionEnd);

    let exit_code = match outcome {
        Ok(code) | Err(Stop::Exit(code)) => code,
        Err(Stop::Trap(t)) => return Err(fail(&mut store, ERR_TRAP, format!("wasm trap: {t}"))),
    };
    let data = store.data_mut();
    let (stdout_truncated, stderr_truncated) = data.wasi.output_truncated();
    Ok(RunOutput {
        exit_code,
        stdout: data.wasi.take_stdout(),
        stderr: data.wasi.take_stderr(),
        stdout_truncated,
        stderr_truncated,
    })
}

/// The contents of [`QJS_ENV_PATH`]: each entry followed by a NUL byte.
fn qjs_env_file(env: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(env.iter().map(|e| e.len() + 1).sum());
    for e in env {
        out.extend_from_slice(e);
        out.push(0);
    }
    out
}

/// A WASI command: `_start`; returning normally is exit code 0.
fn run_start<H: Host>(
    store: &mut Store<StoreData<'_, H>>,
    start: &TypedFunc<(), ()>,
) -> Result<i32, Stop> {
    start.call(&mut *store, ()).map(|()| 0).map_err(classify)
}

/// QuickJS reactor: `qjs_init_argv(argc, argv)` with argv =
/// `qjs --std -I .vmm/prelude.js <args[1..]>` (see [`QJS_PRELUDE`]),
/// the strings and the array allocated with the module's `malloc`. A non-zero return
/// means the script threw (QuickJS has printed the exception): exit code 1.
fn run_qjs<H: Host>(
    store: &mut Store<StoreData<'_, H>>,
    instance: &Instance,
    args: &[&[u8]],
) -> Result<i32, Stop> {
    let missing = |what: &str| Stop::Trap(format!("QuickJS module has no usable {what} export"));
    let malloc = instance
        .get_typed_func::<i32, i32>(&*store, "malloc")
        .map_err(|_| missing("malloc"))?;
    let init_argv = instance
        .get_typed_func::<(i32, i32), i32>(&*store, "qjs_init_argv")
        .map_err(|_| missing("qjs_init_argv"))?;
    let memory = instance
        .get_memory(&*store, "memory")
        .ok_or_else(|| missing("memory"))?;

    let mut argv: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
    argv.push(b"qjs");
    argv.push(b"--std");
    argv.push(b"-I");
    argv.push(QJS_PRELUDE_PATH.as_bytes());
    argv.extend(args.iter().skip(1).copied());

    let alloc = |store: &mut Store<StoreData<'_, H>>, len: usize| -> Result<u32, Stop> {
        let len = i32::try_from(len).map_err(|_| Stop::Trap("argv too large".to_string()))?;
        let p = malloc.call(&mut *store, len).map_err(classify)?;
        if p == 0 {
            return Err(Stop::Trap("malloc failed while building argv".to_string()));
        }
        Ok(p as u32)
    };
    let oob = || Stop::Trap("malloc returned memory out of bounds".to_string());
    let at = |base: u32, off: usize| -> Result<u32, Stop> {
        u32::try_from(off)
            .ok()
            .and_then(|o| base.checked_add(o))
            .ok_or_else(oob)
    };
    let argc = argv.len();
    let array = alloc(store, (argc + 1) * 4)?;
    for (i, a) in argv.iter().enumerate() {
        let p = alloc(store, a.len() + 1)?;
        let mem = memory.data_mut(&mut *store);
        crate::wasi::write_bytes(mem, p, a).map_err(|_| oob())?;
        crate::wasi::write_bytes(mem, at(p, a.len())?, &[0]).map_err(|_| oob())?;
        crate::wasi::write_u32(mem, at(array, i * 4)?, p).map_err(|_| oob())?;
    }
    let mem = memory.data_mut(&mut *store);
    crate::wasi::write_u32(mem, at(array, argc * 4)?, 0).map_err(|_| oob())?;

    let r = init_argv
        .call(&mut *store, (argc as i32, array as i32))
        .map_err(classify)?;
    Ok(if r == 0 { 0 } else { 1 })
}
