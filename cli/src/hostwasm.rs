//! WebAssembly in this host process under wasmtime: modules compiled by Cranelift with
//! wasmtime's default configuration (the host CPU's features, guard pages around linear
//! memories, signal-based traps), WASI preview1 through `wasmtime-wasi`. This is the
//! baseline `vmm bench` compares the guest's engines with; nothing here runs in a VM.

use std::path::Path;
use std::time::{Duration, Instant};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

/// The most a program run here may write to stdout or to stderr, as in the guest (64 MiB):
/// a write past it is a trap.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// What failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum HostWasmError {
    #[error("set up wasmtime: {0}")]
    Engine(String),
    #[error("compile the module with Cranelift: {0}")]
    Compile(String),
    #[error("set up WASI for the module: {0}")]
    Wasi(String),
    #[error("instantiate the module: {0}")]
    Instantiate(String),
    #[error("the module has no usable `{0}` export")]
    MissingExport(&'static str),
    #[error("{step} failed: {msg}")]
    Trap { step: &'static str, msg: String },
    #[error("argument {0:?} contains a NUL byte")]
    NulInArgument(String),
    #[error("the QuickJS reactor's malloc failed while building argv")]
    ArgvAlloc,
}

/// How a WASI module is driven (as `--runtime` in the guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRuntime {
    /// A WASI command: `_start`.
    Command,
    /// QuickJS-NG's WASI reactor: `_initialize`, then `qjs_init_argv(qjs --std ARGS...)`.
    Qjs,
}

/// One WASI invocation.
#[derive(Debug, Clone)]
pub struct WasiInvocation<'a> {
    pub runtime: HostRuntime,
    /// The whole argv (argv[0] first). Under [`HostRuntime::Qjs`] it is what
    /// `qjs_init_argv` gets, for example `qjs --std script.js ARGS...`.
    pub argv: &'a [String],
    /// A host directory preopened read-only as `/` (the guest's file tree is there too).
    pub dir: &'a Path,
    /// The request: the program's stdin.
    pub stdin: &'a [u8],
}

/// How a WASI invocation ended.
#[derive(Debug, Clone)]
pub struct WasiOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A wasmtime engine with its default configuration.
pub struct HostEngine {
    engine: Engine,
}

impl HostEngine {
    pub fn new() -> Result<Self, HostWasmError> {
        let engine = Engine::new(&wasmtime::Config::new())
            .map_err(|e| HostWasmError::Engine(e.to_string()))?;
        Ok(HostEngine { engine })
    }

    /// Validate and compile `wasm` (the binary format) to native code.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, HostWasmError> {
        Module::new(&self.engine, wasm).map_err(|e| HostWasmError::Compile(format!("{e:#}")))
    }

    /// Instantiate `module`, which imports nothing, and call its `_start`; returns how long
    /// the call took (instantiation left out).
    pub fn time_start(&self, module: &Module) -> Result<Duration, HostWasmError> {
        let mut store = Store::new(&self.engine, ());
        let instance = wasmtime::Instance::new(&mut store, module, &[])
            .map_err(|e| HostWasmError::Instantiate(format!("{e:#}")))?;
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| HostWasmError::MissingExport("_start"))?;
        let t0 = Instant::now();
        start
            .call(&mut store, ())
            .map_err(|e| HostWasmError::Trap {
                step: "_start",
                msg: format!("{e:#}"),
            })?;
        Ok(t0.elapsed())
    }

    /// Run `module` with WASI preview1 as `inv` says; stdout and stderr are captured (at most
    /// [`MAX_OUTPUT_BYTES`] each). A `proc_exit` is the exit code; a trap is an error.
    pub fn run_wasi(
        &self,
        module: &Module,
        inv: &WasiInvocation<'_>,
    ) -> Result<WasiOutput, HostWasmError> {
        let wasi_err = |e: wasmtime::Error| HostWasmError::Wasi(format!("{e:#}"));
        let stdout = MemoryOutputPipe::new(MAX_OUTPUT_BYTES);
        let stderr = MemoryOutputPipe::new(MAX_OUTPUT_BYTES);
        let mut builder = WasiCtxBuilder::new();
        builder
            .args(inv.argv)
            .stdin(MemoryInputPipe::new(inv.stdin.to_vec()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_blocking_current_thread(true)
            .preopened_dir(inv.dir, "/", FsPerms::ReadOnly)
            .map_err(wasi_err)?;
        let mut store = Store::new(&self.engine, builder.build_p1());
        let mut linker: Linker<WasiP1Ctx> = Linker::new(&self.engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |cx| cx).map_err(wasi_err)?;
        let instance = linker
            .instantiate(&mut store, module)
            .map_err(|e| HostWasmError::Instantiate(format!("{e:#}")))?;
        let ended = match inv.runtime {
            HostRuntime::Command => {
                let start = instance
                    .get_typed_func::<(), ()>(&mut store, "_start")
                    .map_err(|_| HostWasmError::MissingExport("_start"))?;
                exit_code("_start", start.call(&mut store, ()).map(|()| 0))
            }
            HostRuntime::Qjs => run_qjs(&mut store, &instance, inv.argv),
        };
        let exit_code = ended?;
        drop(store);
        Ok(WasiOutput {
            exit_code,
            stdout: stdout.contents().to_vec(),
            stderr: stderr.contents().to_vec(),
        })
    }
}

/// The exit code of a call into WASI code that returned `r`: its own value, or the code of
/// a `proc_exit`; any other error is a trap of `step`.
fn exit_code(step: &'static str, r: wasmtime::Result<i32>) -> Result<i32, HostWasmError> {
    match r {
        Ok(code) => Ok(code),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(code)) => Ok(*code),
            None => Err(HostWasmError::Trap {
                step,
                msg: format!("{e:#}"),
            }),
        },
    }
}

/// QuickJS-NG's reactor as the guest drives it (without the guest's prelude): `_initialize`,
/// then `qjs_init_argv(argc, argv)` with `argv` copied into memory from the module's
/// `malloc`. A non-zero return means the script threw (QuickJS printed why): exit code 1.
fn run_qjs(
    store: &mut Store<WasiP1Ctx>,
    instance: &wasmtime::Instance,
    argv: &[String],
) -> Result<i32, HostWasmError> {
    let init = instance
        .get_typed_func::<(), ()>(&mut *store, "_initialize")
        .map_err(|_| HostWasmError::MissingExport("_initialize"))?;
    let malloc = instance
        .get_typed_func::<i32, i32>(&mut *store, "malloc")
        .map_err(|_| HostWasmError::MissingExport("malloc"))?;
    let init_argv = instance
        .get_typed_func::<(i32, i32), i32>(&mut *store, "qjs_init_argv")
        .map_err(|_| HostWasmError::MissingExport("qjs_init_argv"))?;
    let memory = instance
        .get_memory(&mut *store, "memory")
        .ok_or(HostWasmError::MissingExport("memory"))?;
    let code = exit_code("_initialize", init.call(&mut *store, ()).map(|()| 0))?;
    if code != 0 {
        return Ok(code);
    }

    let trap = |msg: String| HostWasmError::Trap {
        step: "building argv",
        msg,
    };
    let alloc = |store: &mut Store<WasiP1Ctx>, len: usize| -> Result<usize, HostWasmError> {
        let n = i32::try_from(len).map_err(|_| trap(format!("{len} bytes of argv")))?;
        let p = malloc
            .call(&mut *store, n)
            .map_err(|e| trap(format!("{e:#}")))?;
        if p == 0 {
            return Err(HostWasmError::ArgvAlloc);
        }
        Ok(p as u32 as usize)
    };
    let oob = || trap("malloc returned memory out of bounds".into());
    let array = alloc(store, (argv.len() + 1) * 4)?;
    let mut pointers = Vec::with_capacity(argv.len() + 1);
    for a in argv {
        if a.contains('\0') {
            return Err(HostWasmError::NulInArgument(a.to_string()));
        }
        let p = alloc(store, a.len() + 1)?;
        let mut bytes = a.as_bytes().to_vec();
        bytes.push(0);
        memory.write(&mut *store, p, &bytes).map_err(|_| oob())?;
        pointers.push(p as u32);
    }
    pointers.push(0);
    let table: Vec<u8> = pointers.iter().flat_map(|p| p.to_le_bytes()).collect();
    memory
        .write(&mut *store, array, &table)
        .map_err(|_| oob())?;
    let r = init_argv.call(&mut *store, (argv.len() as i32, array as u32 as i32));
    let r = exit_code("qjs_init_argv", r)?;
    Ok(if r == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WASI command that echoes stdin to stdout and exits with the byte count modulo 256
    /// through `proc_exit`.
    const ECHO_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $n i32)
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (local.set $n (i32.load (i32.const 8)))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (local.get $n))))"#;

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    #[test]
    fn a_wasi_command_gets_stdin_and_its_output_and_exit_code_come_back() {
        let engine = HostEngine::new().unwrap();
        let module = engine.compile(&wat(ECHO_WAT)).unwrap();
        let dir = std::env::temp_dir();
        let out = engine
            .run_wasi(
                &module,
                &WasiInvocation {
                    runtime: HostRuntime::Command,
                    argv: &["echo.wasm".to_string()],
                    dir: &dir,
                    stdin: b"hello",
                },
            )
            .unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.exit_code, 5);
    }

    #[test]
    fn a_trap_is_an_error_naming_the_step() {
        let engine = HostEngine::new().unwrap();
        let module = engine
            .compile(&wat(r#"(module (func (export "_start") unreachable))"#))
            .unwrap();
        let e = engine.time_start(&module).unwrap_err();
        assert!(
            matches!(e, HostWasmError::Trap { step: "_start", .. }),
            "{e}"
        );
        let none = engine.compile(&wat("(module)")).unwrap();
        assert!(matches!(
            engine.time_start(&none),
            Err(HostWasmError::MissingExport("_start"))
        ));
        assert!(matches!(
            engine.compile(b"not wasm"),
            Err(HostWasmError::Compile(_))
        ));
    }
}
