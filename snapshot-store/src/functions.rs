//! Deployed functions in a store: content-addressed blobs (modules, files, a function's
//! spec) under `blobs/`, and one small record per function under `functions/` that names
//! its current version, its spec's blob and the template it serves from.
//!
//! Blobs are named by their SHA-256, written once (temporary file, fsync, rename) and
//! checked against their name whenever they are read. A record is the only mutable part:
//! replaced whole by a rename, and refused when its checksum or fields do not hold.

use crate::format::{fsync_dir, write_atomic};
use crate::TemplateName;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The SHA-256 of a blob, written `sha256:HEX`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobDigest(pub [u8; 32]);

impl BlobDigest {
    pub fn of(bytes: &[u8]) -> BlobDigest {
        BlobDigest(Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `sha256:HEX` (64 lower- or upper-case hex digits); `None` for anything else.
    pub fn parse(s: &str) -> Option<BlobDigest> {
        let hex = s.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(BlobDigest(out))
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FunctionStoreError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("blob {digest} is not in the store")]
    MissingBlob { digest: BlobDigest },
    #[error("blob {digest} ({path}) is damaged: its bytes hash to {actual}")]
    DamagedBlob {
        digest: BlobDigest,
        path: PathBuf,
        actual: BlobDigest,
    },
    #[error("blob {digest} is {size} bytes, over the {limit}-byte limit of this read")]
    BlobTooLarge {
        digest: BlobDigest,
        size: u64,
        limit: u64,
    },
    #[error("function record {path} is damaged: {why}")]
    DamagedRecord { path: PathBuf, why: String },
    #[error("{name:?} is not a valid function name (1 to 64 of A-Z a-z 0-9 _ -, starting with a letter or digit)")]
    BadName { name: String },
}

/// What a store records about one deployed function.
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct FunctionRecord {
    pub name: String,
    /// Starts at 1; every deploy of the name adds one (also after a removal, so that a
    /// version number is never reused for different code).
    pub version: u64,
    /// The blob holding the function's spec (the daemon's JSON).
    pub spec: [u8; 32],
    /// The function template this version serves from, once built.
    pub template: Option<String>,
    /// What the template was built for (guest kernel, ABI, CPU model): a template built
    /// for something else no longer fits and is built again from the spec.
    pub built_for: Option<String>,
    pub created_unix_ms: u64,
    /// Removed (kept so the next deploy of the name continues its version numbers).
    pub removed: bool,
}

impl FunctionRecord {
    pub fn spec_digest(&self) -> BlobDigest {
        BlobDigest(self.spec)
    }
}

const RECORD_MAGIC: &[u8; 8] = b"VMMFUNC1";
/// Where blobs and records are written before their rename.
const FN_TMP: &str = "fn-tmp";
/// Largest record accepted (a name, a template name and a fingerprint fit in far less).
const RECORD_LIMIT: u64 = 16 << 10;

/// A function name: what [`TemplateName`] allows, at most 64 characters, no dots (the
/// templates of its versions are named `fn.NAME.vN`).
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The template of version `version` of function `name`.
pub fn function_template_name(name: &str, version: u64) -> String {
    format!("fn.{name}.v{version}")
}

/// Blobs and function records of the store in `dir` (created on first write).
#[derive(Clone, Debug)]
pub struct FunctionStore {
    dir: PathBuf,
}

impl FunctionStore {
    pub fn new(store_dir: &Path) -> FunctionStore {
        FunctionStore {
            dir: store_dir.to_path_buf(),
        }
    }

    fn blob_path(&self, d: &BlobDigest) -> PathBuf {
        self.dir.join("blobs").join(format!("{}.blob", d.hex()))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join("functions").join(format!("{name}.fn"))
    }

    fn ensure_dir(&self, sub: &str) -> Result<PathBuf, FunctionStoreError> {
        let p = self.dir.join(sub);
        fs::create_dir_all(&p).map_err(|source| FunctionStoreError::Io {
            what: "create",
            path: p.clone(),
            source,
        })?;
        Ok(p)
    }

    /// Store `bytes` (once): its digest and whether it was new.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<(BlobDigest, bool), FunctionStoreError> {
        let d = BlobDigest::of(bytes);
        if self.has_blob(&d) {
            return Ok((d, false));
        }
        self.ensure_dir("blobs")?;
        // Not the store's tmp/: a template commit empties that under its lock, which
        // these writes do not take.
        let tmp = self.ensure_dir(FN_TMP)?;
        let path = self.blob_path(&d);
        write_atomic(&tmp, &path, bytes, || true).map_err(|source| FunctionStoreError::Io {
            what: "write",
            path,
            source,
        })?;
        Ok((d, true))
    }

    pub fn has_blob(&self, d: &BlobDigest) -> bool {
        self.blob_path(d).is_file()
    }

    /// The size of blob `d`, if the store has it.
    pub fn blob_size(&self, d: &BlobDigest) -> Option<u64> {
        fs::metadata(self.blob_path(d)).ok().map(|m| m.len())
    }

    /// Blob `d`, at most `limit` bytes, checked against its digest.
    pub fn get_blob(&self, d: &BlobDigest, limit: u64) -> Result<Vec<u8>, FunctionStoreError> {
        let path = self.blob_path(d);
        let f = match open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FunctionStoreError::MissingBlob { digest: *d })
            }
            Err(source) => {
                return Err(FunctionStoreError::Io {
                    what: "open",
                    path,
                    source,
                })
            }
        };
        let io_err = |source| FunctionStoreError::Io {
            what: "read",
            path: path.clone(),
            source,
        };
        let size = f.metadata().map_err(io_err)?.len();
        if size > limit {
            return Err(FunctionStoreError::BlobTooLarge {
                digest: *d,
                size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        f.take(limit + 1).read_to_end(&mut bytes).map_err(io_err)?;
        let actual = BlobDigest::of(&bytes);
        if actual != *d {
            return Err(FunctionStoreError::DamagedBlob {
                digest: *d,
                path,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Function `name`'s record, removed or not (`None`: never deployed here).
    pub fn record(&self, name: &str) -> Result<Option<FunctionRecord>, FunctionStoreError> {
        if !valid_function_name(name) {
            return Err(FunctionStoreError::BadName { name: name.into() });
        }
        let path = self.record_path(name);
        let bytes = match read_bounded(&path, RECORD_LIMIT) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FunctionStoreError::Io {
                    what: "read",
                    path,
                    source,
                })
            }
        };
        decode_record(&bytes, name)
            .map(Some)
            .map_err(|why| FunctionStoreError::DamagedRecord { path, why })
    }

    /// Write `rec` in place of what the store had for its name (whole or not at all).
    pub fn put_record(&self, rec: &FunctionRecord) -> Result<(), FunctionStoreError> {
        if !valid_function_name(&rec.name) {
            return Err(FunctionStoreError::BadName {
                name: rec.name.clone(),
            });
        }
        self.ensure_dir("functions")?;
        // Not the store's tmp/: a template commit empties that under its lock, which
        // these writes do not take.
        let tmp = self.ensure_dir(FN_TMP)?;
        let path = self.record_path(&rec.name);
        write_atomic(&tmp, &path, &encode_record(rec), || true).map_err(|source| {
            FunctionStoreError::Io {
                what: "write",
                path,
                source,
            }
        })?;
        Ok(())
    }

    /// Every function record (removed ones included), by name; damaged ones as errors.
    pub fn records(&self) -> Vec<Result<FunctionRecord, FunctionStoreError>> {
        let dir = self.dir.join("functions");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_suffix(".fn")?.to_string();
                valid_function_name(&n).then_some(n)
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.record(&n).transpose())
            .collect()
    }

    /// Remove blob `d` (gc of blobs no record names is the caller's).
    pub fn remove_blob(&self, d: &BlobDigest) -> Result<(), FunctionStoreError> {
        let path = self.blob_path(d);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(p) = path.parent() {
                    let _ = fsync_dir(p);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FunctionStoreError::Io {
                what: "remove",
                path,
                source,
            }),
        }
    }

    /// Largest function record (encoded) a store accepts: the bound of any read of one.
    pub const MAX_RECORD_BYTES: u64 = RECORD_LIMIT;

    /// Function `name`'s record as the store encodes it (checked as [`record`](Self::record)
    /// checks it): what another store takes with [`put_record_bytes`](Self::put_record_bytes).
    /// `None`: never deployed here.
    pub fn record_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, FunctionStoreError> {
        if !valid_function_name(name) {
            return Err(FunctionStoreError::BadName { name: name.into() });
        }
        let path = self.record_path(name);
        let bytes = match read_bounded(&path, RECORD_LIMIT) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FunctionStoreError::Io {
                    what: "read",
                    path,
                    source,
                })
            }
        };
        decode_record(&bytes, name)
            .map_err(|why| FunctionStoreError::DamagedRecord { path, why })?;
        Ok(Some(bytes))
    }

    /// The record of function `name` that `bytes` (an encoded record, as
    /// [`record_bytes`](Self::record_bytes) gives it) holds, checked: magic, checksum,
    /// fields, and that it is `name`'s. A refusal is [`FunctionStoreError::DamagedRecord`]
    /// naming `functions/NAME.fn`.
    pub fn decode_record_bytes(
        name: &str,
        bytes: &[u8],
    ) -> Result<FunctionRecord, FunctionStoreError> {
        if !valid_function_name(name) {
            return Err(FunctionStoreError::BadName { name: name.into() });
        }
        decode_record(bytes, name).map_err(|why| FunctionStoreError::DamagedRecord {
            path: Path::new("functions").join(format!("{name}.fn")),
            why,
        })
    }

    /// Write `bytes`, an encoded record of function `name` (from another store), in place
    /// of what the store had for the name, whole or not at all, once they decode and check
    /// as [`decode_record_bytes`](Self::decode_record_bytes) checks them. Returns the record.
    pub fn put_record_bytes(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<FunctionRecord, FunctionStoreError> {
        let rec = Self::decode_record_bytes(name, bytes)?;
        self.ensure_dir("functions")?;
        // Not the store's tmp/: a template commit empties that under its lock, which
        // these writes do not take.
        let tmp = self.ensure_dir(FN_TMP)?;
        let path = self.record_path(name);
        write_atomic(&tmp, &path, bytes, || true).map_err(|source| FunctionStoreError::Io {
            what: "write",
            path,
            source,
        })?;
        Ok(rec)
    }
}

fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut b = Vec::new();
    open_regular(path)?.take(limit + 1).read_to_end(&mut b)?;
    Ok(b)
}

/// Open `path` for reading only if it is a regular file: opened without blocking (a FIFO
/// put in its place would hang an open), then checked.
pub fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(f)
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ RECORD_LIMIT as usize }>()
}

fn encode_record(rec: &FunctionRecord) -> Vec<u8> {
    let body = bincode::encode_to_vec(rec, bincode_config()).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + 16 + body.len());
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_record(b: &[u8], name: &str) -> Result<FunctionRecord, String> {
    if b.len() as u64 > RECORD_LIMIT {
        return Err(format!("over {RECORD_LIMIT} bytes"));
    }
    if b.len() < 24 || &b[..8] != RECORD_MAGIC {
        return Err("not a function record (bad magic)".into());
    }
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&b[8..24]);
    let body = &b[24..];
    if xxhash_rust::xxh3::xxh3_128(body) != u128::from_le_bytes(sum) {
        return Err("checksum mismatch".into());
    }
    let (rec, used): (FunctionRecord, usize) =
        bincode::decode_from_slice(body, bincode_config()).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err("trailing bytes".into());
    }
    if rec.name != name {
        return Err(format!("it names function {:?}", rec.name));
    }
    if let Some(t) = &rec.template {
        TemplateName::new(t).map_err(|e| e.to_string())?;
    }
    if rec.built_for.as_ref().is_some_and(|f| f.len() > 1024) {
        return Err("fingerprint too long".into());
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fnstore-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn blobs_are_stored_once_and_checked_when_read() {
        let d = tmp();
        let s = FunctionStore::new(&d);
        let (a, new) = s.put_blob(b"hello").unwrap();
        assert!(new);
        assert_eq!(s.put_blob(b"hello").unwrap(), (a, false));
        assert_eq!(s.get_blob(&a, 100).unwrap(), b"hello");
        assert!(matches!(
            s.get_blob(&a, 3),
            Err(FunctionStoreError::BlobTooLarge { .. })
        ));
        fs::write(s.blob_path(&a), b"hellO").unwrap();
        assert!(matches!(
            s.get_blob(&a, 100),
            Err(FunctionStoreError::DamagedBlob { .. })
        ));
        let missing = BlobDigest::of(b"x");
        assert!(matches!(
            s.get_blob(&missing, 100),
            Err(FunctionStoreError::MissingBlob { .. })
        ));
        assert_eq!(BlobDigest::parse(&a.to_string()), Some(a));
        assert_eq!(BlobDigest::parse("sha256:zz"), None);
        assert_eq!(
            BlobDigest::parse(&format!("sha256:{}é", &a.hex()[..62])),
            None
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn records_round_trip_and_damage_is_refused() {
        let d = tmp();
        let s = FunctionStore::new(&d);
        assert_eq!(s.record("f").unwrap(), None);
        let rec = FunctionRecord {
            name: "f".into(),
            version: 3,
            spec: [7; 32],
            template: Some(function_template_name("f", 3)),
            built_for: Some("k".into()),
            created_unix_ms: 1,
            removed: false,
        };
        s.put_record(&rec).unwrap();
        assert_eq!(s.record("f").unwrap(), Some(rec.clone()));
        assert_eq!(s.records().len(), 1);
        let p = s.record_path("f");
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 1;
        fs::write(&p, &b).unwrap();
        assert!(matches!(
            s.record("f"),
            Err(FunctionStoreError::DamagedRecord { .. })
        ));
        // A record copied under another name is refused.
        s.put_record(&rec).unwrap();
        fs::copy(&p, s.record_path("g")).unwrap();
        assert!(s.record("g").is_err());
        assert!(s.record("../x").is_err());
        // Raw bytes travel between stores, checked on the way in.
        let e = tmp();
        let other = FunctionStore::new(&e);
        let raw = s.record_bytes("f").unwrap().unwrap();
        assert_eq!(other.put_record_bytes("f", &raw).unwrap(), rec);
        assert_eq!(other.record("f").unwrap(), Some(rec.clone()));
        assert_eq!(other.record_bytes("f").unwrap(), Some(raw.clone()));
        assert!(other.record_bytes("h").unwrap().is_none());
        assert!(matches!(
            other.put_record_bytes("g", &raw),
            Err(FunctionStoreError::DamagedRecord { .. })
        ));
        let mut bad = raw.clone();
        bad[30] ^= 1;
        assert!(other.put_record_bytes("f", &bad).is_err());
        assert!(FunctionStore::decode_record_bytes("f", &raw[..20]).is_err());
        assert!(other.record_bytes("../x").is_err());
        let _ = fs::remove_dir_all(&e);
        for bad in ["", "-a", "a.b", "a/b", &"x".repeat(65)] {
            assert!(!valid_function_name(bad), "{bad}");
        }
        let _ = fs::remove_dir_all(&d);
    }
}
