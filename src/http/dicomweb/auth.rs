//! Bearer tokens for DICOMweb: the node keeps only each token's SHA-256;
//! a presented token is hashed and compared with every configured hash in
//! constant time. GET and HEAD need the `read` scope, POST `write`.
//!
//! The viewer the node serves (/viewer, issue 19) has no token: a browser
//! must never hold one in its storage. Its requests are same-origin and
//! carry the page's session cookie instead, which admits GET and HEAD (no
//! request that changes anything, so a forged cross-site form gains
//! nothing, besides SameSite=Strict) of the studies that session opened
//! from the page, and nothing else: no search across the archive.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{DicomwebConfig, Scope, TokenConfig};
use crate::http::error::Error;

pub struct Tokens {
    open: bool,
    tokens: Vec<([u8; 32], TokenConfig)>,
}

impl Tokens {
    pub fn new(config: &DicomwebConfig) -> Tokens {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&t.sha256, &mut hash).ok()?;
                Some((hash, t.clone()))
            })
            .collect();
        Tokens {
            open: config.open,
            tokens,
        }
    }

    /// The same tokens for the JSON API, which is never open: `open` is
    /// for a viewer's DICOMweb reads and writes, while the API deletes
    /// studies, records consents and asks the region for other hospitals'
    /// records. Those always need a token with the scope.
    pub fn for_api(config: &DicomwebConfig) -> Tokens {
        Tokens {
            open: false,
            ..Tokens::new(config)
        }
    }

    /// The configured token a presented one matches. Every configured hash
    /// is compared, so the time taken does not say which one matched.
    fn find(&self, presented: &str) -> Option<&TokenConfig> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (known, token) in &self.tokens {
            if bool::from(known.ct_eq(&hash)) {
                found = Some(token);
            }
        }
        found
    }

    /// The name of the configured token an Authorization header presents
    /// (for the audit messages; never the token itself).
    pub fn holder(&self, authorization: Option<&str>) -> Option<&str> {
        let (kind, token) = authorization?.trim().split_once(' ')?;
        if !kind.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.find(token.trim()).map(|t| t.name.as_str())
    }

    /// The name of the configured token an Authorization header presents:
    /// who did it, for records such as the deletion record.
    pub fn name_of(&self, authorization: Option<&str>) -> Option<String> {
        self.holder(authorization).map(str::to_string)
    }

    pub fn check(&self, method: &Method, authorization: Option<&str>) -> Result<(), Error> {
        if self.open {
            return Ok(());
        }
        let (scope, name) =
            if method == Method::POST || method == Method::PUT || method == Method::DELETE {
                (Scope::Write, "write")
            } else {
                (Scope::Read, "read")
            };
        let presented = authorization
            .and_then(|v| {
                let (kind, token) = v.trim().split_once(' ')?;
                kind.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(Error::Unauthorized)?;
        let token = self.find(presented).ok_or(Error::Unauthorized)?;
        if token.scopes.contains(&scope) {
            tracing::debug!(token = %token.name, "authorised");
            Ok(())
        } else {
            tracing::info!(token = %token.name, scope = name, "token lacks scope");
            Err(Error::Forbidden(name))
        }
    }
}

/// DICOMweb's gate: a peer's grant (checked before), a bearer token, or
/// the page's session for the studies it opened.
pub struct WebAuth {
    pub tokens: Tokens,
    pub index: crate::index::Index,
}

/// The user of the page's session a request was admitted for (the audit
/// names them).
#[derive(Clone, Debug)]
pub struct SessionAccess(pub String);

/// The one study a viewer's request is about: `/studies/{uid}…`, or a
/// search (`/studies`, `/series`, `/instances`) with `StudyInstanceUID=`
/// (OHIF asks both ways). Paths are seen with or without the `/dicom-web`
/// prefix (nested routers strip it).
pub fn study_of(path: &str, query: Option<&str>) -> Option<String> {
    let rest = path.strip_prefix(super::BASE_PATH).unwrap_or(path);
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let uid = match segments.as_slice() {
        ["studies", uid, ..] => Some(uid.to_string()),
        // A search: keyed on one study exactly as the search reads its keys
        // (percent-decoded, by keyword or tag); a repeated key is no scope.
        ["studies" | "series" | "instances"] => query.and_then(|q| {
            let uri: axum::http::Uri = format!("/?{q}").parse().ok()?;
            let axum::extract::Query(params) =
                axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri).ok()?;
            super::qido::keyed_study(&params).map(str::to_string)
        }),
        _ => None,
    }?;
    crate::types::Uid::parse(&uid)
        .ok()
        .map(|u| u.as_str().to_string())
}

pub async fn require_token_or_session(
    State(auth): State<Arc<WebAuth>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request
        .extensions()
        .get::<crate::http::GrantAccess>()
        .is_some()
    {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let safe = request.method() == Method::GET || request.method() == Method::HEAD;
    if authorization.is_none() && safe && !auth.tokens.open {
        let cookies = crate::http::page::auth::cookies(request.headers());
        if let Some(token) = cookies.get(crate::http::page::auth::SESSION_COOKIE) {
            // A session is no credential for a request naming no study
            // (a search across the archive): 401 like a missing token.
            let Some(study) = study_of(request.uri().path(), request.uri().query()) else {
                return Error::Unauthorized.into_response();
            };
            return match crate::http::page::auth::session_may_read(&auth.index, token, &study).await
            {
                Ok(Some(user)) => {
                    // The DICOM audit messages name the doctor.
                    crate::audit::http_user(format!("session:{user}"));
                    request.extensions_mut().insert(SessionAccess(user));
                    next.run(request).await
                }
                Ok(None) => Error::Unauthorized.into_response(),
                Err(e) => Error::Unavailable(format!("session: {e}")).into_response(),
            };
        }
    }
    match auth.tokens.check(request.method(), authorization) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    request: Request,
    next: Next,
) -> Response {
    if request
        .extensions()
        .get::<crate::http::GrantAccess>()
        .is_some()
    {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match tokens.check(request.method(), authorization) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(s: &str) -> String {
        hex::encode(Sha256::digest(s.as_bytes()))
    }

    #[test]
    fn scopes_and_tokens() {
        let config = DicomwebConfig {
            tokens: vec![
                TokenConfig {
                    name: "viewer".into(),
                    sha256: sha("read-token"),
                    scopes: vec![Scope::Read],
                },
                TokenConfig {
                    name: "modality".into(),
                    sha256: sha("rw-token"),
                    scopes: vec![Scope::Read, Scope::Write],
                },
            ],
            ..DicomwebConfig::default()
        };
        let tokens = Tokens::new(&config);
        let cases: &[(Method, Option<&str>, u16)] = &[
            (Method::GET, None, 401),
            (Method::GET, Some("Bearer wrong"), 401),
            (Method::GET, Some("Basic cmVhZC10b2tlbg=="), 401),
            (Method::GET, Some("Bearer read-token"), 200),
            (Method::GET, Some("bearer  read-token "), 200),
            (Method::POST, Some("Bearer read-token"), 403),
            (Method::POST, Some("Bearer rw-token"), 200),
            (Method::HEAD, Some("Bearer rw-token"), 200),
        ];
        for (method, auth, expected) in cases {
            let got = match tokens.check(method, *auth) {
                Ok(()) => 200,
                Err(e) => e.status().as_u16(),
            };
            assert_eq!(got, *expected, "{method} {auth:?}");
        }
        let open = Tokens::new(&DicomwebConfig {
            open: true,
            ..DicomwebConfig::default()
        });
        assert!(open.check(&Method::POST, None).is_ok());
    }

    #[test]
    fn the_study_a_viewer_request_names() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("/dicom-web/studies/1.2.3/series", None, Some("1.2.3")),
            ("/studies/1.2.3/series/4.5/metadata", None, Some("1.2.3")),
            (
                "/studies",
                Some("StudyInstanceUID=1.2.3&limit=1"),
                Some("1.2.3"),
            ),
            ("/series", Some("0020000D=1.2.3"), Some("1.2.3")),
            ("/series", Some("0020000d=1.2.3"), Some("1.2.3")),
            ("/studies", Some("Study%49nstanceUID=1.2.3"), Some("1.2.3")),
            // Repeated, empty, wildcard or listed: no one study.
            (
                "/studies",
                Some("StudyInstanceUID=1.2.3&StudyInstanceUID="),
                None,
            ),
            (
                "/studies",
                Some("StudyInstanceUID=1.2.3&0020000d=4.5"),
                None,
            ),
            (
                "/studies",
                Some("StudyInstanceUID=1.2.3&Study%49nstanceUID=*"),
                None,
            ),
            ("/studies", Some("StudyInstanceUID=*"), None),
            ("/studies", Some("StudyInstanceUID=1.2.3%5C4.5"), None),
            ("/studies", Some("PatientID=X"), None),
            ("/studies", None, None),
            ("/studies/not a uid", None, None),
            ("/", None, None),
        ];
        for (path, query, expected) in cases {
            assert_eq!(
                study_of(path, *query).as_deref(),
                *expected,
                "{path} {query:?}"
            );
        }
    }
}
