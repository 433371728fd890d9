//! Media types: parsing Content-Type and Accept (PS3.18 §8.7), choosing
//! what to send, and writing multipart/related bodies (RFC 2387).

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use axum::http::header;

use crate::http::error::Error;

/// One media range of an Accept header, or a Content-Type.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaType {
    /// `type/subtype`, lower case.
    pub essence: String,
    /// Parameter names in lower case, values unquoted.
    pub params: BTreeMap<String, String>,
    pub q: f32,
}

impl MediaType {
    pub fn parse(s: &str) -> Option<MediaType> {
        let mut pieces = split_unquoted(s, ';').into_iter();
        let essence = pieces.next()?.trim().to_ascii_lowercase();
        if !essence.contains('/') {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut q = 1.0;
        for p in pieces {
            let Some((name, value)) = p.split_once('=') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().trim_matches('"').to_string();
            if name == "q" {
                q = value.parse().unwrap_or(0.0);
            } else {
                params.insert(name, value);
            }
        }
        Some(MediaType { essence, params, q })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Whether this range admits `essence` (wildcards `*/*`, `type/*`).
    pub fn admits(&self, essence: &str) -> bool {
        if self.essence == "*/*" || self.essence == essence {
            return true;
        }
        match (self.essence.strip_suffix("/*"), essence.split_once('/')) {
            (Some(t), Some((et, _))) => t == et,
            _ => false,
        }
    }
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + 1;
        }
    }
    out.push(&s[start..]);
    out
}

/// The Accept header's media ranges, most preferred first; `*/*` when the
/// request has none. Ranges with q=0 are dropped (RFC 9110 §12.4.2: not
/// acceptable), so an Accept of only such ranges admits nothing.
pub fn accept(headers: &HeaderMap) -> Vec<MediaType> {
    let given: Vec<MediaType> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| split_unquoted(v, ','))
        .filter(|s| !s.trim().is_empty())
        .filter_map(MediaType::parse)
        .collect();
    if given.is_empty() {
        return vec![MediaType::parse("*/*").expect("valid")];
    }
    let mut ranges: Vec<MediaType> = given.into_iter().filter(|m| m.q > 0.0).collect();
    // Stable: equal q keeps the client's order.
    ranges.sort_by(|a, b| b.q.total_cmp(&a.q));
    ranges
}

/// The `accept` query parameter (PS3.18 §8.3.3.1), for a hyperlink that
/// cannot set headers: it stands in for the Accept header, which every
/// handler reads through [`accept`].
pub async fn accept_query_parameter(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let given = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri())
        .ok()
        .and_then(|axum::extract::Query(pairs)| {
            let values: Vec<String> = pairs
                .into_iter()
                .filter(|(k, _)| k == "accept")
                .map(|(_, v)| v)
                .collect();
            (!values.is_empty()).then(|| values.join(", "))
        });
    if let Some(value) = given {
        match axum::http::HeaderValue::from_str(&value) {
            Ok(value) => {
                request.headers_mut().insert(header::ACCEPT, value);
            }
            Err(_) => {
                return axum::response::IntoResponse::into_response(Error::BadRequest(
                    "the accept query parameter is not a valid media type list".into(),
                ));
            }
        }
    }
    next.run(request).await
}

/// For JSON resources (QIDO-RS results, metadata, STOW-RS responses):
/// `application/dicom+json` (or `application/json`, which dicomweb-client
/// and browsers send) is the one representation; XML is not offered.
pub fn require_json(headers: &HeaderMap) -> Result<(), Error> {
    let ok = accept(headers).iter().any(|m| {
        m.admits("application/dicom+json")
            || m.essence == "application/json"
            || (m.essence == "multipart/related"
                && m.param("type") == Some("application/dicom+json"))
    });
    if ok {
        Ok(())
    } else {
        Err(Error::NotAcceptable(
            "this resource is served as application/dicom+json only".into(),
        ))
    }
}

/// A fresh multipart boundary: 128 random bits, which no part's content
/// will hold by chance.
pub fn boundary() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    format!("huren-{}", hex::encode(bytes))
}

/// `multipart/related; type="..."; boundary=...`
pub fn multipart_content_type(part_type: &str, boundary: &str) -> String {
    format!("multipart/related; type=\"{part_type}\"; boundary={boundary}")
}

/// The delimiter and headers that open a part.
pub fn part_head(boundary: &str, content_type: &str, extra: &[(&str, String)]) -> Vec<u8> {
    let mut head = format!("--{boundary}\r\nContent-Type: {content_type}\r\n");
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Ends a part's content (the CRLF belongs to the next delimiter).
pub const PART_END: &[u8] = b"\r\n";

pub fn closing(boundary: &str) -> Vec<u8> {
    format!("--{boundary}--\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_ranges() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*, application/json;q=0.5, text/html;q=0"
                .parse()
                .unwrap(),
        );
        let ranges = accept(&headers);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].essence, "multipart/related");
        assert_eq!(ranges[0].param("type"), Some("application/dicom"));
        assert_eq!(ranges[0].param("transfer-syntax"), Some("*"));
        assert_eq!(ranges[1].essence, "application/json");
        assert!(require_json(&headers).is_ok());

        let cases = [
            ("*/*", true),
            ("application/*", true),
            ("application/dicom+json", true),
            ("application/dicom+xml", false),
            ("image/*", false),
        ];
        for (accept_value, ok) in cases {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, accept_value.parse().unwrap());
            assert_eq!(require_json(&h).is_ok(), ok, "{accept_value}");
        }
        assert!(require_json(&HeaderMap::new()).is_ok());
        // Only q=0: nothing is acceptable, not everything.
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            "application/dicom+json;q=0".parse().unwrap(),
        );
        assert!(accept(&h).is_empty());
        assert!(require_json(&h).is_err());
    }

    #[test]
    fn wildcards() {
        let m = MediaType::parse("image/*").unwrap();
        assert!(m.admits("image/jpeg"));
        assert!(!m.admits("application/dicom"));
        assert!(MediaType::parse("nonsense").is_none());
    }
}
