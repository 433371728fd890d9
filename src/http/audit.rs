//! The HTTP side of the audit trail: gathers, from each DICOMweb request
//! and its response, the plain facts `crate::audit` writes messages from
//! (who asked, what the request was, which study, the status), and gives
//! the page's requests a scope for the hooks its handlers call.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::GrantAccess;
use super::dicomweb::{BASE_PATH, auth::Tokens};
use crate::audit::{Audit, Refusal};
use crate::index::Index;

/// What a DICOMweb request is, for its audit message.
#[derive(Debug, PartialEq, Eq)]
enum WebRequest<'a> {
    /// QIDO-RS: a search.
    Qido,
    /// WADO-RS of a study, a series or an instance: the instances
    /// themselves (Instances Transferred), or only their metadata or a
    /// rendering (Instances Accessed).
    Wado {
        study: &'a str,
        accessed: bool,
    },
    /// STOW-RS.
    Stow,
    Other,
}

fn classify<'a>(method: &Method, path: &'a str) -> WebRequest<'a> {
    let Some(rest) = path.strip_prefix(BASE_PATH) else {
        return WebRequest::Other;
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    if *method == Method::POST {
        return WebRequest::Stow;
    }
    if *method != Method::GET && *method != Method::HEAD {
        return WebRequest::Other;
    }
    match segments.as_slice() {
        [] => WebRequest::Other,
        [.., last] if matches!(*last, "studies" | "series" | "instances") => WebRequest::Qido,
        ["studies", study, ..] => WebRequest::Wado {
            study,
            accessed: matches!(
                segments.last(),
                Some(&"metadata" | &"rendered" | &"thumbnail")
            ),
        },
        _ => WebRequest::Other,
    }
}

struct HttpAudit {
    audit: Audit,
    index: Index,
    tokens: Option<Tokens>,
}

/// Audits every DICOMweb request of `router` (QIDO-RS Query, WADO-RS
/// Instances Transferred/Accessed, STOW-RS Instances Transferred, refused
/// tokens as Security Alerts).
pub fn dicomweb_layer(
    audit: &Audit,
    config: &crate::config::DicomwebConfig,
    index: &Index,
    router: Router,
) -> Router {
    if !audit.is_enabled() {
        return router;
    }
    let state = Arc::new(HttpAudit {
        audit: audit.clone(),
        index: index.clone(),
        tokens: Some(Tokens::new(config)),
    });
    router.layer(axum::middleware::from_fn_with_state(
        state,
        dicomweb_request,
    ))
}

/// Gives the page's handlers a scope (the user's address), for their
/// User Authentication and access hooks.
pub fn page_layer(audit: &Audit, index: &Index, router: Router) -> Router {
    if !audit.is_enabled() {
        return router;
    }
    let state = Arc::new(HttpAudit {
        audit: audit.clone(),
        index: index.clone(),
        tokens: None,
    });
    router.layer(axum::middleware::from_fn_with_state(state, page_request))
}

/// Audits the JSON API's refusals (401, 403) as Security Alerts; what
/// the API does is audited where it is done (deletions, peer fetches).
pub fn api_layer(
    audit: &Audit,
    config: &crate::config::DicomwebConfig,
    index: &Index,
    router: Router,
) -> Router {
    if !audit.is_enabled() {
        return router;
    }
    let state = Arc::new(HttpAudit {
        audit: audit.clone(),
        index: index.clone(),
        tokens: Some(Tokens::for_api(config)),
    });
    router.layer(axum::middleware::from_fn_with_state(state, api_request))
}

async fn api_request(
    State(state): State<Arc<HttpAudit>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let authorization = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let user = state
        .tokens
        .as_ref()
        .and_then(|t| t.holder(authorization))
        .map(|name| format!("token:{name}"))
        .unwrap_or_else(|| "anonymous".into());
    let peer = peer_of(&request);
    let (response, audited) = state
        .audit
        .http_request(peer, user, next.run(request))
        .await;
    if let Some(audited) = audited {
        match response.status().as_u16() {
            401 => audited.refused(
                Refusal::Unauthenticated,
                method.as_str(),
                &path,
                "JSON API request without a valid bearer token (401)",
            ),
            403 => audited.refused(
                Refusal::Forbidden,
                method.as_str(),
                &path,
                "JSON API token lacks the scope this request needs (403)",
            ),
            _ => {}
        }
    }
    response
}

/// A refused registry grant (forged, expired, for another hospital or
/// another study) as a Security Alert; the refusal itself is `response`.
pub async fn grant_refused(
    audit: &Audit,
    (peer, method, path): &(Option<IpAddr>, String, String),
    refusal: Refusal,
    description: &str,
    response: Response,
) -> Response {
    let (response, audited) = audit
        .http_request(*peer, "grant".into(), async { response })
        .await;
    if let Some(audited) = audited {
        audited.refused(refusal, method, path, description);
    }
    response
}

/// The caller, the method and the path of a request, for an alert.
pub fn who_and_what(request: &Request) -> (Option<IpAddr>, String, String) {
    (
        peer_of(request),
        request.method().to_string(),
        request.uri().path().to_string(),
    )
}

fn peer_of(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<crate::tls::PeerAddr>>()
        .map(|c| c.0.0.ip())
}

async fn page_request(
    State(state): State<Arc<HttpAudit>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = peer_of(&request);
    state
        .audit
        .http_request(peer, String::new(), next.run(request))
        .await
        .0
}

async fn dicomweb_request(
    State(state): State<Arc<HttpAudit>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let user = if let Some(grant) = request.extensions().get::<GrantAccess>() {
        format!(
            "grant:{}:{}",
            grant.0.requesting_hospital_id, grant.0.user_id
        )
    } else {
        let authorization = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state
            .tokens
            .as_ref()
            .and_then(|t| t.holder(authorization))
            .map(|name| format!("token:{name}"))
            .unwrap_or_else(|| "anonymous".into())
    };
    let peer = peer_of(&request);
    let (response, audited) = state
        .audit
        .http_request(peer, user, next.run(request))
        .await;
    let Some(audited) = audited else {
        return response;
    };
    let status = response.status().as_u16();
    match status {
        401 => {
            audited.refused(
                Refusal::Unauthenticated,
                method.as_str(),
                &path,
                "DICOMweb request without a valid bearer token (401)",
            );
            return response;
        }
        403 => {
            audited.refused(
                Refusal::Forbidden,
                method.as_str(),
                &path,
                "DICOMweb token lacks the scope this request needs (403)",
            );
            return response;
        }
        _ => {}
    }
    match classify(&method, &path) {
        WebRequest::Qido => audited.queried(&path, &query, status),
        WebRequest::Stow => audited.stored(status),
        WebRequest::Wado { study, accessed } => {
            let study = study.to_string();
            let index = state.index.clone();
            // The patient comes from the index: looked up off the
            // response's path.
            tokio::spawn(async move {
                let row = index.study(&study).await.ok().flatten();
                let accession = row
                    .as_ref()
                    .map(|r| r.accession_number.as_str())
                    .unwrap_or("");
                audited.instances_read(
                    &study,
                    accessed,
                    status,
                    accession,
                    row.as_ref()
                        .map(|r| (r.patient_id.as_str(), r.patient_name.as_str())),
                );
            });
        }
        WebRequest::Other => {}
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dicomweb_requests_are_classified() {
        let study = "1.2.3";
        let cases: &[(Method, &str, WebRequest)] = &[
            (Method::GET, "/dicom-web/studies", WebRequest::Qido),
            (Method::GET, "/dicom-web/series", WebRequest::Qido),
            (Method::GET, "/dicom-web/instances", WebRequest::Qido),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3/series",
                WebRequest::Qido,
            ),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3/series/4/instances",
                WebRequest::Qido,
            ),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3",
                WebRequest::Wado {
                    study,
                    accessed: false,
                },
            ),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3/series/4/instances/5/frames/1",
                WebRequest::Wado {
                    study,
                    accessed: false,
                },
            ),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3/metadata",
                WebRequest::Wado {
                    study,
                    accessed: true,
                },
            ),
            (
                Method::GET,
                "/dicom-web/studies/1.2.3/series/4/instances/5/rendered",
                WebRequest::Wado {
                    study,
                    accessed: true,
                },
            ),
            (Method::POST, "/dicom-web/studies", WebRequest::Stow),
            (Method::POST, "/dicom-web/studies/1.2.3", WebRequest::Stow),
            (Method::OPTIONS, "/dicom-web/studies", WebRequest::Other),
            (Method::GET, "/health", WebRequest::Other),
        ];
        for (method, path, expected) in cases {
            assert_eq!(&classify(method, path), expected, "{method} {path}");
        }
    }
}
