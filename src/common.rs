//! Small helpers both servers (the node's JSON API and the registry) use:
//! RFC 9457 problem+json responses, a JSON body extractor that answers
//! with one, and the times and random identifiers both write. Imports
//! only the contract's `Problem`.

use std::time::SystemTime;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::contract::Problem;

/// An RFC 9457 problem response. A 401 carries the `WWW-Authenticate`
/// challenge RFC 6750 asks of a bearer-token server.
pub fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = Problem {
        kind: format!("https://huren.dev/problems/{kind}"),
        title: status.canonical_reason().unwrap_or("error").to_string(),
        status: status.as_u16(),
        detail: detail.to_string(),
    };
    let mut response = (
        status,
        serde_json::to_string(&body).expect("problem serialises"),
    )
        .into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"huren\""),
        );
    }
    response
}

/// A JSON request body; a malformed one is answered with problem+json
/// (400, or 413 / 415), never axum's plain-text rejection. The 400's
/// detail names the field (its path, `records[3].study_date`) and what
/// kind of problem it has, never the value: serde's own messages quote
/// it (`invalid type: integer `3201…``), and a value may be an identifier.
pub struct Body<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "the body must be application/json",
            ));
        }
        // Bytes obeys DefaultBodyLimit: a larger body is 413.
        let bytes =
            match <axum::body::Bytes as axum::extract::FromRequest<S>>::from_request(req, state)
                .await
            {
                Ok(b) => b,
                Err(rejection) => {
                    let status = rejection.status();
                    let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
                        "too-large"
                    } else {
                        "bad-request"
                    };
                    return Err(problem(status, kind, "the body could not be read"));
                }
            };
        let bad = |detail: &str| problem(StatusCode::BAD_REQUEST, "bad-request", detail);
        // Every request body of the contract is an object; serde would
        // also take a struct written as an array of its fields.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(bad("the body must be a JSON object"));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut de) {
            Ok(v) => match de.end() {
                Ok(()) => Ok(Body(v)),
                Err(_) => Err(bad("the body has more after its JSON value")),
            },
            Err(e) => Err(bad(&body_error(e.path(), e.inner()))),
        }
    }
}

fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// What is wrong with a body, by field path and kind, without its value.
fn body_error(path: &serde_path_to_error::Path, e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    match e.classify() {
        Category::Syntax | Category::Io => {
            return format!("the body is not valid JSON (line {line}, column {column})");
        }
        Category::Eof => return "the body ends before its JSON does".into(),
        Category::Data => {}
    }
    // serde's data messages begin with their kind; what follows (the
    // value, the variant or field the client sent) is left out.
    let message = e.to_string();
    let problem = if let Some(rest) = message.strip_prefix("missing field `") {
        // A field of the contract's own type, not the client's text.
        let field = rest.split('`').next().unwrap_or("");
        format!("is missing the required field {}", safe_segment(field))
    } else if message.starts_with("invalid type") {
        "has the wrong type".into()
    } else if message.starts_with("invalid value") {
        "has a value out of range".into()
    } else if message.starts_with("invalid length") {
        "has the wrong number of elements".into()
    } else if message.starts_with("unknown variant") {
        "is not one of the allowed values".into()
    } else if message.starts_with("unknown field") {
        "has a field the contract does not define".into()
    } else if message.starts_with("duplicate field") {
        "has a field twice".into()
    } else {
        "is not valid".into()
    };
    let segments: Vec<_> = path.iter().collect();
    // An unknown field's path ends with its name, the client's text.
    let segments = if message.starts_with("unknown field") {
        &segments[..segments.len().saturating_sub(1)]
    } else {
        &segments[..]
    };
    let path = field_path(segments);
    if path.is_empty() {
        format!("the body {problem}")
    } else {
        format!("field {path} {problem}")
    }
}

/// `records[3].study_date`; a segment that is not a plain field name (a
/// map key the client chose) is shown as `?`.
fn field_path(segments: &[&serde_path_to_error::Segment]) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&safe_segment(key));
            }
            Segment::Unknown => {}
        }
    }
    out
}

fn safe_segment(key: &str) -> String {
    if !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        key.to_string()
    } else {
        "?".into()
    }
}

/// Now, as the RFC 3339 text every table keeps (UTC, microseconds), so
/// that text comparison is time comparison.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// `bytes` random bytes from the OS, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source works");
    hex::encode(buf)
}

/// A calendar date written YYYY-MM-DD that exists (2024-02-29 does,
/// 2023-02-29 does not).
pub fn is_date(s: &str) -> bool {
    s.len() == 10
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[7] == b'-'
        && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// A time of day written HH:MM:SS that exists (00:00:00 to 23:59:59;
/// 23:59:60 for a leap second, which DICOM TM allows).
pub fn is_time(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 8 || b[2] != b':' || b[5] != b':' {
        return false;
    }
    let two = |i: usize| -> Option<u32> {
        (b[i].is_ascii_digit() && b[i + 1].is_ascii_digit())
            .then(|| u32::from(b[i] - b'0') * 10 + u32::from(b[i + 1] - b'0'))
    };
    match (two(0), two(3), two(6)) {
        (Some(h), Some(m), Some(s)) => h < 24 && m < 60 && (s < 60 || (h, m, s) == (23, 59, 60)),
        _ => false,
    }
}

/// How far behind its clock a [`Pace`] may fall and catch up.
const PACE_BURST: std::time::Duration = std::time::Duration::from_millis(50);

/// A cap on bytes per second, shared by every reader at once; none when 0
/// (the node's `peer_bandwidth`: what its peer fetches take from the
/// hospital's link). Each chunk read from a peer reserves its time on a virtual
/// clock; a reader ahead of it waits, and TCP's flow control slows the
/// peer down to the same rate.
///
/// A reader a doctor is waiting on (an image the viewer asked for) goes
/// first: while one holds an [`Urgent`], the other readers take no time on
/// the clock, so the image gets the whole link, not a share of it; the
/// rate of all of them together stays the cap.
#[derive(Debug)]
pub struct Pace {
    bytes_per_second: u64,
    next: std::sync::Mutex<tokio::time::Instant>,
    urgent: std::sync::atomic::AtomicUsize,
    calm: tokio::sync::Notify,
}

/// While alive, the [`Pace`]'s other readers hold back ([`Pace::urgent`]).
#[derive(Debug)]
pub struct Urgent(std::sync::Arc<Pace>);

impl Drop for Urgent {
    fn drop(&mut self) {
        if self
            .0
            .urgent
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.calm.notify_waiters();
        }
    }
}

impl Pace {
    pub fn new(bytes_per_second: u64) -> Pace {
        Pace {
            bytes_per_second,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
            urgent: std::sync::atomic::AtomicUsize::new(0),
            calm: tokio::sync::Notify::new(),
        }
    }

    /// Marks an urgent reader until the guard is dropped; it reads with
    /// [`Pace::take_urgent`].
    pub fn urgent(self: &std::sync::Arc<Self>) -> Urgent {
        self.urgent
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Urgent(self.clone())
    }

    /// Time for `bytes` of a background reader: after every urgent reader
    /// is done.
    pub async fn take(&self, bytes: usize) {
        if self.bytes_per_second == 0 {
            return;
        }
        loop {
            let calm = self.calm.notified();
            tokio::pin!(calm);
            calm.as_mut().enable();
            if self.urgent.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            calm.await;
        }
        self.reserve(bytes).await;
    }

    /// Time for `bytes` of an urgent reader: it does not wait for the others.
    pub async fn take_urgent(&self, bytes: usize) {
        if self.bytes_per_second == 0 {
            return;
        }
        self.reserve(bytes).await;
    }

    async fn reserve(&self, bytes: usize) {
        let wait = {
            let mut next = self.next.lock().expect("pace lock");
            let now = tokio::time::Instant::now();
            // A reader that slept past its time (the timer's millisecond,
            // a busy runtime) gets it back, up to PACE_BURST: else every
            // oversleep would be lost and the rate fall well below the cap.
            let floor = now.checked_sub(PACE_BURST).unwrap_or(now);
            let start = (*next).max(floor);
            *next = start
                + std::time::Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for (s, ok) in [
            ("2024-02-29", true),
            ("2023-02-29", false),
            ("2024-02-30", false),
            ("2024-13-01", false),
            ("2024-1-01", false),
            ("20240101", false),
            ("2024-01-01T", false),
        ] {
            assert_eq!(is_date(s), ok, "{s}");
        }
    }

    #[test]
    fn times() {
        for (s, ok) in [
            ("00:00:00", true),
            ("23:59:59", true),
            ("23:59:60", true),
            ("12:30:60", false),
            ("25:00:00", false),
            ("24:00:00", false),
            ("12:60:00", false),
            ("1:00:00", false),
            ("12:00", false),
            ("120000", false),
            ("12:00:0x", false),
        ] {
            assert_eq!(is_time(s), ok, "{s}");
        }
    }

    #[test]
    fn body_errors_name_the_field_not_the_value() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            study_date: String,
            n: i64,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            records: Vec<Inner>,
        }
        for (body, expected) in [
            (
                r#"{"records":[{"study_date":"x","n":1},{"study_date":320119490101,"n":1}]}"#,
                "field records[1].study_date has the wrong type",
            ),
            (
                r#"{"records":[{"study_date":"x","n":99999999999999999999999}]}"#,
                "field records[0].n has the wrong type",
            ),
            (
                r#"{"records":[{"study_date":"x"}]}"#,
                "field records[0] is missing the required field n",
            ),
            (
                r#"{"records":[],"11010519491231002X":1}"#,
                "the body has a field the contract does not define",
            ),
            (
                r#"{"records":[}"#,
                "the body is not valid JSON (line 1, column 13)",
            ),
            (r#"{"records":["#, "the body ends before its JSON does"),
        ] {
            let mut de = serde_json::Deserializer::from_str(body);
            let e = serde_path_to_error::deserialize::<_, Outer>(&mut de).unwrap_err();
            let message = body_error(e.path(), e.inner());
            assert_eq!(message, expected, "{body}");
            assert!(!message.contains("3201") && !message.contains("1101"));
        }
    }

    #[tokio::test]
    async fn the_pace_holds_fetches_to_the_configured_rate() {
        // 1 MB at 10 MB/s takes 100 ms, less the burst a reader may catch
        // up by; a lower bound only (a busy machine is slower, never faster).
        let pace = Pace::new(10_000_000);
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            pace.take(100_000).await;
        }
        let took = start.elapsed();
        // The first PACE_BURST may go at once (credit for a reader that
        // overslept), no more.
        assert!(took >= std::time::Duration::from_millis(40), "{took:?}");
        // No cap: a gigabyte goes without a wait.
        let free = Pace::new(0);
        let start = tokio::time::Instant::now();
        free.take(1 << 30).await;
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
    }

    #[tokio::test]
    async fn an_urgent_reader_goes_before_the_others() {
        let pace = std::sync::Arc::new(Pace::new(100_000_000));
        let urgent = pace.urgent();
        let background = tokio::spawn({
            let pace = pace.clone();
            async move { pace.take(1_000).await }
        });
        // 1 MB at 100 MB/s: 10 ms, during which the background reader
        // would have had its turn were it not held back.
        for _ in 0..10 {
            pace.take_urgent(100_000).await;
        }
        tokio::task::yield_now().await;
        assert!(!background.is_finished(), "a background read went first");
        drop(urgent);
        tokio::time::timeout(std::time::Duration::from_secs(5), background)
            .await
            .expect("the background reader goes once the urgent one is done")
            .unwrap();
    }
}
