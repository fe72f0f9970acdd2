//! The compiled-module cache in `<store>/artifacts/`: what an engine produced by
//! compiling a WebAssembly module ahead of time (opaque bytes to the store),
//! kept so that nobody compiles the same module twice.
//!
//! ```text
//! artifacts/<key: 64 hex digits>.art           an artifact (file mode 0444)
//! artifacts/.<key>.<pid>.<16 hex digits>.tmp   one being written by process <pid>
//! ```
//!
//! An artifact file, every integer little-endian:
//!
//! ```text
//! header (100 bytes): magic "VMMARTF1", major u16, minor u16,
//!         engine length u32, settings length u32, artifact length u64,
//!         created (unix ms) u64, key [32], SHA-256 of the module [32]
//! engine string, settings string (UTF-8), the artifact bytes
//! keyed XXH3-128 (the store's secret) of every byte before it (16 bytes)
//! ```
//!
//! **Key.** [`ArtifactKey`] is SHA-256 over a domain tag, the SHA-256 of the
//! module bytes, and the length-prefixed engine and settings strings. A
//! cryptographic hash rather than the pages' keyed XXH3: a key selects native
//! code that will run, and SHA-256 keeps two modules (or engines, or settings)
//! from sharing a key without relying on the store's secret staying secret or
//! on XXH3 resisting an adversary; and the recorded module hash is the one
//! `sha256sum module.wasm` prints. Hashing a 2 MB module costs about a
//! millisecond, against the 0.5-1 s compilation it saves.
//!
//! **Checks.** Every read refuses what is not a regular file (a FIFO, a device
//! such as a link to `/dev/zero`) and a file over [`MAX_ARTIFACT_FILE_BYTES`]
//! before reading a byte, and then checks the magic and version, every length
//! against the file's, the keyed checksum (bytes altered, or copied from
//! another store), that the recorded key is the SHA-256 of the recorded module
//! hash, engine and settings, and that it is the key asked for. Whatever fails
//! is an [`ArtifactError::Damaged`] with an [`ArtifactDamage`] saying what:
//! the caller compiles again and stores the new artifact over it.
//!
//! **Concurrency.** An artifact is never modified in place: it is written to a
//! temp file in `artifacts/`, fsynced, renamed over its final name and the
//! directory fsynced, so readers see a whole file or none, and two writers of
//! the same key both succeed (the last rename wins; both were complete). So no
//! store lock is taken: a cache read or write never waits for a long gc. gc
//! deletes only files it has checked, and only if the name still holds the
//! same file (a writer may have just replaced it), and temp files only of
//! processes that are gone (`tmp/`, which a page gc empties, holds none).
//!
//! **Last used** is the file's modification time, set on every successful
//! read (the bytes are not rewritten); the creation time is in the header.
//!
//! **gc policy** ([`Store::gc_artifacts`]): damaged artifacts and temp files of
//! dead writers are always removed; artifacts compiled by an engine that is
//! not in the caller's list of current engines are *stale* and removed when a
//! list is given; with an age, artifacts not used for that long go too; and
//! `all` empties the cache. Everything else is the cache and is kept.
//! Artifacts of a newer format version are kept (a newer build reads them).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::cache::process_alive;
use crate::format::fsync_dir;
use crate::store::Store;
use crate::util::{now_ms, open_regular};
use crate::verify::Problem;

/// Largest artifact (compiled module) the store writes or reads: 256 MiB.
pub const MAX_ARTIFACT_BYTES: u64 = 256 << 20;
/// Longest engine string (e.g. `wasmtime-48.0.8`).
pub const MAX_ENGINE_LEN: usize = 256;
/// Longest settings fingerprint (target, ISA flags, memory settings).
pub const MAX_SETTINGS_LEN: usize = 64 << 10;

const MAGIC: &[u8; 8] = b"VMMARTF1";
const MAJOR: u16 = 1;
const MINOR: u16 = 0;
const HEADER: usize = 8 + 2 + 2 + 4 + 4 + 8 + 8 + 32 + 32;
const TRAILER: usize = 16;
/// Largest artifact file: header, longest strings, largest artifact, checksum.
pub const MAX_ARTIFACT_FILE_BYTES: u64 =
    (HEADER + MAX_ENGINE_LEN + MAX_SETTINGS_LEN + TRAILER) as u64 + MAX_ARTIFACT_BYTES;
const KEY_DOMAIN: &[u8] = b"vmm compiled-module artifact key v1\0";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What an artifact is the compilation of: a module (by its SHA-256), an
/// engine and its settings; and the key it is stored under, derived from them.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ArtifactKey {
    id: [u8; 32],
    module_sha256: [u8; 32],
    engine: String,
    settings: String,
}

impl ArtifactKey {
    /// The key of `module` compiled by `engine` (name and version, e.g.
    /// `wasmtime-48.0.8`) with `settings` (everything else the artifact
    /// depends on: target, CPU features, memory settings, as one string).
    pub fn new(module: &[u8], engine: &str, settings: &str) -> ArtifactKey {
        ArtifactKey::from_parts(Sha256::digest(module).into(), engine, settings)
    }

    fn from_parts(module_sha256: [u8; 32], engine: &str, settings: &str) -> ArtifactKey {
        let mut h = Sha256::new();
        h.update(KEY_DOMAIN);
        h.update(module_sha256);
        h.update((engine.len() as u64).to_le_bytes());
        h.update(engine.as_bytes());
        h.update((settings.len() as u64).to_le_bytes());
        h.update(settings.as_bytes());
        ArtifactKey {
            id: h.finalize().into(),
            module_sha256,
            engine: engine.to_string(),
            settings: settings.to_string(),
        }
    }

    /// The key as 64 hex digits (the artifact's file name without `.art`).
    pub fn id(&self) -> String {
        hex(&self.id)
    }
    /// The first 16 hex digits of [`ArtifactKey::id`], for listings.
    pub fn short_id(&self) -> String {
        hex(&self.id[..8])
    }
    /// SHA-256 of the module bytes, as 64 hex digits.
    pub fn module_sha256(&self) -> String {
        hex(&self.module_sha256)
    }
    pub fn engine(&self) -> &str {
        &self.engine
    }
    pub fn settings(&self) -> &str {
        &self.settings
    }
}

impl fmt::Display for ArtifactKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// What is wrong with a stored artifact that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactDamage {
    /// A FIFO, a device (a link to `/dev/zero`), a directory, ...: never read.
    #[error("{what}")]
    NotRegular { what: String },
    #[error("it is {len} bytes, over the limit of {max}")]
    Oversize { len: u64, max: u64 },
    #[error("{reason}")]
    Header { reason: String },
    #[error("it has format version {found}, this build reads version {supported}")]
    FutureVersion { found: u16, supported: u16 },
    #[error("it is {found} bytes but its header says {expected} (truncated or extended)")]
    Length { expected: u64, found: u64 },
    #[error("its bytes do not match their checksum (altered, or copied from another store)")]
    Checksum,
    /// A whole, intact artifact under another key's name.
    #[error("it holds the artifact of key {found}, not of {expected}")]
    WrongKey { expected: String, found: String },
}

/// Reading, writing, listing or collecting compiled-module artifacts.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cached compiled module {path} refused: {damage}; it was not used (a new compilation stored under its key replaces it, and gc removes it)")]
    Damaged {
        path: PathBuf,
        damage: ArtifactDamage,
    },
    #[error("reading cached compiled module {path}: {source}; check the permissions of the store directory")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{step} ({path}): {source}; check free space and permissions (the cache stays consistent)"
    )]
    Write {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("listing cached compiled modules in {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("compiled module of {len} bytes is not cached: the limit is {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("compiled module not cached: {reason}")]
    Invalid { reason: String },
}

/// One artifact as listed by [`Store::artifacts`].
#[derive(Clone, Debug)]
pub struct ArtifactInfo {
    pub key: ArtifactKey,
    pub path: PathBuf,
    /// Bytes of the artifact itself, and of its file.
    pub bytes: u64,
    pub file_bytes: u64,
    pub created_unix_ms: u64,
    /// When it was last read (or written).
    pub last_used_unix_ms: u64,
}

/// Every entry of `artifacts/`, from [`Store::artifacts`].
#[derive(Debug, Default)]
pub struct ArtifactList {
    /// Sorted by key.
    pub artifacts: Vec<ArtifactInfo>,
    /// Artifacts whose header cannot be read or is wrong (the bytes are
    /// checked by `verify` and by every read).
    pub unreadable: Vec<(PathBuf, ArtifactError)>,
    /// Temp files of writers: (path, pid, whether that process still exists).
    pub temp: Vec<(PathBuf, u32, bool)>,
    /// Files that are none of these.
    pub unknown: Vec<PathBuf>,
}

/// Which artifacts [`Store::gc_artifacts`] removes besides damaged ones (see
/// the module doc). The default removes only damaged ones.
#[derive(Clone, Debug, Default)]
pub struct ArtifactGcPolicy {
    /// The engines in use: artifacts compiled by any other are stale and
    /// removed. `None`: no artifact is stale.
    pub current_engines: Option<Vec<String>>,
    /// Also remove artifacts not used for at least this long.
    pub unused_for: Option<Duration>,
    /// Remove every artifact.
    pub all: bool,
}

/// Why [`Store::gc_artifacts`] removes a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactGcReason {
    Damaged(ArtifactDamage),
    /// Compiled by an engine not in the current list.
    Stale,
    /// Not used for the policy's age.
    Unused,
    /// The policy removes every artifact.
    All,
    /// Left by a writer that is gone.
    DeadTemp,
}

impl fmt::Display for ArtifactGcReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactGcReason::Damaged(d) => write!(f, "damaged: {d}"),
            ArtifactGcReason::Stale => f.write_str("stale: compiled by an engine not in use"),
            ArtifactGcReason::Unused => f.write_str("unused"),
            ArtifactGcReason::All => f.write_str("all removed"),
            ArtifactGcReason::DeadTemp => f.write_str("temp file of a writer that is gone"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RemovedArtifact {
    pub path: PathBuf,
    /// The engine recorded in it (None: damaged or a temp file).
    pub engine: Option<String>,
    pub reason: ArtifactGcReason,
    pub file_bytes: u64,
}

/// What [`Store::gc_artifacts`] removed (with `dry_run`: would remove).
#[derive(Clone, Debug, Default)]
pub struct ArtifactGcReport {
    pub dry_run: bool,
    pub removed: Vec<RemovedArtifact>,
    /// Artifacts kept, and the bytes of their files.
    pub kept: u64,
    pub kept_bytes: u64,
    /// Files that could not be checked or removed, with the reason.
    pub skipped: Vec<String>,
}

impl ArtifactGcReport {
    pub fn removed_bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.file_bytes).sum()
    }
}

/// What a file in `artifacts/` is.
enum Entry {
    Artifact([u8; 32]),
    Temp(u32),
    Unknown,
}

fn parse_name(name: &str) -> Entry {
    if let Some(id) = name.strip_suffix(".art").and_then(unhex32) {
        return Entry::Artifact(id);
    }
    let temp = name
        .strip_prefix('.')
        .and_then(|s| s.strip_suffix(".tmp"))
        .and_then(|s| {
            let mut it = s.split('.');
            let (id, pid, nonce) = (it.next()?, it.next()?, it.next()?);
            let ok = it.next().is_none()
                && unhex32(id).is_some()
                && nonce.len() == 16
                && nonce.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then(|| pid.parse::<u32>().ok()).flatten()
        });
    temp.map_or(Entry::Unknown, Entry::Temp)
}

/// A decoded header and strings.
struct Head {
    key: ArtifactKey,
    created_unix_ms: u64,
    payload_len: u64,
    /// Header plus strings: where the artifact bytes start.
    body_start: usize,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn arr32(b: &[u8], at: usize) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[at..at + 32]);
    a
}

/// The fixed header `h` (HEADER bytes) of a file of `file_len` bytes: the
/// strings' lengths, checked against their limits and the file length.
fn decode_fixed(h: &[u8], file_len: u64) -> Result<(usize, usize, u64), ArtifactDamage> {
    if h.len() < HEADER || &h[..8] != MAGIC {
        return Err(ArtifactDamage::Header {
            reason: "it is not a compiled-module artifact (no artifact header)".into(),
        });
    }
    let major = u16::from_le_bytes([h[8], h[9]]);
    if major != MAJOR {
        return Err(if major > MAJOR {
            ArtifactDamage::FutureVersion {
                found: major,
                supported: MAJOR,
            }
        } else {
            ArtifactDamage::Header {
                reason: format!("unknown format version {major}"),
            }
        });
    }
    let (elen, slen, plen) = (
        le_u32(h, 12) as usize,
        le_u32(h, 16) as usize,
        le_u64(h, 20),
    );
    if elen == 0 || elen > MAX_ENGINE_LEN || slen > MAX_SETTINGS_LEN || plen > MAX_ARTIFACT_BYTES {
        return Err(ArtifactDamage::Header {
            reason: format!(
                "its header gives lengths out of bounds (engine {elen}, settings {slen}, artifact {plen} bytes)"
            ),
        });
    }
    let expected = (HEADER + elen + slen + TRAILER) as u64 + plen;
    if expected != file_len {
        return Err(ArtifactDamage::Length {
            expected,
            found: file_len,
        });
    }
    Ok((elen, slen, plen))
}

/// Decodes header and strings from `b` (at least header plus strings) of a
/// file of `file_len` bytes, and checks the recorded key against the recorded
/// parts and against `expect` (the key of its file name, or the one asked for).
fn decode_head(b: &[u8], file_len: u64, expect: &[u8; 32]) -> Result<Head, ArtifactDamage> {
    let (elen, slen, plen) = decode_fixed(b, file_len)?;
    let body_start = HEADER + elen + slen;
    let text = |r: std::ops::Range<usize>, what: &str| {
        b.get(r)
            .and_then(|s| std::str::from_utf8(s).ok())
            .map(str::to_string)
            .ok_or_else(|| ArtifactDamage::Header {
                reason: format!("its {what} string is not UTF-8"),
            })
    };
    let engine = text(HEADER..HEADER + elen, "engine")?;
    let settings = text(HEADER + elen..body_start, "settings")?;
    let recorded = arr32(b, 36);
    let key = ArtifactKey::from_parts(arr32(b, 68), &engine, &settings);
    if key.id != recorded {
        return Err(ArtifactDamage::Header {
            reason: "its recorded key is not the key of its recorded module, engine and settings"
                .into(),
        });
    }
    if &key.id != expect {
        return Err(ArtifactDamage::WrongKey {
            expected: hex(expect),
            found: key.id(),
        });
    }
    Ok(Head {
        key,
        created_unix_ms: le_u64(b, 28),
        payload_len: plen,
        body_start,
    })
}

fn mtime_ms(m: &fs::Metadata) -> u64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Identity of the directory entry at `path` (not following a link).
fn entry_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Store {
    pub(crate) fn artifacts_dir(&self) -> PathBuf {
        self.dir.join("artifacts")
    }

    fn artifact_path(&self, id: &[u8; 32]) -> PathBuf {
        self.artifacts_dir().join(format!("{}.art", hex(id)))
    }

    /// Opens the artifact file at `path` for reading: `None` if there is none.
    fn open_artifact(&self, path: &Path) -> Result<Option<(File, fs::Metadata)>, ArtifactError> {
        let damaged = |damage| ArtifactError::Damaged {
            path: path.to_path_buf(),
            damage,
        };
        let read = |source| ArtifactError::Read {
            path: path.to_path_buf(),
            source,
        };
        let f = match open_regular(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // open_regular's refusal of anything but a regular file.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                return Err(damaged(ArtifactDamage::NotRegular {
                    what: e.to_string(),
                }))
            }
            Err(e) => return Err(read(e)),
        };
        let m = f.metadata().map_err(read)?;
        if m.len() > MAX_ARTIFACT_FILE_BYTES {
            return Err(damaged(ArtifactDamage::Oversize {
                len: m.len(),
                max: MAX_ARTIFACT_FILE_BYTES,
            }));
        }
        Ok(Some((f, m)))
    }

    /// Reads and checks the whole artifact at `path`, which must be the one of
    /// key `expect`: its head and all its bytes (`None`: there is none).
    fn read_artifact(
        &self,
        path: &Path,
        expect: &[u8; 32],
    ) -> Result<Option<(File, Head, Vec<u8>)>, ArtifactError> {
        let Some((f, m)) = self.open_artifact(path)? else {
            return Ok(None);
        };
        let damaged = |damage| ArtifactError::Damaged {
            path: path.to_path_buf(),
            damage,
        };
        let mut b = Vec::with_capacity(m.len() as usize);
        (&f).take(MAX_ARTIFACT_FILE_BYTES + 1)
            .read_to_end(&mut b)
            .map_err(|source| ArtifactError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let len = b.len() as u64;
        if len > MAX_ARTIFACT_FILE_BYTES {
            return Err(damaged(ArtifactDamage::Oversize {
                len,
                max: MAX_ARTIFACT_FILE_BYTES,
            }));
        }
        decode_fixed(&b, len).map_err(damaged)?;
        let (body, sum) = b.split_at(b.len() - TRAILER);
        if self.hasher.keyed(body).to_le_bytes() != sum {
            return Err(damaged(ArtifactDamage::Checksum));
        }
        let head = decode_head(&b, len, expect).map_err(damaged)?;
        Ok(Some((f, head, b)))
    }

    /// The cached artifact of `key`: `Ok(None)` when there is none, the
    /// artifact bytes when there is one and it passes every check (see the
    /// module doc), and [`ArtifactError::Damaged`] when it does not; nothing
    /// that fails a check is ever returned. Marks it used (its file's
    /// modification time; best effort).
    pub fn get_artifact(&self, key: &ArtifactKey) -> Result<Option<Vec<u8>>, ArtifactError> {
        let path = self.artifact_path(&key.id);
        let Some((f, head, mut b)) = self.read_artifact(&path, &key.id)? else {
            return Ok(None);
        };
        // Whoever may only read the store still gets the artifact.
        let _ = f.set_modified(SystemTime::now());
        b.truncate(b.len() - TRAILER);
        b.drain(..head.body_start);
        Ok(Some(b))
    }

    /// Stores `bytes` as the artifact of `key`, replacing whatever is stored
    /// under it: temp file in `artifacts/`, fsync, rename, fsync of the
    /// directory. Takes no store lock (see the module doc); concurrent puts of
    /// the same key all succeed and readers only ever see a whole file.
    pub fn put_artifact(&self, key: &ArtifactKey, bytes: &[u8]) -> Result<(), ArtifactError> {
        let len = bytes.len() as u64;
        if len > MAX_ARTIFACT_BYTES {
            return Err(ArtifactError::TooLarge {
                len,
                max: MAX_ARTIFACT_BYTES,
            });
        }
        let invalid = |reason: String| Err(ArtifactError::Invalid { reason });
        if key.engine.is_empty() || key.engine.len() > MAX_ENGINE_LEN {
            return invalid(format!(
                "the engine string must have 1 to {MAX_ENGINE_LEN} bytes, it has {}",
                key.engine.len()
            ));
        }
        if key.engine.chars().any(char::is_control) {
            return invalid(format!(
                "the engine string {:?} holds control characters",
                key.engine
            ));
        }
        if key.settings.len() > MAX_SETTINGS_LEN {
            return invalid(format!(
                "the settings string has {} bytes, the limit is {MAX_SETTINGS_LEN}",
                key.settings.len()
            ));
        }
        let mut v = Vec::with_capacity(
            HEADER + key.engine.len() + key.settings.len() + bytes.len() + TRAILER,
        );
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&MAJOR.to_le_bytes());
        v.extend_from_slice(&MINOR.to_le_bytes());
        v.extend_from_slice(&(key.engine.len() as u32).to_le_bytes());
        v.extend_from_slice(&(key.settings.len() as u32).to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&now_ms().to_le_bytes());
        v.extend_from_slice(&key.id);
        v.extend_from_slice(&key.module_sha256);
        v.extend_from_slice(key.engine.as_bytes());
        v.extend_from_slice(key.settings.as_bytes());
        v.extend_from_slice(bytes);
        let sum = self.hasher.keyed(&v);
        v.extend_from_slice(&sum.to_le_bytes());

        let dir = self.artifacts_dir();
        let io = |step: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| ArtifactError::Write { step, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("creating the artifact directory", &dir))?;
        let path = self.artifact_path(&key.id);
        let (tmp, mut f) = create_temp(&dir, &key.id).map_err(io("creating a temp file", &dir))?;
        if let Err(e) = f.write_all(&v).and_then(|()| f.sync_all()) {
            // A full disk, say: leave no half-written temp file behind.
            let _ = fs::remove_file(&tmp);
            return Err(io("writing a compiled module", &tmp)(e));
        }
        drop(f);
        // Tests: a writer killed here leaves its temp file.
        self.fail("artifact-before-rename")
            .map_err(|e| io("renaming a compiled module", &tmp)(io::Error::other(e.to_string())))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io("putting a compiled module in place", &path)(e));
        }
        fsync_dir(&dir).map_err(io("syncing the artifact directory", &dir))
    }

    /// Every entry of `artifacts/`: artifacts with their recorded engine,
    /// module hash, sizes and times (from their headers; [`Store::verify`]
    /// and every read check the bytes), unreadable ones, temp files, strays.
    pub fn artifacts(&self) -> Result<ArtifactList, ArtifactError> {
        let mut out = ArtifactList::default();
        for (path, entry) in self.artifact_entries()? {
            match entry {
                Entry::Artifact(id) => match self.artifact_info(&path, &id) {
                    Ok(Some(info)) => out.artifacts.push(info),
                    Ok(None) => {}
                    Err(e) => out.unreadable.push((path, e)),
                },
                Entry::Temp(pid) => out.temp.push((path, pid, process_alive(pid))),
                Entry::Unknown => out.unknown.push(path),
            }
        }
        Ok(out)
    }

    /// Number of artifact files and their bytes (without reading them).
    pub(crate) fn artifact_usage(&self) -> (u64, u64) {
        let entries = self.artifact_entries().unwrap_or_default();
        entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Artifact(_)))
            .fold((0, 0), |(n, b), (p, _)| {
                let len = fs::symlink_metadata(p).map_or(0, |m| m.len());
                (n + 1, b + len)
            })
    }

    /// The entries of `artifacts/`, sorted by name (none if there is no such directory).
    fn artifact_entries(&self) -> Result<Vec<(PathBuf, Entry)>, ArtifactError> {
        let dir = self.artifacts_dir();
        let list = |source| ArtifactError::List {
            path: dir.clone(),
            source,
        };
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list(e)),
        };
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(list)?;
            let name = e.file_name();
            v.push((e.path(), parse_name(&name.to_string_lossy())));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    /// The header of the artifact at `path` (named for key `id`), checked
    /// against the file's length and its name; the bytes are not read.
    fn artifact_info(
        &self,
        path: &Path,
        id: &[u8; 32],
    ) -> Result<Option<ArtifactInfo>, ArtifactError> {
        let Some((mut f, m)) = self.open_artifact(path)? else {
            return Ok(None);
        };
        let damaged = |damage| ArtifactError::Damaged {
            path: path.to_path_buf(),
            damage,
        };
        let mut h = vec![0u8; HEADER];
        if let Err(e) = f.read_exact(&mut h) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(damaged(ArtifactDamage::Header {
                    reason: format!("it is {} bytes, shorter than an artifact header", m.len()),
                }));
            }
            return Err(ArtifactError::Read {
                path: path.to_path_buf(),
                source: e,
            });
        }
        let (elen, slen, _) = decode_fixed(&h, m.len()).map_err(damaged)?;
        h.resize(HEADER + elen + slen, 0);
        f.read_exact(&mut h[HEADER..])
            .map_err(|source| ArtifactError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let head = decode_head(&h, m.len(), id).map_err(damaged)?;
        Ok(Some(ArtifactInfo {
            key: head.key,
            path: path.to_path_buf(),
            bytes: head.payload_len,
            file_bytes: m.len(),
            created_unix_ms: head.created_unix_ms,
            last_used_unix_ms: mtime_ms(&m),
        }))
    }

    /// Checks every artifact whole (for [`Store::verify`]).
    pub(crate) fn verify_artifacts(&self, probs: &mut Vec<Problem>) {
        let entries = match self.artifact_entries() {
            Ok(v) => v,
            Err(e) => {
                probs.push(Problem::corrupt(
                    self.artifacts_dir(),
                    e.to_string(),
                    "check the permissions of the store directory",
                ));
                return;
            }
        };
        for (path, entry) in entries {
            match entry {
                Entry::Artifact(id) => match self.read_artifact(&path, &id) {
                    Ok(_) => {}
                    Err(ArtifactError::Damaged {
                        damage: damage @ ArtifactDamage::FutureVersion { .. },
                        ..
                    }) => probs.push(Problem::garbage(
                        &path,
                        format!("compiled module of a newer format: {damage}"),
                        "harmless: this build does not use it, a newer one does",
                    )),
                    Err(ArtifactError::Damaged { damage, .. }) => probs.push(Problem::corrupt(
                        &path,
                        format!("the cached compiled module is damaged: {damage}"),
                        "it is derived data: gc removes it, and a run that needs it refuses it and compiles the module again",
                    )),
                    Err(e) => probs.push(Problem::corrupt(
                        &path,
                        e.to_string(),
                        "fix its permissions, or delete it (it is derived data)",
                    )),
                },
                Entry::Temp(pid) => {
                    if !process_alive(pid) {
                        probs.push(Problem::garbage(
                            &path,
                            format!("compiled module left half-written by process {pid}, which is gone"),
                            "harmless; gc deletes it",
                        ));
                    }
                }
                Entry::Unknown => probs.push(Problem::garbage(
                    &path,
                    "unknown file in artifacts/".into(),
                    "delete it",
                )),
            }
        }
    }

    /// Removes damaged artifacts, temp files of dead writers, and the
    /// artifacts `policy` names (see the module doc); with `dry_run`, only
    /// reports. Every artifact is read and checked whole first. Takes no store
    /// lock: a file replaced meanwhile by a writer is left alone.
    pub fn gc_artifacts(
        &self,
        policy: &ArtifactGcPolicy,
        dry_run: bool,
    ) -> Result<ArtifactGcReport, ArtifactError> {
        let mut rep = ArtifactGcReport {
            dry_run,
            ..ArtifactGcReport::default()
        };
        let now = now_ms();
        let mut doomed = Vec::new();
        for (path, entry) in self.artifact_entries()? {
            let Some(before) = entry_id(&path) else {
                continue;
            };
            let file_bytes = fs::symlink_metadata(&path).map_or(0, |m| m.len());
            let (engine, reason) = match entry {
                Entry::Artifact(id) => match self.read_artifact(&path, &id) {
                    Ok(None) => continue,
                    Ok(Some((f, head, _))) => {
                        let last_used = f.metadata().map_or(0, |m| mtime_ms(&m));
                        let stale = policy
                            .current_engines
                            .as_ref()
                            .is_some_and(|cur| !cur.contains(&head.key.engine));
                        let unused = policy
                            .unused_for
                            .is_some_and(|d| now.saturating_sub(last_used) >= d.as_millis() as u64);
                        let reason = if policy.all {
                            ArtifactGcReason::All
                        } else if stale {
                            ArtifactGcReason::Stale
                        } else if unused {
                            ArtifactGcReason::Unused
                        } else {
                            rep.kept += 1;
                            rep.kept_bytes += file_bytes;
                            continue;
                        };
                        (Some(head.key.engine), reason)
                    }
                    Err(ArtifactError::Damaged {
                        damage: ArtifactDamage::FutureVersion { .. },
                        ..
                    }) => {
                        rep.kept += 1;
                        rep.kept_bytes += file_bytes;
                        continue;
                    }
                    Err(ArtifactError::Damaged { damage, .. }) => {
                        (None, ArtifactGcReason::Damaged(damage))
                    }
                    Err(e) => {
                        rep.skipped.push(e.to_string());
                        continue;
                    }
                },
                Entry::Temp(pid) if !process_alive(pid) => (None, ArtifactGcReason::DeadTemp),
                Entry::Temp(_) | Entry::Unknown => continue,
            };
            doomed.push((
                before,
                RemovedArtifact {
                    path,
                    engine,
                    reason,
                    file_bytes,
                },
            ));
        }
        if dry_run {
            rep.removed = doomed.into_iter().map(|d| d.1).collect();
            return Ok(rep);
        }
        if doomed.is_empty() {
            return Ok(rep);
        }
        for (before, r) in doomed {
            // A writer may have put a new artifact under this name since it was checked.
            if entry_id(&r.path) != Some(before) {
                rep.skipped.push(format!(
                    "{}: replaced while gc ran; left alone",
                    r.path.display()
                ));
                continue;
            }
            match fs::remove_file(&r.path) {
                Ok(()) => rep.removed.push(r),
                Err(e) if e.kind() == io::ErrorKind::NotFound => rep.removed.push(r),
                Err(e) => rep
                    .skipped
                    .push(format!("{}: cannot remove it: {e}", r.path.display())),
            }
        }
        let dir = self.artifacts_dir();
        fsync_dir(&dir).map_err(|source| ArtifactError::Write {
            step: "syncing the artifact directory",
            path: dir,
            source,
        })?;
        Ok(rep)
    }
}

/// Creates a new temp file for key `id` in `dir` (never an existing name).
fn create_temp(dir: &Path, id: &[u8; 32]) -> io::Result<(PathBuf, File)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let nonce = getrandom::u64().unwrap_or(0) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let tmp = dir.join(format!(
            ".{}.{}.{nonce:016x}.tmp",
            hex(id),
            std::process::id()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temp file name")))
}
