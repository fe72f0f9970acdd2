//! Deployed functions: what a deploy gives ([`DeploySpec`]), how it becomes a
//! [`FunctionSpec`] from the blobs in the store ([`resolve`]), and what a template must
//! have been built for to serve it ([`build_fingerprint`]). The template itself is made by
//! [`create_template`](crate::template::create::create_template); a daemon keeps the
//! spec in the store (content-addressed) so it can build the template again when the one
//! it has no longer fits this VMM.

use crate::engine::Engine;
use crate::error::{Error, ErrorKind};
use crate::guest::{EngineKind, FunctionSpec, GuestFile, RuntimeKind};
use snapshot_store::{BlobDigest, FunctionStore, FunctionStoreError};
use std::collections::BTreeMap;

/// Largest guest RAM a deployed function may ask for (MiB).
pub const MAX_MEMORY_MIB: u64 = 4096;
/// Most files a spec may list.
pub const MAX_FILES: usize = 1024;
/// Most arguments, and most environment variables, a spec may list.
pub const MAX_ARGS: usize = 1024;
/// Largest inline `source` or file `content` (bytes).
pub const MAX_INLINE_BYTES: usize = 8 << 20;

/// The language a function is written in, as a deploy names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// JavaScript, run by QuickJS-NG's WASI reactor.
    Js,
    /// Python, run by CPython for WASI.
    Python,
    /// Any WASI command module.
    Wasi,
}

impl Runtime {
    pub fn kind(self) -> RuntimeKind {
        match self {
            Runtime::Js => RuntimeKind::Qjs,
            Runtime::Python => RuntimeKind::Python,
            Runtime::Wasi => RuntimeKind::Wasi,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Js => "js",
            Runtime::Python => "python",
            Runtime::Wasi => "wasi",
        }
    }

    fn default_entry(self) -> &'static str {
        match self {
            Runtime::Js => "main.js",
            Runtime::Python => "main.py",
            Runtime::Wasi => "",
        }
    }
}

/// How a function's requests reach it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interface {
    /// The request body on stdin, the response body on stdout.
    #[default]
    Raw,
    /// One JSON event (AWS Lambda's HTTP API payload format 2.0) on stdin, one JSON
    /// response on stdout.
    Http,
}

/// When a function's template is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Build {
    /// While the deploy waits (its answer says what was built).
    #[default]
    Now,
    /// On the function's first invocation (SEUSS's cold start).
    OnFirstInvoke,
}

/// A file of the function's read-only tree: uploaded (by digest) or inline text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A deploy: everything that defines a function (see docs/api.md).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    pub runtime: Runtime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// `sha256:HEX` of an uploaded module (js/python: the runtime module; default: the
    /// daemon's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    #[serde(default)]
    pub interface: Interface,
    #[serde(default)]
    pub build: Build,
    #[serde(default)]
    pub public: bool,
}

impl DeploySpec {
    /// The script's file name in the guest (js/python).
    pub fn entry(&self) -> &str {
        self.entry
            .as_deref()
            .unwrap_or_else(|| self.runtime.default_entry())
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib.unwrap_or(vmm_abi::layout::DEFAULT_MEM_MIB)
    }

    /// Check what can be checked without the store: bounds, names, combinations. The
    /// message says which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self.runtime {
            Runtime::Js | Runtime::Python => {
                if self.source.is_none() && !self.files.iter().any(|f| f.path == self.entry()) {
                    return Err(format!(
                        "a {} function needs \"source\" (or a file named as \"entry\", {:?})",
                        self.runtime.name(),
                        self.entry()
                    ));
                }
            }
            Runtime::Wasi => {
                if self.module.is_none() {
                    return Err("a wasi function needs \"module\": the digest of a module uploaded with PUT /v1/modules".into());
                }
                if self.source.is_some() || self.entry.is_some() {
                    return Err("\"source\" and \"entry\" are for js and python functions; a wasi function is its module".into());
                }
            }
        }
        if let Some(m) = &self.module {
            if BlobDigest::parse(m).is_none() {
                return Err(format!(
                    "\"module\" {:?} is not sha256:HEX (64 hex digits)",
                    crate::text::shown(m)
                ));
            }
        }
        if self
            .source
            .as_ref()
            .is_some_and(|s| s.len() > MAX_INLINE_BYTES)
        {
            return Err(format!("\"source\" is over {MAX_INLINE_BYTES} bytes; upload it with PUT /v1/files and list it in \"files\""));
        }
        if self.runtime != Runtime::Wasi && !vmm_abi::valid_guest_path(self.entry().as_bytes()) {
            return Err(format!(
                "\"entry\" {:?} is not a valid relative file path",
                crate::text::shown(self.entry())
            ));
        }
        if self.args.len() > MAX_ARGS || self.env.len() > MAX_ARGS {
            return Err(format!(
                "at most {MAX_ARGS} \"args\" and {MAX_ARGS} \"env\" entries"
            ));
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!(
                    "\"env\" name {:?} is empty or holds '=' or NUL",
                    crate::text::shown(k)
                ));
            }
        }
        if self
            .args
            .iter()
            .chain(self.env.values())
            .any(|a| a.contains('\0'))
        {
            return Err("\"args\" and \"env\" values may not hold NUL".into());
        }
        if self.files.len() > MAX_FILES {
            return Err(format!("at most {MAX_FILES} \"files\""));
        }
        for f in &self.files {
            if !vmm_abi::valid_guest_path(f.path.as_bytes()) {
                return Err(format!(
                    "file path {:?} is not a valid relative path",
                    crate::text::shown(&f.path)
                ));
            }
            match (&f.digest, &f.content) {
                (Some(d), None) if BlobDigest::parse(d).is_some() => {}
                (Some(d), None) => {
                    return Err(format!("file {:?}: \"digest\" {:?} is not sha256:HEX", crate::text::shown(&f.path), crate::text::shown(d)))
                }
                (None, Some(c)) if c.len() <= MAX_INLINE_BYTES => {}
                (None, Some(_)) => return Err(format!("file {:?}: inline \"content\" over {MAX_INLINE_BYTES} bytes; upload it with PUT /v1/files", crate::text::shown(&f.path))),
                _ => return Err(format!("file {:?} needs exactly one of \"digest\" and \"content\"", crate::text::shown(&f.path))),
            }
            if self.source.is_some() && f.path == self.entry() {
                return Err(format!(
                    "file {:?} is also the \"entry\" the source is written to",
                    crate::text::shown(&f.path)
                ));
            }
        }
        let mem = self.memory_mib();
        if mem > MAX_MEMORY_MIB || crate::guest::check_mem(mem).is_err() {
            return Err(format!(
                "\"memory_mib\" must be an even number from {} to {MAX_MEMORY_MIB}",
                vmm_abi::layout::MIN_MEM_MIB
            ));
        }
        if let Some(t) = self.timeout_secs {
            if !(0.001..=3600.0).contains(&t) {
                return Err("\"timeout_secs\" must be from 0.001 to 3600".into());
            }
        }
        Ok(())
    }
}

/// The function `spec` defines, with its module and files read (and checked) from the
/// store's blobs. `runtime_module` is the module a js/python spec without `module` runs
/// on. Everything together must fit in the guest's memory.
pub fn resolve(
    store: &FunctionStore,
    spec: &DeploySpec,
    default_engine: EngineKind,
) -> Result<FunctionSpec, Error> {
    let step = "read the function's module and files";
    spec.validate()
        .map_err(|m| Error::new(ErrorKind::BadRequest, "check the function's spec", m))?;
    let mem_bytes = spec.memory_mib() << 20;
    let blob_err = |e: FunctionStoreError| {
        let kind = match e {
            FunctionStoreError::MissingBlob { .. } | FunctionStoreError::BlobTooLarge { .. } => {
                ErrorKind::BadRequest
            }
            FunctionStoreError::DamagedBlob { .. } => ErrorKind::Damaged,
            _ => ErrorKind::Host,
        };
        Error::new(kind, step, e)
    };
    let Some(module_digest) = spec.module.as_deref().and_then(BlobDigest::parse) else {
        return Err(Error::new(
            ErrorKind::BadRequest,
            step,
            format!(
                "no module for this {} function: this daemon has no runtime module for it",
                spec.runtime.name()
            ),
        ));
    };
    let module = store
        .get_blob(&module_digest, mem_bytes)
        .map_err(blob_err)?;
    if !module.starts_with(b"\0asm") {
        return Err(Error::new(
            ErrorKind::BadRequest,
            step,
            format!("module {module_digest} is not a WebAssembly binary"),
        ));
    }
    let mut budget = mem_bytes.saturating_sub(module.len() as u64);
    let mut files = Vec::with_capacity(spec.files.len() + 1);
    let too_big = || {
        Error::new(
            ErrorKind::BadRequest,
            step,
            format!(
                "the module and files do not fit in the function's {} MiB of memory",
                spec.memory_mib()
            ),
        )
    };
    if let Some(src) = &spec.source {
        budget = budget.checked_sub(src.len() as u64).ok_or_else(too_big)?;
        files.push(GuestFile {
            guest_path: spec.entry().to_string(),
            data: src.as_bytes().to_vec(),
        });
    }
    for f in &spec.files {
        let data = match (&f.digest, &f.content) {
            (Some(d), _) => {
                let d = BlobDigest::parse(d).ok_or_else(|| {
                    Error::new(
                        ErrorKind::BadRequest,
                        step,
                        "a file digest is not sha256:HEX",
                    )
                })?;
                match store.get_blob(&d, budget) {
                    Err(FunctionStoreError::BlobTooLarge { .. }) => return Err(too_big()),
                    r => r.map_err(blob_err)?,
                }
            }
            (None, Some(c)) => c.as_bytes().to_vec(),
            (None, None) => Vec::new(),
        };
        budget = budget.checked_sub(data.len() as u64).ok_or_else(too_big)?;
        files.push(GuestFile {
            guest_path: f.path.clone(),
            data,
        });
    }
    let mut args = Vec::with_capacity(spec.args.len() + 1);
    if spec.runtime != Runtime::Wasi {
        args.push(spec.entry().to_string());
    }
    args.extend(spec.args.iter().cloned());
    Ok(FunctionSpec {
        module,
        module_name: match spec.runtime {
            Runtime::Js => "qjs.wasm".into(),
            Runtime::Python => "python.wasm".into(),
            Runtime::Wasi => "module.wasm".into(),
        },
        runtime: spec.runtime.kind(),
        engine: spec.engine.unwrap_or(default_engine),
        files,
        args,
        env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    })
}

/// What a template must have been built for to serve here: the guest kernel, the
/// host-guest ABI, the device state format and the guest CPU model. A function whose
/// template was built for something else is built again from its spec.
pub fn build_fingerprint(engine: &Engine) -> Result<String, Error> {
    let cpu = engine.cpu()?;
    Ok(format!(
        "kernel={:016x} abi={} state={} cpu={:016x}",
        crate::template::device::kernel_hash(),
        vmm_abi::ABI_VERSION,
        crate::template::device::DEVICE_STATE_VERSION,
        xxhash_rust::xxh3::xxh3_64(cpu.record().as_bytes()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn js() -> DeploySpec {
        DeploySpec {
            runtime: Runtime::Js,
            source: Some("x".into()),
            entry: None,
            module: None,
            engine: None,
            args: vec![],
            env: BTreeMap::new(),
            files: vec![],
            memory_mib: None,
            timeout_secs: None,
            interface: Interface::Raw,
            build: Build::Now,
            public: false,
        }
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        assert!(js().validate().is_ok());
        let mut s = js();
        s.source = None;
        assert!(s.validate().unwrap_err().contains("source"));
        let mut s = js();
        s.entry = Some("../x.js".into());
        assert!(s.validate().unwrap_err().contains("entry"));
        let mut s = js();
        s.memory_mib = Some(1 << 20);
        assert!(s.validate().unwrap_err().contains("memory_mib"));
        let mut s = js();
        s.env.insert("A=B".into(), "c".into());
        assert!(s.validate().unwrap_err().contains("env"));
        let mut s = js();
        s.files.push(FileRef {
            path: "a".into(),
            digest: None,
            content: None,
        });
        assert!(s.validate().unwrap_err().contains("exactly one"));
        let mut s = js();
        s.runtime = Runtime::Wasi;
        assert!(s.validate().unwrap_err().contains("module"));
        let mut s = js();
        s.module = Some("sha256:12".into());
        assert!(s.validate().unwrap_err().contains("sha256"));
        let mut s = js();
        s.timeout_secs = Some(f64::NAN);
        assert!(s.validate().is_err());
    }
}
