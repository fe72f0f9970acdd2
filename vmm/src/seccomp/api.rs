//! The daemon's main thread and its HTTP runtime (`vmm-http`: tokio's async thread and
//! its blocking threads). Besides HTTP they store deployed modules and function
//! records, build templates and run cold starts (guests), pull and push templates to a
//! remote store, and start worker processes again when one ends. Because a thread or
//! process they start keeps their filter, their filter is the union of every list
//! (`Kind::entries`) and this one.

use super::{ioctl, sys, Allow};

pub(super) const LIST: &[Allow] = &[
    Allow::Ioctl(&[
        // Building a template and capturing a cold start's layer: the vCPU's state read.
        ioctl!(KVM_GET_REGS),
        ioctl!(KVM_GET_SREGS),
        ioctl!(KVM_GET_XSAVE),
        ioctl!(KVM_GET_XSAVE2),
        ioctl!(KVM_GET_XCRS),
        ioctl!(KVM_GET_VCPU_EVENTS),
        ioctl!(KVM_GET_DEBUGREGS),
        ioctl!(KVM_GET_CLOCK),
        ioctl!(KVM_GET_MSR_INDEX_LIST),
        // Templates are built with their working set recorded through userfaultfd.
        ioctl!(USERFAULTFD_IOC_NEW),
        ioctl!(UFFDIO_API),
        ioctl!(UFFDIO_REGISTER),
        ioctl!(UFFDIO_UNREGISTER),
        // Is a descriptor a terminal (logging's colours)?
        ioctl!(TCGETS),
    ]),
    // Templates are built with their working set recorded through userfaultfd (the
    // descriptor from the system call or from /dev/userfaultfd).
    sys!(SYS_userfaultfd),
    // HTTP: the listener (TCP or Unix), its connections, tokio's event loop.
    sys!(SYS_socket),
    sys!(SYS_bind),
    sys!(SYS_listen),
    sys!(SYS_accept4),
    sys!(SYS_connect),
    sys!(SYS_getsockname),
    sys!(SYS_getpeername),
    sys!(SYS_setsockopt),
    sys!(SYS_getsockopt),
    sys!(SYS_shutdown),
    sys!(SYS_recvmsg),
    sys!(SYS_sendmsg),
    sys!(SYS_sendmmsg),
    sys!(SYS_recvfrom),
    sys!(SYS_sendto),
    sys!(SYS_readv),
    sys!(SYS_writev),
    sys!(SYS_epoll_create1),
    sys!(SYS_epoll_ctl),
    sys!(SYS_epoll_wait),
    sys!(SYS_epoll_pwait),
    sys!(SYS_eventfd2),
    sys!(SYS_poll),
    sys!(SYS_ppoll),
    sys!(SYS_pipe2),
    sys!(SYS_socketpair),
    // tokio's blocking threads started on demand (they keep this filter).
    sys!(SYS_clone3),
    sys!(SYS_clone),
    sys!(SYS_set_robust_list),
    sys!(SYS_rseq),
    // Worker processes started again after one ended (fork, exec of /proc/self/exe, wait),
    // and stopped at shutdown.
    sys!(SYS_execve),
    // A worker process started as an unprivileged user makes itself non-dumpable.
    Allow::ArgIn(
        libc::SYS_prctl,
        "SYS_prctl",
        0,
        &[libc::PR_SET_DUMPABLE as u64],
    ),
    // The new process's own start (the dynamic loader, libc) under this filter.
    sys!(SYS_arch_prctl),
    sys!(SYS_set_tid_address),
    sys!(SYS_access),
    sys!(SYS_wait4),
    sys!(SYS_waitid),
    sys!(SYS_kill),
    sys!(SYS_dup2),
    sys!(SYS_dup3),
    sys!(SYS_rt_sigaction),
    sys!(SYS_pidfd_open),
    sys!(SYS_vfork),
    // Store and deploy: blobs and records written (temporary file, fsync, rename), a
    // template's files, store directories made, removed templates deleted.
    sys!(SYS_rmdir),
    // A template's last use recorded in its file's times (least recently used first).
    sys!(SYS_utimensat),
    sys!(SYS_chmod),
    sys!(SYS_fchmod),
    sys!(SYS_readlink),
    sys!(SYS_getcwd),
    sys!(SYS_getuid),
    sys!(SYS_geteuid),
    sys!(SYS_prlimit64),
    sys!(SYS_uname),
    sys!(SYS_sysinfo),
];
