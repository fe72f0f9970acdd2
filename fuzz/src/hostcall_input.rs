//! The input format of the `hostcall` target, read by the target and written by the seed
//! generator ([`Builder`]). Every read past the end of the input yields zeros, so every
//! input is valid; the op sequence ends with the input.
//!
//! ```text
//! header:
//!   mem: u8          guest RAM = (1 + mem % 12) 2 MiB regions; >= 0xf0: 160 regions (320 MiB)
//!   flags: u8        bit 0: the fixed grants (else none) · bit 1: a function config follows
//!                    bit 2: a request body (stdin) follows · bit 3: a grant map follows
//!   limit: u16       output cap, in units of 64 bytes
//!   [function: u16 len, bytes] [stdin: u16 len, bytes] [map: u8 len, bytes]
//! ops, until the input ends (kind: u8, modulo 6):
//!   0 POKE    off: u16, len: u8, bytes    the guest writes RAM at off (the window: 64 KiB)
//!   1 CALL    op: val, args: 6 x val, port: u8 (bit 0: a u16 port follows, else the
//!             hostcall port; bits 1-2: value length - 1)
//!   2 GRANTS  start: u8, stride: u8, count: u8   count grants of one region each
//!   3 MAILBOX len: u8, bytes                     raw mailbox bytes, then a hostcall
//!   4 ANSWER  stdin: u16 len, bytes              a new invocation's body for the pending call
//!   5 OUTPUT                                     a new invocation's output buffers
//! val (tag: u8, modulo 8):
//!   0 u8 · 1 u16 (in the window) · 2 u8 * 2 MiB · 3 mem_size - u16 · 4 u64
//!   5 u64::MAX - u8 · 6 u16 * 4096 · 7 a length cap + i8 (u8: bit 0 message, else transfer)
//! ```

pub const REGION: u64 = 2 << 20;
/// The part of guest RAM the target pokes and checks byte by byte after every hostcall.
pub const WINDOW: u64 = 64 << 10;

pub const FLAG_FIXED: u8 = 1;
pub const FLAG_FUNCTION: u8 = 2;
pub const FLAG_STDIN: u8 = 4;
pub const FLAG_MAP: u8 = 8;

pub const POKE: u8 = 0;
pub const CALL: u8 = 1;
pub const GRANTS: u8 = 2;
pub const MAILBOX: u8 = 3;
pub const ANSWER: u8 = 4;
pub const OUTPUT: u8 = 5;

pub struct Reader<'a> {
    pub b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn done(&self) -> bool {
        self.b.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.b.len());
        let (h, t) = self.b.split_at(n);
        self.b = t;
        h
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    pub fn u64(&mut self) -> u64 {
        let mut w = [0u8; 8];
        let b = self.bytes(8);
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    }
    pub fn val(&mut self, mem_size: u64) -> u64 {
        match self.u8() % 8 {
            0 => u64::from(self.u8()),
            1 => u64::from(self.u16()),
            2 => u64::from(self.u8()) * REGION,
            3 => mem_size.wrapping_sub(u64::from(self.u16())),
            4 => self.u64(),
            5 => u64::MAX - u64::from(self.u8()),
            6 => u64::from(self.u16()) * 4096,
            _ => {
                let cap = if self.u8() & 1 == 1 {
                    vmm_abi::MAX_MESSAGE_LEN
                } else {
                    vmm_abi::MAX_TRANSFER_LEN
                };
                cap.wrapping_add(self.u8() as i8 as i64 as u64)
            }
        }
    }
}

/// Writes inputs of this format (the seeds).
#[derive(Default)]
pub struct Builder {
    pub b: Vec<u8>,
}

impl Builder {
    pub fn header(
        mem: u8,
        fixed: bool,
        limit: u16,
        function: Option<&[u8]>,
        stdin: Option<&[u8]>,
    ) -> Builder {
        let mut b = Builder::default();
        let flags = if fixed { FLAG_FIXED } else { 0 }
            | if function.is_some() { FLAG_FUNCTION } else { 0 }
            | if stdin.is_some() { FLAG_STDIN } else { 0 };
        b.b.extend_from_slice(&[mem, flags]);
        b.b.extend_from_slice(&limit.to_le_bytes());
        for x in [function, stdin].into_iter().flatten() {
            b.b.extend_from_slice(&(x.len() as u16).to_le_bytes());
            b.b.extend_from_slice(x);
        }
        b
    }
    pub fn poke(&mut self, gpa: u64, bytes: &[u8]) -> &mut Self {
        assert!(gpa < WINDOW && bytes.len() < 256);
        self.b.push(POKE);
        self.b.extend_from_slice(&(gpa as u16).to_le_bytes());
        self.b.push(bytes.len() as u8);
        self.b.extend_from_slice(bytes);
        self
    }
    /// A hostcall on the hostcall port; every value as a raw u64.
    pub fn call(&mut self, op: u64, args: &[u64]) -> &mut Self {
        self.b.push(CALL);
        for v in std::iter::once(op).chain((0..6).map(|i| args.get(i).copied().unwrap_or(0))) {
            self.b.push(4);
            self.b.extend_from_slice(&v.to_le_bytes());
        }
        self.b.push(0);
        self
    }
    pub fn grants(&mut self, start: u8, stride: u8, count: u8) -> &mut Self {
        self.b.extend_from_slice(&[GRANTS, start, stride, count]);
        self
    }
    pub fn answer(&mut self, stdin: &[u8]) -> &mut Self {
        self.b.push(ANSWER);
        self.b
            .extend_from_slice(&(stdin.len() as u16).to_le_bytes());
        self.b.extend_from_slice(stdin);
        self
    }
}
