//! The `http` interface (issue 20): a request becomes one JSON event in AWS Lambda's HTTP
//! API payload format 2.0 on the function's stdin, and the function's stdout is one JSON
//! response in Lambda's format, checked here before any of it reaches a client.
//!
//! Lambda's format, so that functions (and libraries such as Mangum or serverless-http)
//! written for API Gateway run unchanged. Pure code, no I/O: the daemon builds the event
//! from what hyper parsed and turns the checked response into a hyper response; every
//! refusal is a one-line reason the daemon sends as a `502`.
//!
//! Size of an event: a text body is copied as is, with only `"`, `\`, tab, LF and CR
//! escaped (two bytes each), and a body with any other control character or with bytes
//! that are not UTF-8 goes base64 (4/3): the body takes at most twice its length. The
//! request head is copied up to three times (`host` is also `domainName` and
//! `domainPrefix`) with obs-text bytes as U+FFFD (three bytes each), so the whole event is
//! at most `2 * body + 10 * head + 1 KiB`, where `head` is the bytes of the path, the query
//! and every header name and value, and the request id and source address are short.

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Most headers a response may set (`headers`, `multiValueHeaders` and `cookies` together).
pub const MAX_RESPONSE_HEADERS: usize = 100;
/// Most bytes of header names and values a response may set, over all of them.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 64 << 10;

/// Base64 as Lambda uses it (standard alphabet); decoding does not insist on the padding,
/// which some encoders leave out.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// What the event is made from: the request as hyper parsed it, and what the daemon knows
/// about it.
pub struct EventRequest<'a> {
    pub method: &'a str,
    /// The path as received, not decoded (`rawPath`, and `requestContext.http.path`).
    pub raw_path: &'a str,
    /// The query without its `?`, not decoded; empty when there is none.
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The peer's address; `None` on a Unix socket (then `sourceIp` is left out).
    pub source_ip: Option<String>,
    pub request_id: String,
    pub time_epoch_ms: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    version: &'static str,
    route_key: &'static str,
    raw_path: &'a str,
    raw_query_string: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cookies: Vec<&'a str>,
    headers: BTreeMap<&'a str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    query_string_parameters: BTreeMap<String, String>,
    request_context: RequestContext<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Cow<'a, str>>,
    is_base64_encoded: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestContext<'a> {
    account_id: &'static str,
    api_id: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain_name: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain_prefix: Option<Cow<'a, str>>,
    http: HttpContext<'a>,
    request_id: &'a str,
    route_key: &'static str,
    stage: &'static str,
    time: String,
    time_epoch: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HttpContext<'a> {
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_ip: Option<&'a str>,
    user_agent: Cow<'a, str>,
}

/// The payload 2.0 event for a request, as the bytes written to the function's stdin.
///
/// Header names are lowercase (hyper keeps them so) and a repeated header's values are
/// joined with `,`; `Cookie` headers go to `cookies`, split at `;`. Header bytes that are
/// not UTF-8 (obs-text) become U+FFFD. The query is decoded as a form (`+` is a space,
/// `%XX` a byte) into `queryStringParameters`, repeated keys joined with `,`.
pub fn build_event(r: &EventRequest) -> Vec<u8> {
    let mut cookies = Vec::new();
    let mut headers: BTreeMap<&str, String> = BTreeMap::new();
    for name in r.headers.keys() {
        if name == hyper::header::COOKIE {
            for v in r.headers.get_all(name) {
                // Cookie names and values are ASCII (RFC 6265); a value that is not is
                // dropped rather than garbled into a cookie the client never sent.
                if let Ok(s) = v.to_str() {
                    cookies.extend(s.split(';').map(str::trim).filter(|c| !c.is_empty()));
                }
            }
            continue;
        }
        let joined = r
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect::<Vec<_>>()
            .join(",");
        headers.insert(name.as_str(), joined);
    }
    let header_str = |n: &HeaderName| {
        r.headers
            .get(n)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
    };
    let domain_name = header_str(&hyper::header::HOST);
    let domain_prefix = domain_name.as_deref().map(|d| {
        // Up to the first dot of the host name; an IPv6 literal ("[::1]:8080") is whole.
        let host = match d.find(']') {
            Some(end) if d.starts_with('[') => &d[..=end],
            _ => d.split([':', '.']).next().unwrap_or_default(),
        };
        Cow::Owned(host.to_string())
    });
    let (body, is_base64_encoded) = match std::str::from_utf8(r.body) {
        _ if r.body.is_empty() => (None, false),
        Ok(s) if is_text(s) => (Some(Cow::Borrowed(s)), false),
        _ => (Some(Cow::Owned(B64.encode(r.body))), true),
    };
    let event = Event {
        version: "2.0",
        route_key: "$default",
        raw_path: r.raw_path,
        raw_query_string: r.raw_query,
        cookies,
        headers,
        query_string_parameters: query_parameters(r.raw_query),
        request_context: RequestContext {
            account_id: "-",
            api_id: "vmm",
            domain_name,
            domain_prefix,
            http: HttpContext {
                method: r.method,
                path: r.raw_path,
                protocol: "HTTP/1.1",
                source_ip: r.source_ip.as_deref(),
                user_agent: header_str(&hyper::header::USER_AGENT).unwrap_or_default(),
            },
            request_id: &r.request_id,
            route_key: "$default",
            stage: "$default",
            time: clf_time(r.time_epoch_ms),
            time_epoch: r.time_epoch_ms,
        },
        body,
        is_base64_encoded,
    };
    // Strings and maps of strings only: serializing cannot fail.
    serde_json::to_vec(&event).unwrap_or_else(|_| b"{}".to_vec())
}

/// Whether a UTF-8 body goes into the event as is: any control character but tab, LF and
/// CR would take six bytes (`\u0000`) each, and a body made of them is not text; base64
/// keeps every body within twice its length in the event.
fn is_text(s: &str) -> bool {
    !s.bytes()
        .any(|b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
}

/// `a=1&b=x%20y&a=2` -> `{a: "1,2", b: "x y"}`, as a form is decoded; empty pieces are
/// skipped and a key without `=` has the empty value.
fn query_parameters(raw: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for piece in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
        let (k, v) = (form_decode(k), form_decode(v));
        out.entry(k)
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

/// Percent-decoding with `+` as a space; a `%` not followed by two hex digits stays as is,
/// and bytes that do not make UTF-8 become U+FFFD.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lambda's `requestContext.time`: `12/Mar/2020:19:03:58 +0000`.
fn clf_time(epoch_ms: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = epoch_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize % 12],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The event a template of an `http` function records its working set with: `GET /`
/// without headers or body (its requests' common path through the runtime's JSON and the
/// function's dispatch).
pub fn trial_event() -> Vec<u8> {
    build_event(&EventRequest {
        method: "GET",
        raw_path: "/",
        raw_query: "",
        headers: &HeaderMap::new(),
        body: b"",
        source_ip: None,
        request_id: "trial".into(),
        time_epoch_ms: 0,
    })
}

/// A function's answer, checked: what the daemon sends (after its own `x-vmm-*` headers).
#[derive(Debug)]
pub struct FunctionResponse {
    pub status: u16,
    /// Those of `headers`, then `multiValueHeaders` (each by name, as serde_json keeps
    /// objects), then one `set-cookie` per cookie in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

/// Headers the daemon (or hyper under it) owns: how the connection is kept and how the
/// body is framed. A function setting them could desynchronise the client's parser.
const REFUSED_HEADERS: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
];

/// The function's stdout as a Lambda response:
/// `{"statusCode": 200, "headers": {...}, "multiValueHeaders": {...}, "cookies": [...],
/// "body": "...", "isBase64Encoded": false}`; only `statusCode` is required, `null` is the
/// same as a missing field, and fields Lambda does not know are ignored.
///
/// Lambda also takes output that is not an object as a 200 with that JSON as the body;
/// here that is refused, because a function written for this interface that prints
/// something else has gone wrong. The length is the caller's bound (the output cap).
pub fn parse_response(stdout: &[u8]) -> Result<FunctionResponse, String> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Err("the function printed no response (the http interface wants one JSON object with statusCode)".into());
    }
    let v: serde_json::Value = serde_json::from_slice(stdout)
        .map_err(|e| format!("the function's output is not JSON: {e}"))?;
    let serde_json::Value::Object(o) = v else {
        return Err(format!(
            "the function's output is JSON {} but must be an object with statusCode",
            kind(&v)
        ));
    };
    let field = |name: &str| o.get(name).filter(|v| !v.is_null());

    let status = match field("statusCode") {
        None => return Err("statusCode: missing".into()),
        Some(v) if v.is_number() => match v.as_u64() {
            Some(s @ 100..=599) => u16::try_from(s).unwrap_or(500),
            _ => return Err(format!("statusCode: {v} is not an integer in 100..=599")),
        },
        Some(v) => return Err(format!("statusCode: must be an integer, not {}", kind(v))),
    };

    let mut headers = Headers::default();
    if let Some(h) = field("headers") {
        let h = h
            .as_object()
            .ok_or_else(|| format!("headers: must be an object, not {}", kind(h)))?;
        for (name, value) in h {
            let value = value.as_str().ok_or_else(|| {
                format!(
                    "headers.{}: value must be a string, not {}",
                    shown(name),
                    kind(value)
                )
            })?;
            headers.add("headers", name, value)?;
        }
    }
    if let Some(h) = field("multiValueHeaders") {
        let h = h
            .as_object()
            .ok_or_else(|| format!("multiValueHeaders: must be an object, not {}", kind(h)))?;
        for (name, values) in h {
            let bad = || {
                format!(
                    "multiValueHeaders.{}: must be an array of strings",
                    shown(name)
                )
            };
            for value in values.as_array().ok_or_else(bad)? {
                headers.add("multiValueHeaders", name, value.as_str().ok_or_else(bad)?)?;
            }
        }
    }
    if let Some(c) = field("cookies") {
        let bad = || format!("cookies: must be an array of strings, not {}", kind(c));
        for cookie in c.as_array().ok_or_else(bad)? {
            headers.add("cookies", "set-cookie", cookie.as_str().ok_or_else(bad)?)?;
        }
    }

    let base64 = match field("isBase64Encoded") {
        None => false,
        Some(b) => b
            .as_bool()
            .ok_or_else(|| format!("isBase64Encoded: must be true or false, not {}", kind(b)))?,
    };
    let body = match field("body") {
        None => Vec::new(),
        Some(serde_json::Value::String(s)) if base64 => B64.decode(s.trim_end()).map_err(|e| {
            format!("body: isBase64Encoded is true but the body is not base64: {e}")
        })?,
        Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
        Some(b) => return Err(format!("body: must be a string, not {}", kind(b))),
    };

    Ok(FunctionResponse {
        status,
        headers: headers.list,
        body,
    })
}

/// The response headers as they are checked, with the running limits.
#[derive(Default)]
struct Headers {
    list: Vec<(HeaderName, HeaderValue)>,
    bytes: usize,
}

impl Headers {
    fn add(&mut self, field: &str, name: &str, value: &str) -> Result<(), String> {
        if self.list.len() >= MAX_RESPONSE_HEADERS {
            return Err(format!(
                "{field}: more than {MAX_RESPONSE_HEADERS} response headers"
            ));
        }
        self.bytes += name.len() + value.len();
        if self.bytes > MAX_RESPONSE_HEADER_BYTES {
            return Err(format!(
                "{field}: response headers over {} KiB",
                MAX_RESPONSE_HEADER_BYTES >> 10
            ));
        }
        let at = || {
            if field == "cookies" {
                field.to_string()
            } else {
                format!("{field}.{}", shown(name))
            }
        };
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{}: not a valid header name", at()))?;
        if REFUSED_HEADERS.contains(&n.as_str()) {
            return Err(format!(
                "{}: the daemon sets the connection and framing headers itself",
                at()
            ));
        }
        if n.as_str().starts_with("x-vmm-") {
            return Err(format!("{}: x-vmm-* headers are the daemon's", at()));
        }
        if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(format!("{}: value contains CR, LF or NUL", at()));
        }
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("{}: value contains a control character", at()))?;
        self.list.push((n, v));
        Ok(())
    }
}

/// A name from the function's output, fit for a one-line message: escaped, and cut.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let q = format!("{cut:?}");
    if cut.len() < s.len() {
        format!("{q}...")
    } else {
        q
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn request<'a>(
        headers: &'a HeaderMap,
        path: &'a str,
        query: &'a str,
        body: &'a [u8],
    ) -> EventRequest<'a> {
        EventRequest {
            method: "POST",
            raw_path: path,
            raw_query: query,
            headers,
            body,
            source_ip: Some("127.0.0.1".into()),
            request_id: "req-1".into(),
            time_epoch_ms: 1_584_039_838_123,
        }
    }

    fn event(headers: &HeaderMap, query: &str, body: &[u8]) -> Value {
        let r = request(headers, "/v1/functions/f/invoke", query, body);
        serde_json::from_slice(&build_event(&r)).expect("the event is JSON")
    }

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).expect("test value"));
        }
        h
    }

    /// The body as the function would read it back from the event.
    fn body_of(e: &Value) -> Vec<u8> {
        match (&e["body"], e["isBase64Encoded"].as_bool().expect("flag")) {
            (Value::Null, false) => Vec::new(),
            (Value::String(s), true) => B64.decode(s).expect("base64"),
            (Value::String(s), false) => s.as_bytes().to_vec(),
            other => panic!("unexpected body {other:?}"),
        }
    }

    fn refused(out: &str) -> String {
        match parse_response(out.as_bytes()) {
            Ok(r) => panic!("accepted {out:?} as {r:?}"),
            Err(e) => {
                assert!(!e.contains('\n') && !e.contains('\r'), "one line: {e:?}");
                e
            }
        }
    }

    #[test]
    fn event_has_the_payload_2_fields() {
        let h = map(&[
            ("host", "fn.example.com:8080"),
            ("user-agent", "curl/8"),
            ("content-type", "text/plain"),
        ]);
        let e = event(&h, "a=1&b=2", b"hello");
        assert_eq!(e["version"], "2.0");
        assert_eq!(e["routeKey"], "$default");
        assert_eq!(e["rawPath"], "/v1/functions/f/invoke");
        assert_eq!(e["rawQueryString"], "a=1&b=2");
        assert_eq!(e["headers"]["content-type"], "text/plain");
        assert_eq!(e["headers"]["host"], "fn.example.com:8080");
        assert_eq!(e["queryStringParameters"], json!({"a": "1", "b": "2"}));
        assert_eq!(e["body"], "hello");
        assert_eq!(e["isBase64Encoded"], false);
        assert!(e.get("cookies").is_none(), "no cookies, no field");
        let c = &e["requestContext"];
        assert_eq!(c["accountId"], "-");
        assert_eq!(c["apiId"], "vmm");
        assert_eq!(c["domainName"], "fn.example.com:8080");
        assert_eq!(c["domainPrefix"], "fn");
        assert_eq!(c["requestId"], "req-1");
        assert_eq!(c["routeKey"], "$default");
        assert_eq!(c["stage"], "$default");
        assert_eq!(c["timeEpoch"], 1_584_039_838_123u64);
        assert_eq!(c["time"], "12/Mar/2020:19:03:58 +0000");
        assert_eq!(
            c["http"],
            json!({"method": "POST", "path": "/v1/functions/f/invoke", "protocol": "HTTP/1.1",
                   "sourceIp": "127.0.0.1", "userAgent": "curl/8"})
        );
    }

    #[test]
    fn event_without_a_body_query_host_or_address() {
        let h = HeaderMap::new();
        let mut r = request(&h, "/", "", b"");
        r.source_ip = None;
        let e: Value = serde_json::from_slice(&build_event(&r)).expect("JSON");
        assert!(e.get("body").is_none());
        assert_eq!(e["isBase64Encoded"], false);
        assert!(e.get("queryStringParameters").is_none());
        assert_eq!(e["rawQueryString"], "");
        assert_eq!(e["headers"], json!({}));
        assert!(e["requestContext"].get("domainName").is_none());
        assert!(e["requestContext"]["http"].get("sourceIp").is_none());
        assert_eq!(e["requestContext"]["http"]["userAgent"], "");
    }

    #[test]
    fn binary_bodies_round_trip_as_base64() {
        let h = HeaderMap::new();
        let all: Vec<u8> = (0..=255u8).cycle().take(4099).collect();
        for body in [
            &all[..],
            b"\xff",
            b"\x00",
            b"text with a NUL \x00 in it",
            b"\xc3\x28 bad utf-8",
            b"\x1b[31mred\x1b[0m",
        ] {
            let e = event(&h, "", body);
            assert_eq!(e["isBase64Encoded"], true, "{body:?}");
            assert_eq!(body_of(&e), body);
        }
        // Text, including non-ASCII and the whitespace controls, goes as is.
        for body in [
            "héllo wörld ✓",
            "a\tb\r\nc\n",
            "\"quoted\" \\ back",
            "\u{7f}",
        ] {
            let e = event(&h, "", body.as_bytes());
            assert_eq!(e["isBase64Encoded"], false, "{body:?}");
            assert_eq!(e["body"], body);
        }
    }

    #[test]
    fn the_event_stays_within_its_documented_bound() {
        // Worst cases for escaping: quotes in a text body, obs-text in headers, %00 in the
        // query, and control characters in the body (which make it base64).
        let mut h = HeaderMap::new();
        let obs = HeaderValue::from_bytes(&[0xff; 200]).expect("obs-text");
        h.append("host", obs.clone());
        h.append("user-agent", obs.clone());
        h.append("x-a", HeaderValue::from_static("\"\"\"\"\t\t"));
        h.append("x-a", obs);
        let head = |path: &str, query: &str, h: &HeaderMap| {
            path.len()
                + query.len()
                + h.iter()
                    .map(|(n, v)| n.as_str().len() + v.len())
                    .sum::<usize>()
        };
        let query = "%00=%00&%22=%ff&".repeat(20);
        let path = "/\"\\".repeat(30);
        for body in [vec![b'"'; 5000], vec![0u8; 5000], vec![0xff; 5000]] {
            let r = request(&h, &path, &query, &body);
            let n = build_event(&r).len();
            let bound = 2 * body.len() + 10 * head(&path, &query, &h) + 1024;
            assert!(n <= bound, "{n} > {bound}");
        }
        // Many small pieces: headers with empty values, one-byte query keys and cookies.
        let mut h = HeaderMap::new();
        for i in 0..100u8 {
            let name = [b'a' + i % 26, b'a' + i / 26];
            h.append(
                HeaderName::from_bytes(&name[..1 + usize::from(i >= 26)]).expect("name"),
                HeaderValue::from_static(""),
            );
        }
        h.append("cookie", HeaderValue::from_static("a;b;c;d;e;f;g;h;i;j;k"));
        let query: String = (0..100u8)
            .map(|i| format!("{}&", char::from(b'!' + i % 90)))
            .collect();
        let r = request(&h, "/", &query, b"");
        let n = build_event(&r).len();
        let bound = 10 * head("/", &query, &h) + 1024;
        assert!(n <= bound, "{n} > {bound}");
        // What the constant covers: an empty request.
        let h = HeaderMap::new();
        assert!(build_event(&request(&h, "", "", b"")).len() < 512);
    }

    #[test]
    fn repeated_and_many_headers() {
        let mut h = HeaderMap::new();
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("X-Multi", HeaderValue::from_static("b, c"));
        h.append("x-multi", HeaderValue::from_static("d"));
        for i in 0..500 {
            h.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).expect("name"),
                HeaderValue::from_str(&i.to_string()).expect("value"),
            );
        }
        h.append(
            "x-latin",
            HeaderValue::from_bytes(b"caf\xe9").expect("obs-text"),
        );
        let e = event(&h, "", b"");
        let hs = e["headers"].as_object().expect("headers");
        assert_eq!(hs.len(), 502);
        assert_eq!(hs["x-multi"], "a,b, c,d");
        assert_eq!(hs["x-h499"], "499");
        assert_eq!(hs["x-latin"], "caf\u{fffd}");
        assert!(hs
            .keys()
            .all(|k| k.chars().all(|c| !c.is_ascii_uppercase())));
    }

    #[test]
    fn cookies_leave_the_headers() {
        let h = map(&[
            ("cookie", "a=1; b=2"),
            ("cookie", "c=3;d=4;"),
            ("x-other", "y"),
        ]);
        let e = event(&h, "", b"");
        assert_eq!(e["cookies"], json!(["a=1", "b=2", "c=3", "d=4"]));
        assert!(e["headers"].get("cookie").is_none());
        assert_eq!(e["headers"]["x-other"], "y");
    }

    #[test]
    fn query_strings_are_decoded() {
        let h = HeaderMap::new();
        let q = |raw: &str| event(&h, raw, b"")["queryStringParameters"].clone();
        assert_eq!(
            q("a=1&b=x%20y&a=2&c=%E2%9C%93&d=1+2&e&f=&&g=%2B%26%3D"),
            json!({"a": "1,2", "b": "x y", "c": "✓", "d": "1 2", "e": "", "f": "", "g": "+&="})
        );
        assert_eq!(
            q("x%y=%zz&bad=%4&end=%"),
            json!({"x%y": "%zz", "bad": "%4", "end": "%"})
        );
        assert_eq!(q("n=%ff%00"), json!({"n": "\u{fffd}\u{0}"}));
        assert_eq!(q("k%3Dv=1=2"), json!({"k=v": "1=2"}));
        assert_eq!(q(""), Value::Null);
        assert_eq!(q("&&"), Value::Null);
    }

    #[test]
    fn time_is_formatted_like_lambda() {
        assert_eq!(clf_time(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(clf_time(951_782_400_000), "29/Feb/2000:00:00:00 +0000");
        assert_eq!(clf_time(4_102_444_799_999), "31/Dec/2099:23:59:59 +0000");
        // No panic at the far end.
        let _ = clf_time(u64::MAX);
    }

    #[test]
    fn a_full_response_is_taken() {
        let r = parse_response(
            br#"{"statusCode": 201, "headers": {"Content-Type": "text/plain", "x-a": "1"},
                 "multiValueHeaders": {"x-m": ["a", "b"]}, "cookies": ["s=1; Path=/", "t=2"],
                 "body": "hello", "isBase64Encoded": false, "unknown": {"x": [1]}}
              "#,
        )
        .expect("valid");
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"hello");
        let hs: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            hs,
            [
                ("content-type", &b"text/plain"[..]),
                ("x-a", b"1"),
                ("x-m", b"a"),
                ("x-m", b"b"),
                ("set-cookie", b"s=1; Path=/"),
                ("set-cookie", b"t=2"),
            ]
        );
    }

    #[test]
    fn a_minimal_response_and_nulls() {
        let r = parse_response(b"{\"statusCode\":204}\n").expect("valid");
        assert_eq!((r.status, r.headers.len(), r.body.len()), (204, 0, 0));
        let r = parse_response(
            br#"{"statusCode":200,"headers":null,"cookies":null,"body":null,"isBase64Encoded":null}"#,
        )
        .expect("nulls are absent fields");
        assert_eq!((r.status, r.headers.len(), r.body.len()), (200, 0, 0));
        let r = parse_response(
            "{\"statusCode\":200,\"body\":\"✓\",\"headers\":{\"x-u\":\"✓\"}}".as_bytes(),
        )
        .expect("UTF-8 in a value is obs-text");
        assert_eq!(r.body, "✓".as_bytes());
        assert_eq!(r.headers[0].1.as_bytes(), "✓".as_bytes());
    }

    #[test]
    fn binary_response_bodies_are_decoded() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let out = json!({"statusCode": 200, "body": B64.encode(&bytes), "isBase64Encoded": true});
        let r = parse_response(out.to_string().as_bytes()).expect("valid");
        assert_eq!(r.body, bytes);
        // Padding left out is taken; a trailing newline too.
        let r = parse_response(br#"{"statusCode":200,"body":"aGk","isBase64Encoded":true}"#)
            .expect("unpadded");
        assert_eq!(r.body, b"hi");
        let r = parse_response(br#"{"statusCode":200,"body":"aGk=\n","isBase64Encoded":true}"#)
            .expect("newline");
        assert_eq!(r.body, b"hi");
        let r = parse_response(br#"{"statusCode":200,"isBase64Encoded":true}"#).expect("no body");
        assert!(r.body.is_empty());
    }

    #[test]
    fn bad_base64_is_refused() {
        for b in ["not base64!", "aGk=aGk=", "a", "aGk=====", "\u{e9}"] {
            let out = json!({"statusCode": 200, "body": b, "isBase64Encoded": true});
            let e = refused(&out.to_string());
            assert!(e.starts_with("body: "), "{e}");
        }
        assert!(refused(r#"{"statusCode":200,"isBase64Encoded":"yes"}"#)
            .starts_with("isBase64Encoded:"));
        assert!(
            refused(r#"{"statusCode":200,"body":{"a":1}}"#).starts_with("body: must be a string")
        );
        assert!(refused(r#"{"statusCode":200,"body":12}"#).starts_with("body:"));
    }

    #[test]
    fn status_codes_are_checked() {
        for (out, want) in [
            (r#"{"statusCode":99}"#, "statusCode: 99 is not"),
            (r#"{"statusCode":600}"#, "statusCode: 600 is not"),
            (r#"{"statusCode":-1}"#, "statusCode: -1 is not"),
            (r#"{"statusCode":200.5}"#, "statusCode: 200.5 is not"),
            (r#"{"statusCode":1e400}"#, "not JSON"),
            (
                r#"{"statusCode":18446744073709551616}"#,
                "is not an integer",
            ),
            (
                r#"{"statusCode":"200"}"#,
                "statusCode: must be an integer, not a string",
            ),
            (
                r#"{"statusCode":true}"#,
                "statusCode: must be an integer, not a boolean",
            ),
            (r#"{"statusCode":null}"#, "statusCode: missing"),
            (r#"{"body":"hi"}"#, "statusCode: missing"),
        ] {
            let e = refused(out);
            assert!(e.contains(want), "{out}: {e}");
        }
        for s in [100, 200, 418, 599] {
            let r = parse_response(format!("{{\"statusCode\":{s}}}").as_bytes()).expect("valid");
            assert_eq!(r.status, s);
        }
    }

    #[test]
    fn output_that_is_not_a_json_object_is_refused() {
        for (out, want) in [
            ("", "printed no response"),
            (" \n", "printed no response"),
            ("hello", "not JSON"),
            ("{\"statusCode\":200", "not JSON"),
            ("{\"statusCode\":200} trailing", "not JSON"),
            ("{\"statusCode\":200}{\"statusCode\":200}", "not JSON"),
            ("log line\n{\"statusCode\":200}", "not JSON"),
            ("\u{feff}{\"statusCode\":200}", "not JSON"),
            ("[1,2]", "JSON an array but must be an object"),
            ("\"hi\"", "JSON a string but"),
            ("200", "JSON a number but"),
            ("null", "JSON null but"),
            ("true", "JSON a boolean but"),
        ] {
            let e = refused(out);
            assert!(e.contains(want), "{out:?}: {e}");
        }
        // Not UTF-8, deep nesting: refused, no panic.
        refused("\u{0}");
        let e = parse_response(b"\xff\xfe{}").expect_err("binary");
        assert!(e.contains("not JSON"));
        let deep = "[".repeat(100_000);
        assert!(refused(&deep).contains("not JSON"));
        let deep = format!("{{\"statusCode\":200,\"x\":{}}}", "[".repeat(10_000));
        refused(&deep);
    }

    #[test]
    fn header_injection_is_refused() {
        for (out, want) in [
            (
                json!({"statusCode": 200, "headers": {"x": "a\r\nset-cookie: evil"}}),
                "headers.\"x\": value contains CR, LF or NUL",
            ),
            (
                json!({"statusCode": 200, "headers": {"x": "a\nb"}}),
                "CR, LF or NUL",
            ),
            (
                json!({"statusCode": 200, "headers": {"x": "a\rb"}}),
                "CR, LF or NUL",
            ),
            (
                json!({"statusCode": 200, "headers": {"x": "a\u{0}b"}}),
                "CR, LF or NUL",
            ),
            (
                json!({"statusCode": 200, "headers": {"x": "a\u{7}b"}}),
                "control character",
            ),
            (
                json!({"statusCode": 200, "headers": {"x": "a\u{7f}b"}}),
                "control character",
            ),
            (
                json!({"statusCode": 200, "headers": {"x y": "v"}}),
                "headers.\"x y\": not a valid header name",
            ),
            (
                json!({"statusCode": 200, "headers": {"x:y": "v"}}),
                "headers.\"x:y\": not a valid header name",
            ),
            (
                json!({"statusCode": 200, "headers": {"x\r\nset-cookie": "v"}}),
                "headers.\"x\\r\\nset-cookie\": not a valid",
            ),
            (
                json!({"statusCode": 200, "headers": {"": "v"}}),
                "not a valid header name",
            ),
            (
                json!({"statusCode": 200, "headers": {"é": "v"}}),
                "not a valid header name",
            ),
            (
                json!({"statusCode": 200, "multiValueHeaders": {"x": ["ok", "a\r\nb"]}}),
                "multiValueHeaders.\"x\": value contains",
            ),
            (
                json!({"statusCode": 200, "cookies": ["a=1\r\nx-evil: 1"]}),
                "cookies: value contains CR",
            ),
        ] {
            let e = refused(&out.to_string());
            assert!(e.contains(want), "{out}: {e}");
        }
    }

    #[test]
    fn the_daemons_headers_are_refused() {
        for name in REFUSED_HEADERS.iter().copied().chain([
            "Content-Length",
            "Transfer-Encoding",
            "x-vmm-exit-code",
        ]) {
            for out in [
                json!({"statusCode": 200, "headers": {name: "1"}}),
                json!({"statusCode": 200, "multiValueHeaders": {name: ["1"]}}),
            ] {
                let e = refused(&out.to_string());
                assert!(e.contains(&format!("{name:?}")), "{out}: {e}");
            }
        }
    }

    #[test]
    fn header_shapes_are_checked() {
        for (out, want) in [
            (
                r#"{"statusCode":200,"headers":[]}"#,
                "headers: must be an object, not an array",
            ),
            (
                r#"{"statusCode":200,"headers":{"x":1}}"#,
                "headers.\"x\": value must be a string, not a number",
            ),
            (
                r#"{"statusCode":200,"headers":{"x":["a"]}}"#,
                "value must be a string, not an array",
            ),
            (
                r#"{"statusCode":200,"multiValueHeaders":{"x":"a"}}"#,
                "multiValueHeaders.\"x\": must be an array of strings",
            ),
            (
                r#"{"statusCode":200,"multiValueHeaders":{"x":[1]}}"#,
                "must be an array of strings",
            ),
            (
                r#"{"statusCode":200,"multiValueHeaders":"x"}"#,
                "multiValueHeaders: must be an object",
            ),
            (
                r#"{"statusCode":200,"cookies":"a=1"}"#,
                "cookies: must be an array of strings, not a string",
            ),
            (
                r#"{"statusCode":200,"cookies":[1]}"#,
                "cookies: must be an array of strings",
            ),
        ] {
            let e = refused(out);
            assert!(e.contains(want), "{out}: {e}");
        }
    }

    #[test]
    fn header_count_and_size_are_bounded() {
        let headers = |n: usize| -> serde_json::Map<String, Value> {
            (0..n).map(|i| (format!("x-h{i}"), json!("v"))).collect()
        };
        let r = parse_response(
            json!({"statusCode": 200, "headers": headers(100)})
                .to_string()
                .as_bytes(),
        )
        .expect("100 headers");
        assert_eq!(r.headers.len(), 100);
        let e = refused(&json!({"statusCode": 200, "headers": headers(101)}).to_string());
        assert!(e.contains("more than 100 response headers"), "{e}");
        // Cookies and multi-value headers count too.
        let e = refused(
            &json!({"statusCode": 200, "headers": headers(99), "cookies": ["a=1", "b=2"]})
                .to_string(),
        );
        assert!(e.starts_with("cookies: more than 100"), "{e}");
        let e = refused(
            &json!({"statusCode": 200, "multiValueHeaders": {"x": vec!["v"; 101]}}).to_string(),
        );
        assert!(e.contains("more than 100"), "{e}");
        // 64 KiB of names and values, not one byte more.
        let big = "v".repeat(MAX_RESPONSE_HEADER_BYTES - 1);
        parse_response(
            json!({"statusCode": 200, "headers": {"x": big}})
                .to_string()
                .as_bytes(),
        )
        .expect("64 KiB");
        let e =
            refused(&json!({"statusCode": 200, "headers": {"x": format!("{big}v")}}).to_string());
        assert!(e.contains("over 64 KiB"), "{e}");
        let half = "v".repeat(MAX_RESPONSE_HEADER_BYTES / 2);
        let e = refused(
            &json!({"statusCode": 200, "headers": {"x": half}, "cookies": [half]}).to_string(),
        );
        assert!(
            e.starts_with("cookies: response headers over 64 KiB"),
            "{e}"
        );
        // A huge name is cut in the reason.
        let name = "n ".repeat(10_000);
        let e = refused(&json!({"statusCode": 200, "headers": {name: "v"}}).to_string());
        assert!(
            e.len() < 200 && e.contains("\"...: not a valid header name"),
            "{e}"
        );
    }

    #[test]
    fn arbitrary_output_never_panics() {
        // A cheap deterministic fuzz: mutations of a valid response.
        let base = br#"{"statusCode":200,"headers":{"a":"b"},"multiValueHeaders":{"m":["1"]},"cookies":["c=1"],"body":"aGk=","isBase64Encoded":true}"#;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut v = base.to_vec();
            for _ in 0..(x % 4 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % v.len() as u64) as usize;
                match x >> 60 {
                    0..=9 => v[at] = (x >> 32) as u8,
                    10..=12 => {
                        v.remove(at);
                    }
                    _ => v.insert(at, b"\"{}[]:,\\0e-"[(x >> 40) as usize % 11]),
                }
            }
            let _ = parse_response(&v);
        }
    }
}
