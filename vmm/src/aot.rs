//! Ahead-of-time compilation for the guest's wasmtime: Cranelift compiles a module on the
//! host into an artifact for the guest kernel (`x86_64-unknown-none`), with exactly the
//! engine settings the guest's runtime uses (`abi/src/wasmtime_config.rs`, included by both
//! sides) and the CPU features the guest may use (SSE up to 4.2 and POPCNT always;
//! BMI1/BMI2/LZCNT when this CPU has them; never AVX, which needs XCR0 set up in the
//! guest). The guest loads the artifact with `Module::deserialize`, which refuses one made
//! with other settings.
//!
//! [`Compiler::fingerprint`] names everything an artifact depends on besides the module
//! (wasmtime version, target, CPU features, memory settings, and wasmtime's own hash of its
//! compilation settings): with the module's hash it is the key under which a compiled
//! artifact may be cached.

use std::hash::Hasher;
use vmm_abi::wasmtime_settings as settings;

include!("../../abi/src/wasmtime_config.rs");

/// Why a module could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum AotError {
    /// The module is not valid WebAssembly (or uses a feature the engine does not enable).
    #[error("module is not valid WebAssembly: {0}")]
    InvalidModule(String),
    /// This CPU lacks a feature every artifact is compiled with.
    #[error("this CPU lacks {0}, which the guest's compiled code requires")]
    MissingCpuFeature(&'static str),
    /// The compiler could not be set up (a bug: the settings are fixed).
    #[error("cannot set up the WebAssembly compiler: {0}")]
    Setup(String),
}

/// A Cranelift compiler configured for the guest.
pub struct Compiler {
    engine: wasmtime::Engine,
    fingerprint: String,
}

/// `{e}` with its causes.
fn chain(e: &wasmtime::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(": ");
        s.push_str(&cause.to_string());
    }
    s
}

/// Whether this CPU has `feature` (as named in `vmm_abi::wasmtime_settings`).
fn host_has(feature: &str) -> bool {
    match feature {
        "sse3" => std::arch::is_x86_feature_detected!("sse3"),
        "ssse3" => std::arch::is_x86_feature_detected!("ssse3"),
        "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "popcnt" => std::arch::is_x86_feature_detected!("popcnt"),
        "bmi1" => std::arch::is_x86_feature_detected!("bmi1"),
        "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
        "lzcnt" => std::arch::is_x86_feature_detected!("lzcnt"),
        _ => false,
    }
}

impl Compiler {
    /// The compiler for this CPU.
    pub fn new() -> Result<Compiler, AotError> {
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
        for (flag, feature) in settings::REQUIRED_FEATURES {
            if !host_has(feature) {
                return Err(AotError::MissingCpuFeature(feature));
            }
            flags.push(*flag);
        }
        for (flag, feature) in settings::OPTIONAL_FEATURES {
            if host_has(feature) {
                flags.push(*flag);
            }
        }
        for flag in &flags {
            // SAFETY: each flag is a CPU feature this CPU has (checked above), and the guest
            // runs on this CPU (its wasmtime checks them again with CPUID when it loads).
            unsafe { config.cranelift_flag_enable(flag) };
        }
        let engine = wasmtime::Engine::new(&config).map_err(|e| AotError::Setup(chain(&e)))?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut h);
        let fingerprint = format!(
            "wasmtime {} target {} cpu {} memory reservation {} guard {} growth {} stack {} settings {:016x}",
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
        })
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
        self.engine
            .precompile_module(wasm)
            .map_err(|e| AotError::InvalidModule(chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_for_the_guest_and_refuses_what_is_not_wasm() {
        let c = Compiler::new().expect("a compiler for this CPU");
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
