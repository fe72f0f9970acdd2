//! The S3 client: `object_store`'s S3 store driven by a tokio runtime of its
//! own behind a blocking API, with explicit timeouts and retries, byte and
//! request counters, and error messages scrubbed of the secret key.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

use crate::error::{RemoteError, RequestKind};

/// Where the remote is and how to talk to it.
#[derive(Clone)]
pub struct RemoteConfig {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The server, e.g. `http://127.0.0.1:3900` (required: no AWS endpoint is assumed).
    pub endpoint: String,
    /// Signing region (`garage` for Garage; default `us-east-1`).
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Time to open a connection.
    pub connect_timeout: Duration,
    /// Time for one whole request, body included.
    pub request_timeout: Duration,
    /// Retries of a failed request (server errors and connection failures;
    /// never a refusal such as wrong credentials).
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

impl RemoteConfig {
    /// A config for `url` at `endpoint`, credentials from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`, region `region`, else `AWS_REGION`, else `us-east-1`;
    /// connect timeout 5 s, request timeout 60 s, 3 retries within 20 s.
    pub fn from_env(
        url: &str,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<RemoteConfig, RemoteError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = endpoint
            .map(str::to_string)
            .filter(|e| !e.is_empty())
            .ok_or(RemoteError::NoEndpoint)?;
        let (Some(access_key_id), Some(secret_access_key)) =
            (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(RemoteError::NoCredentials);
        };
        Ok(RemoteConfig {
            url: url.to_string(),
            endpoint,
            region: region
                .map(str::to_string)
                .or_else(|| env("AWS_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id,
            secret_access_key,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
        })
    }
}

/// Parses `s3://BUCKET[/PREFIX]` into (bucket, prefix without slashes at the ends).
pub fn parse_url(url: &str) -> Result<(String, String), RemoteError> {
    let bad = |reason: &str| RemoteError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("it must start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(bad(
            "a bucket name is 3-63 characters of a-z, 0-9, '-' and '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    let prefix_ok = prefix.len() <= 512
        && prefix.split('/').all(|seg| {
            prefix.is_empty()
                || (!seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
        });
    if !prefix_ok {
        return Err(bad(
            "the prefix is path segments of A-Z, a-z, 0-9, '-', '_' and '.' (at most 512 characters)",
        ));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Bytes and requests this client has moved.
#[derive(Default)]
pub struct Counters {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub deletes: u64,
}

impl Traffic {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Traffic) -> Traffic {
        Traffic {
            bytes_up: self.bytes_up - before.bytes_up,
            bytes_down: self.bytes_down - before.bytes_down,
            puts: self.puts - before.puts,
            gets: self.gets - before.gets,
            lists: self.lists - before.lists,
            deletes: self.deletes - before.deletes,
        }
    }
}

/// An object listed on the remote.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Key below the remote's prefix, e.g. `packs/<hash>.pack`.
    pub key: String,
    pub size: u64,
    /// Last modified, by the server's clock (unix ms).
    pub modified_unix_ms: i64,
}

/// A connection to one remote (bucket + prefix on one server).
pub struct Remote {
    rt: tokio::runtime::Runtime,
    s3: AmazonS3,
    prefix: String,
    display: String,
    secret: String,
    counters: Counters,
    /// Requests in flight at once in batch operations.
    pub parallel: usize,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl Remote {
    /// Sets up the client (no request is made).
    pub fn connect(cfg: &RemoteConfig) -> Result<Remote, RemoteError> {
        let (bucket, prefix) = parse_url(&cfg.url)?;
        let display = format!("{} at {}", cfg.url.trim_end_matches('/'), cfg.endpoint);
        let scrub = |s: String| s.replace(&cfg.secret_access_key, "<redacted>");
        let client_err = |message: String| RemoteError::Client {
            remote: display.clone(),
            message: scrub(message),
        };
        let options = ClientOptions::new()
            .with_allow_http(true)
            .with_connect_timeout(cfg.connect_timeout)
            .with_timeout(cfg.request_timeout);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: cfg.max_retries,
            retry_timeout: cfg.retry_timeout,
        };
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_endpoint(&cfg.endpoint)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_allow_http(true)
            .with_client_options(options)
            .with_retry(retry)
            // One DELETE per object (we never delete in bulk): a bulk delete's per-key
            // errors come back inside a 200 answer and are not retried, so a server's
            // passing 503 (Garage: "database is locked") failed a whole gc.
            .with_disable_bulk_delete(true)
            .build()
            .map_err(|e| client_err(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| client_err(format!("starting the I/O runtime: {e}")))?;
        Ok(Remote {
            rt,
            s3,
            prefix,
            display,
            secret: cfg.secret_access_key.clone(),
            counters: Counters::default(),
            parallel: 8,
        })
    }

    /// `s3://BUCKET/PREFIX at ENDPOINT`.
    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn traffic(&self) -> Traffic {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Traffic {
            bytes_up: l(&c.bytes_up),
            bytes_down: l(&c.bytes_down),
            puts: l(&c.puts),
            gets: l(&c.gets),
            lists: l(&c.lists),
            deletes: l(&c.deletes),
        }
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, step: &'static str, key: &str, e: object_store::Error) -> RemoteError {
        let message = self.scrub(&e.to_string());
        let kind = classify(&e, &message);
        RemoteError::Request {
            step,
            remote: self.display.clone(),
            object: key.to_string(),
            kind,
            message,
        }
    }

    fn scrub(&self, s: &str) -> String {
        // The secret never appears in a request or a response, but make sure.
        let s = if self.secret.is_empty() {
            s.to_string()
        } else {
            s.replace(&self.secret, "<redacted>")
        };
        // Keep messages to one readable line.
        let s = s.replace('\n', " ");
        if s.len() > 600 {
            let mut end = 600;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}...", &s[..end])
        } else {
            s
        }
    }

    /// The whole object, or None when there is none; refused when larger than `limit`.
    pub fn get(
        &self,
        step: &'static str,
        key: &str,
        limit: u64,
    ) -> Result<Option<Bytes>, RemoteError> {
        let path = self.path(key);
        let r = self.rt.block_on(async {
            let r = match self.s3.get_opts(&path, GetOptions::default()).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if r.meta.size > limit {
                return Ok(Some(Err(r.meta.size)));
            }
            r.bytes().await.map(|b| Some(Ok(b)))
        });
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => {
                self.counters
                    .bytes_down
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
            Ok(Some(Err(size))) => Err(RemoteError::DamagedObject {
                object: key.to_string(),
                reason: format!("{size} bytes, more than the {limit} such an object may have"),
            }),
            Err(e) => Err(self.err(step, key, e)),
        }
    }

    /// The size of an object (a HEAD request), or None when there is none.
    pub fn size(&self, step: &'static str, key: &str) -> Result<Option<u64>, RemoteError> {
        let path = self.path(key);
        let r = self.rt.block_on(self.s3.head(&path));
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(step, key, e)),
        }
    }

    /// Byte ranges of objects, `parallel` requests at a time; results in the order asked.
    /// A range the object does not hold entirely comes back short (the caller checks).
    pub fn get_ranges(
        &self,
        step: &'static str,
        ranges: &[(String, Range<u64>)],
        mut done: impl FnMut(u64),
    ) -> Result<Vec<Bytes>, RemoteError> {
        let futs = ranges.iter().enumerate().map(|(i, (key, r))| {
            let path = self.path(key);
            let opts = GetOptions {
                range: Some(GetRange::Bounded(r.clone())),
                ..Default::default()
            };
            async move {
                let res = async {
                    let g = self.s3.get_opts(&path, opts).await?;
                    g.bytes().await
                }
                .await;
                (i, res)
            }
        });
        let mut out: Vec<Option<Bytes>> = vec![None; ranges.len()];
        let mut failure = None;
        self.rt.block_on(async {
            let mut s = stream::iter(futs).buffer_unordered(self.parallel.max(1));
            while let Some((i, res)) = s.next().await {
                self.counters.gets.fetch_add(1, Ordering::Relaxed);
                match res {
                    Ok(b) => {
                        self.counters
                            .bytes_down
                            .fetch_add(b.len() as u64, Ordering::Relaxed);
                        done(b.len() as u64);
                        out[i] = Some(b);
                    }
                    Err(e) => {
                        failure = Some((i, e));
                        break;
                    }
                }
            }
        });
        if let Some((i, e)) = failure {
            return Err(self.err(step, &ranges[i].0, e));
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Writes objects, `parallel` at a time; each is written whole or not at all.
    pub fn put_many(
        &self,
        step: &'static str,
        objects: Vec<(String, Bytes)>,
        mut done: impl FnMut(u64),
    ) -> Result<(), RemoteError> {
        let futs = objects.into_iter().map(|(key, b)| {
            let path = self.path(&key);
            let len = b.len() as u64;
            async move {
                let r = self.s3.put(&path, PutPayload::from_bytes(b)).await;
                (key, len, r)
            }
        });
        let mut failure = None;
        self.rt.block_on(async {
            let mut s = stream::iter(futs).buffer_unordered(self.parallel.max(1));
            while let Some((key, len, r)) = s.next().await {
                self.counters.puts.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(_) => {
                        self.counters.bytes_up.fetch_add(len, Ordering::Relaxed);
                        done(len);
                    }
                    Err(e) => {
                        failure = Some((key, e));
                        break;
                    }
                }
            }
        });
        match failure {
            Some((key, e)) => Err(self.err(step, &key, e)),
            None => Ok(()),
        }
    }

    pub fn put(&self, step: &'static str, key: &str, bytes: Vec<u8>) -> Result<(), RemoteError> {
        self.put_many(step, vec![(key.to_string(), Bytes::from(bytes))], |_| {})
    }

    pub fn delete(&self, step: &'static str, key: &str) -> Result<(), RemoteError> {
        let path = self.path(key);
        let r = self.rt.block_on(self.s3.delete(&path));
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(step, key, e)),
        }
    }

    /// Every object whose key starts with `dir/` (recursively).
    pub fn list(&self, step: &'static str, dir: &str) -> Result<Vec<Listed>, RemoteError> {
        let path = self.path(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let r: Result<Vec<_>, _> = self
            .rt
            .block_on(self.s3.list(Some(&path)).try_collect::<Vec<_>>());
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let metas = r.map_err(|e| self.err(step, &format!("{dir}/"), e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                let key = full.strip_prefix(&strip)?.to_string();
                Some(Listed {
                    key,
                    size: m.size,
                    modified_unix_ms: m.last_modified.timestamp_millis(),
                })
            })
            .collect())
    }
}

fn classify(e: &object_store::Error, message: &str) -> RequestKind {
    if matches!(e, object_store::Error::NotFound { .. }) {
        return RequestKind::NotFound;
    }
    if matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) {
        return RequestKind::Denied;
    }
    let m = message.to_ascii_lowercase();
    let has = |s: &str| m.contains(s);
    // No answer at all first: such a message may contain any number (a duration, say).
    if has("error sending request")
        || has("connection refused")
        || has("tcp connect")
        || has("dns error")
        || has("timed out")
    {
        RequestKind::Unreachable
    } else if has("status code: 403")
        || has("status code: 401")
        || has("accessdenied")
        || has("forbidden")
        || has("invalidaccesskeyid")
        || has("signaturedoesnotmatch")
    {
        RequestKind::Denied
    } else {
        RequestKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        }
    }

    #[test]
    fn failures_are_classified_by_what_happened_not_by_numbers_in_the_message() {
        let refused = "Error performing GET http://127.0.0.1:1/b in 403.99ms, after 3 retries - HTTP error: error sending request";
        assert_eq!(
            classify(&generic(refused), refused),
            RequestKind::Unreachable
        );
        let denied =
            "Server returned non-2xx status code: 403 Forbidden: <Code>AccessDenied</Code>";
        assert_eq!(classify(&generic(denied), denied), RequestKind::Denied);
        let other = "Server returned non-2xx status code: 500 Internal Server Error";
        assert_eq!(classify(&generic(other), other), RequestKind::Other);
    }

    #[test]
    fn urls_are_checked_and_the_secret_is_never_in_debug_output() {
        assert_eq!(
            parse_url("s3://bucket").unwrap(),
            ("bucket".into(), "".into())
        );
        assert_eq!(
            parse_url("s3://my.bucket/a/b/").unwrap(),
            ("my.bucket".into(), "a/b".into())
        );
        for bad in [
            "http://b/x",
            "s3://",
            "s3://B",
            "s3://b/../x",
            "s3://bb/a//b",
            "s3://bb/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        let cfg = RemoteConfig {
            url: "s3://bucket/p".into(),
            endpoint: "http://127.0.0.1:1".into(),
            region: "garage".into(),
            access_key_id: "GKid".into(),
            secret_access_key: "very-secret-value".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{cfg:?}").contains("very-secret-value"));
        let r = Remote::connect(&cfg).unwrap();
        assert!(!format!("{r:?}").contains("very-secret-value"));
        assert_eq!(r.scrub("x very-secret-value y"), "x <redacted> y");
    }
}
