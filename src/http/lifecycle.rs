//! Deletion through the node's JSON API (src/lifecycle.rs does the work):
//!
//! - `DELETE /api/v1/studies/{uid}`, `/api/v1/series/{uid}`,
//!   `/api/v1/instances/{uid}` with a body `{"reason": "...",
//!   "reason_code": "113001"}` (the code optional, one of CID 7011's IOCM
//!   codes): 200 with what was removed, 404 when nothing matched.
//! - `GET /api/v1/deletions?study=UID&limit=N`: the deletion record.
//!
//! Behind the API's bearer tokens: DELETE needs `write`, GET `read`. The
//! token's name is recorded as who deleted.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;

use crate::http::api::{ApiError, ApiState};
use crate::http::dicomweb::auth::Tokens;
use crate::lifecycle::{self, Deletion, Scope, Source};
use crate::types::Uid;

struct LifecycleState {
    api: Arc<ApiState>,
    tokens: Arc<Tokens>,
    audit: crate::audit::Audit,
}

pub fn router(api: Arc<ApiState>, tokens: Arc<Tokens>, audit: crate::audit::Audit) -> Router {
    Router::new()
        .route("/api/v1/studies/{study_instance_uid}", delete(delete_study))
        .route(
            "/api/v1/series/{series_instance_uid}",
            delete(delete_series),
        )
        .route(
            "/api/v1/instances/{sop_instance_uid}",
            delete(delete_instance),
        )
        .route("/api/v1/deletions", get(deletions))
        .with_state(Arc::new(LifecycleState { api, tokens, audit }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    reason: String,
    #[serde(default)]
    reason_code: Option<String>,
}

async fn delete_study(
    State(state): State<Arc<LifecycleState>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Option<Json<DeleteBody>>,
) -> Result<Json<lifecycle::Outcome>, ApiError> {
    run(&state, Scope::Study(parse_uid(&uid)?), &headers, body).await
}

async fn delete_series(
    State(state): State<Arc<LifecycleState>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Option<Json<DeleteBody>>,
) -> Result<Json<lifecycle::Outcome>, ApiError> {
    run(&state, Scope::Series(parse_uid(&uid)?), &headers, body).await
}

async fn delete_instance(
    State(state): State<Arc<LifecycleState>>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    body: Option<Json<DeleteBody>>,
) -> Result<Json<lifecycle::Outcome>, ApiError> {
    run(&state, Scope::Instance(parse_uid(&uid)?), &headers, body).await
}

fn parse_uid(raw: &str) -> Result<String, ApiError> {
    Uid::parse(raw)
        .map(|u| u.as_str().to_string())
        .map_err(|_| ApiError::BadRequest(format!("{raw:?} is not a valid UID")))
}

async fn run(
    state: &LifecycleState,
    scope: Scope,
    headers: &HeaderMap,
    body: Option<Json<DeleteBody>>,
) -> Result<Json<lifecycle::Outcome>, ApiError> {
    // A deletion without a reason cannot be accounted for later.
    let Some(Json(body)) = body else {
        return Err(ApiError::BadRequest(
            "a JSON body with the deletion's \"reason\" is required".into(),
        ));
    };
    let reason = body.reason.trim().to_string();
    if reason.is_empty() {
        return Err(ApiError::BadRequest("\"reason\" must not be empty".into()));
    }
    let reason_code = match body.reason_code {
        Some(code) if lifecycle::reason_meaning(&code).is_some() => code,
        Some(code) => {
            return Err(ApiError::BadRequest(format!(
                "reason_code {code:?} is not one of 113001, 113037, 113038, 113039"
            )));
        }
        None => String::new(),
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let actor = state
        .tokens
        .name_of(authorization)
        .unwrap_or_else(|| "api (no token: DICOMweb open)".into());
    let outcome = lifecycle::delete(
        &state.api.index,
        state.api.region.as_deref(),
        &Deletion {
            scopes: vec![scope],
            source: Source::Operator,
            actor,
            reason_code,
            reason,
            rejection_note_uid: None,
            rejected_in: None,
            audit: state.audit.clone(),
        },
    )
    .await
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if outcome.instances_removed == 0 {
        return Err(ApiError::NotFound("study, series or instance"));
    }
    Ok(Json(outcome))
}

#[derive(Debug, Deserialize)]
struct DeletionsQuery {
    study: Option<String>,
    limit: Option<i64>,
}

async fn deletions(
    State(state): State<Arc<LifecycleState>>,
    Query(query): Query<DeletionsQuery>,
) -> Result<Json<Vec<lifecycle::DeletionRecord>>, ApiError> {
    let study = query.study.as_deref().map(parse_uid).transpose()?;
    let limit = query.limit.unwrap_or(1000).clamp(1, 10_000);
    lifecycle::records(&state.api.index, study.as_deref(), limit)
        .await
        .map(Json)
        .map_err(|e| ApiError::Unavailable(e.to_string()))
}
