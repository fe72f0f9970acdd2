//! The library's error type: what failed (a step), why (the source), and a [`ErrorKind`]
//! the caller can match on to decide what to tell its own user (an HTTP status, an exit
//! code). Hints that name CLI flags or HTTP details are added by the caller, not here.

use std::fmt;

/// What kind of failure an [`Error`] is, for callers that map failures to statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The caller's request cannot be served as given (too large, malformed, wrong kind
    /// of template).
    BadRequest,
    /// No template of that name.
    NotFound,
    /// The guest did not finish within its time limit and was stopped.
    Timeout,
    /// The guest failed: CPU exception, kernel panic, out of memory, malformed hostcall.
    GuestFault,
    /// The store holds damaged data for this template.
    Damaged,
    /// The host failed: KVM, memory, threads, I/O.
    Host,
    /// The caller interrupted the invocation (e.g. its client went away).
    Interrupted,
}

/// A failure of one step of the library, with its kind and cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    step: &'static str,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl Error {
    pub fn new(
        kind: ErrorKind,
        step: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        Error {
            kind,
            step,
            source: source.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The step that failed (e.g. "load template", "reset instance").
    pub fn step(&self) -> &'static str {
        self.step
    }

    /// The first error of type `T` in this error's chain of sources (for callers that
    /// add their own advice to particular failures).
    pub fn find<T: std::error::Error + 'static>(&self) -> Option<&T> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*self.source);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<T>() {
                return Some(t);
            }
            cur = e.source();
        }
        None
    }

    /// Classify a guest run failure.
    pub fn from_run(step: &'static str, e: crate::vm::RunError) -> Error {
        use crate::vm::{GuestError, RunError};
        let kind = match &e {
            RunError::Guest(GuestError::Timeout(_)) => ErrorKind::Timeout,
            RunError::Guest(GuestError::Interrupted) => ErrorKind::Interrupted,
            RunError::Guest(_) => ErrorKind::GuestFault,
            RunError::Vm(_) => ErrorKind::Host,
        };
        Error::new(kind, step, e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
