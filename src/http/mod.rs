//! The node's HTTP side: health, readiness and metrics ([`health`]), and
//! DICOMweb under `/dicom-web` ([`dicomweb`]). The JSON API, the page and
//! the viewer (`/viewer`, [`viewer`]) join here as one `router()` per
//! resource.

pub mod api;
pub mod audit;
pub mod dicomweb;
pub mod error;
pub mod health;
pub mod lifecycle;
pub mod page;
pub mod viewer;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::config::DicomwebConfig;
use crate::ingest::Ingest;

#[derive(Clone)]
pub struct AppState {
    pub ae_title: String,
    pub ingest: Ingest,
    pub dicomweb: DicomwebConfig,
    /// The node's matching options, the ones C-FIND uses.
    pub match_options: crate::query::MatchOptions,
    /// The node's part in the region, when configured.
    pub region: Option<Arc<crate::publish::Region>>,
    pub audit: crate::audit::Audit,
    /// Set once the node's start has finished: `/ready` answers 503 until
    /// then.
    pub started: Arc<std::sync::atomic::AtomicBool>,
    /// OHIF's installed files (deploy/install-viewer.sh), served under
    /// `/viewer`.
    pub viewer_dir: std::path::PathBuf,
    /// How the viewer draws its viewports (its generated configuration).
    pub viewer_rendering: crate::config::ViewerRendering,
}

pub fn router(state: Arc<AppState>) -> Router {
    health::router(state.clone())
        .merge(audit::dicomweb_layer(
            &state.audit,
            &state.dicomweb,
            state.ingest.index(),
            dicomweb::router(
                state.ingest.clone(),
                state.dicomweb.clone(),
                state.match_options,
                state.region.clone(),
            ),
        ))
        .merge(audit::api_layer(
            &state.audit,
            &state.dicomweb,
            state.ingest.index(),
            api_router(&state),
        ))
        .merge(audit::page_layer(
            &state.audit,
            state.ingest.index(),
            page::router(&state),
        ))
        .merge(viewer::router(
            state.viewer_dir.clone(),
            state.viewer_rendering,
        ))
        // A peer node presenting a registry grant may GET the study the
        // grant names (its manifest and its instances), and nothing else.
        .layer(axum::middleware::from_fn_with_state(
            (state.region.clone(), state.audit.clone()),
            grant_access,
        ))
        .layer(axum::middleware::from_fn(no_control_characters))
        .layer(axum::middleware::map_request(host_from_authority))
        // Outermost but for the span: the refusals above get it too.
        .layer(axum::middleware::map_response(no_store))
        // One span per request: errors logged while serving it carry its
        // method and path.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
            ),
        )
}

/// DICOMweb answers, the JSON API and the page carry PHI (names, IDs,
/// birth dates, images): no browser or proxy may keep a copy (issue 22).
/// Health and metrics carry none, but one rule for every answer leaves no
/// route forgotten; the only exception is the viewer's own files (OHIF's
/// scripts), which its router marks.
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    if response
        .extensions()
        .get::<viewer::CacheableAsset>()
        .is_some()
    {
        return response;
    }
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// An HTTP/2 request names its host in the `:authority` pseudo-header
/// (the request URI), not in `Host` (RFC 9113 8.3.1): copied into `Host`
/// when that is missing, so that the URLs the node writes into its answers
/// (RetrieveURL, BulkDataURI, Location) name the host and port the client
/// used, over either version. Before, HTTP/2 clients (browsers and curl
/// on HTTPS) got `https://localhost/…`.
async fn host_from_authority(mut request: axum::extract::Request) -> axum::extract::Request {
    if !request.headers().contains_key(axum::http::header::HOST)
        && let Some(authority) = request.uri().authority()
        // Host and port only: userinfo has no place in either header.
        && let Ok(value) = axum::http::HeaderValue::from_str(&match authority.port_u16() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_string(),
        })
    {
        request
            .headers_mut()
            .insert(axum::http::header::HOST, value);
    }
    request
}

/// A control character (a NUL, a newline) has no place in a UID, a
/// keyword or a search value: percent-encoded in the path or the query it
/// is refused here, once for every route (PS3.18 8.1; issue 22: a NUL in
/// a UID was answered 502, a NUL as PatientName matched everyone).
async fn no_control_characters(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let uri = request.uri();
    let encoded_control = |s: &str| {
        s.as_bytes().windows(3).any(|w| {
            w[0] == b'%'
                && matches!(
                    (w[1].to_ascii_lowercase(), w[2].to_ascii_lowercase()),
                    (b'0' | b'1', b'0'..=b'9' | b'a'..=b'f') | (b'7', b'f')
                )
        })
    };
    if encoded_control(uri.path()) || uri.query().is_some_and(encoded_control) {
        return crate::common::problem(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "a control character (such as NUL) in the path or the query",
        );
    }
    next.run(request).await
}

/// A request admitted under a peer's registry grant.
#[derive(Clone)]
pub struct GrantAccess(pub crate::contract::GrantConfirmed);

/// Every refusal here is audited (Security Alert), within the audit's
/// per-caller bound: a forged or expired grant leaves a trace.
async fn grant_access(
    State((region, audit_sink)): State<(Option<Arc<crate::publish::Region>>, crate::audit::Audit)>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .filter(|t| t.starts_with("hg."));
    if let Some(token) = token {
        use crate::audit::Refusal;
        use crate::common::problem;
        let Some(region) = region else {
            let response = problem(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this node takes no grants",
            );
            return audit::grant_refused(
                &audit_sink,
                &audit::who_and_what(&request),
                Refusal::Unauthenticated,
                "registry grant presented to a node outside the region (401)",
                response,
            )
            .await;
        };
        let Some(grant) = crate::peer::verify_grant(&region, &token).await else {
            let response = problem(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the grant is not valid for this hospital (expired, unknown, or for another)",
            );
            return audit::grant_refused(
                &audit_sink,
                &audit::who_and_what(&request),
                Refusal::Unauthenticated,
                "registry grant not confirmed: forged, expired, revoked or for another hospital (401)",
                response,
            )
            .await;
        };
        let path = request.uri().path();
        let study = path
            .strip_prefix("/dicom-web/studies/")
            .or_else(|| path.strip_prefix("/api/v1/studies/"))
            .and_then(|rest| rest.split('/').next());
        // Or a study search keyed on exactly this study, one UID (how a
        // viewer at the asking node looks the study up while it arrives):
        // the search itself is scoped to it again (dicomweb::qido).
        let searched = (path == "/dicom-web/studies")
            .then(|| {
                axum::extract::Query::<Vec<(String, String)>>::try_from_uri(request.uri())
                    .ok()
                    .and_then(|axum::extract::Query(params)| {
                        dicomweb::qido::keyed_study(&params).map(str::to_string)
                    })
            })
            .flatten();
        let allowed = request.method() == axum::http::Method::GET
            && ((study == Some(grant.study_instance_uid.as_str())
                && (path.starts_with("/dicom-web/") || path.ends_with("/manifest")))
                || searched.as_deref() == Some(grant.study_instance_uid.as_str()));
        if !allowed {
            let response = problem(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a grant admits GET of its own study only",
            );
            return audit::grant_refused(
                &audit_sink,
                &audit::who_and_what(&request),
                Refusal::Forbidden,
                "registry grant used outside its study (403)",
                response,
            )
            .await;
        }
        request.extensions_mut().insert(GrantAccess(grant));
    }
    next.run(request).await
}

/// The JSON API behind the same bearer tokens as DICOMweb.
fn api_router(state: &Arc<AppState>) -> Router {
    let tokens = Arc::new(dicomweb::auth::Tokens::for_api(&state.dicomweb));
    let api_state = Arc::new(api::ApiState {
        index: state.ingest.index().clone(),
        region: state.region.clone(),
        ingest: state.ingest.clone(),
    });
    api::router(api_state.clone())
        .merge(lifecycle::router(
            api_state,
            tokens.clone(),
            state.audit.clone(),
        ))
        .layer(axum::middleware::from_fn_with_state(
            tokens,
            api::require_token,
        ))
}

/// Serves plain HTTP or HTTPS (src/tls.rs) until `shutdown` fires. Both
/// listeners set TCP_NODELAY: responses stream in several writes (a QIDO-RS
/// result array, WADO-RS parts), and with Nagle's algorithm on, the last
/// small write waits for the client's delayed ACK (~40 ms on loopback).
pub async fn run(
    listener: crate::tls::HttpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = match &listener {
        crate::tls::HttpListener::Tls(_) => router(state)
            .layer(axum::middleware::map_request(crate::tls::mark_https))
            .layer(axum::middleware::map_response(
                crate::tls::strict_transport_security,
            )),
        crate::tls::HttpListener::Plain(_) => router(state),
    };
    crate::tls::serve(listener, app, shutdown).await
}
