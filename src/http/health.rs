//! What an operator's monitoring asks the node: `/health` (liveness: the
//! process serves HTTP), `/ready` (readiness: the index and the blob store
//! answer and startup has finished) and `/metrics` (Prometheus text
//! format, crate::metrics).
//!
//! Liveness asks nothing of the database on purpose: a supervisor that
//! restarts a node whose database is down gains nothing and loses the
//! associations in flight. Readiness is what a load balancer in front of
//! several node processes routes on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(json!({ "status": "ok", "ae_title": state.ae_title }))
}

/// 200 when every check passes; 503 naming each one that failed. The
/// reasons name the component, never its error (that goes to the log).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let reasons = not_ready(&state).await;
    if reasons.is_empty() {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "ae_title": state.ae_title })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not_ready",
                "ae_title": state.ae_title,
                "reasons": reasons,
            })),
        )
            .into_response()
    }
}

/// How long each readiness check may take: under Prometheus' default
/// scrape timeout (10 s) and a Kubernetes probe's.
const READY_CHECK: std::time::Duration = std::time::Duration::from_secs(4);

/// What keeps the node from being ready; empty when it is.
async fn not_ready(state: &AppState) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    if !state.started.load(Ordering::Acquire) {
        reasons.push("startup has not finished");
    }
    // Bounded: a store or database that takes the connection and never
    // answers (object_store retries for minutes) must not hold up the
    // probe, or a Prometheus scrape, past its own timeout; not answering
    // in time is not ready.
    let in_time = |what: &'static str| {
        move |_| format!("no answer within {} s ({what})", READY_CHECK.as_secs())
    };
    let (index, store) = tokio::join!(
        async {
            tokio::time::timeout(READY_CHECK, state.ingest.index().ping())
                .await
                .map_err(in_time("database"))
                .and_then(|r| r.map_err(|e| e.to_string()))
        },
        async {
            tokio::time::timeout(READY_CHECK, state.ingest.store().check_reachable())
                .await
                .map_err(in_time("blob store"))
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
    );
    if let Err(error) = index {
        tracing::error!(%error, "readiness: database unreachable");
        reasons.push("database unreachable");
    }
    if let Err(error) = store {
        tracing::error!(%error, "readiness: blob store unreachable");
        reasons.push("blob store unreachable");
    }
    // The node's last audit record could not be written (a full disk):
    // what it serves now goes unaudited.
    // The last instance failed for want of room: every C-STORE is 0xA700
    // (Out of Resources) until room is made; the next stored clears it.
    if state.ingest.out_of_space() {
        reasons.push("out of space: instances are refused");
    }
    if state.audit.failing() {
        reasons.push("audit log not writable");
    }
    reasons
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // The backlog lives in the outbox table, which several node processes
    // may share: counted when asked, not tracked.
    if let Some(region) = &state.region {
        region.refresh_metrics().await;
    }
    crate::metrics::ready(not_ready(&state).await.is_empty());
    let handle = crate::metrics::install(crate::metrics::Process::Node);
    crate::metrics::render(&handle)
}
