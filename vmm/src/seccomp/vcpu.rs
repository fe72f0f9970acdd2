//! vCPU threads: a daemon's `vmm-worker-N` threads, a worker process's (its main thread
//! included), and `vmm restore`'s main thread once its instance is set up. They run
//! guests, answer hostcalls, reset instances in place and restore new ones on demand
//! (a pool that is empty or 0), and record what requests taught a template.

use super::{ioctl, sys, Allow};

pub(super) const LIST: &[Allow] = &[
    Allow::Ioctl(&[
        // Running the guest.
        ioctl!(KVM_RUN),
        // Restoring and resetting: the vCPU's state written back.
        ioctl!(KVM_SET_REGS),
        ioctl!(KVM_SET_SREGS),
        ioctl!(KVM_SET_MSRS),
        ioctl!(KVM_GET_MSRS),
        ioctl!(KVM_SET_CPUID2),
        ioctl!(KVM_SET_XSAVE),
        ioctl!(KVM_SET_XCRS),
        ioctl!(KVM_SET_VCPU_EVENTS),
        ioctl!(KVM_SET_DEBUGREGS),
        ioctl!(KVM_SET_CLOCK),
        ioctl!(KVM_GET_TSC_KHZ),
        // A new instance on demand: its VM, vCPU and memory slots (grants add slots
        // while the guest runs).
        ioctl!(KVM_CREATE_VM),
        ioctl!(KVM_CREATE_VCPU),
        ioctl!(KVM_GET_VCPU_MMAP_SIZE),
        ioctl!(KVM_SET_USER_MEMORY_REGION),
        ioctl!(KVM_GET_SUPPORTED_CPUID),
        ioctl!(KVM_CHECK_EXTENSION),
        ioctl!(KVM_GET_API_VERSION),
        // Non-blocking sockets and descriptors (the worker process's socket).
        ioctl!(FIONBIO),
        ioctl!(FIOCLEX),
    ]),
    // Guest memory: a template's memory image mapped copy-on-write, the instance's own
    // anonymous memory (mmap/munmap/madvise are in `common`); which pages a guest touched
    // (mincore) for the reset and for the working set.
    sys!(SYS_mincore),
    sys!(SYS_memfd_create),
    sys!(SYS_ftruncate),
    sys!(SYS_fallocate),
    // Templates loaded on demand from the store (verified reads), and the working set
    // a request taught the template written back (temporary file, fsync, rename, under
    // the store's lock).
    sys!(SYS_openat),
    sys!(SYS_close),
    sys!(SYS_read),
    sys!(SYS_pread64),
    sys!(SYS_pwrite64),
    sys!(SYS_lseek),
    sys!(SYS_statx),
    sys!(SYS_newfstatat),
    sys!(SYS_fstat),
    sys!(SYS_getdents64),
    sys!(SYS_flock),
    sys!(SYS_fsync),
    sys!(SYS_fdatasync),
    sys!(SYS_rename),
    sys!(SYS_renameat),
    sys!(SYS_unlink),
    sys!(SYS_unlinkat),
    sys!(SYS_mkdir),
    sys!(SYS_fcntl),
    // A worker process's vCPU threads read requests from and answer the daemon on its
    // socket.
    sys!(SYS_recvfrom),
    sys!(SYS_sendto),
    sys!(SYS_writev),
    sys!(SYS_poll),
];
