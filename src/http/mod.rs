//! The node's HTTP side. For now: health. DICOMweb, the JSON API and the
//! page join here as one `router()` per resource.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ingest::Ingest;

#[derive(Clone)]
pub struct AppState {
    pub ae_title: String,
    pub ingest: Ingest,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(state)
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
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
