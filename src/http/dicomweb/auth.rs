//! Bearer tokens for DICOMweb: the node keeps only each token's SHA-256;
//! a presented token is hashed and compared with every configured hash in
//! constant time. GET and HEAD need the `read` scope, POST `write`.

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
}
