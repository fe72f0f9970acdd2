//! A worker process's cancellation reader (`vmm-cancel`): reads "client gone" messages
//! from the daemon on a socket of its own and interrupts the guest that runs that
//! request (through the watchdog).

use super::{sys, Allow};

pub(super) const LIST: &[Allow] = &[
    // The socket from the daemon.
    sys!(SYS_recvfrom),
    sys!(SYS_read),
    sys!(SYS_close),
];
