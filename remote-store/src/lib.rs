//! The template store's remote tier: templates pushed to, and pulled from, an
//! S3-compatible object store shared by any number of workers, deduplicated
//! by page content across every template and every worker.
//!
//! A remote is a bucket and a prefix, `s3://BUCKET/PREFIX`, on a server given
//! by its endpoint URL; requests are path-style and signed with the region
//! given (Garage's is `garage`) and the credentials in `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`. The secret is never printed: [`RemoteConfig`]'s
//! `Debug` redacts it and every error message from the HTTP stack is scrubbed
//! of it. Each request has a connect timeout (5 s) and a whole-request timeout
//! (60 s); failed requests are retried at most 3 times within 20 s (server
//! errors and connection failures only: a refusal such as wrong credentials
//! fails at once).
//!
//! The local store ([`snapshot_store`]) stays free of the HTTP stack; this
//! crate uses its exchange API (a template's layers with their page ids and
//! verified page bytes; [`Store::write_layers`](snapshot_store::Store::write_layers)
//! to write pulled layers through its atomic writer).
//!
//! # Page identity
//!
//! Each local store names a page by an XXH3-128 keyed with its own random
//! secret, so two stores name the same page differently. On the remote a page
//! is named by BLAKE3-256 of its 4096 bytes: every worker computes the same
//! name with no secret to distribute, and nobody can make two different pages
//! with the same name. Push hashes each page it reads (after checking it
//! against its local id); pull checks each page it fetches against its BLAKE3
//! name before it goes anywhere, and the local store hashes it again with its
//! own key as it writes it.
//!
//! # Remote layout
//!
//! Every object is immutable except the template references, and every
//! metadata object is framed as: magic (8 bytes), major u16, minor u16,
//! payload length u64, BLAKE3 of the payload (32 bytes), payload (bincode 2,
//! size-limited); all little-endian.
//!
//! ```text
//! s3://BUCKET/PREFIX/
//! ├── packs/
//! │   ├── <H>.pack      pages, 4096 bytes each, back to back (1..=4096 pages; push writes
//! │   │                 1024: 4 MiB objects); H = BLAKE3(salt || the whole object), the salt
//! │   │                 random per pack (a pack sent again never reuses a key gc has marked)
//! │   └── <H>.idx       "VMMRIDX1": { pack: H, salt [16], pages: [BLAKE3 of page i] }
//! │                     (page i at i*4096); written only after <H>.pack is complete
//! ├── manifests/
//! │   └── <M>.man       "VMMRMAN1", M = BLAKE3 of the whole object: one template layer:
//! │                     { name, parent: Option<(name, M of the parent manifest)>, mem_size,
//! │                       created (unix ms), pushed (unix ms), nonce [16] (random per push),
//! │                       zero_runs: [(first frame, count)],
//! │                       page_runs: [(first frame, [index into pages])],
//! │                       pages: [BLAKE3], locs: [(index into packs, page number)] (one per page),
//! │                       packs: [H], vcpu_state, device_state, working_set }
//! ├── blobs/
//! │   └── <HEX>.blob    a deployed function's blob (its spec, module or a file), named by
//! │                     its SHA-256 (see the [`functions`](mod@functions) module)
//! ├── functions/
//! │   └── <NAME>.fn     a deployed function's record, as the local store encodes it
//! ├── templates/
//! │   └── <name>        "VMMRREF1": { name, manifest: M, pushed (unix ms) }; written last
//! └── gc/
//!     └── marked        "VMMRGCM1": { marked (unix ms), grace (ms), objects: [key] }
//! ```
//!
//! A child names its parent by name *and* manifest hash, so a pull fetches
//! exactly the chain that was pushed, whatever was pushed under the parent's
//! name since. Each pull reads a manifest's pages straight from the packs its
//! `locs` name (ranged reads of adjacent pages, up to 1 MiB each), so the
//! pack indexes are read only by push (to learn what the remote has) and by
//! verify.
//!
//! # Push, and what a killed or concurrent push leaves
//!
//! Push hashes the pages of the templates and every layer below them, lists
//! `packs/`, reads the pack indexes it has not cached (copies are kept in the
//! local store under `remote/`, checked on every read), and sends only pages
//! no usable pack has, in new packs: each pack object, then its index. A
//! layer the remote has already (its reference names a manifest with the same
//! contents on packs that are kept) is not written again. Then, root first,
//! each layer's manifest object and, last, its template reference.
//! So a reference only ever names a manifest whose packs were all complete
//! when it was written: a push killed at any moment leaves at most packs, pack
//! indexes or manifests nothing references, which the next push reuses (a pack
//! with its index) and gc removes. Two pushes at once at worst both upload a
//! page; each reference names a complete chain, and the last one written wins.
//!
//! # Garbage collection, without racing pushes
//!
//! `gc` works in two passes at least a grace period apart (default one hour):
//! a pass finds every object that no template reference reaches (references ->
//! manifests -> parents' manifests and packs), deletes those the previous pass
//! marked at least the grace period ago and that are still unreached, and
//! writes the rest into `gc/marked`. Only packs and manifests are ever collected:
//! function records and blobs are not (a function's template is an ordinary template). A push never relies on a marked object
//! (it uploads those pages again), and after uploading it checks the marks
//! and the listing once more; it writes its references within
//! [`push::SETTLE_WINDOW`] (60 s) of that check, or checks again. An object a
//! push relies on was therefore either unmarked when the push last checked, so
//! a pass marking it afterwards comes later and its deletion is at least a
//! grace period later still, after the push's references exist and reach it;
//! or the push uploaded it, and it is new. This holds while the grace period
//! is longer than the settle window plus the clock skew between machines.
//!
//! # Pull, and what a killed or concurrent pull leaves
//!
//! Pull reads the template's reference and its manifest chain, skips layers the
//! local store has (they must be the same templates), learns which pages the
//! local store has by BLAKE3 (a cache under `remote/`; every page relied on is
//! hashed again), fetches the rest with ranged reads, checks every page, and only
//! then writes the layers through the local store's atomic writer (pages
//! appended and indexed, then manifests, root first). A damaged or missing
//! object fails the pull naming the template and the object, with nothing
//! written. A pull killed while writing leaves at most unreferenced pages
//! (garbage that `vmm-store gc` reclaims, never corruption). Pulls of one
//! template on one machine take a lock file (`remote/locks/<name>.lock`)
//! in turn, so the work is done once.
//!
//! # A size limit on a worker
//!
//! [`evict`] removes templates that came from a remote, least recently used first,
//! never one in use or one with children, until the store's packs fit a limit, then
//! runs the store's gc (see the [`evict`](mod@evict) module for the marker files).

pub mod admin;
mod cache;
pub mod client;
pub mod error;
pub mod evict;
pub mod functions;
pub mod objects;
pub mod pull;
pub mod push;
mod state;

pub use admin::{
    gc, list, stats, verify, GcOptions, GcReport, RemoteList, RemoteProblem, RemoteSeverity,
    RemoteStats, RemoteTemplate,
};
pub use client::{parse_url, Listed, Remote, RemoteConfig, Traffic};
pub use error::{RemoteError, RequestKind};
pub use evict::{evict, forget, in_use, touch_used, EvictReport, InUse};
pub use functions::{
    list_functions, pull_function, push_function, remote_record, FunctionTemplate, ListedFunction,
    PulledFunction, PushedFunction, RecordPush, SpecBlobs,
};
pub use pull::{pull, PullReport, PulledTemplate};
pub use push::{push, PushReport, PushedTemplate};

/// Progress of a long step: `done` of `total` (pages or bytes, as the phase says).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

impl Progress {
    pub fn new(phase: &'static str, done: u64, total: u64) -> Progress {
        Progress { phase, done, total }
    }
}
