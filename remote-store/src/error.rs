//! Errors of the remote tier. Every message names the step and the object;
//! none contains the secret access key (messages from the HTTP stack are
//! scrubbed of it before they are kept).

use std::path::PathBuf;

use snapshot_store::{FunctionStoreError, LayersError, LoadError, OpenError, TemplateName};

/// What kind of failure a request to the object store was, for callers to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// The object does not exist.
    NotFound,
    /// The server refused the credentials or the access (HTTP 401/403).
    Denied,
    /// No answer: connection refused, DNS failure, timeout.
    Unreachable,
    /// Anything else the server or the client reported.
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {url:?} is not of the form s3://BUCKET or s3://BUCKET/PREFIX ({reason})")]
    BadUrl { url: String, reason: String },
    #[error("no remote endpoint: an S3-compatible server needs its URL (http://HOST:PORT)")]
    NoEndpoint,
    #[error("no credentials for the remote: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    NoCredentials,
    #[error("setting up the S3 client for {remote}: {message}")]
    Client { remote: String, message: String },
    #[error("{step} {object} on {remote}: {}", describe(*kind, message))]
    Request {
        step: &'static str,
        remote: String,
        object: String,
        kind: RequestKind,
        message: String,
    },
    #[error("template {template}: remote object {object} is damaged ({reason}); nothing was written to the local store. Push the template again from a store that has it")]
    Damaged {
        template: String,
        object: String,
        reason: String,
    },
    #[error("remote object {object} is damaged ({reason})")]
    DamagedObject { object: String, reason: String },
    #[error("template {name} is not on the remote {remote}")]
    NotOnRemote { name: String, remote: String },
    #[error("template {child} on the remote is layered on {parent}, whose manifest {object} is missing from the remote; push {child} again")]
    MissingParent {
        child: String,
        parent: String,
        object: String,
    },
    #[error("template {name}: its parent chain on the remote is longer than {max} layers or has a cycle")]
    ChainTooLong { name: String, max: usize },
    #[error("template {name}: a page of the local store is missing or damaged (page {page}); run `vmm-store verify`")]
    LocalPageDamaged { name: TemplateName, page: String },
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("writing into the local store: {0}")]
    Write(#[from] LayersError),
    #[error("{step} {path}: {source}")]
    Local {
        step: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("evicting templates from the local store: {0}")]
    Evict(String),
    #[error("function {function}: remote object {object} {reason}; the function's record was not written to the local store")]
    FunctionDamaged {
        function: String,
        object: String,
        reason: String,
    },
    #[error("function {name}: {reason}")]
    Function { name: String, reason: String },
    #[error("{0}")]
    Functions(#[from] FunctionStoreError),
    #[error("the push could not settle on packs the remote keeps (a garbage collection of the remote kept marking them); retry the push")]
    Unsettled,
}

fn describe(kind: RequestKind, message: &str) -> String {
    match kind {
        RequestKind::NotFound => format!("not found ({message})"),
        RequestKind::Denied => format!("access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions ({message})"),
        RequestKind::Unreachable => format!("the server cannot be reached: check the endpoint and that the server runs ({message})"),
        RequestKind::Other => message.to_string(),
    }
}

impl RemoteError {
    /// The request kind, where this error is a failed request.
    pub fn request_kind(&self) -> Option<RequestKind> {
        match self {
            RemoteError::Request { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
