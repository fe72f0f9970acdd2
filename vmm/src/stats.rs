//! What an invocation cost: one [`Stats`] per response, with a section for how the
//! instance came to be (a cold boot's phases, or a restore's [`RestoreStats`]).

use std::time::Duration;
use vmm_abi::{GuestStats, Mailbox};

/// Timing breakdown of one invocation, in milliseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub mode: &'static str,
    pub backend: &'static str,
    /// `wasmtime` or `wasmi` (empty for a restore: the template's).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub engine: &'static str,
    /// Compiling the module on the host, ahead of time, for the guest's wasmtime (0 for
    /// wasmi, which compiles in the guest: `compile_ms`).
    pub aot_compile_ms: f64,
    /// Whether the compiled module came from the store's cache (wasmtime, cold runs).
    pub artifact_cache: ArtifactCache,
    pub vm_create_ms: f64,
    pub boot_ms: f64,
    pub compile_ms: f64,
    pub instantiate_ms: f64,
    pub runtime_init_ms: f64,
    pub function_ms: f64,
    /// From resuming the guest with the request to its exit, as the host saw it.
    pub run_ms: f64,
    pub total_ms: f64,
    pub exits: u64,
    pub hostcalls: u64,
    /// KVM memory slots of the instance after the run, and the guest RAM they cover
    /// (granted to the guest; KVM's per-slot metadata is sized by it).
    pub memory_slots: u64,
    pub slot_bytes: u64,
    /// Set for `vmm restore`: how the template was restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStats>,
    /// The guest's CPU: the model the VMM set, what the guest saw, what it was compiled for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuReport>,
}

/// The guest's CPU, for `--stats` (`"cpu"` in `--json`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuReport {
    /// The guest CPU model the VMM set on the vCPU, as a template records it
    /// (`pvm/GenuineIntel/fxsr,sse,...`).
    pub model: String,
    /// The features a guest may use that the guest's own `cpuid` reported (at its boot:
    /// for a restore, the template's creation), named as in `model`.
    pub guest_sees: Vec<&'static str>,
    /// The features the module was compiled for ahead of time (wasmtime cold runs; empty
    /// otherwise), named as in `model`.
    pub compiled_for: Vec<&'static str>,
}

impl CpuReport {
    /// The report of a guest of model `cpu` whose mailbox is `mb`.
    pub fn new(cpu: &crate::cpu::GuestCpu, mb: &Mailbox, compiled_for: &[&'static str]) -> Self {
        CpuReport {
            model: cpu.record(),
            guest_sees: crate::cpu::Cpu::usable_in(&vmm_abi::cpu::CpuidRegs::from_words(mb.cpuid)),
            compiled_for: compiled_for.to_vec(),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn tsc_ms(from: u64, to: u64, tsc_khz: u64) -> f64 {
    if from == 0 || to < from || tsc_khz == 0 {
        return 0.0;
    }
    (to - from) as f64 / tsc_khz as f64
}

/// Fill the guest-side phase timings into `stats`.
pub fn apply_guest_stats(stats: &mut Stats, g: &GuestStats, tsc_khz: u64) {
    stats.boot_ms = tsc_ms(g.kernel_entry, g.kernel_ready, tsc_khz);
    stats.compile_ms = tsc_ms(g.kernel_ready, g.compiled, tsc_khz);
    stats.instantiate_ms = tsc_ms(g.compiled, g.instantiated, tsc_khz);
    stats.runtime_init_ms = tsc_ms(g.instantiated, g.runtime_initialized, tsc_khz);
    stats.function_ms = tsc_ms(g.function_start, g.function_end, tsc_khz);
    stats.hostcalls = g.hostcalls;
}

/// What the compiled-module cache in the store did for one run (`--stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactCache {
    /// Not used: wasmi (nothing to compile on the host), or no store to cache in.
    #[default]
    Off,
    /// The artifact came from the store: nothing was compiled.
    Hit,
    /// Not in the store: compiled, and stored for the next run.
    Miss,
    /// The store held a damaged artifact under this key (refused, never run), or one the
    /// guest's engine refused to load (compiled with other settings): compiled again, and
    /// the new artifact stored in its place.
    Refused,
}

impl ArtifactCache {
    pub fn name(self) -> &'static str {
        match self {
            ArtifactCache::Off => "off",
            ArtifactCache::Hit => "hit",
            ArtifactCache::Miss => "miss",
            ArtifactCache::Refused => "refused, recompiled",
        }
    }
}

/// Counters of one restore.
#[derive(Debug, Default, serde::Serialize, Clone)]
pub struct RestoreStats {
    /// How guest memory was filled ([`Backing::name`](crate::instance::Backing::name)).
    pub strategy: Option<&'static str>,
    pub load_ms: f64,
    pub install_ms: f64,
    pub vm_restore_ms: f64,
    /// Registering the memory slots with KVM.
    pub slots_ms: f64,
    /// VM creation, memory install and vCPU restore (the last two overlap).
    pub setup_ms: f64,
    pub run_ms: f64,
    pub pages_installed: u64,
    pub uffd_faults: u64,
    pub bytes_from_store: u64,
}
