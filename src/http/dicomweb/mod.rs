//! DICOMweb (PS3.18) under `/dicom-web`: QIDO-RS (search), WADO-RS
//! (retrieve) and STOW-RS (store), over the same index and blob store as
//! the DIMSE services.
//!
//! - `auth`: bearer tokens with read/write scopes (or an open node).
//! - `media`: Content-Type and Accept, multipart/related writing.
//! - `json`: the DICOM JSON model.
//! - `stow`: STOW-RS into the ingest path C-STORE uses.
//! - `qido`: QIDO-RS over `crate::query`, the matcher C-FIND uses.
//! - `wado`: WADO-RS: instances, metadata, frames, bulk data, rendered.

pub mod auth;
pub mod json;
pub mod media;
pub mod qido;
pub mod render;
pub mod stow;
pub mod wado;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::routing::get;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::DicomwebConfig;
use crate::ingest::Ingest;
use crate::query::MatchOptions;

/// Where DICOMweb is mounted on the HTTP port.
pub const BASE_PATH: &str = "/dicom-web";

pub struct DicomwebState {
    pub ingest: Ingest,
    pub config: DicomwebConfig,
    /// The node's matching options (those of C-FIND); a request's
    /// `fuzzymatching` turns on fuzzy names for that request.
    pub match_options: MatchOptions,
    /// The node's part in the region: a retrieve of a regional prior not
    /// held here fetches it from the hospital that holds it first.
    pub region: Option<Arc<crate::publish::Region>>,
}

pub fn router(
    ingest: Ingest,
    config: DicomwebConfig,
    match_options: MatchOptions,
    region: Option<Arc<crate::publish::Region>>,
) -> Router {
    if config.open {
        tracing::warn!(
            "DICOMweb is open: anyone who reaches the HTTP port can search, retrieve and store without a token"
        );
    } else if config.tokens.is_empty() {
        tracing::warn!(
            "DICOMweb has no tokens configured: every request gets 401 (add [[dicomweb.tokens]] or set dicomweb open)"
        );
    }
    let web_auth = Arc::new(auth::WebAuth {
        tokens: auth::Tokens::new(&config),
        index: ingest.index().clone(),
    });
    let cors = cors_layer(&config);
    let state = Arc::new(DicomwebState {
        ingest,
        config,
        match_options,
        region,
    });
    let study = "/studies/{study}";
    let series = "/studies/{study}/series/{series}";
    let instance = "/studies/{study}/series/{series}/instances/{instance}";
    let routes = Router::new()
        .route("/studies", get(qido::studies).post(stow::store_any))
        .route(study, get(wado::study).post(stow::store_in_study))
        .route(&format!("{study}/metadata"), get(wado::study_metadata))
        .route(&format!("{study}/series"), get(qido::study_series))
        .route(&format!("{study}/instances"), get(qido::study_instances))
        .route(series, get(wado::series))
        .route(&format!("{series}/metadata"), get(wado::series_metadata))
        .route(&format!("{series}/instances"), get(qido::series_instances))
        .route(instance, get(wado::instance))
        .route(
            &format!("{instance}/metadata"),
            get(wado::instance_metadata),
        )
        .route(&format!("{instance}/frames/{{frames}}"), get(wado::frames))
        .route(&format!("{instance}/bulkdata/{{tag}}"), get(wado::bulkdata))
        .route(
            &format!("{instance}/rendered"),
            get(render::instance_rendered),
        )
        .route(
            &format!("{instance}/thumbnail"),
            get(render::instance_thumbnail),
        )
        .route(
            &format!("{instance}/frames/{{frames}}/rendered"),
            get(render::frame_rendered),
        )
        .route(
            &format!("{instance}/frames/{{frames}}/thumbnail"),
            get(render::frame_thumbnail),
        )
        .route("/series", get(qido::all_series))
        .route("/instances", get(qido::all_instances))
        // STOW-RS bodies are streamed and limited by
        // `max_request_bytes`, not axum's 2 MB default.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            web_auth,
            auth::require_token_or_session,
        ))
        .layer(axum::middleware::from_fn(media::accept_query_parameter))
        .layer(axum::middleware::from_fn(crate::metrics::dicomweb_timing))
        .with_state(state);
    let routes = match cors {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    Router::new().nest(BASE_PATH, routes)
}

/// The fetch from another hospital a study is still arriving by, once its
/// manifest is verified (`crate::peer::Live`): the viewer reads the study
/// through it while it runs.
pub fn live(state: &DicomwebState, study: &str) -> Option<Arc<crate::peer::Live>> {
    state
        .region
        .as_ref()
        .and_then(|region| crate::peer::live(region, study))
}

/// A search or metadata request of a study still arriving, answered by the
/// holding node under the fetch's grant, its URLs rewritten to this node's
/// (a retrieve of what they name comes here and waits for the verified
/// instance). `path` is below the DICOMweb base; `params` the request's.
pub async fn from_peer(
    live: &crate::peer::Live,
    path: &str,
    params: &[(String, String)],
    headers: &HeaderMap,
) -> Result<axum::response::Response, crate::http::error::Error> {
    use axum::response::IntoResponse;
    let mut path_and_query = path.to_string();
    if !params.is_empty() {
        // reqwest's URL type encodes the pairs as a form would.
        let mut url = reqwest::Url::parse("http://query/").expect("a valid URL");
        url.query_pairs_mut().extend_pairs(params);
        path_and_query.push('?');
        path_and_query.push_str(url.query().unwrap_or_default());
    }
    let answer = live
        .ask_peer(&path_and_query, json::DICOM_JSON, &base_url(headers))
        .await
        .map_err(|e| {
            crate::http::error::Error::Unavailable(format!("the holding hospital's node: {e}"))
        })?;
    match answer.status {
        // A holding node of an older release answers no match with 204:
        // passed on as this node answers it, an empty array.
        204 => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(json::DICOM_JSON),
            )],
            "[]",
        )
            .into_response()),
        200..=299 => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_str(answer.content_type.as_deref().unwrap_or(json::DICOM_JSON))
                    .unwrap_or(HeaderValue::from_static(json::DICOM_JSON)),
            )],
            answer.body,
        )
            .into_response()),
        404 => Err(crate::http::error::Error::NotFound(
            "study at the holding hospital",
        )),
        s => Err(crate::http::error::Error::Unavailable(format!(
            "the holding hospital's node answered {s}"
        ))),
    }
}

/// CORS for browser viewers served from elsewhere; the preflight is
/// answered before the token check (browsers send it without one).
fn cors_layer(config: &DicomwebConfig) -> Option<CorsLayer> {
    if config.cors_allowed_origins.is_empty() {
        return None;
    }
    let origin = if config.cors_allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::ACCEPT, header::CONTENT_TYPE])
            .expose_headers([
                header::CONTENT_TYPE,
                header::CONTENT_LENGTH,
                header::WARNING,
            ])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// The absolute URL of the DICOMweb root as the client reached it (Host
/// header; `X-Forwarded-Proto` when a TLS proxy is in front), for the
/// retrieve URLs of QIDO-RS and STOW-RS responses.
pub fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("localhost");
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}{BASE_PATH}")
}
