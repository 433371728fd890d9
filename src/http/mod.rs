//! The node's HTTP side: health, and DICOMweb under `/dicom-web`
//! ([`dicomweb`]). The JSON API and the page join here as one `router()`
//! per resource.

pub mod api;
pub mod dicomweb;
pub mod error;

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
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
}

pub fn router(state: Arc<AppState>) -> Router {
    let health = Router::new()
        .route("/health", get(health))
        .with_state(state.clone());
    health
        .merge(dicomweb::router(
            state.ingest.clone(),
            state.dicomweb.clone(),
            state.match_options,
        ))
        .merge(api_router(&state))
        // One span per request: errors logged while serving it carry its
        // method and path.
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
            ),
        )
}

/// The JSON API behind the same bearer tokens as DICOMweb.
fn api_router(state: &Arc<AppState>) -> Router {
    let tokens = Arc::new(dicomweb::auth::Tokens::new(&state.dicomweb));
    api::router(Arc::new(api::ApiState {
        index: state.ingest.index().clone(),
        region: state.region.clone(),
    }))
    .layer(axum::middleware::from_fn_with_state(
        tokens,
        api::require_token,
    ))
}

/// 200 when the index answers, 503 otherwise; the body never carries
/// internal detail (that goes to the log).
async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.ingest.index().ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "ae_title": state.ae_title })),
        ),
        Err(error) => {
            tracing::error!(%error, "health check: index unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "status": "unavailable", "ae_title": state.ae_title })),
            )
        }
    }
}

pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Responses stream in several writes (a QIDO-RS result array, WADO-RS
    // parts): with Nagle's algorithm on, the last small write waits for the
    // client's delayed ACK (~40 ms on loopback).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
