//! Builders of healthy and damaged stores, shared by this crate's tests, the
//! `vmm-store` tool tests and fuzz seeds (feature `fixtures`). Not a stable API.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::format::{self, ManifestV1};
use crate::{PackId, PageId, Store, PAGE_SIZE};

/// Guest memory size of the fixture templates (64 frames).
pub const MEM: u64 = 64 * PAGE_SIZE as u64;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "snapshot-store-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}
impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A pseudo-random, non-zero page determined by `seed`.
pub fn page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut p = [0u8; PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// base: frames 0..10 = page(i); fn (on base): frames 3,4 new, frame 5 zeroed.
pub fn make_base_and_fn(store: &mut Store) {
    let mut w = store.begin_template("base", None, MEM).unwrap();
    for i in 0..10 {
        w.put_page(i, &page(i)).unwrap();
    }
    w.set_vcpu_state(b"vcpu-base".to_vec());
    w.set_device_state(b"dev-base".to_vec());
    w.set_working_set(vec![2, 1, 0]);
    w.commit().unwrap();
    let mut w = store.begin_template("fn", Some("base"), MEM).unwrap();
    w.put_page(3, &page(103)).unwrap();
    w.put_page(4, &page(104)).unwrap();
    w.set_zero(5).unwrap();
    w.set_vcpu_state(b"vcpu-fn".to_vec());
    w.set_working_set(vec![4, 3, 9]);
    w.commit().unwrap();
}

/// A healthy store with `base` and `fn` (see [`make_base_and_fn`]) at `dir`.
pub fn healthy_store(dir: &Path) -> Store {
    let mut s = Store::create_or_open(dir).unwrap();
    make_base_and_fn(&mut s);
    s
}

pub fn read_manifest(dir: &Path, name: &str) -> ManifestV1 {
    let p = dir.join(format!("templates/{name}.tmpl"));
    format::decode_manifest(&p, &fs::read(&p).unwrap()).unwrap()
}

pub fn write_manifest(dir: &Path, m: &ManifestV1) {
    fs::write(
        dir.join(format!("templates/{}.tmpl", m.name)),
        format::encode_manifest(m),
    )
    .unwrap();
}

const PACK1: &str = "packs/0000000000000001.pack";
const IDX1: &str = "packs/0000000000000001.idx";

/// Cuts 6000 bytes off the end of the first pack.
pub fn truncated_pack(d: &Path) {
    let p = d.join(PACK1);
    let len = fs::metadata(&p).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 6000)
        .unwrap();
}

/// Flips one bit in the sixth page of the first pack.
pub fn flipped_bit(d: &Path) {
    let p = d.join(PACK1);
    let mut b = fs::read(&p).unwrap();
    b[5 * PAGE_SIZE + 17] ^= 0x10;
    fs::write(&p, b).unwrap();
}

/// Damages the payload of `fn`'s manifest (checksum no longer matches).
pub fn bad_manifest_checksum(d: &Path) {
    let p = d.join("templates/fn.tmpl");
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 3] ^= 1;
    fs::write(&p, b).unwrap();
}

/// Deletes `base`, the parent of `fn`.
pub fn missing_parent(d: &Path) {
    fs::remove_file(d.join("templates/base.tmpl")).unwrap();
}

/// Adds an index entry pointing 1 GiB into the first pack.
pub fn index_entry_past_end(d: &Path) {
    let p = d.join(IDX1);
    let b = fs::read(&p).unwrap();
    let mut body = b[format::IDX_HEADER..].to_vec();
    format::idx_entry_bytes(
        &mut body,
        &format::IdxEntry {
            id: PageId::new(123, 0),
            offset: 1 << 30,
        },
    );
    fs::write(&p, format::encode_idx(PackId::new(1), &body)).unwrap();
}

/// Rewrites `fn`'s manifest with format major version 7.
pub fn future_format_version(d: &Path) {
    let m = read_manifest(d, "fn");
    fs::write(
        d.join("templates/fn.tmpl"),
        format::encode_manifest_version(&m, 7),
    )
    .unwrap();
}

/// Makes `base` a child of `fn` (fn -> base -> fn).
pub fn parent_cycle(d: &Path) {
    let mut m = read_manifest(d, "base");
    m.parent = Some("fn".into());
    write_manifest(d, &m);
}

/// Adds a working-set frame far outside guest memory to `fn`.
pub fn working_set_outside_ram(d: &Path) {
    let mut m = read_manifest(d, "fn");
    m.working_set.push(1 << 40);
    write_manifest(d, &m);
}

/// Deletes `store.cfg` (and with it the page secret).
pub fn missing_config(d: &Path) {
    fs::remove_file(d.join("store.cfg")).unwrap();
}

/// Deletes the first pack's index.
pub fn deleted_index(d: &Path) {
    fs::remove_file(d.join(IDX1)).unwrap();
}

/// Replaces the first pack's index with the index of pack 1 of another store
/// holding the same templates (a valid file, but its ids are keyed with
/// another secret).
pub fn foreign_index(d: &Path) {
    let other = TempDir::new();
    drop(healthy_store(other.path()));
    fs::copy(other.path().join(IDX1), d.join(IDX1)).unwrap();
}

/// Rewrites every entry of the first pack's index to offset 0 (valid checksum).
pub fn forged_offsets(d: &Path) {
    let p = d.join(IDX1);
    let entries = format::decode_idx(&p, PackId::new(1), &fs::read(&p).unwrap()).unwrap();
    let mut body = Vec::new();
    for e in entries {
        format::idx_entry_bytes(
            &mut body,
            &format::IdxEntry {
                id: e.id,
                offset: 0,
            },
        );
    }
    fs::write(&p, format::encode_idx(PackId::new(1), &body)).unwrap();
}

/// Drops the second half of the first pack's index entries, as an index
/// restored from an older backup would: the pages they listed now look like
/// an unindexed ("torn") tail, but templates still need them.
pub fn stale_index(d: &Path) {
    let p = d.join(IDX1);
    let mut entries = format::decode_idx(&p, PackId::new(1), &fs::read(&p).unwrap()).unwrap();
    entries.sort_by_key(|e| e.offset);
    entries.truncate(entries.len() / 2);
    let mut body = Vec::new();
    for e in &entries {
        format::idx_entry_bytes(&mut body, e);
    }
    fs::write(&p, format::encode_idx(PackId::new(1), &body)).unwrap();
}

/// A named way of damaging the first pack's index.
pub type IndexDamage = (&'static str, fn(&Path));

/// Index damage that leaves referenced pages in pack 1 that no index accounts
/// for: gc must refuse and change nothing, verify must report it, and
/// rebuilding the index from the pack must repair it.
pub const INDEX_DAMAGES: &[IndexDamage] = &[
    ("deleted-index", deleted_index),
    ("foreign-index", foreign_index),
    ("forged-offsets", forged_offsets),
    ("stale-index", stale_index),
];

/// A way of damaging a store made by [`healthy_store`], with a substring
/// the corruption report is expected to contain.
pub struct Damage {
    pub name: &'static str,
    pub apply: fn(&Path),
    pub expect: &'static str,
}

/// Every damaged fixture.
pub const DAMAGES: &[Damage] = &[
    Damage {
        name: "truncated-pack",
        apply: truncated_pack,
        expect: "truncated",
    },
    Damage {
        name: "flipped-bit",
        apply: flipped_bit,
        expect: "is damaged",
    },
    Damage {
        name: "manifest-checksum",
        apply: bad_manifest_checksum,
        expect: "checksum mismatch",
    },
    Damage {
        name: "missing-parent",
        apply: missing_parent,
        expect: "parent template base does not exist",
    },
    Damage {
        name: "index-past-end",
        apply: index_entry_past_end,
        expect: "past the end of its pack",
    },
    Damage {
        name: "future-version",
        apply: future_format_version,
        expect: "format version 7",
    },
    Damage {
        name: "parent-cycle",
        apply: parent_cycle,
        expect: "cycle",
    },
    Damage {
        name: "working-set-outside-ram",
        apply: working_set_outside_ram,
        expect: "working set frame",
    },
    Damage {
        name: "deleted-index",
        apply: deleted_index,
        expect: "no index accounts for them",
    },
    Damage {
        name: "foreign-index",
        apply: foreign_index,
        expect: "no index accounts for them",
    },
    Damage {
        name: "forged-offsets",
        apply: forged_offsets,
        expect: "no index accounts for them",
    },
    Damage {
        name: "stale-index",
        apply: stale_index,
        expect: "no index accounts for them",
    },
];
