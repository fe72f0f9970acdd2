//! Learned working sets: `templates/<name>.ws`, beside the manifest, the union of the
//! guest frames that real requests touched, learned after the template was created.
//!
//! The working set in a manifest is what the trial request of `template create` touched: a
//! first guess. Restores report the frames their requests touched beyond it; the union of
//! the first [`Store::learn_working_set`] calls that added frames (at most `limit` of them:
//! REAP observed that a function's working set is stable after a few requests) is kept
//! here, so that a later restore prefetches what requests really touch. The manifest and
//! the pages are never rewritten for it.
//!
//! Format: header magic `VMMTWS01`, major u16, minor u16, body length u64, keyed
//! xxh3-128(body) u128 (the store's secret: a record copied from another store or forged is
//! refused); body: the checksum of the manifest it was learned for u128, observations u32
//! (calls that added frames), frame count u32, frames u32 each (trial's first, then in
//! the order they were learned).
//!
//! A record is a hint: it is used only when it decodes, is bound to the manifest as it is
//! now (a template replaced under the same name starts learning again) and names only
//! frames inside guest RAM. Updates run under their own lock (`learn.lock` in the store
//! directory, not the writer lock a long `template create` holds) with a read, a merge
//! and an atomic replace (temp file, fsync, rename).

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;

use crate::error::WriteError;
use crate::resolve::Template;
use crate::store::Store;
use crate::util::open_regular;
use crate::{TemplateName, PAGE_SIZE};

const MAGIC: &[u8; 8] = b"VMMTWS01";
const MAJOR: u16 = 1;
const MINOR: u16 = 0;
const HEADER: usize = 8 + 2 + 2 + 8 + 16;
/// Body bytes before the frames.
const BODY_FIXED: usize = 16 + 4 + 4;

/// A template's learned working set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnedWorkingSet {
    /// Calls of [`Store::learn_working_set`] that added frames.
    pub observations: u32,
    /// The manifest's working set, then the frames learned, each once.
    pub frames: Vec<u64>,
}

fn encode(manifest_sum: u128, ws: &LearnedWorkingSet, sum: &dyn Fn(&[u8]) -> u128) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_FIXED + ws.frames.len() * 4);
    body.extend_from_slice(&manifest_sum.to_le_bytes());
    body.extend_from_slice(&ws.observations.to_le_bytes());
    body.extend_from_slice(&(ws.frames.len() as u32).to_le_bytes());
    for &f in &ws.frames {
        body.extend_from_slice(&(f as u32).to_le_bytes());
    }
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&MAJOR.to_le_bytes());
    v.extend_from_slice(&MINOR.to_le_bytes());
    v.extend_from_slice(&(body.len() as u64).to_le_bytes());
    v.extend_from_slice(&sum(&body).to_le_bytes());
    v.extend_from_slice(&body);
    v
}

/// Decodes a record learned for the manifest whose checksum is `manifest_sum`, for guest
/// RAM of `frames` frames: lengths checked before allocating, the checksum, the binding,
/// every frame inside guest RAM and named once.
fn decode(
    b: &[u8],
    manifest_sum: u128,
    frames: u64,
    sum: &dyn Fn(&[u8]) -> u128,
) -> Result<LearnedWorkingSet, String> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return Err("bad magic or short header".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    if u16_at(8) != MAJOR {
        return Err(format!(
            "major version {} (this build reads {MAJOR})",
            u16_at(8)
        ));
    }
    let body = &b[HEADER..];
    let len = u64::from_le_bytes(b[12..20].try_into().unwrap_or_default());
    if len != body.len() as u64 {
        return Err(format!(
            "body of {len} bytes announced, {} present",
            body.len()
        ));
    }
    if u128::from_le_bytes(b[20..36].try_into().unwrap_or_default()) != sum(body) {
        return Err("checksum mismatch".into());
    }
    if body.len() < BODY_FIXED {
        return Err("body too short".into());
    }
    if u128::from_le_bytes(body[..16].try_into().unwrap_or_default()) != manifest_sum {
        return Err("learned for another version of the template".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap_or_default());
    let observations = u32_at(16);
    let count = u32_at(20) as usize;
    let rest = &body[BODY_FIXED..];
    if count as u64 > frames || rest.len() != count * 4 {
        return Err(format!(
            "{count} frames announced, {} bytes present, guest RAM has {frames} frames",
            rest.len()
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    for c in rest.chunks_exact(4) {
        let f = u64::from(u32::from_le_bytes(c.try_into().unwrap_or_default()));
        if f >= frames || !seen.insert(f) {
            return Err(format!("frame {f} is outside guest RAM or named twice"));
        }
        out.push(f);
    }
    Ok(LearnedWorkingSet {
        observations,
        frames: out,
    })
}

impl Store {
    pub(crate) fn ws_path(&self, name: &TemplateName) -> PathBuf {
        self.templates_dir().join(format!("{name}.ws"))
    }

    /// The working set learned for `t` (None: nothing learned yet). Err: a record exists
    /// but cannot be used (the reason); the manifest's working set then stands.
    pub fn learned_working_set(&self, t: &Template) -> Result<Option<LearnedWorkingSet>, String> {
        let path = self.ws_path(&t.name);
        let frames = t.mem_size / PAGE_SIZE as u64;
        // Never more than a record of every frame of guest RAM: a larger file (damaged, or
        // planted) is refused before it is read.
        let limit = (HEADER + BODY_FIXED) as u64 + 4 * frames;
        // None: longer than `limit` (the file is not read).
        let read = open_regular(&path).and_then(|f| {
            if f.metadata()?.len() > limit {
                return Ok(None);
            }
            let mut b = Vec::new();
            f.take(limit).read_to_end(&mut b)?;
            Ok(Some(b))
        });
        let bytes = match read {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(format!(
                    "{}: longer than the {limit} bytes a record of {frames} frames can take",
                    path.display()
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        if t.manifest_sum == 0 {
            return Err(format!(
                "{}: the manifest was not read from a file",
                path.display()
            ));
        }
        decode(&bytes, t.manifest_sum, frames, &|b| self.hasher.keyed(b))
            .map(Some)
            .map_err(|why| format!("{}: {why}", path.display()))
    }

    /// Adds the frames in `touched` (guest frames a request touched, in first-touch order)
    /// to `t`'s learned working set, unless `limit` calls have added frames already or
    /// nothing is new. Returns the set written (None: nothing written). A record that
    /// cannot be used is replaced.
    pub fn learn_working_set(
        &self,
        t: &Template,
        touched: &[u64],
        limit: u32,
    ) -> Result<Option<LearnedWorkingSet>, WriteError> {
        let frames = t.mem_size / PAGE_SIZE as u64;
        let lock_path = self.dir.join("learn.lock");
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .and_then(|f| f.lock().map(|()| f));
        let _lock = lock.map_err(|source| WriteError::Lock {
            path: lock_path,
            source,
        })?;
        let mut ws = match self.learned_working_set(t) {
            Ok(Some(ws)) => ws,
            _ => LearnedWorkingSet {
                observations: 0,
                frames: dedup_in_order(&t.working_set, frames),
            },
        };
        if ws.observations >= limit {
            return Ok(None);
        }
        let known: std::collections::HashSet<u64> = ws.frames.iter().copied().collect();
        let new = dedup_in_order(touched, frames);
        let before = ws.frames.len();
        ws.frames
            .extend(new.into_iter().filter(|f| !known.contains(f)));
        if ws.frames.len() == before {
            return Ok(None);
        }
        ws.observations += 1;
        let path = self.ws_path(&t.name);
        let bytes = encode(t.manifest_sum, &ws, &|b| self.hasher.keyed(b));
        crate::format::write_atomic(&self.tmp_dir(), &path, &bytes, || true).map_err(|source| {
            WriteError::Io {
                step: "writing the learned working set",
                path,
                source,
            }
        })?;
        Ok(Some(ws))
    }

    /// Removes the learned working set of `name` (none is fine).
    pub(crate) fn remove_learned(&self, name: &TemplateName) -> io::Result<()> {
        match fs::remove_file(self.ws_path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// `frames` without repeats and without frames at or past `limit`, in their order.
fn dedup_in_order(frames: &[u64], limit: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::with_capacity(frames.len());
    frames
        .iter()
        .copied()
        .filter(|&f| f < limit && seen.insert(f))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{page, TempDir};

    const MEM: u64 = 4 << 20;

    fn store() -> (TempDir, Store) {
        let d = TempDir::new();
        let mut s = Store::create_or_open(d.path()).unwrap();
        let mut w = s.begin_template("fn", None, MEM).unwrap();
        w.put_page(3, &page(1)).unwrap();
        w.set_working_set(vec![3, 9]);
        w.commit().unwrap();
        (d, s)
    }

    #[test]
    fn learning_adds_new_frames_in_order_until_the_limit() {
        let (_d, s) = store();
        let t = s.load("fn").unwrap();
        assert_eq!(s.learned_working_set(&t), Ok(None));
        // Nothing new: nothing written.
        assert_eq!(s.learn_working_set(&t, &[9, 3], 2).unwrap(), None);
        assert_eq!(s.learned_working_set(&t), Ok(None));
        let ws = s.learn_working_set(&t, &[5, 9, 5, 7], 2).unwrap().unwrap();
        assert_eq!(ws.frames, vec![3, 9, 5, 7]);
        assert_eq!(ws.observations, 1);
        assert_eq!(s.learned_working_set(&t), Ok(Some(ws)));
        // Frames past guest RAM are dropped.
        let ws = s
            .learn_working_set(&t, &[1, MEM / 4096, u64::MAX], 2)
            .unwrap()
            .unwrap();
        assert_eq!((ws.observations, ws.frames), (2, vec![3, 9, 5, 7, 1]));
        // The limit reached: no more learning.
        assert_eq!(s.learn_working_set(&t, &[2], 2).unwrap(), None);
        let now = s.learned_working_set(&t).unwrap().unwrap();
        assert_eq!(now.frames, vec![3, 9, 5, 7, 1]);
    }

    #[test]
    fn a_record_is_bound_to_its_manifest_and_checked() {
        let (d, mut s) = store();
        let t = s.load("fn").unwrap();
        s.learn_working_set(&t, &[4], 10).unwrap().unwrap();
        let path = d.path().join("templates/fn.ws");
        let good = fs::read(&path).unwrap();
        // Any flipped byte is refused (the checksum, or the header).
        for at in [0, 9, 13, 25, HEADER + 3, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            assert!(s.learned_working_set(&t).is_err(), "byte {at}");
        }
        // A damaged record is replaced by the next update.
        let ws = s.learn_working_set(&t, &[6], 10).unwrap().unwrap();
        assert_eq!((ws.observations, ws.frames), (1, vec![3, 9, 6]));
        // Removing the template removes its record.
        let kept = fs::read(&path).unwrap();
        s.remove("fn").unwrap();
        assert!(!path.exists());
        // Re-created under the same name: a record of the old one is not used.
        let mut w = s.begin_template("fn", None, MEM).unwrap();
        w.put_page(3, &page(2)).unwrap();
        w.commit().unwrap();
        fs::write(&path, &kept).unwrap();
        let t2 = s.load("fn").unwrap();
        let why = s.learned_working_set(&t2).unwrap_err();
        assert!(why.contains("another version"), "{why}");
        let about_ws = |s: &Store| {
            let p = s.verify();
            p.iter()
                .filter(|p| p.path.to_string_lossy().ends_with(".ws"))
                .count()
        };
        assert_eq!(about_ws(&s), 0, "{:?}", s.verify());
        // One whose template is gone is garbage, which gc removes.
        fs::copy(&path, d.path().join("templates/gone.ws")).unwrap();
        assert_eq!(about_ws(&s), 1, "{:?}", s.verify());
        s.gc(false).unwrap();
        assert!(!d.path().join("templates/gone.ws").exists());
    }

    #[test]
    fn an_oversized_or_special_file_is_refused_unread() {
        use std::os::unix::fs::symlink;
        let (d, s) = store();
        let t = s.load("fn").unwrap();
        let path = d.path().join("templates/fn.ws");
        // A sparse file far larger than any record: refused without reading it.
        let f = fs::File::create(&path).unwrap();
        f.set_len(64 << 30).unwrap();
        let why = s.learned_working_set(&t).unwrap_err();
        assert!(why.contains("longer than"), "{why}");
        // A device that never ends, and a FIFO that would block.
        fs::remove_file(&path).unwrap();
        symlink("/dev/zero", &path).unwrap();
        assert!(s.learned_working_set(&t).unwrap_err().contains("device"));
        fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path; the result is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(s.learned_working_set(&t).unwrap_err().contains("FIFO"));
        // Learning renames a new record over it.
        let ws = s.learn_working_set(&t, &[5], 10).unwrap().unwrap();
        assert_eq!(ws.frames, vec![3, 9, 5]);
        assert_eq!(s.learned_working_set(&t).unwrap(), Some(ws));
    }

    #[test]
    fn hostile_records_are_refused_without_panicking() {
        let sum = |b: &[u8]| b.len() as u128;
        let ws = LearnedWorkingSet {
            observations: 1,
            frames: vec![1, 2],
        };
        let good = encode(7, &ws, &sum);
        assert_eq!(decode(&good, 7, 16, &sum), Ok(ws));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], 7, 16, &sum).is_err());
        }
        // Outside guest RAM, named twice, more frames than RAM has.
        for frames in [vec![16], vec![2, 2], (0..17).collect()] {
            let b = encode(
                7,
                &LearnedWorkingSet {
                    observations: 1,
                    frames,
                },
                &sum,
            );
            assert!(decode(&b, 7, 16, &sum).is_err());
        }
    }
}
