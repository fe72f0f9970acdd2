//! A minimal userfaultfd binding (MISSING mode, COPY and ZEROPAGE), written against
//! <linux/userfaultfd.h>. The `userfaultfd` crate needs libclang at build time (bindgen),
//! which a fresh machine does not have; these few ioctls do not justify that.
//!
//! Guest faults on registered memory arrive here when KVM touches a missing page; the
//! handler thread answers each with one UFFDIO_COPY (or ZEROPAGE). Each such round trip
//! costs ~70 µs on this machine's PVM back end, which is why restore installs a template's
//! working set before the vCPU runs and leaves only the rest to this path.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
const UFFDIO: u64 = 0xaa;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}
/// struct uffd_msg: 32 bytes; for a page fault, `arg0` = flags and `arg1` = address.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg0: u64,
    arg1: u64,
    arg2: u64,
}

const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>() as u64);
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>() as u64);
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>() as u64);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>() as u64);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("create a userfaultfd: {0} (as non-root, allow it with `sysctl vm.unprivileged_userfaultfd=1`)")]
    Create(std::io::Error),
    #[error("userfaultfd {step}: {source}")]
    Ioctl {
        step: &'static str,
        source: std::io::Error,
    },
}

pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T, step: &'static str) -> Result<(), UffdError> {
    // SAFETY: `req` is one of the UFFDIO_* requests whose size field is size_of::<T>(),
    // and `arg` points to a live, properly laid out #[repr(C)] T.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        return Err(UffdError::Ioctl {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Uffd {
    pub fn new() -> Result<Uffd, UffdError> {
        // SAFETY: plain syscall with flag arguments; the result is checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        ioctl(&fd, UFFDIO_API, &mut api, "UFFDIO_API")?;
        Ok(Uffd { fd })
    }

    /// Register `[start, start+len)` for missing-page faults.
    pub fn register(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER")
    }

    /// Install `src` (page-aligned length) at `dst` and wake the faulting thread.
    /// A page that is already present (EEXIST) is not an error.
    pub fn copy(&self, dst: *mut u8, src: &[u8]) -> Result<(), UffdError> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            ..Default::default()
        };
        match ioctl(&self.fd, UFFDIO_COPY, &mut c, "UFFDIO_COPY") {
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            r => r,
        }
    }

    /// Map zeros at `[dst, dst+len)` and wake the faulting thread.
    pub fn zeropage(&self, dst: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst as u64,
                len: len as u64,
            },
            ..Default::default()
        };
        match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut z, "UFFDIO_ZEROPAGE") {
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            r => r,
        }
    }

    /// Wait for the next page fault and return its address, or `None` once `wake` (an
    /// eventfd) has been signalled.
    pub fn next_fault(&self, wake: &OwnedFd) -> Result<Option<u64>, UffdError> {
        loop {
            let mut pfds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds, count 2.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(UffdError::Ioctl {
                    step: "poll",
                    source: e,
                });
            }
            if pfds[0].revents & libc::POLLIN == 0 {
                if pfds[1].revents != 0 {
                    return Ok(None);
                }
                continue;
            }
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() bytes into a local #[repr(C)] struct.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut msg as *mut UffdMsg).cast(),
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if r != std::mem::size_of::<UffdMsg>() as isize {
                let e = std::io::Error::last_os_error();
                if r < 0 && e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                return Err(UffdError::Ioctl {
                    step: "read fault message",
                    source: e,
                });
            }
            if msg.event == UFFD_EVENT_PAGEFAULT {
                return Ok(Some(msg.arg1));
            }
        }
    }
}

/// An eventfd that stops a fault server blocked in [`Uffd::next_fault`].
pub fn wake_fd() -> Result<OwnedFd, UffdError> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Ioctl {
            step: "eventfd",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Signal an eventfd made by [`wake_fd`].
pub fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64, as eventfd requires.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}
