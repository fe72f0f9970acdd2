//! Wall-clock timeout for a running vCPU. One timer thread per process serves every
//! armed watchdog (a daemon runs many invocations a second: no thread per invocation); at
//! a deadline it sets that vCPU's `immediate_exit` and signals the vCPU thread, again every
//! 2 ms, until the watchdog is dropped (KVM_RUN returned with EINTR and the caller saw it).

use kvm_bindings::kvm_run;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
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
// KVM reads at the next KVM_RUN; the timer touches it only while the watchdog is armed
// (under the timer's lock), and the watchdog is disarmed in Drop before the vCPU goes.
unsafe impl Send for RunPtr {}

/// Stops a running invocation from another thread (a request whose client went away):
/// the vCPU is kicked out of KVM_RUN as by a timeout, and the run ends with
/// `GuestError::Interrupted`. Interrupting before the run starts stops it at once;
/// interrupting when nothing runs is harmless.
#[derive(Clone, Debug, Default)]
pub struct InterruptHandle(Arc<InterruptState>);

#[derive(Debug, Default)]
struct InterruptState {
    requested: AtomicBool,
    /// The watchdog of the run in progress, if any.
    armed: Mutex<Option<u64>>,
}

impl InterruptHandle {
    pub fn new() -> InterruptHandle {
        InterruptHandle::default()
    }

    pub fn interrupt(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
        let armed = *self.0.armed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = armed {
            timer().fire_now(id);
        }
    }

    pub fn is_interrupted(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst)
    }
}

/// One armed watchdog, as the timer thread sees it.
struct Armed {
    run: RunPtr,
    target: nix::sys::pthread::Pthread,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Timers {
    next_id: u64,
    /// By (next time to act, id): the deadline, or the next re-kick once fired.
    armed: BTreeMap<(Instant, u64), Armed>,
    /// Where each id sits in `armed`.
    when: BTreeMap<u64, Instant>,
}

struct Timer {
    state: Mutex<Timers>,
    cv: Condvar,
}

/// Start the watchdog's timer thread and signal handler now (they start on first use
/// otherwise): before a thread installs its seccomp filter, so that the timer thread
/// is not started under (and does not inherit) a vCPU thread's filter.
pub fn start() {
    let _ = timer();
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        install_handler();
        let t: &'static Timer = Box::leak(Box::new(Timer {
            state: Mutex::new(Timers::default()),
            cv: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("vmm-watchdog".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Watchdog);
                t.run()
            })
            .expect("spawn the watchdog timer thread");
        t
    })
}

impl Timer {
    /// Make watchdog `id` fire now (if it is still armed).
    fn fire_now(&self, id: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = st.when.get(&id).copied() {
            if let Some(a) = st.armed.remove(&(at, id)) {
                let now = Instant::now();
                st.when.insert(id, now);
                st.armed.insert((now, id), a);
                self.cv.notify_one();
            }
        }
    }

    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let Some((&(at, id), _)) = st.armed.iter().next() else {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            if at > now {
                st = self
                    .cv
                    .wait_timeout(st, at - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let Some(a) = st.armed.remove(&(at, id)) else {
                continue;
            };
            a.fired.store(true, Ordering::SeqCst);
            // SAFETY: see RunPtr; the watchdog is armed (it is in the map, under the lock),
            // so its vCPU and run area exist; a single byte write to a field KVM polls.
            unsafe { std::ptr::addr_of_mut!((*a.run.0).immediate_exit).write_volatile(1) };
            // The vCPU thread is alive: it disarms (under this lock) before it returns.
            let _ = nix::sys::pthread::pthread_kill(a.target, KICK_SIGNAL);
            let again = now + Duration::from_millis(2);
            st.when.insert(id, again);
            st.armed.insert((again, id), a);
        }
    }
}

/// A wall-clock deadline for the vCPU running on the thread that armed it.
pub struct Watchdog {
    id: u64,
    fired: Arc<AtomicBool>,
    interrupt: Option<InterruptHandle>,
}

impl Watchdog {
    /// Arm a watchdog for the vCPU whose run area is `run`, running on the calling thread.
    pub fn start(timeout: Duration, run: *mut kvm_run) -> Watchdog {
        Self::start_interruptible(timeout, run, None)
    }

    /// [`Watchdog::start`] that `interrupt` can also fire, from any thread.
    pub fn start_interruptible(
        timeout: Duration,
        run: *mut kvm_run,
        interrupt: Option<&InterruptHandle>,
    ) -> Watchdog {
        let t = timer();
        let fired = Arc::new(AtomicBool::new(false));
        let mut st = t.state.lock().unwrap_or_else(|e| e.into_inner());
        st.next_id += 1;
        let id = st.next_id;
        // A deadline too far away to represent never fires, unless interrupted.
        let never = interrupt.map(|_| Instant::now() + Duration::from_secs(365 * 86400));
        if let Some(at) = deadline(Instant::now(), timeout).or(never) {
            st.when.insert(id, at);
            st.armed.insert(
                (at, id),
                Armed {
                    run: RunPtr(run),
                    target: nix::sys::pthread::pthread_self(),
                    fired: fired.clone(),
                },
            );
            t.cv.notify_one();
        }
        drop(st);
        if let Some(h) = interrupt {
            *h.0.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
            if h.is_interrupted() {
                t.fire_now(id);
            }
        }
        Watchdog {
            id,
            fired,
            interrupt: interrupt.cloned(),
        }
    }

    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Whether it fired because of an interrupt (not the deadline).
    pub fn interrupted(&self) -> bool {
        self.interrupt.as_ref().is_some_and(|h| h.is_interrupted())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(h) = &self.interrupt {
            *h.0.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let t = timer();
        let mut st = t.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = st.when.remove(&self.id) {
            st.armed.remove(&(at, self.id));
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
