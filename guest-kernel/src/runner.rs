//! Run a module under WASI (a command's `_start`, or the QuickJS-NG reactor's
//! `_initialize` + `qjs_init_argv`), whatever the engine: each engine (`crate::engine`)
//! compiles or loads the module and instantiates it with the WASI functions
//! ([`crate::define_wasi!`]); the phases after that are [`drive`]'s, over the small
//! [`Session`] interface the engines implement.

use crate::wasi::{link, WasiCtx};
use crate::{Host, Phase, RunError, RunOutput, Runtime};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use vmm_abi::{ERR_CONFIG, ERR_INSTANTIATE, ERR_RUNTIME_INIT, ERR_TRAP};

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

/// [`run`] with options (under wasmi, the engine that also runs on the host: tests).
pub fn run_with<H: Host>(
    host: &mut H,
    module: &[u8],
    runtime: Runtime,
    opts: RunOptions,
) -> Result<RunOutput, RunError> {
    let compiled = crate::engine::wasmi::compile(module, opts)?;
    host.mark(Phase::Compiled);
    crate::engine::wasmi::run(host, &compiled, runtime, opts)
}

// --- shared phases -------------------------------------------------------------------

fn err(code: u64, message: String) -> RunError {
    RunError { code, message }
}

/// How a call into wasm ended, other than by returning.
pub enum Stop {
    /// `proc_exit(code)`.
    Exit(i32),
    /// A trap or a host error.
    Trap(String),
}

/// A module instantiated by one of the engines, with its WASI state and host: what the
/// phases after instantiation need, whatever the engine.
pub trait Session {
    /// The WASI state and the host.
    fn parts(&mut self) -> (&mut WasiCtx, &mut dyn Host);
    /// Whether the module exports a function `name` of type `[] -> []`.
    fn has_unit_func(&mut self, name: &str) -> bool;
    /// Call `name: [] -> []`; `None` if there is no such export.
    fn call_unit(&mut self, name: &str) -> Option<Result<(), Stop>>;
    /// Call `name: [i32] -> [i32]`; `None` if there is no such export.
    fn call_i32(&mut self, name: &str, a: i32) -> Option<Result<i32, Stop>>;
    /// Call `name: [i32 i32] -> [i32]`; `None` if there is no such export.
    fn call_i32_i32(&mut self, name: &str, a: i32, b: i32) -> Option<Result<i32, Stop>>;
    /// The exported `memory`, if any.
    fn memory(&mut self) -> Option<&mut [u8]>;

    fn mark(&mut self, phase: Phase) {
        self.parts().1.mark(phase);
    }

    /// [`fail`] with this session's WASI state and host.
    fn fail(&mut self, code: u64, message: String) -> RunError {
        let (wasi, host) = self.parts();
        fail(wasi, host, code, message)
    }
}

/// The glue that is the same code for every engine (their APIs agree on it): the caller
/// type `C<'a, H>`, `with_mem` (run WASI logic over the caller's linear memory, for
/// [`crate::define_wasi!`]) and `EngineSession<H>`, the [`Session`] over the engine's
/// store and instance. Invoked in each engine's module with the engine's crate, the
/// expression that makes its error for a WASI call from a module without memory, and the
/// bounds it needs on the host type; the module defines `classify(Error) -> Stop`.
#[macro_export]
macro_rules! engine_glue {
    ($engine:ident, $no_memory:expr, [$($bound:tt)*]) => {
        type C<'a, H> = $engine::Caller<'a, $crate::wasi::link::StoreData<H, $engine::Memory>>;

        /// Run `f` over the caller's linear memory, the WASI state and the host.
        #[inline]
        fn with_mem<H: $($bound)*>(
            caller: &mut C<'_, H>,
            f: impl FnOnce(
                &mut $crate::wasi::WasiCtx,
                &mut dyn $crate::Host,
                &mut [u8],
            ) -> Result<(), $crate::wasi::Errno>,
        ) -> Result<i32, $engine::Error> {
            let memory = match caller.data().memory {
                Some(m) => m,
                None => caller
                    .get_export("memory")
                    .and_then($engine::Extern::into_memory)
                    .ok_or_else(|| $no_memory)?,
            };
            let (mem, data) = memory.data_and_store_mut(&mut *caller);
            Ok($crate::wasi::link::ret(f(&mut data.wasi, &mut data.host, mem)))
        }

        /// An instance and its store.
        struct EngineSession<H: $($bound)*> {
            store: $engine::Store<$crate::wasi::link::StoreData<H, $engine::Memory>>,
            instance: $engine::Instance,
        }

        impl<H: $($bound)*> $crate::runner::Session for EngineSession<H> {
            fn parts(&mut self) -> (&mut $crate::wasi::WasiCtx, &mut dyn $crate::Host) {
                let d = self.store.data_mut();
                (&mut d.wasi, &mut d.host)
            }

            fn has_unit_func(&mut self, name: &str) -> bool {
                self.instance
                    .get_typed_func::<(), ()>(&mut self.store, name)
                    .is_ok()
            }

            fn call_unit(&mut self, name: &str) -> Option<Result<(), $crate::runner::Stop>> {
                let f = self
                    .instance
                    .get_typed_func::<(), ()>(&mut self.store, name)
                    .ok()?;
                Some(f.call(&mut self.store, ()).map_err(classify))
            }

            fn call_i32(&mut self, name: &str, a: i32) -> Option<Result<i32, $crate::runner::Stop>> {
                let f = self
                    .instance
                    .get_typed_func::<i32, i32>(&mut self.store, name)
                    .ok()?;
                Some(f.call(&mut self.store, a).map_err(classify))
            }

            fn call_i32_i32(
                &mut self,
                name: &str,
                a: i32,
                b: i32,
            ) -> Option<Result<i32, $crate::runner::Stop>> {
                let f = self
                    .instance
                    .get_typed_func::<(i32, i32), i32>(&mut self.store, name)
                    .ok()?;
                Some(f.call(&mut self.store, (a, b)).map_err(classify))
            }

            fn memory(&mut self) -> Option<&mut [u8]> {
                let m = self.store.data().memory?;
                Some(m.data_mut(&mut self.store))
            }
        }
    };
}

/// Hand buffered output to the host, then build the error (the output must not be lost).
pub fn fail(wasi: &mut WasiCtx, host: &mut dyn Host, code: u64, message: String) -> RunError {
    wasi.flush(host);
    err(code, message)
}

/// The first import that the WASI linker does not define, as `module.name`, from
/// `(module, name, is a function)` triples.
pub fn missing_import<'a>(
    mut imports: impl Iterator<Item = (&'a str, &'a str, bool)>,
    test_hostcalls: bool,
) -> Option<RunError> {
    imports
        .find(|&(module, name, func)| !func || !link::provides(module, name, test_hostcalls))
        .map(|(module, name, _)| {
            err(
                ERR_INSTANTIATE,
                format!("module imports {module}.{name}, which this runtime does not provide"),
            )
        })
}

/// The message for an instantiation (or start function) that did not complete.
pub fn instantiate_message(stop: Stop) -> String {
    match stop {
        Stop::Exit(code) => format!("start function exited with code {code}"),
        Stop::Trap(t) => format!("cannot instantiate module: {t}"),
    }
}

/// Run an instantiated module: `_start` for a command, `_initialize` if it has one, the
/// function configuration (where the runtime base is taken), then the function. The
/// caller has marked [`Phase::Compiled`]; the rest are marked here.
pub fn drive(s: &mut impl Session, runtime: Runtime) -> Result<RunOutput, RunError> {
    if runtime == Runtime::Wasi && !s.has_unit_func("_start") {
        return Err(err(
            ERR_INSTANTIATE,
            "module has no _start export".to_string(),
        ));
    }
    s.mark(Phase::Instantiated);

    // Runtime initialisation (part of the runtime base snapshot: nothing
    // function-specific may happen before get_function below).
    match (runtime, s.call_unit("_initialize")) {
        (Runtime::Qjs, None) => {
            return Err(err(
                ERR_RUNTIME_INIT,
                "QuickJS module has no _initialize export".to_string(),
            ))
        }
        (_, Some(Err(stop))) => {
            let msg = match stop {
                Stop::Exit(code) => format!("_initialize exited with code {code}"),
                Stop::Trap(t) => format!("_initialize failed: wasm trap: {t}"),
            };
            return Err(s.fail(ERR_RUNTIME_INIT, msg));
        }
        _ => {}
    }
    s.mark(Phase::RuntimeInitialized);

    // The function: config, then run it.
    let blob = s.parts().1.get_function();
    let config = match vmm_abi::FunctionConfig::decode(&blob) {
        Ok(c) => c,
        Err(e) => return Err(s.fail(ERR_CONFIG, e.to_string())),
    };
    if runtime == Runtime::Qjs {
        // Before the function's files, so a config file at this path is a conflict.
        if let Err(e) = s
            .parts()
            .0
            .add_hidden_file(QJS_PRELUDE_PATH.as_bytes(), QJS_PRELUDE.as_bytes())
        {
            let msg = format!("cannot install the QuickJS prelude: {e:?}");
            return Err(s.fail(ERR_CONFIG, msg));
        }
        let env = qjs_env_file(&config.env);
        if let Err(e) = s.parts().0.add_hidden_file(QJS_ENV_PATH.as_bytes(), &env) {
            let msg = format!("cannot install the QuickJS environment file: {e:?}");
            return Err(s.fail(ERR_CONFIG, msg));
        }
    }
    if let Err(e) = s.parts().0.configure(&config) {
        return Err(s.fail(ERR_CONFIG, e.to_string()));
    }

    s.mark(Phase::FunctionStart);
    let outcome = match runtime {
        Runtime::Wasi => s
            .call_unit("_start")
            .unwrap_or_else(|| Err(Stop::Trap("module has no _start export".to_string())))
            .map(|()| 0),
        Runtime::Qjs => run_qjs(s, &config.args),
    };
    drop(config);
    s.mark(Phase::FunctionEnd);

    let exit_code = match outcome {
        Ok(code) | Err(Stop::Exit(code)) => code,
        Err(Stop::Trap(t)) => return Err(s.fail(ERR_TRAP, format!("wasm trap: {t}"))),
    };
    let wasi = s.parts().0;
    let (stdout_truncated, stderr_truncated) = wasi.output_truncated();
    Ok(RunOutput {
        exit_code,
        stdout: wasi.take_stdout(),
        stderr: wasi.take_stderr(),
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

/// QuickJS reactor: `qjs_init_argv(argc, argv)` with argv =
/// `qjs --std -I .vmm/prelude.js <args[1..]>` (see [`QJS_PRELUDE`]),
/// the strings and the array allocated with the module's `malloc`. A non-zero return
/// means the script threw (QuickJS has printed the exception): exit code 1.
fn run_qjs(s: &mut impl Session, args: &[&[u8]]) -> Result<i32, Stop> {
    let missing = |what: &str| Stop::Trap(format!("QuickJS module has no usable {what} export"));
    if s.memory().is_none() {
        return Err(missing("memory"));
    }
    let mut argv: Vec<&[u8]> = Vec::with_capacity(args.len() + 3);
    argv.push(b"qjs");
    argv.push(b"--std");
    argv.push(b"-I");
    argv.push(QJS_PRELUDE_PATH.as_bytes());
    argv.extend(args.iter().skip(1).copied());

    let oob = || Stop::Trap("malloc returned memory out of bounds".to_string());
    let at = |base: u32, off: usize| -> Result<u32, Stop> {
        u32::try_from(off)
            .ok()
            .and_then(|o| base.checked_add(o))
            .ok_or_else(oob)
    };
    let argc = argv.len();
    let array = qjs_malloc(s, (argc + 1) * 4)?;
    for (i, a) in argv.iter().enumerate() {
        let p = qjs_malloc(s, a.len() + 1)?;
        let mem = s.memory().ok_or_else(|| missing("memory"))?;
        crate::wasi::write_bytes(mem, p, a).map_err(|_| oob())?;
        crate::wasi::write_bytes(mem, at(p, a.len())?, &[0]).map_err(|_| oob())?;
        crate::wasi::write_u32(mem, at(array, i * 4)?, p).map_err(|_| oob())?;
    }
    let mem = s.memory().ok_or_else(|| missing("memory"))?;
    crate::wasi::write_u32(mem, at(array, argc * 4)?, 0).map_err(|_| oob())?;

    let r = s
        .call_i32_i32("qjs_init_argv", argc as i32, array as i32)
        .ok_or_else(|| missing("qjs_init_argv"))??;
    Ok(if r == 0 { 0 } else { 1 })
}

/// `malloc(len)` in the QuickJS module (non-null).
fn qjs_malloc(s: &mut impl Session, len: usize) -> Result<u32, Stop> {
    let len = i32::try_from(len).map_err(|_| Stop::Trap("argv too large".to_string()))?;
    let p = s
        .call_i32("malloc", len)
        .ok_or_else(|| Stop::Trap("QuickJS module has no usable malloc export".to_string()))??;
    if p == 0 {
        return Err(Stop::Trap("malloc failed while building argv".to_string()));
    }
    Ok(p as u32)
}
