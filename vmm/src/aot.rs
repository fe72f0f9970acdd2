//! Ahead-of-time compilation for the guest's wasmtime: Cranelift compiles a module on the
//! host into an artifact for the guest kernel (`x86_64-unknown-none`), with exactly the
//! engine settings the guest's runtime uses (`abi/src/wasmtime_config.rs`, included by both
//! sides) and the CPU features of the guest CPU model (`crate::cpu::GuestCpu`, the CPUID
//! table the VMM sets on every vCPU), never the host's: SSE up to 4.2 and POPCNT are
//! required, BMI1/BMI2/LZCNT used when the model has them, AVX never (it needs XCR0 set up
//! in the guest). Each feature is decided by `vmm_abi::cpu::wasmtime_feature` over the
//! model's table, the same function the guest's wasmtime answers from its own `cpuid`
//! with, so the guest's `Module::deserialize` (which refuses an artifact made with other
//! settings) accepts what this compiles.
//!
//! [`Compiler::fingerprint`] names everything an artifact depends on besides the module
//! (wasmtime version, target, the guest CPU model's features, memory settings, and
//! wasmtime's own hash of its compilation settings): with the module's hash it is the key
//! under which a compiled artifact may be cached, so an artifact compiled for one model is
//! never handed to a guest of another.
//!
//! Without the library's `compiler` feature (on by default; `vmm-store`, which only checks
//! templates, turns it off and so builds no Cranelift) [`Compiler::new`] fails with
//! [`AotError::Setup`] saying so.

#[cfg(feature = "compiler")]
use std::hash::Hasher;
#[cfg(feature = "compiler")]
use vmm_abi::wasmtime_settings as settings;

#[cfg(feature = "compiler")]
include!("../../abi/src/wasmtime_config.rs");

/// Why a module could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum AotError {
    /// The module is not valid WebAssembly (or uses a feature the engine does not enable).
    #[error("module is not valid WebAssembly: {0}")]
    InvalidModule(String),
    /// The guest CPU model lacks a feature every artifact is compiled with.
    #[error("the guest CPU model ({model}) lacks {feature}, which code compiled for the guest's wasmtime requires (the wasmi engine needs no such feature)")]
    MissingCpuFeature {
        feature: &'static str,
        model: String,
    },
    /// The compiler could not be set up (a bug: the settings are fixed).
    #[error("cannot set up the WebAssembly compiler: {0}")]
    Setup(String),
}

/// A Cranelift compiler configured for the guest.
pub struct Compiler {
    #[cfg(feature = "compiler")]
    engine: wasmtime::Engine,
    fingerprint: String,
    /// The CPU features compiled for (wasmtime's names: `sse4.1`, `bmi2`, ...).
    features: Vec<&'static str>,
}

/// `{e}` with its causes.
#[cfg(feature = "compiler")]
fn chain(e: &wasmtime::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(": ");
        s.push_str(&cause.to_string());
    }
    s
}

impl Compiler {
    /// The compiler for guests of the CPU model `cpu`.
    #[cfg(not(feature = "compiler"))]
    pub fn new(_cpu: &crate::cpu::GuestCpu) -> Result<Compiler, AotError> {
        Err(AotError::Setup(
            "this build of the vmm library has no compiler (its cargo feature `compiler` is off)"
                .into(),
        ))
    }

    /// The compiler for guests of the CPU model `cpu`.
    #[cfg(feature = "compiler")]
    pub fn new(cpu: &crate::cpu::GuestCpu) -> Result<Compiler, AotError> {
        let regs = cpu.regs();
        let has = |feature: &str| vmm_abi::cpu::wasmtime_feature(&regs, feature) == Some(true);
        let mut config = wasmtime::Config::new();
        apply_shared_settings(&mut config);
        // Cargo unifies this crate's wasmtime features with those of wasmtime-wasi (the
        // bench's host-process runner), which turn the component model on by default; the
        // guest's runtime has none of it and refuses an artifact compiled with any
        // component-model feature enabled, so they are all switched off here.
        for (name, feature) in wasmtime::WasmFeatures::all().iter_names() {
            if name.starts_with("CM_") || name == "COMPONENT_MODEL" {
                config.wasm_features(feature, false);
            }
        }
        config
            .target(settings::TARGET)
            .map_err(|e| AotError::Setup(chain(&e)))?;
        // SAFETY: the guest's code is built with hardware floats (vmm/build.rs, which also
        // refuses an image that calls the target's soft-float library with floats), so
        // compiled code and the guest's runtime agree on how floats are passed.
        unsafe { config.x86_float_abi_ok(true) };
        let mut flags = Vec::new();
        let mut features = Vec::new();
        for (flag, feature) in settings::REQUIRED_FEATURES {
            if !has(feature) {
                return Err(AotError::MissingCpuFeature {
                    feature,
                    model: cpu.record(),
                });
            }
            flags.push(*flag);
            features.push(*feature);
        }
        for (flag, feature) in settings::OPTIONAL_FEATURES {
            if has(feature) {
                flags.push(*flag);
                features.push(*feature);
            }
        }
        for flag in &flags {
            // SAFETY: each flag is a CPU feature the guest CPU model has (checked above):
            // the model's CPUID table is set on every vCPU, and on PVM it only has features
            // the host CPU executes. The guest's wasmtime checks them again with `cpuid`
            // when it loads the artifact, and refuses one it does not find.
            unsafe { config.cranelift_flag_enable(flag) };
        }
        let engine = wasmtime::Engine::new(&config).map_err(|e| AotError::Setup(chain(&e)))?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
        let fingerprint = format!(
            "wasmtime {} target {} guest cpu model {} memory reservation {} guard {} growth {} stack {} settings {:016x}",
            settings::VERSION,
            settings::TARGET,
            flags.join(","),
            settings::MEMORY_RESERVATION,
            settings::MEMORY_GUARD_SIZE,
            settings::MEMORY_RESERVATION_FOR_GROWTH,
            settings::MAX_WASM_STACK,
            h.finish()
        );
        Ok(Compiler {
            engine,
            fingerprint,
            features,
        })
    }

    /// The guest CPU features the artifacts are compiled for (wasmtime's names).
    pub fn features(&self) -> &[&'static str] {
        &self.features
    }

    /// Everything an artifact depends on besides its module (see the module docs).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The key under which the artifact of `wasm` may be cached: the module's xxh3-128 and
    /// the xxh3-64 of [`Compiler::fingerprint`] (an artifact made under another key must
    /// not be handed to this guest: its `Module::deserialize` would refuse it).
    pub fn cache_key(&self, wasm: &[u8]) -> String {
        format!(
            "{:032x}-{:016x}",
            xxhash_rust::xxh3::xxh3_128(wasm),
            xxhash_rust::xxh3::xxh3_64(self.fingerprint.as_bytes())
        )
    }

    /// Compile `wasm` (binary WebAssembly) into an artifact for the guest.
    pub fn compile(&self, wasm: &[u8]) -> Result<Vec<u8>, AotError> {
        #[cfg(feature = "compiler")]
        return self
            .engine
            .precompile_module(wasm)
            .map_err(|e| AotError::InvalidModule(chain(&e)));
        #[cfg(not(feature = "compiler"))]
        Err(AotError::Setup(format!(
            "no compiler in this build, for {} bytes of module",
            wasm.len()
        )))
    }
}

#[cfg(all(test, feature = "compiler"))]
mod tests {
    use super::*;

    /// The compiler's settings come from the guest CPU model, and the guest, reading the
    /// model's table with `cpuid`, detects every feature an artifact is compiled for:
    /// checked on the model of the AMD EPYC PVM host where artifacts compiled for the host's
    /// own features were refused (`has_sse3 is enabled, but not available on the host`).
    #[test]
    fn compile_settings_and_the_guests_detection_agree() {
        use crate::cpu::recorded;
        for model in recorded::pvm_models("") {
            agree(&model);
        }
    }

    fn agree(model: &crate::cpu::GuestCpu) {
        use crate::cpu::recorded;
        let c = Compiler::new(model).expect("a compiler for the model");
        // Everything the guest's wasmtime may be asked about, as the guest would answer it.
        let guest = |f: &str| vmm_abi::cpu::wasmtime_feature(&model.regs(), f);
        let all: Vec<&str> = settings::REQUIRED_FEATURES
            .iter()
            .chain(settings::OPTIONAL_FEATURES)
            .map(|(_, f)| *f)
            .collect();
        for f in &all {
            assert_eq!(
                c.features().contains(f),
                guest(f) == Some(true),
                "{f}: compiled for {:?}",
                c.features()
            );
        }
        assert_eq!(c.features(), &all[..], "these hosts' models have them all");
        for (flag, _) in settings::REQUIRED_FEATURES
            .iter()
            .chain(settings::OPTIONAL_FEATURES)
        {
            assert!(c.fingerprint().contains(flag), "{}", c.fingerprint());
        }
        // A model without LZCNT and BMI2: neither compiled for, and another cache key.
        let smaller = recorded::amd_epyc_pvm_model("lzcnt,bmi2");
        let s = Compiler::new(&smaller).unwrap();
        assert!(!s.features().contains(&"lzcnt") && !s.features().contains(&"bmi2"));
        assert!(
            !s.fingerprint().contains("has_lzcnt"),
            "{}",
            s.fingerprint()
        );
        let wasm = wat::parse_str("(module)").unwrap();
        assert_ne!(c.cache_key(&wasm), s.cache_key(&wasm));
        // A model without a required feature: refused, naming the feature and the model.
        let bare = recorded::amd_epyc_pvm_model("sse4.1");
        let Err(e) = Compiler::new(&bare) else {
            panic!("compiled without SSE4.1")
        };
        let e = e.to_string();
        assert!(e.contains("sse4.1") && e.contains(&bare.record()), "{e}");
    }

    #[test]
    fn compiles_for_the_guest_and_refuses_what_is_not_wasm() {
        let c = Compiler::new(&crate::cpu::recorded::amd_epyc_pvm_model(""))
            .expect("a compiler for the model");
        let wasm =
            wat::parse_str(r#"(module (func (export "f") (result i32) i32.const 7))"#).unwrap();
        let artifact = c.compile(&wasm).expect("compiles");
        assert!(artifact.starts_with(b"\x7fELF"), "an ELF artifact");
        assert!(
            c.fingerprint().contains(settings::VERSION),
            "{}",
            c.fingerprint()
        );
        assert!(c.fingerprint().contains("has_sse41"), "{}", c.fingerprint());
        assert!(!c.fingerprint().contains("avx"), "{}", c.fingerprint());
        let key = c.cache_key(&wasm);
        assert_eq!(key, c.cache_key(&wasm));
        assert_ne!(
            key,
            c.cache_key(b"\0asm\x01\0\0\0"),
            "the module is part of the key"
        );
        let e = c.compile(b"not wasm").unwrap_err();
        assert!(matches!(e, AotError::InvalidModule(_)), "{e}");
        assert!(e.to_string().contains("not valid WebAssembly"), "{e}");
    }
}
