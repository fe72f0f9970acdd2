//! Location record decoder (`decode_locations`: `templates/<name>.loc`, where each of a
//! template's own pages lives).
//!
//! Input: a mode byte, then the file. Mode % 2: 0 = the record as is, 1 = with its magic,
//! major version, body length and checksum fixed up, so that the body's decoder is reached.
//! The checksum is the store's keyed XXH3-128; here the unkeyed one stands in for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot_store::fuzzing as fmt;
use xxhash_rust::xxh3::xxh3_128;

fn sum(b: &[u8]) -> u128 {
    xxh3_128(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    if mode % 2 == 1 && b.len() >= fmt::LOC_HEADER {
        b[..8].copy_from_slice(fmt::LOC_MAGIC);
        b[8..10].copy_from_slice(&fmt::LOC_MAJOR.to_le_bytes());
        let body_len = (b.len() - fmt::LOC_HEADER) as u64;
        b[12..20].copy_from_slice(&body_len.to_le_bytes());
        let s = sum(&b[fmt::LOC_HEADER..]);
        b[20..36].copy_from_slice(&s.to_le_bytes());
    }
    match fmt::decode_locations(&b, &sum) {
        Ok(record) => {
            for &e in &record.entries {
                let (pack, offset) = fmt::LocRecord::split(e);
                let p = record
                    .packs
                    .get(pack as usize)
                    .expect("an entry names a pack the record lacks");
                assert_eq!(offset % 4096, 0, "unaligned offset accepted");
                assert!(offset + 4096 <= p.extent, "an entry lies past its pack's extent");
            }
            // Re-encoding gives the input back (except the minor version, which the
            // decoder ignores).
            let again = fmt::encode_locations(&record, &sum);
            assert_eq!(again[..10], b[..10]);
            assert_eq!(again[12..], b[12..], "location record round trip changed it");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
