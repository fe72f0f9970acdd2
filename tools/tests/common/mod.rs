//! Helpers shared by the `vmm-store` end-to-end tests.
#![allow(dead_code)]

use snapshot_store::fixtures;
use snapshot_store::Store;
use std::path::Path;

/// Gives every template in the store at `dir` a vCPU and device state the VMM accepts:
/// the store's fixtures hold placeholder bytes, which `verify` reports (the VMM could not
/// restore such a template).
pub fn with_vmm_states(dir: &Path) {
    for e in std::fs::read_dir(dir.join("templates")).unwrap() {
        let f = e.unwrap().file_name();
        let Some(name) = f.to_str().and_then(|n| n.strip_suffix(".tmpl")) else {
            continue;
        };
        let mut m = fixtures::read_manifest(dir, name);
        let base = m.parent.as_ref().map(|p| vmm::template::device::BaseRef {
            name: p.clone(),
            created_unix_ms: fixtures::read_manifest(dir, p).created_unix_ms,
        });
        (m.vcpu_state, m.device_state) = vmm::template::checks::fixtures::states(m.mem_size, base);
        fixtures::write_manifest(dir, &m);
    }
}

/// The store fixtures' healthy store, with VMM states.
pub fn healthy_store(dir: &Path) -> Store {
    let s = fixtures::healthy_store(dir);
    with_vmm_states(dir);
    s
}
