//! What every thread of this program may call, whatever its kind.

use super::{sys, Allow};

pub(super) const LIST: &[Allow] = &[
    // Memory: the allocator (glibc malloc: brk, mmap, munmap, madvise trims; mprotect
    // for a new arena's pages), thread stacks and their guard pages.
    sys!(SYS_brk),
    sys!(SYS_mmap),
    sys!(SYS_munmap),
    sys!(SYS_mprotect),
    sys!(SYS_madvise),
    sys!(SYS_mremap),
    // Locks, condition variables, channels (std, parking, tokio).
    sys!(SYS_futex),
    sys!(SYS_sched_yield),
    // Logging to stderr (tracing, the `say!` lines), and the SIGSYS line itself.
    sys!(SYS_write),
    // Signals: the SIGSYS handler returns; signal masks around thread start and exit.
    sys!(SYS_rt_sigreturn),
    sys!(SYS_rt_sigprocmask),
    // A thread's own start and end under std: its alternate signal stack (set up and
    // freed), its name, its CPU count (available_parallelism), its id.
    sys!(SYS_sigaltstack),
    sys!(SYS_sched_getaffinity),
    sys!(SYS_gettid),
    sys!(SYS_getpid),
    // prctl: PR_SET_NAME (thread names), PR_GET_SECCOMP ([`super::filtered`]) and
    // PR_SET_NO_NEW_PRIVS (required before a filter is added).
    Allow::ArgIn(
        libc::SYS_prctl,
        "SYS_prctl",
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_SECCOMP as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
    ),
    // A thread started by a filtered one adds its own filter (a filter can only take
    // calls away): seccomp(SECCOMP_SET_MODE_FILTER), after PR_SET_NO_NEW_PRIVS above.
    Allow::ArgIn(
        libc::SYS_seccomp,
        "SYS_seccomp",
        0,
        &[libc::SECCOMP_SET_MODE_FILTER as u64],
    ),
    // Clocks when the vDSO does not answer, and timed waits.
    sys!(SYS_clock_gettime),
    sys!(SYS_clock_nanosleep),
    sys!(SYS_nanosleep),
    // Random seeds (std's HashMap keys, once per thread).
    sys!(SYS_getrandom),
    // Interrupted calls restarted by the kernel.
    sys!(SYS_restart_syscall),
    // A thread's and the process's end.
    sys!(SYS_exit),
    sys!(SYS_exit_group),
];
