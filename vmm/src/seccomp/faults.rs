//! A userfaultfd server (`vmm-faults`, one per instance restored with `--memory lazy` or
//! `prefetch`): waits for the guest's first touches and installs pages from the
//! template's already open pack files, verified.

use super::{ioctl, sys, Allow};

pub(super) const LIST: &[Allow] = &[
    Allow::Ioctl(&[
        // Installing a page or a run of pages, a zero page, waking the faulting thread.
        ioctl!(UFFDIO_COPY),
        ioctl!(UFFDIO_ZEROPAGE),
        ioctl!(UFFDIO_WAKE),
    ]),
    // Waiting for a fault or the stop event, reading the fault message.
    sys!(SYS_poll),
    sys!(SYS_ppoll),
    sys!(SYS_read),
    // Pages read from the store's pack files.
    sys!(SYS_pread64),
    // Which pages are already there.
    sys!(SYS_mincore),
];
