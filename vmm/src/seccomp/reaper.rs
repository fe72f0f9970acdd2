//! The reaper (`vmm-reaper`): destroys instances off the request path (their guest
//! memory unmapped, their VM and vCPU descriptors closed).

use super::{sys, Allow};

pub(super) const LIST: &[Allow] = &[
    // A VM's, a vCPU's and a memory image's descriptors.
    sys!(SYS_close),
    // What an instance's end writes back: its template's files, when it was the last
    // user of a loaded template (TODO: narrow).
    sys!(SYS_openat),
    sys!(SYS_read),
    // A template's shared lock on the store released with its last instance.
    sys!(SYS_flock),
];
