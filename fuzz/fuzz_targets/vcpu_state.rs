//! Template vCPU state (`vmm::persist::VcpuState::decode`) and device state.
//!
//! Input: a mode byte, then the state bytes. Even mode: `VcpuState::decode` and
//! `VcpuState::validate`. Odd mode: the device state decoder of vmm/src/snapshot.rs
//! (`DeviceState::decode`), whose encoding must round-trip in its own version's layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::persist::{VcpuState, VCPU_STATE_VERSION};
use vmm::template::device::DeviceState;

fn decode_device_state(b: &[u8]) -> Option<DeviceState> {
    DeviceState::decode(b).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        match VcpuState::decode(rest) {
            Ok(s) => {
                assert_eq!(s.version, VCPU_STATE_VERSION);
                // The range checks restore and verify run must never panic either.
                if let Err(e) = s.validate(512 << 20) {
                    let _ = e.to_string();
                }
                let enc = s.encode();
                assert!(
                    enc.len() <= rest.len(),
                    "canonical encoding is not the shortest"
                );
                let s2 = VcpuState::decode(&enc).expect("re-encoded vCPU state does not decode");
                assert_eq!(s2.encode(), enc, "vCPU state round trip");
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    } else if let Some(d) = decode_device_state(rest) {
        // Encoded in the layout of its own version (1 or 2).
        let enc = d.encode();
        assert!(enc.len() <= rest.len());
        let d2 = decode_device_state(&enc).expect("re-encoded device state does not decode");
        assert_eq!(d2.encode(), enc, "device state round trip");
    }
});
