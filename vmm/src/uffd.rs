//! Guest memory on demand through userfaultfd (MISSING mode, COPY and ZEROPAGE), with the
//! `userfaultfd` crate (bytecodealliance's userfaultfd-rs). This module adds what the VMM
//! needs around it:
//!
//! - errors that name the step and carry the OS error (the crate's own say "Copy failed");
//! - a page that is already present (EEXIST: a second fault on a page that was served in
//!   between) is not an error;
//! - waiting for a fault *or* a stop signal: the crate reads one descriptor, so
//!   [`Uffd::next_fault`] polls it together with a [`Waker`] (an eventfd);
//! - creation through the system call when `/dev/userfaultfd` exists but this user may not
//!   open it: the crate stops there, while `vm.unprivileged_userfaultfd=1` allows the call.
//!
//! Guest faults on registered memory arrive here when KVM touches a missing page; the
//! handler thread answers each with one UFFDIO_COPY (or ZEROPAGE). Each such round trip
//! costs ~70 µs on this machine's PVM back end, which is why restore installs a template's
//! working set before the vCPU runs and leaves only the rest to this path.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use userfaultfd::{Event, UffdBuilder};

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("create a userfaultfd: {0} (as non-root, allow it with `sysctl vm.unprivileged_userfaultfd=1` or read-write access to /dev/userfaultfd)")]
    Create(io::Error),
    #[error("userfaultfd {step}: {source}")]
    Ioctl {
        step: &'static str,
        source: io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(userfaultfd::Error) -> UffdError {
    move |e| UffdError::Ioctl {
        step,
        source: os_error(e),
    }
}

/// The OS error behind one of the crate's errors (they keep the errno but do not print it).
fn os_error(e: userfaultfd::Error) -> io::Error {
    use userfaultfd::Error as E;
    match e {
        E::CopyFailed(errno) | E::ZeropageFailed(errno) | E::SystemError(errno) => errno.into(),
        E::OpenDevUserfaultfd(e) => e,
        // The kernel stores a negative errno in the count when nothing was copied.
        E::PartiallyCopied(n) if (n as isize) > 0 => {
            io::Error::other(format!("only {n} bytes were copied"))
        }
        E::PartiallyCopied(_) => Errno::EAGAIN.into(),
        E::IncompleteMsg { read, expected } => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read {read} of a {expected}-byte message"),
        ),
        e => io::Error::other(e.to_string()),
    }
}

/// A userfaultfd: non-blocking, close-on-exec, reporting kernel-mode faults too.
pub struct Uffd(userfaultfd::Uffd);

impl Uffd {
    pub fn new() -> Result<Uffd, UffdError> {
        let made = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM touches guest memory from the kernel (get_user_pages), not from user mode:
            // a user-mode-only descriptor would fail those faults instead of reporting them.
            .user_mode_only(false)
            .create();
        match made {
            Ok(u) => Ok(Uffd(u)),
            Err(userfaultfd::Error::OpenDevUserfaultfd(e))
                if e.kind() == io::ErrorKind::PermissionDenied =>
            {
                Self::from_syscall()
            }
            // The system call or the API handshake (the crate does both).
            Err(e) => Err(UffdError::Create(os_error(e))),
        }
    }

    /// The system call, then the API handshake, when `/dev/userfaultfd` is not ours to open.
    fn from_syscall() -> Result<Uffd, UffdError> {
        // SAFETY: plain syscall with flag arguments; the result is checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Create(io::Error::last_os_error()));
        }
        let fd = i32::try_from(fd)
            .map_err(|_| UffdError::Create(io::Error::other("descriptor number out of range")))?;
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = userfaultfd_sys::uffdio_api {
            api: userfaultfd_sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a struct uffdio_api (the kernel header's layout, as the
        // -sys crate generates it), which `api` is, live and writable for the call.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                userfaultfd_sys::UFFDIO_API as _,
                &mut api as *mut userfaultfd_sys::uffdio_api,
            )
        };
        if r < 0 {
            return Err(UffdError::Ioctl {
                step: "UFFDIO_API",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the crate's `Uffd` takes over a userfaultfd that completed its handshake,
        // which nothing else owns (`into_raw_fd` gives up ours).
        Ok(Uffd(unsafe {
            userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd())
        }))
    }

    /// Register `[start, start+len)` for missing-page faults.
    pub fn register(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        self.0
            .register(start.cast(), len)
            .map(drop)
            .map_err(step("UFFDIO_REGISTER"))
    }

    /// Install `src` (page-aligned length) at `dst` and wake the faulting thread.
    /// A page that is already present (EEXIST) is not an error.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` lies in memory registered with this descriptor, and no Rust
    /// reference covers it while the kernel fills it.
    pub unsafe fn copy(&self, dst: *mut u8, src: &[u8]) -> Result<(), UffdError> {
        // SAFETY: `src` is a live slice of `src.len()` bytes; `dst` as the caller promised.
        let copied = unsafe {
            self.0
                .copy(src.as_ptr().cast(), dst.cast(), src.len(), true)
        };
        match copied {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Ok(()),
            Err(e) => Err(step("UFFDIO_COPY")(e)),
        }
    }

    /// Install `src` (page-aligned length) at `dst` and wake the threads faulting there;
    /// true only if every page was installed. A page already present stops the copy
    /// (false, with the pages before it installed and woken): the caller then installs
    /// what it needs page by page.
    ///
    /// # Safety
    /// As for [`Uffd::copy`].
    pub unsafe fn copy_all(&self, dst: *mut u8, src: &[u8]) -> Result<bool, UffdError> {
        // SAFETY: `src` is a live slice of `src.len()` bytes; `dst` as the caller promised.
        let copied = unsafe {
            self.0
                .copy(src.as_ptr().cast(), dst.cast(), src.len(), true)
        };
        match copied {
            Ok(n) => Ok(n == src.len()),
            Err(userfaultfd::Error::PartiallyCopied(_)) => Ok(false),
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => Ok(false),
            Err(e) => Err(step("UFFDIO_COPY")(e)),
        }
    }

    /// Map zeros at `[dst, dst+len)` and wake the faulting thread.
    /// A page that is already present (EEXIST) is not an error.
    ///
    /// # Safety
    /// As for [`Uffd::copy`]: the range is registered memory no Rust reference covers.
    pub unsafe fn zeropage(&self, dst: *mut u8, len: usize) -> Result<(), UffdError> {
        // SAFETY: the range is as the caller promised.
        let zeroed = unsafe { self.0.zeropage(dst.cast(), len, true) };
        match zeroed {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => Ok(()),
            Err(e) => Err(step("UFFDIO_ZEROPAGE")(e)),
        }
    }

    /// Wait for the next page fault and return its address, or `None` once `wake` has
    /// been signalled (faults already queued are served first).
    pub fn next_fault(&self, wake: &Waker) -> Result<Option<u64>, UffdError> {
        loop {
            let mut pfds = [
                PollFd::new(self.0.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.0.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut pfds, PollTimeout::NONE) {
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(UffdError::Ioctl {
                        step: "poll",
                        source: e.into(),
                    })
                }
                Ok(_) => {}
            }
            let fault = pfds[0].revents().unwrap_or(PollFlags::empty());
            if !fault.contains(PollFlags::POLLIN) {
                if fault.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
                    return Err(UffdError::Ioctl {
                        step: "poll",
                        source: io::Error::other(format!("descriptor reports {fault:?}")),
                    });
                }
                if pfds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(None);
                }
                continue;
            }
            // Non-blocking: `None` when another reader took the message first (EAGAIN).
            match self.0.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => return Ok(Some(addr as u64)),
                // Only page faults are enabled; anything else is not ours to handle.
                Ok(_) | Err(userfaultfd::Error::UnrecognizedEvent(_)) => {}
                Err(e) => return Err(step("read fault message")(e)),
            }
        }
    }
}

/// Stops a fault server blocked in [`Uffd::next_fault`] (an eventfd).
pub struct Waker(EventFd);

impl Waker {
    pub fn new() -> Result<Waker, UffdError> {
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map(Waker)
            .map_err(|e| UffdError::Ioctl {
                step: "eventfd",
                source: e.into(),
            })
    }

    pub fn wake(&self) {
        // Cannot fail but by overflowing the counter, which still leaves it readable.
        let _ = self.0.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// Anonymous private memory, unmapped on drop.
    struct Anon(*mut u8, usize);
    impl Anon {
        fn new(len: usize) -> Anon {
            // SAFETY: a fresh anonymous private mapping; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Anon(p.cast(), len)
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: exactly the mapping made in `new`.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    /// A userfaultfd, or `None` (skip, with the reason) where this user may not make one.
    fn uffd() -> Option<Uffd> {
        match Uffd::new() {
            Ok(u) => Some(u),
            Err(e) if std::env::var("VMM_REQUIRE_KVM").as_deref() != Ok("1") => {
                eprintln!("SKIPPED: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// A fault from another thread is reported at its address and served by COPY (then
    /// ZEROPAGE); a second install of a present page is not an error (the EEXIST race);
    /// the waker stops the wait.
    #[test]
    fn serves_faults_and_stops_on_wake() {
        let Some(u) = uffd() else { return };
        let mem = Anon::new(2 * PAGE);
        u.register(mem.0, mem.1).unwrap();
        let base = mem.0 as usize;
        let toucher = std::thread::spawn(move || {
            // SAFETY: both pages lie in `mem`, which outlives this thread (joined below).
            unsafe {
                let a = std::ptr::read_volatile(base as *const u8);
                let b = std::ptr::read_volatile((base + PAGE + 7) as *const u8);
                (a, b)
            }
        });
        let waker = Waker::new().unwrap();
        let page = [0xabu8; PAGE];
        let first = u.next_fault(&waker).unwrap().unwrap();
        assert_eq!(first, base as u64);
        // SAFETY: the first page of `mem`, registered above; nothing references it.
        unsafe { u.copy(mem.0, &page).unwrap() };
        let second = u.next_fault(&waker).unwrap().unwrap();
        assert_eq!(second & !(PAGE as u64 - 1), (base + PAGE) as u64);
        // SAFETY: the second page of `mem`, as above.
        unsafe { u.zeropage(mem.0.add(PAGE), PAGE).unwrap() };
        assert_eq!(toucher.join().unwrap(), (0xab, 0));
        // SAFETY: as above; both pages are present now, so the kernel reports EEXIST.
        unsafe {
            u.copy(mem.0, &page).unwrap();
            u.zeropage(mem.0.add(PAGE), PAGE).unwrap();
        }
        waker.wake();
        assert_eq!(u.next_fault(&waker).unwrap(), None);
    }

    /// Errors name the step and carry the OS error.
    #[test]
    fn errors_name_the_step() {
        let Some(u) = uffd() else { return };
        let mem = Anon::new(PAGE);
        // Not page-aligned: the kernel refuses the range.
        let e = u.register(mem.0.wrapping_add(1), PAGE).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("userfaultfd UFFDIO_REGISTER: "), "{msg}");
        assert!(msg.contains("Invalid argument"), "{msg}");
        // SAFETY: `mem` is not registered, so the kernel refuses the copy.
        let e = unsafe { u.copy(mem.0, &[0u8; PAGE]) }.unwrap_err();
        assert!(
            e.to_string().starts_with("userfaultfd UFFDIO_COPY: "),
            "{e}"
        );
    }
}
