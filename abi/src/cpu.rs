//! The guest's CPU as `cpuid` shows it, read the same way on both sides.
//!
//! The VMM sets one CPUID table on every vCPU (its guest CPU model, `vmm/src/cpu.rs`) and
//! compiles wasm ahead of time for the features that table shows; the guest's wasmtime
//! checks an artifact against what its own `cpuid` reports. Both decide "does this CPU have
//! feature X" with [`wasmtime_feature`] over the same [`CpuidRegs`], so the compiler can
//! only enable what the guest will detect. The guest reports the registers it read in the
//! mailbox ([`crate::Mailbox::cpuid`]) so that the VMM can show and check them.

/// The CPUID registers that carry the features either side asks about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    /// Leaf 1: ECX and EDX.
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    /// Leaf 7, subleaf 0: EBX and ECX (0 when leaf 7 is above the maximum basic leaf).
    pub leaf7_ebx: u32,
    pub leaf7_ecx: u32,
    /// Leaf 0x8000_0001: ECX and EDX (0 when above the maximum extended leaf).
    pub ext1_ecx: u32,
    pub ext1_edx: u32,
}

/// Words of [`CpuidRegs`] in the mailbox.
pub const CPUID_WORDS: usize = 3;

impl CpuidRegs {
    /// Read the registers through `cpuid(leaf, subleaf) -> [eax, ebx, ecx, edx]` (the
    /// instruction in the guest, a CPUID table in the VMM).
    pub fn read(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> CpuidRegs {
        let max = cpuid(0, 0)[0];
        let max_ext = cpuid(0x8000_0000, 0)[0];
        let l1 = if max >= 1 { cpuid(1, 0) } else { [0; 4] };
        let l7 = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
        // Below 0x8000_0000 the "maximum extended leaf" is garbage (or 0): no such leaves.
        let e1 = if (0x8000_0001..0x8000_1000).contains(&max_ext) {
            cpuid(0x8000_0001, 0)
        } else {
            [0; 4]
        };
        CpuidRegs {
            leaf1_ecx: l1[2],
            leaf1_edx: l1[3],
            leaf7_ebx: l7[1],
            leaf7_ecx: l7[2],
            ext1_ecx: e1[2],
            ext1_edx: e1[3],
        }
    }

    /// The mailbox words: each pair as `low | high << 32`.
    pub fn to_words(&self) -> [u64; CPUID_WORDS] {
        let w = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        [
            w(self.leaf1_ecx, self.leaf1_edx),
            w(self.leaf7_ebx, self.leaf7_ecx),
            w(self.ext1_ecx, self.ext1_edx),
        ]
    }

    /// The inverse of [`CpuidRegs::to_words`] (any words are valid).
    pub fn from_words(w: [u64; CPUID_WORDS]) -> CpuidRegs {
        CpuidRegs {
            leaf1_ecx: w[0] as u32,
            leaf1_edx: (w[0] >> 32) as u32,
            leaf7_ebx: w[1] as u32,
            leaf7_ecx: (w[1] >> 32) as u32,
            ext1_ecx: w[2] as u32,
            ext1_edx: (w[2] >> 32) as u32,
        }
    }
}

/// Whether the CPU these registers describe has `feature`, named as wasmtime's
/// `Config::detect_host_feature` asks ("sse4.1", "bmi2", ...). `None` for a name this
/// function does not know, which makes wasmtime refuse an artifact that needs it.
/// AVX and everything built on it is reported missing whatever the registers say: it needs
/// XSAVE state enabled in XCR0, which the guest does not do (the PVM back end kills a guest
/// that executes `xsetbv`).
pub fn wasmtime_feature(regs: &CpuidRegs, feature: &str) -> Option<bool> {
    let bit = |r: u32, n: u32| r & (1 << n) != 0;
    Some(match feature {
        "sse3" => bit(regs.leaf1_ecx, 0),
        "ssse3" => bit(regs.leaf1_ecx, 9),
        "cmpxchg16b" => bit(regs.leaf1_ecx, 13),
        "sse4.1" => bit(regs.leaf1_ecx, 19),
        "sse4.2" => bit(regs.leaf1_ecx, 20),
        "popcnt" => bit(regs.leaf1_ecx, 23),
        "bmi1" => bit(regs.leaf7_ebx, 3),
        "bmi2" => bit(regs.leaf7_ebx, 8),
        "lzcnt" => bit(regs.ext1_ecx, 5),
        f if f.starts_with("avx") || f == "fma" => false,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID table as `(leaf, subleaf, [eax, ebx, ecx, edx])`.
    fn table(entries: &[(u32, u32, [u32; 4])]) -> impl Fn(u32, u32) -> [u32; 4] + '_ {
        move |leaf, sub| {
            entries
                .iter()
                .find(|e| e.0 == leaf && e.1 == sub)
                .map_or([0; 4], |e| e.2)
        }
    }

    #[test]
    fn reads_features_and_round_trips_the_mailbox_words() {
        let t = [
            (0, 0, [0xd, 0, 0, 0]),
            (1, 0, [0, 0, 0xfffa_3203, 0x178b_fbff]),
            (7, 0, [0, 0xf1bf_07ab, 0x0040_069c, 0]),
            (0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            (0x8000_0001, 0, [0, 0, 0x0040_03f3, 0x2fd3_fbff]),
        ];
        let regs = CpuidRegs::read(table(&t));
        assert_eq!(regs.leaf1_ecx, 0xfffa_3203);
        assert_eq!(regs.ext1_edx, 0x2fd3_fbff);
        assert_eq!(CpuidRegs::from_words(regs.to_words()), regs);
        for f in [
            "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "bmi1", "bmi2", "lzcnt",
        ] {
            assert_eq!(wasmtime_feature(&regs, f), Some(true), "{f}");
        }
        assert_eq!(wasmtime_feature(&regs, "avx2"), Some(false));
        assert_eq!(wasmtime_feature(&regs, "fma"), Some(false));
        assert_eq!(wasmtime_feature(&regs, "no-such-feature"), None);
    }

    #[test]
    fn leaves_above_the_maximum_read_as_zero() {
        // Leaf 7 present in the table but the maximum basic leaf is 1; no extended leaves.
        let t = [
            (0, 0, [1, 0, 0, 0]),
            (1, 0, [0, 0, 1, 0]),
            (7, 0, [0, !0, !0, 0]),
            (0x8000_0001, 0, [0, 0, !0, !0]),
        ];
        let regs = CpuidRegs::read(table(&t));
        assert_eq!(regs.leaf7_ebx, 0);
        assert_eq!(regs.ext1_ecx, 0);
        assert_eq!(wasmtime_feature(&regs, "sse3"), Some(true));
        assert_eq!(wasmtime_feature(&regs, "bmi1"), Some(false));
        assert_eq!(CpuidRegs::read(table(&[])), CpuidRegs::default());
    }
}
