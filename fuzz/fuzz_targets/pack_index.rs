//! Pack index decoder (`decode_idx`) and store config decoder (`decode_config`).
//!
//! Input: a mode byte, then the file. Mode % 4: 0 = index as is, 1 = index with
//! its pack id, count and checksum fixed up, 2 = config as is, 3 = config with
//! its magic and checksum fixed up.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapshot_store::fuzzing as fmt;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    match mode % 4 {
        m @ (0 | 1) => {
            let name = "packs/0000000000000001.idx";
            if m == 1 {
                vmm_fuzz::fix_file(name, &mut b);
            }
            match fmt::decode_idx(Path::new(name), fmt::pack_id(1), &b) {
                Ok(entries) => {
                    assert_eq!(
                        fmt::IDX_HEADER + entries.len() * fmt::IDX_ENTRY,
                        b.len(),
                        "entry count does not match the bytes"
                    );
                    let mut body = Vec::new();
                    for e in &entries {
                        assert_eq!(e.offset % 4096, 0, "unaligned offset accepted");
                        fmt::idx_entry_bytes(&mut body, e);
                    }
                    // Fixed-width format: re-encoding gives the input back
                    // (except the minor version, which the decoder ignores).
                    let again = fmt::encode_idx(fmt::pack_id(1), &body);
                    assert_eq!(again[..10], b[..10]);
                    assert_eq!(again[12..], b[12..], "index round trip changed it");
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        m => {
            if m == 3 {
                vmm_fuzz::fix_file("store.cfg", &mut b);
            }
            if let Ok(secret) = fmt::decode_config(&b) {
                let again = fmt::encode_config(&secret);
                assert_eq!(again.len(), b.len());
                assert_eq!(again[..10], b[..10]);
                assert_eq!(again[12..fmt::CFG_LEN - 8], b[12..fmt::CFG_LEN - 8]);
            }
        }
    }
});
