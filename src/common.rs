//! Small helpers both servers (the node's JSON API and the registry) use:
//! RFC 9457 problem+json responses, a JSON body extractor that answers
//! with one, and the times and random identifiers both write. Imports
//! only the contract's `Problem`.

use std::time::SystemTime;

use axum::Json;
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
/// (400, or 413 / 415), never axum's plain-text rejection.
pub struct Body<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => {
                let status = rejection.status();
                let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too-large"
                } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
                    "unsupported-media-type"
                } else {
                    "bad-request"
                };
                let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
                    StatusCode::BAD_REQUEST
                } else {
                    status
                };
                Err(problem(status, kind, &rejection_text(&rejection)))
            }
        }
    }
}

/// What a refused JSON body is told: the field, never its value (serde's
/// own text quotes it: "invalid type: integer `3201…`" repeated an
/// identifier, issue 22).
fn rejection_text(rejection: &axum::extract::rejection::JsonRejection) -> String {
    use axum::extract::rejection::JsonRejection;
    match rejection {
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            // axum: "Failed to deserialize …: {path}: {serde's message}".
            let detail = text.split_once("target type: ").map_or("", |(_, d)| d);
            let (path, message) = detail.split_once(": ").unwrap_or((".", detail));
            let path_ok = path != "."
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'));
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|m| m.split('`').next())
                .filter(|f| f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            match (path_ok, missing) {
                (true, Some(field)) => format!("the JSON body lacks the field {path}.{field}"),
                (false, Some(field)) => format!("the JSON body lacks the field {field}"),
                (true, None) => format!(
                    "the JSON body's field {path} has a value of the wrong type or form, or is unknown"
                ),
                (false, None) => {
                    "the JSON body does not have the form this request takes".to_string()
                }
            }
        }
        JsonRejection::JsonSyntaxError(_) => "the body is not valid JSON".to_string(),
        other => other.body_text(),
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
}
