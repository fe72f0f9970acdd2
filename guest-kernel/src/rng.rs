//! A ChaCha20-based CSPRNG (RFC 8439 block function), no dependencies.
//!
//! The generator keeps a 256-bit key and a 96-bit block position (a 32-bit block counter
//! plus a 64-bit stream number standing in for the nonce). Output is the ChaCha20
//! keystream. [`Rng::reseed`] mixes fresh material into the key through the block
//! function, so the new key is unpredictable if *either* the old key or the fresh
//! material is; it never replaces the state with something weaker.

const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];

#[inline(always)]
fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 §2.3): 64 bytes of keystream.
pub fn chacha20_block(key: &[u32; 8], counter: u32, nonce: &[u32; 3]) -> [u8; 64] {
    let mut init = [0u32; 16];
    init[..4].copy_from_slice(&SIGMA);
    init[4..12].copy_from_slice(key);
    init[12] = counter;
    init[13..16].copy_from_slice(nonce);
    let mut s = init;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    let mut out = [0u8; 64];
    for i in 0..16 {
        let w = s[i].wrapping_add(init[i]);
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn key_words(bytes: &[u8; 32]) -> [u32; 8] {
    let mut k = [0u32; 8];
    for (i, w) in k.iter_mut().enumerate() {
        *w = u32::from_le_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
    }
    k
}

/// Domain separation for the key-derivation block used by `reseed` (never used for output).
const RESEED_NONCE: [u32; 3] = [0x7265_7365, 0x6564_2121, 0xffff_ffff];

/// A ChaCha20 keystream generator.
pub struct Rng {
    key: [u32; 8],
    /// 64-bit block position: low word is the ChaCha counter, high word the stream.
    block: u64,
    buf: [u8; 64],
    /// Bytes of `buf` already handed out (64 = empty).
    used: usize,
}

impl Rng {
    pub fn new(seed: [u8; 32]) -> Self {
        Rng {
            key: key_words(&seed),
            block: 0,
            buf: [0; 64],
            used: 64,
        }
    }

    fn next_block(&mut self) -> [u8; 64] {
        let nonce = [(self.block >> 32) as u32, 0, 0];
        let out = chacha20_block(&self.key, self.block as u32, &nonce);
        self.block = self.block.wrapping_add(1);
        if self.block == 0 {
            // 2^64 blocks: practically unreachable; rekey rather than repeat.
            self.rekey([0; 32]);
        }
        out
    }

    /// Fill `dest` with keystream bytes.
    pub fn fill(&mut self, dest: &mut [u8]) {
        let mut dest = dest;
        // Drain what is left of the current block.
        if self.used < 64 && !dest.is_empty() {
            let n = core::cmp::min(64 - self.used, dest.len());
            dest[..n].copy_from_slice(&self.buf[self.used..self.used + n]);
            self.used += n;
            dest = &mut dest[n..];
        }
        let mut chunks = dest.chunks_exact_mut(64);
        for chunk in &mut chunks {
            let b = self.next_block();
            chunk.copy_from_slice(&b);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.buf = self.next_block();
            let n = rest.len();
            rest.copy_from_slice(&self.buf[..n]);
            self.used = n;
        }
    }

    /// Mix fresh seed material into the key. The new key is ChaCha20 keyed with
    /// `old_key XOR extra` over a dedicated nonce, so it stays secret if either input is.
    pub fn reseed(&mut self, extra: [u8; 32]) {
        self.rekey(extra);
    }

    fn rekey(&mut self, extra: [u8; 32]) {
        let e = key_words(&extra);
        let mut mixed = self.key;
        for (m, x) in mixed.iter_mut().zip(e.iter()) {
            *m ^= *x;
        }
        // Bind the old position too, so reseeding with zeros still moves the state.
        let pos = [
            RESEED_NONCE[0],
            RESEED_NONCE[1] ^ (self.block >> 32) as u32,
            RESEED_NONCE[2],
        ];
        let out = chacha20_block(&mixed, self.block as u32, &pos);
        let mut k = [0u8; 32];
        k.copy_from_slice(&out[..32]);
        self.key = key_words(&k);
        self.block = 0;
        // Forget any buffered bytes derived from the old key.
        self.buf = [0; 64];
        self.used = 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8439_block_vector() {
        // RFC 8439 §2.3.2.
        let mut kb = [0u8; 32];
        for (i, b) in kb.iter_mut().enumerate() {
            *b = i as u8;
        }
        let key = key_words(&kb);
        let nonce = [0x0900_0000, 0x4a00_0000, 0];
        let out = chacha20_block(&key, 1, &nonce);
        let expected: [u8; 64] = [
            0x10, 0xf1, 0xe7, 0xe4, 0xd1, 0x3b, 0x59, 0x15, 0x50, 0x0f, 0xdd, 0x1f, 0xa3, 0x20,
            0x71, 0xc4, 0xc7, 0xd1, 0xf4, 0xc7, 0x33, 0xc0, 0x68, 0x03, 0x04, 0x22, 0xaa, 0x9a,
            0xc3, 0xd4, 0x6c, 0x4e, 0xd2, 0x82, 0x64, 0x46, 0x07, 0x9f, 0xaa, 0x09, 0x14, 0xc2,
            0xd7, 0x05, 0xd9, 0x8b, 0x02, 0xa2, 0xb5, 0x12, 0x9c, 0xd1, 0xde, 0x16, 0x4e, 0xb9,
            0xcb, 0xd0, 0x83, 0xe8, 0xa2, 0x50, 0x3c, 0x4e,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn fill_is_a_contiguous_keystream() {
        let mut a = Rng::new([7; 32]);
        let mut whole = [0u8; 300];
        a.fill(&mut whole);
        let mut b = Rng::new([7; 32]);
        let mut pieces = [0u8; 300];
        let mut off = 0;
        for n in [1usize, 63, 5, 64, 100, 67] {
            b.fill(&mut pieces[off..off + n]);
            off += n;
        }
        assert_eq!(off, 300);
        assert_eq!(whole[..], pieces[..]);
        // First block equals the raw block function at counter 0.
        let first = chacha20_block(&key_words(&[7; 32]), 0, &[0, 0, 0]);
        assert_eq!(whole[..64], first[..]);
    }

    #[test]
    fn reseed_changes_stream() {
        let mut a = Rng::new([1; 32]);
        let mut b = Rng::new([1; 32]);
        b.reseed([0; 32]);
        let mut c = Rng::new([1; 32]);
        c.reseed([2; 32]);
        let (mut x, mut y, mut z) = ([0u8; 32], [0u8; 32], [0u8; 32]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_ne!(x, y);
        assert_ne!(y, z);
        assert_ne!(x, z);
    }
}
