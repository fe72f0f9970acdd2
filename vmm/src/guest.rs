//! The guest side of an instance: what a function is ([`FunctionSpec`]: module, runtime,
//! engine, files, arguments), the limits of a run ([`RunLimits`]), the module the guest's
//! engine gets (compiled ahead of time and cached for wasmtime), a cold boot of the guest
//! kernel ([`boot_vm`]) and the hostcall loop ([`resume`]).

use crate::memory::GuestMemory;
use crate::stats::{ms, ArtifactCache};
use crate::vm::{GuestError, Hostcall, Output, RunError, SetupError, Vm, VmError};
use crate::watchdog::Watchdog;
use std::time::{Duration, Instant};
use vmm_abi::{layout, ConfigFile, FunctionConfig, Mailbox};

/// How the module is driven (mirrors `guest_kernel::Runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A WASI command module (`_start`).
    Wasi,
    /// QuickJS-NG's WASI reactor: `qjs --std <script>`.
    Qjs,
    /// CPython for WASI (a command module): `python <script>`, through
    /// [`PYTHON_RUNNER`], which reseeds `random` when the request arrives.
    Python,
}

/// Run by `--runtime python` as `python -c PYTHON_RUNNER <script> <args>...`: it runs the
/// script as `python <script> <args>...` would, and reseeds `random` at the script's first
/// read of stdin (where a function template resumes), so restores do not replay it.
pub const PYTHON_RUNNER: &str = include_str!("python_runner.py");

impl RuntimeKind {
    pub fn abi(self) -> u64 {
        match self {
            // To the guest a Python function is a WASI command with more arguments.
            RuntimeKind::Wasi | RuntimeKind::Python => vmm_abi::RUNTIME_WASI,
            RuntimeKind::Qjs => vmm_abi::RUNTIME_QJS,
        }
    }

    /// Arguments the VMM puts between argv[0] and the function's own.
    pub fn argv_prefix(self) -> &'static [&'static str] {
        match self {
            RuntimeKind::Wasi | RuntimeKind::Qjs => &[],
            RuntimeKind::Python => &["-c", PYTHON_RUNNER],
        }
    }
}

/// The WebAssembly engine in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// wasmtime, with the module compiled ahead of time on the host ([`crate::aot`]).
    Wasmtime,
    /// wasmi, an interpreter: the guest gets the module itself.
    Wasmi,
}

impl EngineKind {
    pub fn abi(self) -> u64 {
        match self {
            EngineKind::Wasmtime => vmm_abi::ENGINE_WASMTIME,
            EngineKind::Wasmi => vmm_abi::ENGINE_WASMI,
        }
    }

    /// The engine's name, as templates record it.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Wasmtime => "wasmtime",
            EngineKind::Wasmi => "wasmi",
        }
    }
}

/// A file for the guest's read-only tree.
#[derive(Clone, Debug)]
pub struct GuestFile {
    pub guest_path: String,
    pub data: Vec<u8>,
}

/// Everything that defines one function: the module, how to drive it, its files,
/// arguments and environment.
#[derive(Clone, Debug)]
pub struct FunctionSpec {
    pub module: Vec<u8>,
    /// argv[0]: the module's file name.
    pub module_name: String,
    pub runtime: RuntimeKind,
    /// The engine that runs it in the guest.
    pub engine: EngineKind,
    pub files: Vec<GuestFile>,
    pub args: Vec<String>,
    pub env: Vec<String>,
}

impl FunctionSpec {
    /// The function config blob the guest receives at its GetFunction hostcall.
    pub fn config_blob(&self) -> Vec<u8> {
        let mut args: Vec<&[u8]> = vec![self.module_name.as_bytes()];
        args.extend(self.runtime.argv_prefix().iter().map(|a| a.as_bytes()));
        args.extend(self.args.iter().map(|a| a.as_bytes()));
        FunctionConfig {
            args,
            env: self.env.iter().map(|e| e.as_bytes()).collect(),
            files: self
                .files
                .iter()
                .map(|f| ConfigFile {
                    path: f.guest_path.as_bytes(),
                    data: &f.data,
                })
                .collect(),
        }
        .encode()
    }
}

/// The largest request (`--input`, standard input, `--trial-input`) the VMM reads: the
/// same as the output cap. The guest takes stdin in chunks of its own buffer size, so
/// this is a host policy that keeps host memory bounded, not a guest limit.
pub const MAX_REQUEST_BYTES: usize = vmm_abi::MAX_TRANSFER_LEN as usize;

#[derive(Clone, Debug)]
pub struct RunLimits {
    pub timeout: Duration,
    pub mem_mib: u64,
    pub max_output: usize,
    /// Expose the raw `vmm_test.hostcall` import to the module (hostile-guest tests).
    pub test_hostcalls: bool,
    /// Translate the whole module up front (runtime bases; see `FLAG_EAGER_COMPILE`).
    pub eager_compile: bool,
    /// Lets another thread stop the run (see [`crate::watchdog::InterruptHandle`]).
    pub interrupt: Option<crate::watchdog::InterruptHandle>,
    /// The store whose compiled-module cache a cold run uses (created if missing); `None`:
    /// compile every time.
    pub artifact_store: Option<std::path::PathBuf>,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            timeout: Duration::from_secs(30),
            mem_mib: layout::DEFAULT_MEM_MIB,
            max_output: 64 << 20,
            test_hostcalls: false,
            eager_compile: false,
            interrupt: None,
            artifact_store: None,
        }
    }
}

/// Largest guest kernel image read from `$VMM_GUEST_KERNEL` (the built one is ~2 MB).
pub const MAX_KERNEL_IMAGE_BYTES: u64 = 64 << 20;

/// The guest kernel image built by `vmm/build.rs` (or `$VMM_GUEST_KERNEL` if set, read up
/// to [`MAX_KERNEL_IMAGE_BYTES`]).
pub fn guest_kernel_image() -> std::io::Result<std::borrow::Cow<'static, [u8]>> {
    use std::io::Read;
    static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.elf"));
    match std::env::var_os("VMM_GUEST_KERNEL") {
        Some(p) => {
            let mut image = Vec::new();
            std::fs::File::open(p)?
                .take(MAX_KERNEL_IMAGE_BYTES + 1)
                .read_to_end(&mut image)?;
            if image.len() as u64 > MAX_KERNEL_IMAGE_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("larger than {} MiB", MAX_KERNEL_IMAGE_BYTES >> 20),
                ));
            }
            Ok(image.into())
        }
        None => Ok(IMAGE.into()),
    }
}

/// Guest RAM of `mem_mib` MiB in bytes, if that is a size the guest can have.
pub fn check_mem(mem_mib: u64) -> Result<u64, SetupError> {
    if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mem_mib) || !mem_mib.is_multiple_of(2)
    {
        return Err(SetupError::BadMemSize(mem_mib));
    }
    Ok(mem_mib << 20)
}

/// The engine string artifacts are cached under (with the compiler's fingerprint).
pub const ARTIFACT_ENGINE: &str = concat!("wasmtime-", "48.0.8");

/// [`guest_module`]'s product: the bytes for the guest, the host time it took, and what
/// the cache did.
pub struct GuestModule<'a> {
    pub bytes: std::borrow::Cow<'a, [u8]>,
    pub aot_ms: f64,
    pub cache: ArtifactCache,
    /// The guest CPU features the artifact is compiled for (empty for wasmi).
    pub features: Vec<&'static str>,
}

/// What the guest's engine gets as its module: the module itself for wasmi; for wasmtime,
/// an artifact compiled here, or found in `cache` (the store's compiled-module cache,
/// verified on load; a damaged entry is refused, never run, and replaced). The guest's
/// fault-injection modules (`\0vmm-selftest:`, only with `test_hostcalls`) are not wasm
/// and go as they are: the guest acts on them before any engine sees them.
pub fn guest_module<'a>(
    spec: &'a FunctionSpec,
    limits: &RunLimits,
    cache: Option<&snapshot_store::Store>,
) -> Result<GuestModule<'a>, RunError> {
    guest_module_with(spec, limits, cache, true)
}

/// Whether a run that failed with `failure` should start again with a freshly compiled
/// artifact: the guest's engine refused one that came from the cache (an artifact made
/// with other settings passes the store's checks: they cover its bytes, not what made
/// them), before the function wrote anything. Says so on stderr.
pub(crate) fn cached_artifact_refused(
    failure: Option<&crate::error::Error>,
    cache: ArtifactCache,
    wrote: bool,
) -> bool {
    let Some(RunError::Guest(GuestError::ModuleInvalid(why))) =
        failure.and_then(|e| e.find::<RunError>())
    else {
        return false;
    };
    if cache != ArtifactCache::Hit || wrote {
        return false;
    }
    let model = crate::vm::host().map_or_else(|_| "unknown".into(), |h| h.cpu.record());
    eprintln!(
        "vmm: warning: the guest refused the compiled module cached in the store ({why}; the guest CPU model: {model}); compiling it again and replacing the cached one"
    );
    true
}

/// A guest that refused its compiled module for a CPU feature: the error says which model
/// the guest had and what the module was compiled for.
pub(crate) fn name_the_model<T>(
    result: Result<T, RunError>,
    cpu: &crate::cpu::GuestCpu,
    compiled_for: &[&str],
) -> Result<T, RunError> {
    match result {
        Err(RunError::Guest(GuestError::ModuleInvalid(why)))
            if why.contains("compilation setting") =>
        {
            Err(GuestError::ModuleInvalid(format!(
                "{why} (the guest CPU model: {}; the module was compiled for {})",
                cpu.record(),
                compiled_for.join(",")
            ))
            .into())
        }
        r => r,
    }
}

/// [`guest_module`]; with `reuse` false a cached artifact is not read but compiled again
/// and replaced (after the guest refused it: see [`cached_artifact_refused`]).
pub(crate) fn guest_module_with<'a>(
    spec: &'a FunctionSpec,
    limits: &RunLimits,
    cache: Option<&snapshot_store::Store>,
    reuse: bool,
) -> Result<GuestModule<'a>, RunError> {
    let selftest = limits.test_hostcalls && spec.module.starts_with(b"\0vmm-selftest:");
    if spec.engine == EngineKind::Wasmi || selftest {
        return Ok(GuestModule {
            bytes: std::borrow::Cow::Borrowed(&spec.module),
            aot_ms: 0.0,
            cache: ArtifactCache::Off,
            features: vec![],
        });
    }
    let t0 = Instant::now();
    // The guest CPU model, not this CPU, says what the artifact may use.
    let cpu = crate::vm::host()?.cpu;
    let compiler = crate::aot::Compiler::new(cpu).map_err(|e| VmError::Setup(e.into()))?;
    let key =
        snapshot_store::ArtifactKey::new(&spec.module, ARTIFACT_ENGINE, compiler.fingerprint());
    let mut outcome = ArtifactCache::Off;
    match cache {
        Some(_) if !reuse => outcome = ArtifactCache::Refused,
        Some(store) => match store.get_artifact(&key) {
            Ok(Some(artifact)) => {
                return Ok(GuestModule {
                    bytes: artifact.into(),
                    aot_ms: ms(t0.elapsed()),
                    cache: ArtifactCache::Hit,
                    features: compiler.features().to_vec(),
                })
            }
            Ok(None) => outcome = ArtifactCache::Miss,
            Err(e @ snapshot_store::ArtifactError::Damaged { .. }) => {
                eprintln!("vmm: warning: {e}");
                outcome = ArtifactCache::Refused;
            }
            // An unreadable cache must not stop the run: compile without it.
            Err(e) => eprintln!("vmm: warning: the compiled-module cache is not used: {e}"),
        },
        None => {}
    }
    match compiler.compile(&spec.module) {
        Ok(artifact) => {
            if let (Some(store), ArtifactCache::Miss | ArtifactCache::Refused) = (cache, outcome) {
                if let Err(e) = store.put_artifact(&key, &artifact) {
                    eprintln!("vmm: warning: the compiled module was not cached: {e}");
                }
            }
            Ok(GuestModule {
                bytes: artifact.into(),
                aot_ms: ms(t0.elapsed()),
                cache: outcome,
                features: compiler.features().to_vec(),
            })
        }
        // Not wasm: the same failure the guest reports for wasmi.
        Err(e @ crate::aot::AotError::InvalidModule(_)) => {
            Err(GuestError::ModuleInvalid(e.to_string()).into())
        }
        Err(e) => Err(VmError::Setup(e.into()).into()),
    }
}

/// Create a VM with the kernel and `module` (what [`guest_module`] made of the function's
/// module) loaded, ready for its first KVM_RUN.
pub fn boot_vm(
    module: &[u8],
    runtime: RuntimeKind,
    engine: EngineKind,
    limits: &RunLimits,
) -> Result<Vm, RunError> {
    let mem_mib = limits.mem_mib;
    let mem_size = check_mem(mem_mib).map_err(VmError::Setup)?;
    let module_gpa = (mem_size - module.len() as u64) & !(layout::PAGE_SIZE - 1);
    if module.len() as u64 >= mem_size || module_gpa < layout::HEAP_START + (16 << 20) {
        return Err(VmError::Setup(SetupError::ModuleTooLarge {
            module: module.len(),
            mem_mib,
        })
        .into());
    }
    let mem = GuestMemory::new(mem_size as usize).map_err(VmError::Memory)?;
    // Slots over the fixed regions and the module; the guest's heap asks for the rest.
    let mut vm = Vm::new_unregistered(mem)?;
    vm.grant_initial(module_gpa, mem_size - module_gpa);
    vm.mem().write(module_gpa, module)?;
    let mut seed = [0u8; 32];
    crate::vm::fill_random(&mut seed);
    let words =
        |i: usize| u64::from_le_bytes(seed[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let mailbox = Mailbox {
        magic: vmm_abi::MAILBOX_MAGIC,
        abi_version: vmm_abi::ABI_VERSION,
        flags: (if limits.test_hostcalls {
            vmm_abi::FLAG_TEST_HOSTCALLS
        } else {
            0
        }) | (if limits.eager_compile {
            vmm_abi::FLAG_EAGER_COMPILE
        } else {
            0
        }),
        mem_size,
        tsc_khz: vm.tsc_khz,
        module_gpa,
        module_len: module.len() as u64,
        runtime: runtime.abi(),
        engine: engine.abi(),
        now_unix_ns: crate::vm::unix_now_ns(),
        entropy_gen: 1,
        entropy: [words(0), words(1), words(2), words(3)],
        ..Default::default()
    };
    let kernel = guest_kernel_image().map_err(|e| {
        GuestError::Runtime(format!(
            "read the guest kernel image ($VMM_GUEST_KERNEL): {e}"
        ))
    })?;
    vm.setup_boot(&kernel, &mailbox)?;
    Ok(vm)
}

/// Where a [`resume`] stopped: the hostcall the guest waits in (answer it and resume again),
/// or its exit.
pub type Stop = Hostcall;

/// Run the vCPU from `pending` (the hostcall the guest already waits in, if any; taken)
/// and answer its hostcalls: `GetFunction` with `function` (once; without one, or asked
/// again, the run stops there), `ReadStdin` from `stdin` in chunks of the guest's buffer
/// (without it the run stops there). Returns the hostcall it stopped at, left in
/// `pending`, or the guest's exit. The watchdog of `limits` covers the whole run.
pub(crate) fn resume(
    vm: &mut Vm,
    pending: &mut Option<Hostcall>,
    function: Option<&[u8]>,
    stdin: Option<&[u8]>,
    out: &mut Output,
    limits: &RunLimits,
) -> Result<Stop, RunError> {
    // A watchdog of an earlier run on this vCPU (a reused instance) may have fired just as
    // that run ended successfully, leaving `immediate_exit` set: every KVM_RUN would then
    // return at once until this run's deadline.
    vm.vcpu.set_kvm_immediate_exit(0);
    let run_ptr: *mut kvm_bindings::kvm_run = vm.vcpu.get_kvm_run();
    let watchdog =
        Watchdog::start_interruptible(limits.timeout, run_ptr, limits.interrupt.as_ref());
    let mut answers = crate::hostcall::Answers {
        function,
        stdin,
        stdin_pos: 0,
    };
    let call = match pending.take() {
        Some(c) => match vm.answer(c, out, &mut answers)? {
            crate::hostcall::Next::Resume => {
                vm.next_hostcall(out, &mut answers, &watchdog, limits.timeout)?
            }
            crate::hostcall::Next::Stop(c) => c,
        },
        None => vm.next_hostcall(out, &mut answers, &watchdog, limits.timeout)?,
    };
    if !matches!(call, Hostcall::Exit { .. }) {
        *pending = Some(call);
    }
    Ok(call)
}
