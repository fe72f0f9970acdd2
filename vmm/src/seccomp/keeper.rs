//! The pool keeper (`vmm-pool-keeper`): finds the store's templates every 2 s, loads
//! them, restores instances into the pools and warms the first ones up (a run of the
//! guest), every 200 ms; in a worker process it also sends the pools' state to the
//! daemon. Its filter is [`super::vcpu`]'s list (it restores and runs guests the same
//! way) plus this one.

use super::{sys, Allow};

pub(super) const LIST: &[Allow] = &[
    // Listing the store's templates.
    sys!(SYS_getdents64),
    sys!(SYS_access),
];
