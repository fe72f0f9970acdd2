//! Byte formats of the remote's metadata objects (pack indexes, manifests,
//! template references, gc marks). Each is framed the same way:
//!
//! ```text
//! magic [8], major u16, minor u16, payload length u64, BLAKE3(payload) [32], payload
//! ```
//!
//! and the payload is bincode 2 (standard config) with an allocation limit.
//! Decoders check the frame, the length against the bytes present and the
//! limit, the checksum, then the structure; they never panic.

use bincode::{Decode, Encode};

use snapshot_store::{TemplateName, PAGE_SIZE};

/// BLAKE3-256 of some bytes: a page's, a pack's or a manifest's identity on the remote.
pub type Hash = [u8; 32];

pub fn hash(b: &[u8]) -> Hash {
    *blake3::hash(b).as_bytes()
}

pub fn hex(h: &Hash) -> String {
    let mut s = String::with_capacity(64);
    for b in h {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn parse_hex(s: &str) -> Option<Hash> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, out) in h.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(h)
}

const HEADER: usize = 8 + 2 + 2 + 8 + 32;
const MAJOR: u16 = 1;

/// Most pages in one pack (16 MiB); push writes packs of [`PACK_TARGET_PAGES`].
pub const MAX_PACK_PAGES: usize = 4096;
/// Pages per pack written by push: 4 MiB objects.
pub const PACK_TARGET_PAGES: usize = 1024;
/// Largest guest memory a manifest may describe (as the local store).
pub const MAX_MEM: u64 = 4 << 30;

pub const IDX_MAGIC: &[u8; 8] = b"VMMRIDX1";
pub const MAN_MAGIC: &[u8; 8] = b"VMMRMAN1";
pub const REF_MAGIC: &[u8; 8] = b"VMMRREF1";
pub const GC_MAGIC: &[u8; 8] = b"VMMRGCM1";

/// Size limits of each object kind, checked before anything is allocated.
pub const IDX_LIMIT: usize = 64 + MAX_PACK_PAGES * 40;
pub const MAN_LIMIT: usize = 256 << 20;
pub const REF_LIMIT: usize = 4096;
pub const GC_LIMIT: usize = 64 << 20;

fn encode<T: Encode>(magic: &[u8; 8], v: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these types.
    let payload = bincode::encode_to_vec(v, bincode::config::standard()).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&MAJOR.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&hash(&payload));
    out.extend_from_slice(&payload);
    out
}

fn decode<T: Decode<()>, const LIMIT: usize>(magic: &[u8; 8], b: &[u8]) -> Result<T, String> {
    if b.len() < HEADER || &b[..8] != magic {
        return Err("bad magic or short header".into());
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    if major != MAJOR {
        return Err(format!(
            "format version {major}, this build reads {MAJOR}: upgrade"
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&b[12..20]);
    let len = u64::from_le_bytes(len);
    let payload = &b[HEADER..];
    if len != payload.len() as u64 || payload.len() > LIMIT {
        return Err(format!(
            "header says {len} payload bytes, {} present (limit {LIMIT})",
            payload.len()
        ));
    }
    if b[20..52] != hash(payload) {
        return Err("checksum mismatch".into());
    }
    let cfg = bincode::config::standard().with_limit::<LIMIT>();
    let (v, used): (T, usize) =
        bincode::decode_from_slice(payload, cfg).map_err(|e| format!("payload: {e}"))?;
    let minor = u16::from_le_bytes([b[10], b[11]]);
    if used != payload.len() && minor == 0 {
        return Err(format!("{} trailing payload bytes", payload.len() - used));
    }
    Ok(v)
}

// ---------------------------------------------------------------- pack index

/// `packs/<H>.idx`: the pages of pack `H`, in order (page i at byte i * 4096).
/// H = BLAKE3(salt || the pack's bytes): a random salt per pack, so a pack uploaded
/// again (say after gc marked an identical one for deletion) never reuses a key.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    pub pack: Hash,
    pub salt: [u8; 16],
    pub pages: Vec<Hash>,
}

/// The name of a pack: BLAKE3 of its salt and its bytes.
pub fn pack_name(salt: &[u8; 16], bytes: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(salt);
    h.update(bytes);
    *h.finalize().as_bytes()
}

impl PackIndex {
    pub fn encode(&self) -> Vec<u8> {
        encode(IDX_MAGIC, self)
    }
    /// Decodes the index object of pack `name`.
    pub fn decode(name: &Hash, b: &[u8]) -> Result<PackIndex, String> {
        let i: PackIndex = decode::<_, IDX_LIMIT>(IDX_MAGIC, b)?;
        if &i.pack != name {
            return Err(format!("it indexes pack {}", hex(&i.pack)));
        }
        if i.pages.is_empty() || i.pages.len() > MAX_PACK_PAGES {
            return Err(format!(
                "{} pages (1..={MAX_PACK_PAGES} allowed)",
                i.pages.len()
            ));
        }
        Ok(i)
    }
    pub fn pack_len(&self) -> u64 {
        (self.pages.len() * PAGE_SIZE) as u64
    }
}

// ---------------------------------------------------------------- manifest

/// `manifests/<M>.man` (M = BLAKE3 of the whole object): one template layer.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub name: String,
    /// The parent's name and the hash of the parent manifest this layer was pushed with.
    pub parent: Option<(String, Hash)>,
    pub mem_size: u64,
    pub created_unix_ms: u64,
    pub pushed_unix_ms: u64,
    /// Random: every push writes a manifest object no earlier push (or gc mark) knew.
    pub nonce: [u8; 16],
    /// (first frame, count), sorted, disjoint.
    pub zero_runs: Vec<(u64, u64)>,
    /// (first frame, indexes into `pages`), sorted, disjoint.
    pub page_runs: Vec<(u64, Vec<u32>)>,
    /// The layer's distinct pages (BLAKE3 of their bytes).
    pub pages: Vec<Hash>,
    /// Where each page of `pages` is: (index into `packs`, page number in that pack).
    pub locs: Vec<(u32, u32)>,
    pub packs: Vec<Hash>,
    pub vcpu_state: Vec<u8>,
    pub device_state: Vec<u8>,
    pub working_set: Vec<u64>,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        encode(MAN_MAGIC, self)
    }
    /// Decodes and checks the manifest object `name` (its bytes must hash to it).
    pub fn decode(name: &Hash, b: &[u8]) -> Result<Manifest, String> {
        if &hash(b) != name {
            return Err("its bytes do not hash to its name".into());
        }
        let m: Manifest = decode::<_, MAN_LIMIT>(MAN_MAGIC, b)?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        TemplateName::new(&self.name).map_err(|e| e.to_string())?;
        if let Some((p, _)) = &self.parent {
            TemplateName::new(p).map_err(|e| format!("parent: {e}"))?;
            if p == &self.name {
                return Err("it is its own parent".into());
            }
        }
        if self.mem_size == 0
            || !self.mem_size.is_multiple_of(PAGE_SIZE as u64)
            || self.mem_size > MAX_MEM
        {
            return Err(format!("guest memory size {} is invalid", self.mem_size));
        }
        let frames = self.mem_size / PAGE_SIZE as u64;
        let mut ranges: Vec<(u64, u64)> = self.zero_runs.clone();
        for (s, v) in &self.page_runs {
            ranges.push((*s, v.len() as u64));
            if let Some(k) = v.iter().find(|&&k| k as usize >= self.pages.len()) {
                return Err(format!(
                    "page index {k} is past its {} pages",
                    self.pages.len()
                ));
            }
        }
        // Every page listed is used (so a layer lists at most one page per frame it owns).
        let mut used = vec![false; self.pages.len()];
        for (_, v) in &self.page_runs {
            for &k in v {
                used[k as usize] = true;
            }
        }
        if let Some(k) = used.iter().position(|u| !u) {
            return Err(format!("page {k} of its page list is used by no frame"));
        }
        ranges.sort_unstable();
        let mut next = 0u64;
        for (s, n) in ranges {
            let end = s.checked_add(n).filter(|&e| n > 0 && e <= frames);
            let Some(end) = end else {
                return Err(format!(
                    "run of {n} frames at {s} is empty or outside guest memory"
                ));
            };
            if s < next {
                return Err(format!("run at frame {s} overlaps the previous one"));
            }
            next = end;
        }
        if self.locs.len() != self.pages.len() {
            return Err(format!(
                "{} pages but {} locations",
                self.pages.len(),
                self.locs.len()
            ));
        }
        if let Some((p, n)) = self
            .locs
            .iter()
            .find(|(p, n)| *p as usize >= self.packs.len() || *n as usize >= MAX_PACK_PAGES)
        {
            return Err(format!("location (pack {p}, page {n}) is out of range"));
        }
        if let Some(f) = self.working_set.iter().find(|&&f| f >= frames) {
            return Err(format!("working set frame {f} is outside guest memory"));
        }
        Ok(())
    }

    /// Frames with a page of this layer's own, with the page.
    pub fn own_pages(&self) -> impl Iterator<Item = (u64, &Hash)> + '_ {
        self.page_runs.iter().flat_map(move |(s, v)| {
            v.iter()
                .enumerate()
                .map(move |(i, &k)| (s + i as u64, &self.pages[k as usize]))
        })
    }

    pub fn own_page_count(&self) -> u64 {
        self.page_runs.iter().map(|(_, v)| v.len() as u64).sum()
    }

    /// Whether `other` is the same template (same name, parent, layout, pages
    /// and state; where pages are stored and when it was pushed do not count).
    pub fn same_template(&self, other: &Manifest) -> bool {
        self.name == other.name
            && self.parent == other.parent
            && self.mem_size == other.mem_size
            && self.created_unix_ms == other.created_unix_ms
            && self.zero_runs == other.zero_runs
            && self.vcpu_state == other.vcpu_state
            && self.device_state == other.device_state
            && self.working_set == other.working_set
            && self.page_runs.len() == other.page_runs.len()
            && self
                .page_runs
                .iter()
                .zip(&other.page_runs)
                .all(|((a, va), (b, vb))| a == b && va.len() == vb.len())
            && self
                .own_pages()
                .map(|(_, h)| h)
                .eq(other.own_pages().map(|(_, h)| h))
    }
}

// ---------------------------------------------------------------- template reference

/// `templates/<name>`: which manifest the template of that name is now.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct TemplateRef {
    pub name: String,
    pub manifest: Hash,
    pub pushed_unix_ms: u64,
}

impl TemplateRef {
    pub fn encode(&self) -> Vec<u8> {
        encode(REF_MAGIC, self)
    }
    pub fn decode(name: &str, b: &[u8]) -> Result<TemplateRef, String> {
        let r: TemplateRef = decode::<_, REF_LIMIT>(REF_MAGIC, b)?;
        if r.name != name {
            return Err(format!("it names template {:?}", r.name));
        }
        Ok(r)
    }
}

// ---------------------------------------------------------------- gc marks

/// `gc/marked`: the objects a garbage collection found unreferenced, and when.
/// The next collection at least `grace_ms` later deletes those still unreferenced.
#[derive(Encode, Decode, Clone, Debug, Default, PartialEq, Eq)]
pub struct GcMarks {
    pub marked_unix_ms: u64,
    pub grace_ms: u64,
    /// Keys below the prefix: `packs/<H>.pack`, `packs/<H>.idx`, `manifests/<M>.man`.
    pub objects: Vec<String>,
}

impl GcMarks {
    pub fn encode(&self) -> Vec<u8> {
        encode(GC_MAGIC, self)
    }
    pub fn decode(b: &[u8]) -> Result<GcMarks, String> {
        decode::<_, GC_LIMIT>(GC_MAGIC, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_damage_is_refused() {
        let pack = hash(b"pack");
        let i = PackIndex {
            pack,
            salt: [3; 16],
            pages: vec![hash(b"a"), hash(b"b")],
        };
        let b = i.encode();
        assert_eq!(PackIndex::decode(&pack, &b).unwrap(), i);
        assert!(PackIndex::decode(&hash(b"other"), &b).is_err());
        // Every byte but the minor version (a newer minor may only append payload).
        for k in (0..b.len()).filter(|k| !(10..12).contains(k)) {
            let mut d = b.clone();
            d[k] ^= 1;
            assert!(
                PackIndex::decode(&pack, &d).is_err(),
                "flip at {k} accepted"
            );
        }
        for n in 0..b.len() {
            assert!(PackIndex::decode(&pack, &b[..n]).is_err());
        }
        let m = Manifest {
            name: "fn".into(),
            parent: Some(("base".into(), hash(b"p"))),
            mem_size: 16 * 4096,
            created_unix_ms: 1,
            pushed_unix_ms: 2,
            nonce: [7; 16],
            zero_runs: vec![(0, 2)],
            page_runs: vec![(3, vec![0, 1, 0])],
            pages: vec![hash(b"x"), hash(b"y")],
            locs: vec![(0, 0), (0, 1)],
            packs: vec![pack],
            vcpu_state: vec![1],
            device_state: vec![],
            working_set: vec![3, 4],
        };
        let b = m.encode();
        let name = hash(&b);
        assert_eq!(Manifest::decode(&name, &b).unwrap(), m);
        let mut d = b.clone();
        *d.last_mut().unwrap() ^= 1;
        assert!(Manifest::decode(&name, &d).is_err());
        let mut bad = m.clone();
        bad.page_runs = vec![(15, vec![0, 1])];
        let b = bad.encode();
        assert!(Manifest::decode(&hash(&b), &b)
            .unwrap_err()
            .contains("outside"));
        let mut bad = m.clone();
        bad.pages.push(hash(b"unused"));
        bad.locs.push((0, 2));
        let b = bad.encode();
        assert!(Manifest::decode(&hash(&b), &b)
            .unwrap_err()
            .contains("used by no frame"));
        let mut bad = m.clone();
        bad.locs = vec![(1, 0), (0, 1)];
        let b = bad.encode();
        assert!(Manifest::decode(&hash(&b), &b).is_err());
        let mut other = m.clone();
        other.locs = vec![(0, 5), (0, 1)];
        other.nonce = [0; 16];
        assert!(m.same_template(&other));
        other.pages.swap(0, 1);
        assert!(!m.same_template(&other));
        let r = TemplateRef {
            name: "fn".into(),
            manifest: name,
            pushed_unix_ms: 3,
        };
        assert_eq!(TemplateRef::decode("fn", &r.encode()).unwrap(), r);
        assert!(TemplateRef::decode("other", &r.encode()).is_err());
        assert_eq!(parse_hex(&hex(&name)), Some(name));
        assert_eq!(parse_hex("zz"), None);
    }

    #[test]
    fn decoders_survive_garbage_and_valid_frames_around_garbage_payloads() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let len = (next() % 300) as usize;
            let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 {
                // Large announced lengths inside the payload (bincode varints).
                payload.insert(0, 0xfd);
            }
            for magic in [IDX_MAGIC, MAN_MAGIC, REF_MAGIC, GC_MAGIC] {
                // A well-framed object whose payload is garbage, and the raw garbage.
                let mut b = Vec::new();
                b.extend_from_slice(magic);
                b.extend_from_slice(&MAJOR.to_le_bytes());
                b.extend_from_slice(&0u16.to_le_bytes());
                b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                b.extend_from_slice(&hash(&payload));
                b.extend_from_slice(&payload);
                for bytes in [&b[..], &payload[..]] {
                    let _ = PackIndex::decode(&[0; 32], bytes);
                    let _ = Manifest::decode(&hash(bytes), bytes);
                    let _ = TemplateRef::decode("x", bytes);
                    let _ = GcMarks::decode(bytes);
                }
            }
        }
    }
}
