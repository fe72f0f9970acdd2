//! Template manifest decoder: `decode_manifest` (header, checksum, bincode payload)
//! and `validate_manifest`.
//!
//! Input: a mode byte, then either a whole manifest file (mode bit 0 clear) or
//! a bare payload (bit 0 set) that gets a valid header and checksum (minor
//! version = mode bits 1..2), so the fuzzer reaches the bincode decoder and the
//! validator without having to forge an xxh3-128.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapshot_store::fuzzing as fmt;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("templates/fuzz.tmpl");
    let built;
    let bytes: &[u8] = if mode & 1 == 0 {
        rest
    } else {
        built = vmm_fuzz::manifest_with_payload(u16::from((mode >> 1) & 3), rest);
        &built
    };
    match fmt::decode_manifest(path, bytes) {
        Ok(m) => {
            // Accepted means valid, and it survives an encode/decode round trip.
            if let Err(e) = fmt::validate_manifest(path, &m) {
                panic!("decode_manifest accepted a manifest validate_manifest rejects: {e}");
            }
            let again = fmt::encode_manifest(&m);
            match fmt::decode_manifest(path, &again) {
                Ok(m2) => assert_eq!(m, m2, "manifest round trip changed it"),
                Err(e) => panic!("re-encoded manifest does not decode: {e}"),
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
