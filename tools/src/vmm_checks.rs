//! `verify`'s checks of what the VMM itself reads from each template: vCPU and device
//! state, provenance, and whether a function template sits on the runtime base it was made
//! on. They are the VMM's own restore-time checks (`vmm::template::checks`), so `verify` reports
//! exactly what `vmm restore` would refuse.

use snapshot_store::{Problem, Severity, Store};

/// One corruption problem per template that restore would refuse.
pub fn problems(store: &Store) -> Vec<Problem> {
    vmm::template::checks::check_store(store)
        .into_iter()
        .map(|f| Problem {
            severity: Severity::Corruption,
            path: store
                .dir()
                .join("templates")
                .join(format!("{}.tmpl", f.template)),
            what: f.error.to_string(),
            hint: format!(
                "remove {} (`vmm template rm {}`) and create it again",
                f.template, f.template
            ),
        })
        .collect()
}
