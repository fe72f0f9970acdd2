//! The CPU a guest sees, and what a template was made on ([`MadeOn`]: the back end, the
//! CPU vendor and the CPU features its guest could see); a template is refused where that
//! differs in a way the guest would trip over.

use crate::platform::Backend;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuFd;

/// A CPUID register.
#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// The CPU features a guest's code (the kernel, the wasm engine's generated code) may use:
/// name, CPUID leaf, subleaf, register, bit. A template records the ones its guest could see;
/// it is restored only where all of them are present. Append only: a record names features,
/// and a name this table lacks makes the record invalid.
const FEATURES: &[(&str, u32, u32, Reg, u8)] = &[
    ("fxsr", 1, 0, Reg::Edx, 24),
    ("sse", 1, 0, Reg::Edx, 25),
    ("sse2", 1, 0, Reg::Edx, 26),
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("sse4.1", 1, 0, Reg::Ecx, 19),
    ("sse4.2", 1, 0, Reg::Ecx, 20),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("mpx", 7, 0, Reg::Ebx, 14),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("avx512dq", 7, 0, Reg::Ebx, 17),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("avx512cd", 7, 0, Reg::Ebx, 28),
    ("sha", 7, 0, Reg::Ebx, 29),
    ("avx512bw", 7, 0, Reg::Ebx, 30),
    ("avx512vl", 7, 0, Reg::Ebx, 31),
    ("avx512vbmi", 7, 0, Reg::Ecx, 1),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("gfni", 7, 0, Reg::Ecx, 8),
    ("vaes", 7, 0, Reg::Ecx, 9),
    ("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    ("lahf", 0x8000_0001, 0, Reg::Ecx, 0),
    ("lzcnt", 0x8000_0001, 0, Reg::Ecx, 5),
    ("sse4a", 0x8000_0001, 0, Reg::Ecx, 6),
    ("prefetchw", 0x8000_0001, 0, Reg::Ecx, 8),
];

/// Longest back-end record read from a template (the longest this VMM writes is ~350 bytes).
const MAX_RECORD: usize = 1024;

/// The CPU a guest ran on, as the guest saw it through CPUID.
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
    #[error("the template was made on {made} with CPU features that {here} here lacks ({missing}); the template's code may use them: create it on this machine")]
    Features {
        made: String,
        here: String,
        missing: String,
    },
}


impl Cpu {
    /// The CPU a guest of this process sees: the host's own CPUID on PVM (which does not
    /// filter it), the vCPU's CPUID table on hardware KVM (the VMM sets the same table on
    /// every vCPU before it runs). Read once per process. `None` when that table cannot be
    /// read or is empty.
    fn of(backend: Backend, vcpu: &VcpuFd) -> Option<Cpu> {
        static PVM: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
        static HARDWARE: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
        match backend {
            Backend::Pvm => Some(
                PVM.get_or_init(|| {
                    Cpu::from_cpuid(|leaf, sub| {
                        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
                        [r.eax, r.ebx, r.ecx, r.edx]
                    })
                })
                .clone(),
            ),
            Backend::Hardware => {
                if let Some(cpu) = HARDWARE.get() {
                    return Some(cpu.clone());
                }
                let table = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).ok()?;
                let entries = table.as_slice();
                if entries.is_empty() {
                    return None;
                }
                let cpu = Cpu::from_cpuid(|leaf, sub| {
                    entries
                        .iter()
                        .find(|e| {
                            e.function == leaf
                                && (e.index == sub
                                    || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
                        })
                        .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
                });
                Some(HARDWARE.get_or_init(|| cpu).clone())
            }
        }
    }

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
        for (i, &(_, leaf, sub, reg, bit)) in FEATURES.iter().enumerate() {
            let supported = if leaf >= 0x8000_0000 { max_ext } else { max };
            if leaf > supported {
                continue;
            }
            let r = cpuid(leaf, sub);
            let v = match reg {
                Reg::Ebx => r[1],
                Reg::Ecx => r[2],
                Reg::Edx => r[3],
            };
            if v >> bit & 1 == 1 {
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
}

impl MadeOn {
    /// What a template made now, by this process on `backend` with `vcpu`, is made on.
    pub fn here(backend: Backend, vcpu: &VcpuFd) -> MadeOn {
        MadeOn {
            backend,
            cpu: Cpu::of(backend, vcpu),
        }
    }

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
    /// state holds that back end's registers and MSRs), and every CPU feature its guest
    /// could see (its code may use any of them). The vendor alone may differ.
    pub fn check_restore(&self, here: &MadeOn) -> Result<(), MadeOnMismatch> {
        if self.backend != here.backend {
            return Err(MadeOnMismatch::Backend {
                made: self.to_string(),
                here: here.to_string(),
            });
        }
        if let (Some(made), Some(cpu)) = (&self.cpu, &here.cpu) {
            let missing = made.features & !cpu.features;
            if missing != 0 {
                return Err(MadeOnMismatch::Features {
                    made: self.to_string(),
                    here: here.to_string(),
                    missing: Cpu::feature_names(missing).collect::<Vec<_>>().join(", "),
                });
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(e.contains("sse4a") && !e.contains("avx2"), "{e}");
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
