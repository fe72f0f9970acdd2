//! What a template records beside its memory and vCPU: the hostcall the guest waits in
//! ([`DeviceState`]), what its runtime base was made from ([`Provenance`]) and which base
//! a function template was made on ([`BaseRef`]). Decoded under a size limit: the bytes
//! come from the store and are hostile input.

use crate::guest::{FunctionSpec, RuntimeKind};
use crate::text::decode_error_text;

/// The WebAssembly engines inside the guest kernel, by the names templates record (see
/// [`crate::guest::EngineKind::name`]). The kernel's hash (also recorded) pins their exact
/// build; the name tells engines apart.
pub const ENGINES: &[&str] = &["wasmtime", "wasmi"];

/// What a runtime base was made from. Two bases with equal provenance run the same code.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Provenance {
    /// xxh3-128 of the module's bytes (the binary, after `.wat` text is compiled).
    pub module_hash: u128,
    /// The module's file name, for messages.
    pub module_name: String,
    /// `wasi`, `qjs` or `python`.
    pub runtime: String,
    pub engine: String,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// xxh3-64 of the guest kernel image.
    pub kernel_hash: u64,
    pub abi_version: u64,
}

/// The runtime base a function template was made on: its name and creation time.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct BaseRef {
    pub name: String,
    pub created_unix_ms: u64,
}

pub fn runtime_name(r: RuntimeKind) -> &'static str {
    match r {
        RuntimeKind::Wasi => "wasi",
        RuntimeKind::Qjs => "qjs",
        RuntimeKind::Python => "python",
    }
}

/// xxh3-64 of the guest kernel this VMM boots (0 if it cannot be read).
pub fn kernel_hash() -> u64 {
    crate::guest::guest_kernel_image()
        .map(|k| xxhash_rust::xxh3::xxh3_64(&k))
        .unwrap_or(0)
}

impl Provenance {
    /// Whether two provenances describe the same code (the module's file name, kept
    /// for messages, may differ: a base made by `vmm template create` from a file and a
    /// function deployed from the same bytes stored as a blob name it differently).
    pub fn same_code(&self, other: &Provenance) -> bool {
        Provenance {
            module_name: String::new(),
            ..self.clone()
        } == Provenance {
            module_name: String::new(),
            ..other.clone()
        }
    }

    /// The provenance a base made now for `spec` with `mem_mib` MiB of guest memory has.
    pub fn of(spec: &FunctionSpec, mem_mib: u64) -> Provenance {
        Provenance {
            module_hash: xxhash_rust::xxh3::xxh3_128(&spec.module),
            module_name: spec.module_name.clone(),
            runtime: runtime_name(spec.runtime).into(),
            engine: spec.engine.name().into(),
            mem_size: mem_mib.saturating_mul(1 << 20),
            kernel_hash: kernel_hash(),
            abi_version: vmm_abi::ABI_VERSION,
        }
    }
}

/// Version 2 added `provenance` and `base`; version 1 states still decode (without them).
pub const DEVICE_STATE_VERSION: u32 = 2;
const MAX_DEVICE_STATE_BYTES: usize = 1 << 20;

/// What the guest was waiting for when the template was taken, and how it was set up.
#[derive(Debug, Clone, bincode::Encode, bincode::Decode)]
pub struct DeviceState {
    pub version: u32,
    /// `Op::GetFunction` (runtime base) or `Op::ReadStdin` (function template).
    pub pending_op: u64,
    pub buf_gpa: u64,
    pub buf_len: u64,
    pub runtime: String,
    pub module_name: String,
    /// The function's arguments (empty for a runtime base), for `template ls`.
    pub args: Vec<String>,
    /// What the runtime base under this template was made from (version 2 on).
    pub provenance: Option<Provenance>,
    /// Function templates: the runtime base they were made on (version 2 on).
    pub base: Option<BaseRef>,
}

/// The version 1 encoding: the fields up to `args` (also the start of every later one).
#[derive(bincode::Encode, bincode::Decode)]
struct DeviceStateV1 {
    version: u32,
    pending_op: u64,
    buf_gpa: u64,
    buf_len: u64,
    runtime: String,
    module_name: String,
    args: Vec<String>,
}

/// A device state that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("{0}")]
    Damaged(String),
    #[error("version {0}, from a newer vmm")]
    Newer(u32),
}

impl DeviceState {
    /// The encoding of `self.version` (version 1 without the fields it did not have).
    pub fn encode(&self) -> Vec<u8> {
        let cfg = bincode::config::standard();
        if self.version == 1 {
            let v1 = DeviceStateV1 {
                version: 1,
                pending_op: self.pending_op,
                buf_gpa: self.buf_gpa,
                buf_len: self.buf_len,
                runtime: self.runtime.clone(),
                module_name: self.module_name.clone(),
                args: self.args.clone(),
            };
            return bincode::encode_to_vec(v1, cfg).unwrap_or_default();
        }
        bincode::encode_to_vec(self, cfg).unwrap_or_default()
    }

    /// Decode a version 1 or 2 state (bounded: at most 1 MiB is decoded).
    pub fn decode(b: &[u8]) -> Result<Self, DeviceStateError> {
        let cfg = bincode::config::standard().with_limit::<MAX_DEVICE_STATE_BYTES>();
        let damaged =
            |e: bincode::error::DecodeError| DeviceStateError::Damaged(decode_error_text(&e));
        let trailing = |used: usize| {
            DeviceStateError::Damaged(format!("{} bytes follow its end", b.len() - used))
        };
        let (v1, used): (DeviceStateV1, usize) =
            bincode::decode_from_slice(b, cfg).map_err(damaged)?;
        match v1.version {
            1 if used == b.len() => Ok(DeviceState {
                version: 1,
                pending_op: v1.pending_op,
                buf_gpa: v1.buf_gpa,
                buf_len: v1.buf_len,
                runtime: v1.runtime,
                module_name: v1.module_name,
                args: v1.args,
                provenance: None,
                base: None,
            }),
            1 => Err(trailing(used)),
            DEVICE_STATE_VERSION => {
                let (d, used): (DeviceState, usize) =
                    bincode::decode_from_slice(b, cfg).map_err(damaged)?;
                if used != b.len() {
                    return Err(trailing(used));
                }
                Ok(d)
            }
            v if v > DEVICE_STATE_VERSION => Err(DeviceStateError::Newer(v)),
            v => Err(DeviceStateError::Damaged(format!("version {v}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_abi::Op;

    fn state(base: Option<BaseRef>) -> DeviceState {
        DeviceState::decode(&super::super::checks::fixtures::states(64 << 20, base).1).unwrap()
    }

    fn damaged(b: &[u8]) -> String {
        match DeviceState::decode(b) {
            Err(DeviceStateError::Damaged(why)) => why,
            other => panic!("expected a damaged state, got {other:?}"),
        }
    }

    #[test]
    fn version_2_reads_back() {
        let mut d = state(Some(BaseRef {
            name: "rt".into(),
            created_unix_ms: 7,
        }));
        d.args = vec!["a".into(), "b c".into()];
        let back = DeviceState::decode(&d.encode()).unwrap();
        assert_eq!(back.version, DEVICE_STATE_VERSION);
        assert_eq!(back.pending_op, Op::ReadStdin as u64);
        assert_eq!((back.buf_gpa, back.buf_len), (d.buf_gpa, d.buf_len));
        assert_eq!((back.runtime, back.module_name), (d.runtime, d.module_name));
        assert_eq!(back.args, d.args);
        assert_eq!(back.provenance, d.provenance);
        assert_eq!(back.base, d.base);
    }

    #[test]
    fn version_1_reads_back_without_provenance_or_base() {
        let mut d = state(None);
        d.version = 1;
        let b = d.encode();
        // Shorter than version 2's encoding of the same state.
        d.version = DEVICE_STATE_VERSION;
        assert!(b.len() < d.encode().len());
        let back = DeviceState::decode(&b).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.module_name, d.module_name);
        assert_eq!((back.buf_gpa, back.buf_len), (d.buf_gpa, d.buf_len));
        assert!(back.provenance.is_none() && back.base.is_none());
    }

    #[test]
    fn other_versions_and_damaged_encodings_are_refused() {
        let mut d = state(None);
        d.version = DEVICE_STATE_VERSION + 1;
        assert!(matches!(
            DeviceState::decode(&d.encode()),
            Err(DeviceStateError::Newer(v)) if v == DEVICE_STATE_VERSION + 1
        ));
        d.version = 0;
        assert_eq!(damaged(&d.encode()), "version 0");
        // Bytes after the end, in either version.
        for version in [1, DEVICE_STATE_VERSION] {
            d.version = version;
            let mut b = d.encode();
            b.extend_from_slice(&[0, 0, 0]);
            assert_eq!(damaged(&b), "3 bytes follow its end");
        }
        // Cut short.
        d.version = DEVICE_STATE_VERSION;
        let b = d.encode();
        assert!(damaged(&b[..b.len() - 1]).contains("too early"));
        assert!(damaged(&[]).contains("too early"));
        // A length past the 1 MiB limit is not allocated.
        d.args = vec!["x".repeat(MAX_DEVICE_STATE_BYTES + 1)];
        assert!(damaged(&d.encode()).contains("size limit"));
    }
}
