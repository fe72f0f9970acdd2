//! Callers prove who they are (`vmm serve --auth FILE`): bearer tokens, stored hashed,
//! each with scopes.
//!
//! The file has one token per line, `#` comments and blank lines ignored:
//!
//! ```text
//! # name      SHA-256 of the token                 scopes
//! ci          sha256:9f86d081884c7d65...0f00a08    invoke,metrics
//! alice       sha256:60303ae22b998861...bce6c0b    invoke:hello,invoke:markdown
//! ```
//!
//! Scopes: `invoke` (every function), `invoke:NAME` (that function only), `metrics`
//! (`GET /metrics` and `GET /v1/functions`), `deploy` (reserved for the deploy API). A
//! token itself never appears in the file, in a log line or in an answer: a presented one
//! is hashed and compared with every entry in constant time.

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

/// Largest token file read (bytes) and most tokens in it.
const MAX_FILE: u64 = 1 << 20;
const MAX_TOKENS: usize = 10_000;
/// Longest token accepted in a request header (longer ones are refused unhashed).
const MAX_TOKEN: usize = 4096;

/// What a token may do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Scope {
    Invoke,
    InvokeOne(String),
    Metrics,
    Deploy,
}

#[derive(Debug)]
struct Entry {
    name: String,
    hash: [u8; 32],
    scopes: BTreeSet<Scope>,
}

/// The tokens of `--auth` and the functions marked public.
#[derive(Debug, Default)]
pub(super) struct Auth {
    entries: Vec<Entry>,
    public: BTreeSet<String>,
}

/// Why a request is refused: no (valid) token, or a token without the scope.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Denied {
    /// 401.
    Unauthenticated,
    /// 403, naming the token's entry (never the token).
    Forbidden { who: String },
}

impl Auth {
    /// Read the token file.
    pub(super) fn load(path: &Path, public: &[String]) -> Result<Auth, String> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: a FIFO given as the file is refused below instead of hanging here.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("--auth {}: {e}", path.display()))?;
        let meta = f
            .metadata()
            .map_err(|e| format!("--auth {}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("--auth {}: not a regular file", path.display()));
        }
        let mut text = String::new();
        f.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("--auth {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_FILE {
            return Err(format!(
                "--auth {}: larger than {MAX_FILE} bytes",
                path.display()
            ));
        }
        Auth::parse(&text, public).map_err(|e| format!("--auth {}: {e}", path.display()))
    }

    /// The tokens of a token file's text.
    pub(super) fn parse(text: &str, public: &[String]) -> Result<Auth, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |m: &str| format!("line {}: {m}", i + 1);
            let words: Vec<&str> = line.split_whitespace().collect();
            let [name, hash, scopes] = words[..] else {
                return Err(at("expected NAME sha256:HEX SCOPES"));
            };
            let hex = hash
                .strip_prefix("sha256:")
                .ok_or_else(|| at("the token's hash must be written sha256:HEX (64 hex digits)"))?;
            let hash = parse_hex(hex).ok_or_else(|| {
                at("the token's hash must be 64 hex digits (`printf %s TOKEN | sha256sum`)")
            })?;
            let mut set = BTreeSet::new();
            for s in scopes.split(',') {
                set.insert(match s {
                    "invoke" => Scope::Invoke,
                    "metrics" => Scope::Metrics,
                    "deploy" => Scope::Deploy,
                    s => match s.strip_prefix("invoke:") {
                        Some(f) if snapshot_store::TemplateName::new(f).is_ok() => {
                            Scope::InvokeOne(f.to_string())
                        }
                        _ => {
                            return Err(at(&format!(
                                "unknown scope {s:?} (invoke, invoke:NAME, metrics, deploy)"
                            )))
                        }
                    },
                });
            }
            if entries.iter().any(|e| e.name == name) {
                return Err(at(&format!("a second token named {name:?}")));
            }
            if entries.iter().any(|e| e.hash == hash) {
                return Err(at("the same token twice"));
            }
            if entries.len() >= MAX_TOKENS {
                return Err(format!("more than {MAX_TOKENS} tokens"));
            }
            entries.push(Entry {
                name: name.to_string(),
                hash,
                scopes: set,
            });
        }
        if entries.is_empty() {
            return Err("no token in it (a line is NAME sha256:HEX SCOPES)".into());
        }
        Ok(Auth {
            entries,
            public: public.iter().cloned().collect(),
        })
    }

    /// Whether `authorization` (the request's header, if any) allows `want`; invoking a
    /// public function needs no token.
    pub(super) fn check(&self, authorization: Option<&[u8]>, want: &Scope) -> Result<(), Denied> {
        if let Scope::InvokeOne(f) = want {
            if self.public.contains(f) {
                return Ok(());
            }
        }
        let token = authorization
            .and_then(|h| h.strip_prefix(b"Bearer ".as_slice()))
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN)
            .ok_or(Denied::Unauthenticated)?;
        let hash: [u8; 32] = Sha256::digest(token).into();
        // Every entry is compared, each in constant time.
        let mut found: Option<&Entry> = None;
        for e in &self.entries {
            if constant_time_eq(&e.hash, &hash) {
                found = Some(e);
            }
        }
        let e = found.ok_or(Denied::Unauthenticated)?;
        let allowed = e.scopes.contains(want)
            || matches!(want, Scope::InvokeOne(_)) && e.scopes.contains(&Scope::Invoke);
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden {
                who: e.name.clone(),
            })
        }
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut d = 0u8;
    for (x, y) in a.iter().zip(b) {
        d |= x ^ y;
    }
    // Read through black_box so that the compiler cannot end the loop early.
    std::hint::black_box(d) == 0
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `listen` is only reachable from this machine (a loopback address or a Unix
/// socket).
pub(super) fn local_only(listen: &str) -> bool {
    if listen.starts_with("unix:") {
        return true;
    }
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(t: &str) -> String {
        let h: [u8; 32] = Sha256::digest(t.as_bytes()).into();
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn tokens_are_checked_by_hash_and_scope() {
        let text = format!(
            "# comment\n\nci sha256:{} invoke,metrics\nalice sha256:{} invoke:hello\n",
            sha("ci-secret"),
            sha("alice-secret")
        );
        let a = Auth::parse(&text, &["open".into()]).expect("parse");
        let h = |t: &str| format!("Bearer {t}").into_bytes();
        let hello = Scope::InvokeOne("hello".into());
        let other = Scope::InvokeOne("other".into());
        assert_eq!(a.check(Some(&h("ci-secret")), &hello), Ok(()));
        assert_eq!(a.check(Some(&h("ci-secret")), &Scope::Metrics), Ok(()));
        assert_eq!(a.check(Some(&h("alice-secret")), &hello), Ok(()));
        assert_eq!(
            a.check(Some(&h("alice-secret")), &other),
            Err(Denied::Forbidden {
                who: "alice".into()
            })
        );
        assert_eq!(
            a.check(Some(&h("alice-secret")), &Scope::Metrics),
            Err(Denied::Forbidden {
                who: "alice".into()
            })
        );
        for bad in [
            &b""[..],
            b"Bearer ",
            b"Basic Y2k=",
            b"Bearer ci-secreT",
            b"bearer ci-secret",
        ] {
            assert_eq!(
                a.check(Some(bad), &hello),
                Err(Denied::Unauthenticated),
                "{bad:?}"
            );
        }
        assert_eq!(a.check(None, &hello), Err(Denied::Unauthenticated));
        let long = format!("Bearer {}", "x".repeat(MAX_TOKEN + 1)).into_bytes();
        assert_eq!(a.check(Some(&long), &hello), Err(Denied::Unauthenticated));
        // A public function needs no token; only invoking it.
        assert_eq!(a.check(None, &Scope::InvokeOne("open".into())), Ok(()));
        assert_eq!(a.check(None, &Scope::Metrics), Err(Denied::Unauthenticated));
    }

    #[test]
    fn malformed_token_files_are_refused_with_the_line() {
        let good = sha("t");
        for (text, want) in [
            ("", "no token"),
            ("a b\n", "line 1: expected"),
            (&format!("a {good} invoke\n") as &str, "sha256:HEX"),
            ("a sha256:abc invoke\n", "64 hex digits"),
            (&format!("a sha256:{good} root\n"), "unknown scope"),
            (&format!("a sha256:{good} invoke:../x\n"), "unknown scope"),
            (
                &format!("a sha256:{good} invoke\na sha256:{} invoke\n", sha("u")),
                "line 2: a second token named",
            ),
            (
                &format!("a sha256:{good} invoke\nb sha256:{good} metrics\n"),
                "the same token twice",
            ),
        ] {
            let e = Auth::parse(text, &[]).expect_err(text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn only_loopback_and_unix_sockets_are_local() {
        for l in [
            "127.0.0.1:8080",
            "[::1]:80",
            "localhost:1",
            "unix:/tmp/s",
            "127.1.2.3:9",
        ] {
            assert!(local_only(l), "{l}");
        }
        for l in ["0.0.0.0:8080", "10.0.0.1:80", "[::]:80", "example.com:80"] {
            assert!(!local_only(l), "{l}");
        }
    }
}
