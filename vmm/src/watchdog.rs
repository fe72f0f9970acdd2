//! Wall-clock timeout for a running vCPU: a thread that, at the deadline, sets the vCPU's
//! `immediate_exit` and signals the vCPU thread until KVM_RUN returns with EINTR.

use kvm_bindings::kvm_run;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const KICK_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
        // No SA_RESTART: the signal must make KVM_RUN return EINTR.
        let act = SigAction::new(
            SigHandler::Handler(on_kick),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe.
        unsafe { sigaction(KICK_SIGNAL, &act) }.expect("install the vCPU kick signal handler");
    });
}

/// When a watchdog armed at `now` for `timeout` fires: never, if that instant cannot be
/// represented (a timeout of centuries), instead of panicking on the overflow.
fn deadline(now: Instant, timeout: Duration) -> Option<Instant> {
    now.checked_add(timeout)
}

struct RunPtr(*mut kvm_run);
// SAFETY: the pointer is only used for one volatile byte write to `immediate_exit`, which
// KVM reads at the next KVM_RUN; the mapping outlives the watchdog (stopped in Drop first).
unsafe impl Send for RunPtr {}

pub struct Watchdog {
    done: Arc<(Mutex<bool>, Condvar)>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Arm a watchdog for the vCPU whose run area is `run`, running on the calling thread.
    pub fn start(timeout: Duration, run: *mut kvm_run) -> Watchdog {
        install_handler();
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let fired = Arc::new(AtomicBool::new(false));
        let target = nix::sys::pthread::pthread_self();
        let run = RunPtr(run);
        let (d, f) = (done.clone(), fired.clone());
        let thread = std::thread::spawn(move || {
            let run = run;
            let deadline = deadline(Instant::now(), timeout);
            let (lock, cv) = &*d;
            let mut finished = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*finished {
                let now = Instant::now();
                let Some(deadline) = deadline else {
                    finished = cv.wait(finished).unwrap_or_else(|e| e.into_inner());
                    continue;
                };
                if now >= deadline {
                    f.store(true, Ordering::SeqCst);
                    // SAFETY: see RunPtr; a single byte write to a field KVM polls.
                    unsafe { std::ptr::addr_of_mut!((*run.0).immediate_exit).write_volatile(1) };
                    let _ = nix::sys::pthread::pthread_kill(target, KICK_SIGNAL);
                    finished = cv
                        .wait_timeout(finished, Duration::from_millis(2))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                } else {
                    finished = cv
                        .wait_timeout(finished, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        });
        Watchdog {
            done,
            fired,
            thread: Some(thread),
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_beyond_what_an_instant_holds_is_never() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::MAX), None);
        assert_eq!(deadline(now, Duration::from_secs_f64(1.8e19)), None);
        assert_eq!(
            deadline(now, Duration::from_secs(1)),
            Some(now + Duration::from_secs(1))
        );
    }
}
