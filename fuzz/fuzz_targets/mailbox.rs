//! What the VMM decodes from guest-written memory: the mailbox page
//! (`Mailbox::from_bytes` + `decode_request`) and the function config blob
//! (`FunctionConfig::decode`; the guest parses it, the VMM builds it, and both
//! sides must agree).
//!
//! Input: mem_size (u64 LE), the mailbox bytes (`MAILBOX_BYTES`), then the config blob.
//! Short input reads as zeros (like a short mailbox).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm_abi::{
    decode_request, valid_guest_path, AbiError, FunctionConfig, GuestRange, Mailbox, Request,
    MAILBOX_BYTES, MAX_CONFIG_ITEMS, MAX_MESSAGE_LEN, MAX_TRANSFER_LEN,
};

const GRANT_REGION: u64 = vmm_abi::layout::GRANT_REGION;

fn check_range(r: &GuestRange, max: u64, mem_size: u64) {
    let end = r.gpa.checked_add(r.len);
    assert!(
        matches!(end, Some(e) if e <= mem_size),
        "{r:?} is not inside guest memory of {mem_size:#x} bytes"
    );
    assert!(r.len <= max, "{r:?} is longer than {max}");
}

fuzz_target!(|data: &[u8]| {
    let mut ms = [0u8; 8];
    let n = data.len().min(8);
    ms[..n].copy_from_slice(&data[..n]);
    let mem_size = u64::from_le_bytes(ms);
    let rest = data.get(8..).unwrap_or(&[]);
    let (mb_bytes, blob) = rest.split_at(rest.len().min(MAILBOX_BYTES));

    // --- mailbox
    let mb = Mailbox::from_bytes(mb_bytes);
    assert_eq!(
        Mailbox::from_bytes(&mb.to_bytes()),
        mb,
        "mailbox round trip"
    );
    let words = mb.to_bytes();
    let whole = mb_bytes.len() / 8 * 8;
    let used = 31 * 8; // words the ABI defines; the rest of the page is ignored
    assert_eq!(words[..whole.min(used)], mb_bytes[..whole.min(used)]);

    let a = mb.args;
    match decode_request(&mb, mem_size) {
        Ok(req) => match req {
            Request::GetFunction { buf } => {
                assert_eq!(mb.op, 1);
                assert_eq!((buf.gpa, buf.len), (a[0], a[1]));
                check_range(&buf, mem_size, mem_size);
            }
            Request::ReadStdin { buf } => {
                assert_eq!(mb.op, 2);
                assert_eq!((buf.gpa, buf.len), (a[0], a[1]));
                check_range(&buf, mem_size, mem_size);
            }
            Request::Write { fd, data } => {
                assert_eq!(mb.op, 3);
                assert!(fd == 1 || fd == 2, "fd {fd}");
                assert_eq!(u64::from(fd), a[0]);
                assert_eq!((data.gpa, data.len), (a[1], a[2]));
                check_range(&data, MAX_TRANSFER_LEN, mem_size);
            }
            Request::Exit {
                code,
                stdout,
                stderr,
                flags,
            } => {
                assert_eq!(mb.op, 4);
                assert_eq!(
                    flags,
                    a[5] & (vmm_abi::EXIT_STDOUT_TRUNCATED | vmm_abi::EXIT_STDERR_TRUNCATED)
                );
                assert_eq!(code as u32, a[0] as u32);
                assert_eq!((stdout.gpa, stdout.len), (a[1], a[2]));
                assert_eq!((stderr.gpa, stderr.len), (a[3], a[4]));
                check_range(&stdout, MAX_TRANSFER_LEN, mem_size);
                check_range(&stderr, MAX_TRANSFER_LEN, mem_size);
            }
            Request::Fault { .. } => assert_eq!(mb.op, 5),
            Request::Panic { message, kind } => {
                assert_eq!(mb.op, 6);
                assert_eq!(kind, a[2]);
                assert_eq!((message.gpa, message.len), (a[0], a[1]));
                check_range(&message, MAX_MESSAGE_LEN, mem_size);
            }
            Request::Error { code, message } => {
                assert_eq!(mb.op, 7);
                assert_eq!(code, a[0]);
                assert_eq!((message.gpa, message.len), (a[1], a[2]));
                check_range(&message, MAX_MESSAGE_LEN, mem_size);
            }
            Request::Grant { range } => {
                assert_eq!(mb.op, 8);
                assert_eq!((range.gpa, range.len), (a[0], a[1]));
                check_range(&range, mem_size, mem_size);
                // A non-empty run of whole 2 MiB regions.
                assert!(range.len > 0);
                assert!(range.gpa.is_multiple_of(GRANT_REGION));
                assert!(range.len.is_multiple_of(GRANT_REGION));
            }
        },
        Err(e) => {
            let _ = e.to_string();
            match e {
                AbiError::UnknownOp(op) => {
                    assert_eq!(op, mb.op);
                    assert!(!(1..=8).contains(&op), "known op {op} refused as unknown");
                }
                AbiError::BadFd(fd) => {
                    assert_eq!(mb.op, 3);
                    assert!(fd != 1 && fd != 2);
                }
                AbiError::OutOfRange { gpa, len, .. } => {
                    assert!(gpa.checked_add(len).is_none_or(|e| e > mem_size));
                }
                AbiError::TooLong { len, max, .. } => assert!(len > max),
                AbiError::Unaligned { gpa, len, .. } => {
                    assert_eq!(mb.op, 8);
                    assert_eq!((gpa, len), (a[0], a[1]));
                    assert!(
                        len == 0
                            || !gpa.is_multiple_of(GRANT_REGION)
                            || !len.is_multiple_of(GRANT_REGION)
                    );
                }
            }
        }
    }

    // --- function config
    match FunctionConfig::decode(blob) {
        Ok(cfg) => {
            assert!(cfg.args.len() <= MAX_CONFIG_ITEMS as usize);
            assert!(cfg.env.len() <= MAX_CONFIG_ITEMS as usize);
            assert!(cfg.files.len() <= MAX_CONFIG_ITEMS as usize);
            for f in &cfg.files {
                assert!(valid_guest_path(f.path));
            }
            let enc = cfg.encode();
            // The format has exactly one encoding of each config.
            assert_eq!(enc, blob, "config re-encodes differently");
            match FunctionConfig::decode(&enc) {
                Ok(again) => assert_eq!(again, cfg, "config round trip"),
                Err(e) => panic!("re-encoded config does not decode: {e}"),
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
