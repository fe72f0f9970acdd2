//! The CPU every guest sees: one model per back end, defined by the VMM ([`GuestCpu`]).
//!
//! The VMM builds one CPUID table per process and sets it on every vCPU before it runs, at
//! boot and at restore, on both back ends. The ahead-of-time compiler (`crate::aot`) enables
//! exactly the features the guest's wasmtime will detect in that table (both decide with
//! `vmm_abi::cpu::wasmtime_feature`), so an artifact never needs what the guest's `cpuid`
//! does not report.
//!
//! * Hardware KVM: the table is `KVM_GET_SUPPORTED_CPUID`, what KVM can give a guest.
//! * PVM: `KVM_GET_SUPPORTED_CPUID` is far smaller than what runs: the guest's code runs at
//!   hardware CPL3 on the host CPU, so every user-mode instruction the host has executes
//!   natively whatever the table says (on an AMD EPYC host PVM reported no SSE3, SSSE3,
//!   SSE4.x, POPCNT, BMI or LZCNT). The model takes PVM's table and sets each
//!   [`Use::Guest`] feature's bit from the host's own `cpuid` (what this process, also at
//!   CPL3 on that CPU, sees), and clears every [`Use::Never`] one (AVX and the rest that need
//!   state the guest cannot enable: `xsetbv` kills a PVM guest).
//! * `VMM_CPU_WITHOUT=lzcnt,bmi2` removes features from the model on either back end: for
//!   templates that must restore on hosts lacking them (and for tests of exactly that).
//!
//! Some PVM hosts answer the guest's `cpuid` from the table; others hand it the host's own
//! values (a superset of the model: the guest still finds everything it was compiled for).
//!
//! A template records the model it was made on ([`MadeOn`]: back end, CPU vendor, features)
//! and is restored where the model here has every feature a guest may use that the
//! template's had (a superset runs; a model that lacks one is refused, naming both).

use crate::platform::{Backend, PlatformError};
use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_abi::cpu::CpuidRegs;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// Whether a guest may use a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Instructions that run at any privilege level with no processor state beyond the SSE
    /// state the guest enables at boot (CR4.OSFXSR): the guest's code may use them. On PVM
    /// the model has one exactly when the host CPU has it.
    Guest,
    /// Needs state the guest never enables (XCR0 for AVX and AVX-512, CR4.PKE for PKU, MPX's
    /// bound registers): no guest code can use it. Kept out of the PVM model; ignored when a
    /// restore compares models.
    Never,
}

/// The CPU features the VMM knows: name, CPUID leaf, subleaf, register, bit, use. A template
/// records the ones its guest's model had. Append only: a record names features, and a name
/// this table lacks makes the record invalid.
const FEATURES: &[(&str, u32, u32, Reg, u8, Use)] = &[
    ("fxsr", 1, 0, Reg::Edx, 24, Use::Guest),
    ("sse", 1, 0, Reg::Edx, 25, Use::Guest),
    ("sse2", 1, 0, Reg::Edx, 26, Use::Guest),
    ("sse3", 1, 0, Reg::Ecx, 0, Use::Guest),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1, Use::Guest),
    ("ssse3", 1, 0, Reg::Ecx, 9, Use::Guest),
    ("fma", 1, 0, Reg::Ecx, 12, Use::Never),
    ("cx16", 1, 0, Reg::Ecx, 13, Use::Guest),
    ("sse4.1", 1, 0, Reg::Ecx, 19, Use::Guest),
    ("sse4.2", 1, 0, Reg::Ecx, 20, Use::Guest),
    ("movbe", 1, 0, Reg::Ecx, 22, Use::Guest),
    ("popcnt", 1, 0, Reg::Ecx, 23, Use::Guest),
    ("aes", 1, 0, Reg::Ecx, 25, Use::Guest),
    ("xsave", 1, 0, Reg::Ecx, 26, Use::Never),
    ("avx", 1, 0, Reg::Ecx, 28, Use::Never),
    ("f16c", 1, 0, Reg::Ecx, 29, Use::Never),
    ("rdrand", 1, 0, Reg::Ecx, 30, Use::Guest),
    ("bmi1", 7, 0, Reg::Ebx, 3, Use::Guest),
    ("avx2", 7, 0, Reg::Ebx, 5, Use::Never),
    ("bmi2", 7, 0, Reg::Ebx, 8, Use::Guest),
    ("erms", 7, 0, Reg::Ebx, 9, Use::Guest),
    ("mpx", 7, 0, Reg::Ebx, 14, Use::Never),
    ("avx512f", 7, 0, Reg::Ebx, 16, Use::Never),
    ("avx512dq", 7, 0, Reg::Ebx, 17, Use::Never),
    ("rdseed", 7, 0, Reg::Ebx, 18, Use::Guest),
    ("adx", 7, 0, Reg::Ebx, 19, Use::Guest),
    ("avx512cd", 7, 0, Reg::Ebx, 28, Use::Never),
    ("sha", 7, 0, Reg::Ebx, 29, Use::Guest),
    ("avx512bw", 7, 0, Reg::Ebx, 30, Use::Never),
    ("avx512vl", 7, 0, Reg::Ebx, 31, Use::Never),
    ("avx512vbmi", 7, 0, Reg::Ecx, 1, Use::Never),
    ("pku", 7, 0, Reg::Ecx, 3, Use::Never),
    ("gfni", 7, 0, Reg::Ecx, 8, Use::Guest),
    ("vaes", 7, 0, Reg::Ecx, 9, Use::Never),
    ("vpclmulqdq", 7, 0, Reg::Ecx, 10, Use::Never),
    ("lahf", 0x8000_0001, 0, Reg::Ecx, 0, Use::Guest),
    ("lzcnt", 0x8000_0001, 0, Reg::Ecx, 5, Use::Guest),
    ("sse4a", 0x8000_0001, 0, Reg::Ecx, 6, Use::Guest),
    ("prefetchw", 0x8000_0001, 0, Reg::Ecx, 8, Use::Guest),
];

/// The features a guest may use, as a mask over [`FEATURES`].
fn guest_usable() -> u64 {
    FEATURES
        .iter()
        .enumerate()
        .filter(|(_, f)| f.5 == Use::Guest)
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// Longest back-end record read from a template (the longest this VMM writes is ~350 bytes).
const MAX_RECORD: usize = 1024;

/// `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]` answered from a CPUID table the way KVM
/// answers a guest (an absent leaf reads as zeros).
fn lookup(table: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> [u32; 4] {
    table
        .iter()
        .find(|e| {
            e.function == leaf && (e.index == sub || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        })
        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}

/// The environment variable that removes features from the model.
pub const CPU_WITHOUT_ENV: &str = "VMM_CPU_WITHOUT";

/// The CPU every guest of this process sees: the CPUID table set on every vCPU, and what it
/// shows.
#[derive(Clone, Debug)]
pub struct GuestCpu {
    table: Vec<kvm_cpuid_entry2>,
    regs: CpuidRegs,
    made_on: MadeOn,
}

impl GuestCpu {
    /// The model for `backend` from KVM's supported table and (PVM) the host's own
    /// `cpuid`, without the features in the `without` mask. Pure: tests feed it recorded
    /// tables.
    pub fn build(
        backend: Backend,
        supported: &[kvm_cpuid_entry2],
        host: impl Fn(u32, u32) -> [u32; 4],
        without: u64,
    ) -> GuestCpu {
        let mut table = supported.to_vec();
        let host_max = host(0, 0)[0];
        let host_max_ext = host(0x8000_0000, 0)[0];
        for (i, &(_, leaf, sub, reg, bit, usage)) in FEATURES.iter().enumerate() {
            let on = match (backend, usage) {
                _ if without >> i & 1 == 1 => false,
                (Backend::Hardware, _) => continue,
                // SAFETY of the model (not a Rust `unsafe`): the guest runs at CPL3 on the
                // host CPU, so a user-mode instruction the host has runs in the guest.
                (Backend::Pvm, Use::Guest) => {
                    let max = if leaf >= 0x8000_0000 {
                        host_max_ext
                    } else {
                        host_max
                    };
                    leaf <= max && reg_of(host(leaf, sub), reg) >> bit & 1 == 1
                }
                (Backend::Pvm, Use::Never) => false,
            };
            set_bit(&mut table, leaf, sub, reg, bit, on);
        }
        let regs = CpuidRegs::read(|leaf, sub| lookup(&table, leaf, sub));
        let made_on = MadeOn {
            backend,
            cpu: Some(Cpu::from_cpuid(|leaf, sub| lookup(&table, leaf, sub))),
        };
        GuestCpu {
            table,
            regs,
            made_on,
        }
    }

    /// This process's model for `backend`, built once from `kvm` (every /dev/kvm of a
    /// process is the same back end) and `VMM_CPU_WITHOUT`.
    pub fn for_host(kvm: &Kvm, backend: Backend) -> Result<&'static GuestCpu, PlatformError> {
        static PVM: std::sync::OnceLock<GuestCpu> = std::sync::OnceLock::new();
        static HARDWARE: std::sync::OnceLock<GuestCpu> = std::sync::OnceLock::new();
        let cell = match backend {
            Backend::Pvm => &PVM,
            Backend::Hardware => &HARDWARE,
        };
        if let Some(model) = cell.get() {
            return Ok(model);
        }
        let without = match std::env::var(CPU_WITHOUT_ENV) {
            Ok(v) => parse_without(&v).map_err(PlatformError::CpuModel)?,
            Err(std::env::VarError::NotPresent) => 0,
            Err(e) => return Err(PlatformError::CpuModel(format!("{CPU_WITHOUT_ENV}: {e}"))),
        };
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(PlatformError::Cpuid)?;
        let model = GuestCpu::build(
            backend,
            supported.as_slice(),
            |leaf, sub| {
                let r = std::arch::x86_64::__cpuid_count(leaf, sub);
                [r.eax, r.ebx, r.ecx, r.edx]
            },
            without,
        );
        Ok(cell.get_or_init(|| model))
    }

    /// Set the model's CPUID table on a fresh vCPU (before its first KVM_RUN and before
    /// its MSRs, some of which KVM accepts only for features the table has).
    pub fn set_on(&self, vcpu: &VcpuFd) -> Result<(), PlatformError> {
        let cpuid = CpuId::from_entries(&self.table).map_err(|e| {
            PlatformError::CpuModel(format!("the CPUID table does not fit KVM's: {e:?}"))
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(PlatformError::Cpuid)
    }

    pub fn backend(&self) -> Backend {
        self.made_on.backend
    }

    /// What a template made with this model is made on.
    pub fn made_on(&self) -> &MadeOn {
        &self.made_on
    }

    /// The registers the guest's `cpuid` reads its features from, as the table answers.
    pub fn regs(&self) -> CpuidRegs {
        self.regs
    }

    /// The model as a template records it (`pvm/GenuineIntel/fxsr,sse,...`).
    pub fn record(&self) -> String {
        self.made_on.record()
    }
}

fn reg_of(r: [u32; 4], reg: Reg) -> u32 {
    match reg {
        Reg::Ebx => r[1],
        Reg::Ecx => r[2],
        Reg::Edx => r[3],
    }
}

/// Set or clear one feature bit in `table`, adding the leaf (and raising the maximum leaf
/// that covers it) when the bit is set and the table lacks it.
fn set_bit(table: &mut Vec<kvm_cpuid_entry2>, leaf: u32, sub: u32, reg: Reg, bit: u8, on: bool) {
    let significant = leaf == 7;
    let pos = table.iter().position(|e| {
        e.function == leaf && (e.index == sub || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
    });
    let i = match (pos, on) {
        (Some(i), _) => i,
        (None, false) => return,
        (None, true) => {
            table.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub,
                flags: if significant {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                ..Default::default()
            });
            let base = if leaf >= 0x8000_0000 { 0x8000_0000 } else { 0 };
            match table.iter_mut().find(|e| e.function == base) {
                Some(e) if e.eax < leaf => e.eax = leaf,
                Some(_) => {}
                None => table.push(kvm_cpuid_entry2 {
                    function: base,
                    eax: leaf,
                    ..Default::default()
                }),
            }
            table.len() - 1
        }
    };
    let e = &mut table[i];
    let r = match reg {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    };
    if on {
        *r |= 1 << bit;
    } else {
        *r &= !(1 << bit);
    }
}

/// `lzcnt,bmi2` (names from [`FEATURES`]) as a mask.
fn parse_without(list: &str) -> Result<u64, String> {
    let mut mask = 0u64;
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match FEATURES.iter().position(|f| f.0 == name) {
            Some(i) => mask |= 1 << i,
            None => {
                return Err(format!(
                    "{CPU_WITHOUT_ENV} names {:?}, not a CPU feature this vmm knows (known: {})",
                    crate::text::shown(name),
                    FEATURES.iter().map(|f| f.0).collect::<Vec<_>>().join(",")
                ))
            }
        }
    }
    Ok(mask)
}

/// The CPU a guest saw, through CPUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// The CPUID vendor string (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    /// Bit i set: the guest could see `FEATURES[i]`.
    features: u64,
}

/// What a template was made on. Recorded in its vCPU state as
/// `BACKEND/VENDOR/FEATURE,FEATURE,...` (`hardware/AuthenticAMD/fxsr,sse,sse2,...`);
/// templates from before the CPU was recorded hold the bare back end (`pvm`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadeOn {
    pub backend: Backend,
    /// `None` for a template that did not record its CPU.
    pub cpu: Option<Cpu>,
}

/// Why a template cannot be restored here.
#[derive(Debug, thiserror::Error)]
pub enum MadeOnMismatch {
    #[error("the template was made on {made} and cannot be restored on {here}: its vCPU state is that back end's; create it on this machine")]
    Backend { made: String, here: String },
    #[error(transparent)]
    Features(Box<FeaturesMissing>),
}

/// A template whose guest CPU model had features a guest may use that the model here lacks.
#[derive(Debug, thiserror::Error)]
#[error("the template was made on {made} with CPU features that {here} here lacks ({missing}); the template's code may use them: create it on this machine, or make templates with a model that every host has ({CPU_WITHOUT_ENV}={missing_list}). The guest CPU it was made for: {made_model}; here: {here_model}")]
pub struct FeaturesMissing {
    made: String,
    here: String,
    missing: String,
    missing_list: String,
    made_model: String,
    here_model: String,
}

impl Cpu {
    /// The vendor and features from `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]`.
    fn from_cpuid(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Cpu {
        let l0 = cpuid(0, 0);
        let vendor: Vec<u8> = [l0[1], l0[3], l0[2]]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let max = l0[0];
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let mut features = 0u64;
        for (i, &(_, leaf, sub, reg, bit, _)) in FEATURES.iter().enumerate() {
            let supported = if leaf >= 0x8000_0000 { max_ext } else { max };
            if leaf > supported {
                continue;
            }
            if reg_of(cpuid(leaf, sub), reg) >> bit & 1 == 1 {
                features |= 1 << i;
            }
        }
        // Recorded between slashes: anything but a printable character becomes `_`.
        let vendor = vendor
            .iter()
            .map(|&b| match b {
                b'/' => '_',
                b if b.is_ascii_graphic() => b as char,
                _ => '_',
            })
            .collect();
        Cpu { vendor, features }
    }

    fn feature_names(features: u64) -> impl Iterator<Item = &'static str> {
        FEATURES
            .iter()
            .enumerate()
            .filter(move |(i, _)| features >> i & 1 == 1)
            .map(|(_, f)| f.0)
    }

    /// The features a guest may use (named as [`FEATURES`] does) among those `regs` show:
    /// what a guest that read these registers could see.
    pub fn usable_in(regs: &CpuidRegs) -> Vec<&'static str> {
        let mut features = 0u64;
        for (i, &(_, leaf, _, reg, bit, usage)) in FEATURES.iter().enumerate() {
            let r = match (leaf, reg) {
                (1, Reg::Ecx) => regs.leaf1_ecx,
                (1, Reg::Edx) => regs.leaf1_edx,
                (7, Reg::Ebx) => regs.leaf7_ebx,
                (7, Reg::Ecx) => regs.leaf7_ecx,
                (0x8000_0001, Reg::Ecx) => regs.ext1_ecx,
                (0x8000_0001, Reg::Edx) => regs.ext1_edx,
                _ => 0,
            };
            if usage == Use::Guest && r >> bit & 1 == 1 {
                features |= 1 << i;
            }
        }
        Cpu::feature_names(features).collect()
    }
}

impl MadeOn {
    /// The text recorded in a template's vCPU state.
    pub fn record(&self) -> String {
        match &self.cpu {
            None => self.backend.name().into(),
            Some(cpu) => format!(
                "{}/{}/{}",
                self.backend.name(),
                cpu.vendor,
                Cpu::feature_names(cpu.features)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// Read a record (bounded and strict: it comes from a template, which may be forged);
    /// the error says what a valid one is.
    pub fn parse(record: &str) -> Result<MadeOn, String> {
        if record.len() > MAX_RECORD {
            return Err(format!("a back-end record is at most {MAX_RECORD} bytes"));
        }
        let mut parts = record.splitn(3, '/');
        let backend = match parts.next() {
            Some("pvm") => Backend::Pvm,
            Some("hardware") => Backend::Hardware,
            _ => return Err("it is pvm or hardware, then the CPU vendor and features".into()),
        };
        let (vendor, features) = match (parts.next(), parts.next()) {
            (None, _) => return Ok(MadeOn { backend, cpu: None }),
            (Some(v), Some(f)) => (v, f),
            (Some(_), None) => return Err("the CPU vendor is followed by its features".into()),
        };
        if vendor.len() != 12 || !vendor.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err("the CPU vendor is 12 printable characters".into());
        }
        let mut mask = 0u64;
        for name in features.split(',').filter(|n| !n.is_empty()) {
            match FEATURES.iter().position(|f| f.0 == name) {
                Some(i) => mask |= 1 << i,
                None => return Err("the CPU features are ones this vmm knows".into()),
            }
        }
        Ok(MadeOn {
            backend,
            cpu: Some(Cpu {
                vendor: vendor.into(),
                features: mask,
            }),
        })
    }

    /// Whether a template made on `self` can be restored `here`: the same back end (a vCPU
    /// state holds that back end's registers and MSRs), and every CPU feature a guest may
    /// use that its model had (its code may use any of them). The vendor alone may differ,
    /// and so may features no guest can use (AVX and the like).
    pub fn check_restore(&self, here: &MadeOn) -> Result<(), MadeOnMismatch> {
        if self.backend != here.backend {
            return Err(MadeOnMismatch::Backend {
                made: self.to_string(),
                here: here.to_string(),
            });
        }
        if let (Some(made), Some(cpu)) = (&self.cpu, &here.cpu) {
            // Only what a guest may use counts: a model without AVX restores a template
            // whose model had it (no guest code can have used it).
            let missing = made.features & !cpu.features & guest_usable();
            if missing != 0 {
                let names = Cpu::feature_names(missing).collect::<Vec<_>>();
                return Err(MadeOnMismatch::Features(Box::new(FeaturesMissing {
                    made: self.to_string(),
                    here: here.to_string(),
                    missing: names.join(", "),
                    missing_list: names.join(","),
                    made_model: self.record(),
                    here_model: here.record(),
                })));
            }
        }
        Ok(())
    }
}

/// `pvm KVM (GenuineIntel)`, or `pvm KVM` when the CPU is not recorded.
impl std::fmt::Display for MadeOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} KVM", self.backend.name())?;
        if let Some(cpu) = &self.cpu {
            write!(f, " ({})", cpu.vendor)?;
        }
        Ok(())
    }
}

/// CPUID tables recorded on real hosts, for tests that must hold on any host.
#[cfg(test)]
pub(crate) mod recorded {
    use super::*;

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// "AuthenticAMD" in leaf 0's EBX, EDX, ECX.
    const AMD: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163];

    /// PVM's KVM_GET_SUPPORTED_CPUID on an AMD EPYC host (2026-12-07): leaf 1 ECX has no
    /// SSE3, SSSE3, SSE4.x or POPCNT, leaf 7 EBX no BMI/AVX2, leaf 0x8000_0001 ECX no LZCNT.
    pub fn amd_epyc_pvm_supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x10, AMD[0], AMD[2], AMD[1]]),
            entry(1, 0, [0x00a0_0f11, 0x0000_0800, 0x8120_2000, 0x078b_fbff]),
            entry(7, 0, [0, 0x0180_0002, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, AMD[0], AMD[2], AMD[1]]),
            entry(0x8000_0001, 0, [0x00a0_0f11, 0, 0x0040_0393, 0x2fd3_fbff]),
        ]
    }

    /// That host's own `cpuid` (what the VMM process sees).
    pub fn amd_epyc_host(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (0, _) => [0x10, AMD[0], AMD[2], AMD[1]],
            (1, _) => [0x00a0_0f11, 0x0000_0800, 0xfffa_3203, 0x178b_fbff],
            (7, 0) => [0, 0xf1bf_07ab, 0x0040_069c, 0],
            (0x8000_0000, _) => [0x8000_0021, AMD[0], AMD[2], AMD[1]],
            (0x8000_0001, _) => [0x00a0_0f11, 0, 0x0040_03f3, 0x2fd3_fbff],
            _ => [0; 4],
        }
    }

    /// "GenuineIntel" in leaf 0's EBX, EDX, ECX.
    const INTEL: [u32; 3] = [0x756e_6547, 0x4965_6e69, 0x6c65_746e];

    /// PVM's KVM_GET_SUPPORTED_CPUID on an "Intel Xeon Processor" host (2026-12-07): the
    /// same leaf 1 ECX as on the AMD host, no BMI in leaf 7, no LZCNT in 0x8000_0001.
    pub fn intel_xeon_pvm_supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x24, INTEL[0], INTEL[2], INTEL[1]]),
            entry(1, 0, [0x000a_0671, 0x0102_0800, 0x8120_2000, 0x0f8b_fbff]),
            entry(7, 0, [2, 0x0180_2852, 0x1a01_0104, 0x2001_0000]),
            entry(7, 1, [0x1c00, 0, 0, 0x4000]),
            entry(7, 2, [0, 0, 0, 1]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x101, 0x2010_0800]),
        ]
    }

    /// That host's own `cpuid`.
    pub fn intel_xeon_host(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (0, _) => [0x24, INTEL[0], INTEL[2], INTEL[1]],
            (1, _) => [0x000a_0671, 0x0102_0800, 0xfffa_3203, 0x1f8b_fbff],
            (7, 0) => [2, 0xf1bf_2ffb, 0x1a41_5f46, 0],
            (0x8000_0000, _) => [0x8000_0008, 0, 0, 0],
            (0x8000_0001, _) => [0, 0, 0x121, 0x2c10_0800],
            _ => [0; 4],
        }
    }

    /// The guest CPU models of both hosts.
    pub fn pvm_models(without: &str) -> [GuestCpu; 2] {
        [
            amd_epyc_pvm_model(without),
            GuestCpu::build(
                Backend::Pvm,
                &intel_xeon_pvm_supported(),
                intel_xeon_host,
                parse_without(without).unwrap(),
            ),
        ]
    }

    /// The guest CPU model of the AMD host.
    pub fn amd_epyc_pvm_model(without: &str) -> GuestCpu {
        GuestCpu::build(
            Backend::Pvm,
            &amd_epyc_pvm_supported(),
            amd_epyc_host,
            parse_without(without).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(model: &GuestCpu) -> Vec<&'static str> {
        Cpu::feature_names(model.made_on.cpu.as_ref().unwrap().features).collect()
    }

    /// The model of the host where the default engine failed: the guest's `cpuid`, answered
    /// from the table the VMM sets, shows every user-mode feature the host executes and
    /// nothing that needs XCR0.
    #[test]
    fn the_pvm_model_shows_what_runs_in_the_guest() {
        let [model, intel] = recorded::pvm_models("");
        let seen = names(&model);
        for f in [
            "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "bmi1", "bmi2", "lzcnt", "sse4a",
            "cx16", "aes", "sha",
        ] {
            assert!(seen.contains(&f), "{f} not in {seen:?}");
        }
        let intel_seen = names(&intel);
        for f in [
            "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "bmi1", "bmi2", "lzcnt", "gfni",
        ] {
            assert!(intel_seen.contains(&f), "{f} not in {intel_seen:?}");
        }
        assert!(!intel_seen.contains(&"sse4a") && !intel_seen.contains(&"avx512f"));
        assert!(
            intel.record().starts_with("pvm/GenuineIntel/"),
            "{}",
            intel.record()
        );
        // Leaf 7's other subleaves are left as KVM gave them.
        assert_eq!(lookup(&intel.table, 7, 1), [0x1c00, 0, 0, 0x4000]);
        for f in ["avx", "avx2", "fma", "xsave", "f16c", "avx512f", "vaes"] {
            assert!(!seen.contains(&f), "{f} in {seen:?}");
        }
        // What the guest reads from the table is what the model says.
        let guest = CpuidRegs::read(|l, s| lookup(&model.table, l, s));
        assert_eq!(guest, model.regs());
        assert_eq!(Cpu::usable_in(&guest), seen);
        // The vendor and what KVM alone put in the table stay (the hypervisor bit, x2APIC).
        assert_eq!(model.made_on.cpu.as_ref().unwrap().vendor, "AuthenticAMD");
        assert_eq!(
            model.regs().leaf1_ecx & (1 << 31 | 1 << 21),
            1 << 31 | 1 << 21
        );
        // PVM's table alone would have hidden SSE3 from the guest: that was the bug.
        let bare = CpuidRegs::read(|l, s| lookup(&recorded::amd_epyc_pvm_supported(), l, s));
        assert_eq!(vmm_abi::cpu::wasmtime_feature(&bare, "sse3"), Some(false));
    }

    #[test]
    fn the_hardware_model_is_what_kvm_supports() {
        let supported = recorded::amd_epyc_pvm_supported();
        let model = GuestCpu::build(Backend::Hardware, &supported, recorded::amd_epyc_host, 0);
        assert_eq!(model.table.len(), supported.len());
        assert_eq!(
            model.regs().leaf1_ecx,
            0x8120_2000,
            "the host's bits are not added"
        );
        assert!(!names(&model).contains(&"sse3"));
        assert!(model.record().starts_with("hardware/AuthenticAMD/"));
    }

    #[test]
    fn features_can_be_left_out_of_the_model() {
        let model = recorded::amd_epyc_pvm_model("lzcnt, bmi2");
        let seen = names(&model);
        assert!(
            !seen.contains(&"lzcnt") && !seen.contains(&"bmi2"),
            "{seen:?}"
        );
        assert!(seen.contains(&"bmi1"));
        assert_eq!(
            vmm_abi::cpu::wasmtime_feature(&model.regs(), "lzcnt"),
            Some(false)
        );
        // An absurd value is not echoed whole.
        let e = parse_without(&"a".repeat(100_000)).unwrap_err();
        assert!(e.len() < 1024, "{} bytes", e.len());
        let e = parse_without("sse3,nosuch").unwrap_err();
        assert!(
            e.contains("\"nosuch\"") && e.contains("VMM_CPU_WITHOUT"),
            "{e}"
        );
        assert_eq!(parse_without(""), Ok(0));
    }

    /// A template made on one model restores on a model with every usable feature it had
    /// (a superset, or one that differs only in features no guest can use), and is refused
    /// on one that lacks a usable feature, with both models named.
    #[test]
    fn a_template_restores_on_a_superset_model_and_is_refused_on_a_smaller_one() {
        let full = recorded::amd_epyc_pvm_model("");
        let small = recorded::amd_epyc_pvm_model("lzcnt");
        assert!(small.made_on().check_restore(full.made_on()).is_ok());
        let e = full
            .made_on()
            .check_restore(small.made_on())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks (lzcnt)"), "{e}");
        assert!(
            e.contains(&full.record()) && e.contains(&small.record()),
            "{e}"
        );
        assert!(e.contains("VMM_CPU_WITHOUT=lzcnt"), "{e}");
        // A record that had AVX (the PVM record of old, the host's own features) restores
        // on a model without it: no guest code can have used it.
        let old = MadeOn::parse(&format!("{},avx,avx2,fma,xsave", full.record())).unwrap();
        assert!(old.check_restore(full.made_on()).is_ok());
    }

    fn cpu(vendor: &str, names: &[&str]) -> Option<Cpu> {
        let features = names.iter().fold(0u64, |m, n| {
            m | 1 << FEATURES.iter().position(|f| f.0 == *n).unwrap()
        });
        Some(Cpu {
            vendor: vendor.into(),
            features,
        })
    }

    #[test]
    fn records_read_back() {
        for made in [
            MadeOn {
                backend: Backend::Hardware,
                cpu: cpu("AuthenticAMD", &["sse", "sse2", "sse4.2", "avx2", "sse4a"]),
            },
            MadeOn {
                backend: Backend::Pvm,
                cpu: cpu("GenuineIntel", &[]),
            },
            MadeOn {
                backend: Backend::Pvm,
                cpu: None,
            },
        ] {
            assert_eq!(
                MadeOn::parse(&made.record()),
                Ok(made.clone()),
                "{}",
                made.record()
            );
        }
        assert_eq!(
            MadeOn::parse("hardware/AuthenticAMD/sse,sse2")
                .unwrap()
                .record(),
            "hardware/AuthenticAMD/sse,sse2"
        );
    }

    #[test]
    fn forged_records_are_refused() {
        for bad in [
            "",
            "kvm",
            "PVM",
            "pvm/",
            "pvm/GenuineIntel",
            "pvm/Intel/sse",
            "pvm/GenuineIntel/sse,nosuchfeature",
            "pvm/Genuine\u{1b}ntel/sse",
            &format!("pvm/GenuineIntel/{}", "sse,".repeat(300)),
        ] {
            assert!(MadeOn::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn restore_needs_the_same_back_end_and_every_feature() {
        let made = MadeOn {
            backend: Backend::Hardware,
            cpu: cpu("AuthenticAMD", &["sse2", "sse4a", "avx2"]),
        };
        let pvm = MadeOn {
            backend: Backend::Pvm,
            cpu: cpu("AuthenticAMD", &["sse2", "sse4a", "avx2"]),
        };
        let e = made.check_restore(&pvm).unwrap_err().to_string();
        assert!(
            e.contains("made on hardware KVM (AuthenticAMD)")
                && e.contains("restored on pvm KVM (AuthenticAMD)"),
            "{e}"
        );
        let intel = MadeOn {
            backend: Backend::Hardware,
            cpu: cpu("GenuineIntel", &["sse2", "avx2", "avx512f"]),
        };
        let e = made.check_restore(&intel).unwrap_err().to_string();
        assert!(e.contains("here lacks (sse4a)"), "{e}");
        assert!(
            e.contains("GenuineIntel") && e.contains("AuthenticAMD"),
            "{e}"
        );
        // More features, another vendor, or no record of the CPU: restored.
        assert!(MadeOn {
            cpu: cpu("GenuineIntel", &["sse2"]),
            ..made.clone()
        }
        .check_restore(&intel)
        .is_ok());
        assert!(MadeOn {
            cpu: None,
            ..made.clone()
        }
        .check_restore(&intel)
        .is_ok());
    }
}
