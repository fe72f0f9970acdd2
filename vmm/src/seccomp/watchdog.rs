//! The watchdog timer (`vmm-watchdog`): sleeps until the next deadline of a running
//! guest, then kicks its vCPU thread out of KVM_RUN with a signal, again every 2 ms
//! until the guest stops.

use super::{sys, Allow};

pub(super) const LIST: &[Allow] = &[
    // pthread_kill of the vCPU thread (the kick signal).
    sys!(SYS_tgkill),
];
