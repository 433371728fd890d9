//! The node's JSON API under `/api/v1` (proto/huren.openapi.json, tag
//! "node"): what the hospital's systems tell the node that DICOM does not
//! carry (report issued, QC result, patient identifier mappings), the
//! publisher's state, the study manifest peers verify against, and the
//! region's answers (priors, consent) asked through this node.
//!
//! The same bearer tokens as DICOMweb: GET needs `read`, PUT and POST
//! `write`. Errors are RFC 9457 problem+json. No request puts a patient
//! identifier in a URL (URLs end up in logs): identifiers travel in bodies.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::common::{Body, problem};
use crate::contract::*;
use crate::index::Index;
use crate::patient_key::{Identifier, IdentifierType};
use crate::priors::{self, PatientRef};
use crate::publish::{self, Region};
use crate::registry::client;
use crate::types::{BlobHash, Uid};

pub struct ApiState {
    pub index: Index,
    pub region: Option<Arc<Region>>,
    /// Peer fetches store through the one ingest path.
    pub ingest: crate::ingest::Ingest,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed body or parameter.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: the node is not part of a region (no registry configured).
    #[error("this node is not configured for a region (registry_url)")]
    NoRegion,
    /// 502: the peer node did not serve the study.
    #[error("peer: {0}")]
    Peer(String),
    /// 502: a peer's study failed verification; nothing unverified kept.
    #[error("integrity: {0}")]
    Integrity(String),
    /// 409: the study has not been classified yet: nothing to confirm.
    #[error("the study has not been classified yet")]
    NotClassified,
    /// 503: no recognition list is active yet (none pulled, none configured).
    #[error("no recognition list is active yet")]
    NoList,
    /// 502: the registry answered with an error; its detail is passed on.
    #[error("registry: {0}")]
    Registry(String),
    /// 503: the index or the registry cannot be reached.
    #[error("service unavailable")]
    Unavailable(String),
    /// 403: refused by policy here or at the registry (break-the-glass
    /// outside an emergency, a grant limit).
    #[error("{0}")]
    Forbidden(String),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Unavailable(format!("index: {e}"))
    }
}

impl From<publish::Error> for ApiError {
    fn from(e: publish::Error) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl From<client::Error> for ApiError {
    fn from(e: client::Error) -> Self {
        match e {
            client::Error::Status {
                status: 403,
                detail,
            } => ApiError::Forbidden(detail),
            client::Error::Status { status, detail } if status < 500 => {
                ApiError::Registry(format!("{status}: {detail}"))
            }
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::NoRegion => (StatusCode::CONFLICT, "no-region"),
            ApiError::NotClassified => (StatusCode::CONFLICT, "not-classified"),
            ApiError::NoList => (StatusCode::SERVICE_UNAVAILABLE, "no-recognition-list"),
            ApiError::Registry(_) => (StatusCode::BAD_GATEWAY, "registry-refused"),
            ApiError::Integrity(_) => (StatusCode::BAD_GATEWAY, "integrity"),
            ApiError::Peer(_) => (StatusCode::BAD_GATEWAY, "peer"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        };
        if let ApiError::Unavailable(detail) = &self {
            tracing::error!(%status, detail, "request failed");
            return problem(status, kind, "service unavailable");
        }
        problem(status, kind, &self.to_string())
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/patient-identifiers", post(put_identifier))
        .route(
            "/api/v1/studies/{study_instance_uid}/report",
            put(put_report),
        )
        .route("/api/v1/studies/{study_instance_uid}/qc", put(put_qc))
        .route(
            "/api/v1/studies/{study_instance_uid}/retraction",
            post(retract),
        )
        .route(
            "/api/v1/studies/{study_instance_uid}/manifest",
            get(manifest),
        )
        .route("/api/v1/publication", get(publication))
        .route("/api/v1/publication/local-only", get(local_only))
        .route("/api/v1/priors", post(priors))
        .route("/api/v1/consents", post(add_consent))
        .route("/api/v1/peer/fetch", post(peer_fetch))
        .route("/api/v1/peer/audit", get(peer_audit))
        .route("/api/v1/recognition/check", post(recognition_check))
        .route("/api/v1/recognition/decisions", post(recognition_decision))
        .route(
            "/api/v1/recognition/statistics",
            get(recognition_statistics),
        )
        .route("/api/v1/recognition/list", get(recognition_list))
        .merge(confirmation_routes())
        .with_state(state)
}

/// The DICOMweb tokens, with refusals as problem+json like every answer of
/// this API.
pub async fn require_token(
    State(tokens): State<Arc<crate::http::dicomweb::auth::Tokens>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
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
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match tokens.check(request.method(), authorization) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            let status = e.status();
            let kind = if status == StatusCode::UNAUTHORIZED {
                "unauthorized"
            } else {
                "forbidden"
            };
            problem(status, kind, &e.to_string())
        }
    }
}

fn study_uid(raw: &str) -> Result<String, ApiError> {
    // Uid::parse forgives the NUL padding of the DICOM wire; JSON has none.
    if raw.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(
            "not a valid Study Instance UID".into(),
        ));
    }
    Uid::parse(raw)
        .map(|u| u.as_str().to_string())
        .map_err(|_| ApiError::BadRequest("not a valid Study Instance UID".into()))
}

async fn study_exists(index: &Index, uid: &str) -> Result<(), ApiError> {
    match index.study(uid).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(ApiError::NotFound("study")),
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}

fn region(state: &ApiState) -> Result<&Arc<Region>, ApiError> {
    state.region.as_ref().ok_or(ApiError::NoRegion)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentifierMapping {
    patient_id: String,
    #[serde(default)]
    issuer_of_patient_id: String,
    identifier_type: IdentifierType,
    identifier: String,
}

/// Records which cross-enterprise identifier a local Patient ID stands
/// for; the patient's studies are published (again) under it.
async fn put_identifier(
    State(state): State<Arc<ApiState>>,
    Body(m): Body<IdentifierMapping>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if m.patient_id.trim().is_empty() || m.patient_id.len() > 64 {
        return Err(ApiError::BadRequest(
            "patient_id must be 1 to 64 characters".into(),
        ));
    }
    let identifier = Identifier::parse(m.identifier_type, &m.identifier).map_err(|e| {
        // The number itself is never echoed back.
        ApiError::BadRequest(format!("identifier refused ({}): {e}", e.code()))
    })?;
    let pool = state.index.pool();
    sqlx::query(
        "INSERT INTO patient_identifier (patient_id, issuer_of_patient_id, identifier_type, \
         identifier, updated_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET \
         identifier_type = excluded.identifier_type, identifier = excluded.identifier, \
         updated_at = excluded.updated_at",
    )
    .bind(m.patient_id.trim())
    .bind(m.issuer_of_patient_id.trim())
    .bind(identifier.kind().code())
    .bind(identifier.number())
    .bind(crate::common::now_rfc3339())
    .execute(pool)
    .await?;
    let studies = sqlx::query(
        "SELECT st.study_instance_uid FROM study st JOIN patient p ON p.patient_key = st.patient_key \
         WHERE p.patient_id = $1 AND p.issuer_of_patient_id = $2",
    )
    .bind(m.patient_id.trim())
    .bind(m.issuer_of_patient_id.trim())
    .fetch_all(pool)
    .await?;
    for s in &studies {
        let uid: String = s.try_get(0)?;
        publish::mark_changed(&state.index, &uid).await?;
    }
    Ok(Json(serde_json::json!({
        "patient_id": m.patient_id.trim(),
        "issuer_of_patient_id": m.issuer_of_patient_id.trim(),
        "identifier_type": identifier.kind().code(),
        "studies": studies.len(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportChange {
    report_status: ReportStatus,
    /// YYYY-MM-DD; required unless the status is `none`.
    report_issued_date: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QcChange {
    qc_status: QcStatus,
}

/// A study's report and QC state, as the node's API returns it.
#[derive(Debug, Serialize)]
struct StudyReport {
    study_instance_uid: String,
    report_status: ReportStatus,
    report_issued_date: Option<String>,
    qc_status: QcStatus,
}

async fn read_report(index: &Index, uid: &str) -> Result<StudyReport, ApiError> {
    let row = sqlx::query(
        "SELECT report_status, report_issued_date, qc_status FROM study_report \
         WHERE study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_optional(index.pool())
    .await?;
    Ok(match row {
        Some(r) => StudyReport {
            study_instance_uid: uid.to_string(),
            report_status: ReportStatus::parse(&r.try_get::<String, _>(0)?)
                .unwrap_or(ReportStatus::None),
            report_issued_date: r.try_get(1)?,
            qc_status: QcStatus::parse(&r.try_get::<String, _>(2)?).unwrap_or(QcStatus::Pending),
        },
        None => StudyReport {
            study_instance_uid: uid.to_string(),
            report_status: ReportStatus::None,
            report_issued_date: None,
            qc_status: QcStatus::Pending,
        },
    })
}

fn check_date(s: &str) -> Result<(), ApiError> {
    if crate::common::is_date(s) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "report_issued_date must be a date, YYYY-MM-DD".into(),
        ))
    }
}

async fn write_report(state: &ApiState, uid: &str, report: &StudyReport) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO study_report (study_instance_uid, report_status, report_issued_date, \
         qc_status, updated_at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (study_instance_uid) DO UPDATE SET report_status = excluded.report_status, \
         report_issued_date = excluded.report_issued_date, qc_status = excluded.qc_status, \
         updated_at = excluded.updated_at",
    )
    .bind(uid)
    .bind(report.report_status.as_str())
    .bind(report.report_issued_date.clone())
    .bind(report.qc_status.as_str())
    .bind(crate::common::now_rfc3339())
    .execute(state.index.pool())
    .await?;
    publish::mark_changed(&state.index, uid).await?;
    Ok(())
}

async fn put_report(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
    Body(change): Body<ReportChange>,
) -> Result<Json<StudyReport>, ApiError> {
    let uid = study_uid(&uid)?;
    study_exists(&state.index, &uid).await?;
    match (&change.report_status, &change.report_issued_date) {
        (ReportStatus::None, _) => {}
        (_, Some(d)) => check_date(d)?,
        (_, None) => {
            return Err(ApiError::BadRequest(
                "report_issued_date is required for an issued report".into(),
            ));
        }
    }
    let mut report = read_report(&state.index, &uid).await?;
    report.report_status = change.report_status;
    report.report_issued_date = match change.report_status {
        ReportStatus::None => None,
        _ => change.report_issued_date,
    };
    write_report(&state, &uid, &report).await?;
    Ok(Json(report))
}

async fn put_qc(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
    Body(change): Body<QcChange>,
) -> Result<Json<StudyReport>, ApiError> {
    let uid = study_uid(&uid)?;
    study_exists(&state.index, &uid).await?;
    let mut report = read_report(&state.index, &uid).await?;
    report.qc_status = change.qc_status;
    write_report(&state, &uid, &report).await?;
    Ok(Json(report))
}

async fn retract(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
) -> Result<Response, ApiError> {
    let uid = study_uid(&uid)?;
    let region = region(&state)?;
    if region.retract(&uid).await? {
        Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"study_instance_uid": uid, "state": "retracted"})),
        )
            .into_response())
    } else {
        Err(ApiError::NotFound("published study"))
    }
}

async fn manifest(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
) -> Result<Json<StudyManifest>, ApiError> {
    let uid = study_uid(&uid)?;
    let rows = sqlx::query(
        "SELECT i.sop_instance_uid, i.blob_hash, i.blob_size, se.series_instance_uid, \
         i.sop_class_uid, i.transfer_syntax_uid FROM instance i \
         JOIN series se ON se.series_key = i.series_key JOIN study st ON st.study_key = se.study_key \
         WHERE st.study_instance_uid = $1 AND i.is_current = 1 ORDER BY i.sop_instance_uid",
    )
    .bind(&uid)
    .fetch_all(state.index.pool())
    .await?;
    if rows.is_empty() {
        return Err(ApiError::NotFound("study"));
    }
    let mut instances = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    for r in &rows {
        let sop: String = r.try_get(0)?;
        let hex: String = r.try_get(1)?;
        let hash = BlobHash::parse(&hex)
            .map_err(|_| ApiError::Unavailable(format!("index holds a bad hash {hex:?}")))?;
        hashes.push((sop.clone(), hash));
        instances.push(ManifestInstance {
            sop_instance_uid: sop,
            series_instance_uid: r.try_get(3)?,
            sop_class_uid: r.try_get(4)?,
            transfer_syntax_uid: r.try_get(5)?,
            blob_hash: hex,
            size: r.try_get(2)?,
        });
    }
    Ok(Json(StudyManifest {
        study_instance_uid: uid,
        content_root: publish::content_root(hashes.iter().map(|(s, h)| (s.as_str(), h))),
        instances,
    }))
}

async fn publication(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match &state.region {
        Some(region) => Ok(Json(region.status().await?)),
        None => Ok(Json(serde_json::json!({ "enabled": false }))),
    }
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<i64>,
}

async fn local_only(
    State(state): State<Arc<ApiState>>,
    Query(limit): Query<Limit>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let region = region(&state)?;
    let studies = region
        .local_only(limit.limit.unwrap_or(1000).clamp(1, 10_000))
        .await?;
    Ok(Json(serde_json::json!({
        "studies": studies.into_iter().map(|(uid, reason)| serde_json::json!({
            "study_instance_uid": uid, "reason": reason,
        })).collect::<Vec<_>>()
    })))
}

async fn patient_key(region: &Region, patient: &PatientRef) -> Result<String, ApiError> {
    priors::resolve_patient(region, patient)
        .await?
        .map_err(|why| ApiError::BadRequest(format!("no valid cross-enterprise identifier: {why}")))
}

impl From<priors::Error> for ApiError {
    fn from(e: priors::Error) -> Self {
        match e {
            priors::Error::Invalid(m) => ApiError::BadRequest(m),
            priors::Error::NotFound(what) => ApiError::NotFound(what),
            priors::Error::NoList => ApiError::NoList,
            priors::Error::Registry(m) => ApiError::Registry(m),
            priors::Error::Refused(m) => ApiError::Forbidden(m),
            priors::Error::Index(m) => ApiError::Unavailable(m),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorsRequest {
    patient: PatientRef,
    purpose: Purpose,
    user_id: String,
    /// Required with purpose `emergency` (break-the-glass).
    #[serde(default)]
    encounter: Option<Encounter>,
    items: Option<Vec<String>>,
    since: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

/// The region's records of a patient, asked by this hospital.
async fn priors(
    State(state): State<Arc<ApiState>>,
    Body(r): Body<PriorsRequest>,
) -> Result<Json<PriorsAnswer>, ApiError> {
    check_printable("user_id", &r.user_id, 128).map_err(ApiError::BadRequest)?;
    let region = region(&state)?;
    let key = patient_key(region, &r.patient).await?;
    let federation_pseudonym = priors::federation_pseudonym(region, &r.patient).await;
    let answer = region
        .client()
        .priors(&PriorsQuery {
            federation_pseudonym,
            patient_key: key,
            items: r.items,
            since: r.since,
            purpose: r.purpose,
            user_id: r.user_id,
            encounter: r.encounter,
            page_size: r.page_size,
            page_token: r.page_token,
        })
        .await?;
    priors::remember_holders(region, &answer).await;
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentRequest {
    patient: PatientRef,
    method: ConsentMethod,
    recorded_by: String,
    state: ConsentState,
    expires_at: String,
}

/// Records at the registry a patient's authorisation for this hospital
/// (doctor-assisted, or an SMS code confirmed at the desk).
async fn add_consent(
    State(state): State<Arc<ApiState>>,
    Body(r): Body<ConsentRequest>,
) -> Result<Response, ApiError> {
    check_printable("recorded_by", &r.recorded_by, 128).map_err(ApiError::BadRequest)?;
    let region = region(&state)?;
    let key = patient_key(region, &r.patient).await?;
    let consent = region
        .client()
        .add_consent(&NewConsent {
            patient_key: key,
            hospital_id: region.config().hospital_id.clone(),
            method: r.method,
            recorded_by: r.recorded_by,
            state: r.state,
            expires_at: r.expires_at,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(consent)).into_response())
}

/// The duplicate-exam check (proto: RecognitionCheck).
async fn recognition_check(
    State(state): State<Arc<ApiState>>,
    Body(request): Body<priors::CheckRequest>,
) -> Result<Json<priors::CheckAnswer>, ApiError> {
    let region = region(&state)?;
    Ok(Json(priors::run_check(region, &request).await?))
}

async fn recognition_decision(
    State(state): State<Arc<ApiState>>,
    Body(request): Body<priors::DecisionRequest>,
) -> Result<Json<priors::DecisionRecorded>, ApiError> {
    let region = region(&state)?;
    Ok(Json(priors::decide(region, &request).await?))
}

#[derive(Deserialize)]
struct Month {
    month: Option<String>,
}

/// This hospital's warnings and decisions per month and item.
async fn recognition_statistics(
    State(state): State<Arc<ApiState>>,
    Query(m): Query<Month>,
) -> Result<Json<Statistics>, ApiError> {
    let region = region(&state)?;
    if let Some(month) = &m.month
        && chrono::NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").is_err()
    {
        return Err(ApiError::BadRequest("month must be YYYY-MM".into()));
    }
    Ok(Json(Statistics {
        rows: priors::statistics(region, m.month.as_deref()).await?,
    }))
}

/// The active recognition list: its version, items and reasons.
async fn recognition_list(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let region = region(&state)?;
    let list = region.list().ok_or(ApiError::NoList)?;
    Ok(Json(serde_json::json!({
        "version": list.meta.version,
        "content_hash": list.content_hash,
        "region": list.meta.region,
        "mark": list.meta.mark,
        "items": list.items.iter().map(|i| serde_json::json!({
            "code": i.code, "name_zh": i.name_zh, "name_en": i.name_en, "modality": i.modality,
            "body_part": i.body_part, "contrast": i.contrast, "laterality": i.laterality,
            "projections": i.projections, "window_days": i.window_days,
            "window_is_default": i.window_is_default, "mark": list.mark_of(i),
        })).collect::<Vec<_>>(),
        "reasons": list.reasons,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFetchRequest {
    hospital_id: String,
    study_instance_uid: String,
    purpose: Purpose,
    user_id: String,
    #[serde(default)]
    reference: Option<String>,
    /// Required with purpose `emergency` (break-the-glass).
    #[serde(default)]
    encounter: Option<Encounter>,
}

/// Fetches a regional prior from the node that holds it (missing
/// instances only, verified).
async fn peer_fetch(
    State(state): State<Arc<ApiState>>,
    Body(r): Body<PeerFetchRequest>,
) -> Result<Json<crate::peer::FetchReport>, ApiError> {
    // Checked here, not by the registry or the peer: a malformed UID was
    // answered 502 (their refusal), and is the caller's error.
    let uid = study_uid(&r.study_instance_uid)?;
    if r.hospital_id.is_empty()
        || r.hospital_id.len() > 64
        || !r
            .hospital_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::BadRequest("not a valid hospital_id".into()));
    }
    check_printable("user_id", &r.user_id, 128).map_err(ApiError::BadRequest)?;
    let region = region(&state)?;
    crate::peer::fetch_study(
        region,
        &state.ingest,
        &r.hospital_id,
        &uid,
        crate::peer::Asked {
            purpose: r.purpose,
            encounter: r.encounter,
            user_id: &r.user_id,
            reference: r.reference,
        },
    )
    .await
    .map(Json)
    .map_err(|e| match e {
        crate::peer::Error::Refused(m) => ApiError::Forbidden(m),
        crate::peer::Error::NoPeer(h) => {
            ApiError::BadRequest(format!("hospital {h} has no node URL in the directory"))
        }
        crate::peer::Error::Integrity(m) => ApiError::Integrity(m),
        // The peer node failing (down, refusing) is a gateway error the
        // caller may retry; its detail is the peer's, not ours.
        crate::peer::Error::Peer(m) => ApiError::Peer(m),
        other => ApiError::Unavailable(other.to_string()),
    })
}

/// The studies this node fetched from and served to peers.
async fn peer_audit(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = sqlx::query(
        "SELECT seq, at, action, peer_hospital_id, study_instance_uid, purpose, user_id, grant_id, \
         detail FROM peer_audit ORDER BY seq",
    )
    .fetch_all(state.index.pool())
    .await?;
    let mut entries = Vec::new();
    for r in rows {
        entries.push(serde_json::json!({
            "seq": r.try_get::<i64, _>(0)?, "at": r.try_get::<String, _>(1)?,
            "action": r.try_get::<String, _>(2)?, "peer_hospital_id": r.try_get::<String, _>(3)?,
            "study_instance_uid": r.try_get::<String, _>(4)?, "purpose": r.try_get::<String, _>(5)?,
            "user_id": r.try_get::<String, _>(6)?, "grant_id": r.try_get::<Option<String>, _>(7)?,
            "detail": r.try_get::<String, _>(8)?,
        }));
    }
    Ok(Json(serde_json::json!({ "entries": entries })))
}

// ------------------------------------------------- confirmation at the source

/// Issue 17: the classifier's items for a study with their evidence, the
/// hospital's confirmation or correction, the confirmations counted, and
/// the operator's mark that a study's images cannot be retrieved.
fn confirmation_routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route(
            "/api/v1/studies/{study_instance_uid}/recognition",
            get(study_recognition),
        )
        .route(
            "/api/v1/studies/{study_instance_uid}/confirmation",
            put(put_confirmation),
        )
        .route(
            "/api/v1/studies/{study_instance_uid}/images-available",
            put(put_images_available),
        )
        .route(
            "/api/v1/recognition/confirmations",
            get(confirmation_counts),
        )
}

impl From<crate::confirm::Error> for ApiError {
    fn from(e: crate::confirm::Error) -> Self {
        use crate::confirm::Error as E;
        match e {
            E::Invalid(m) => ApiError::BadRequest(m),
            E::NotFound => ApiError::NotFound("study"),
            E::NotClassified => ApiError::NotClassified,
            E::Index(m) => ApiError::Unavailable(m),
        }
    }
}

async fn study_recognition(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
) -> Result<Json<crate::confirm::StudyRecognition>, ApiError> {
    let uid = study_uid(&uid)?;
    let region = region(&state)?;
    Ok(Json(crate::confirm::study_recognition(region, &uid).await?))
}

async fn put_confirmation(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
    Body(request): Body<crate::confirm::ConfirmationRequest>,
) -> Result<Json<crate::confirm::StudyRecognition>, ApiError> {
    let uid = study_uid(&uid)?;
    let region = region(&state)?;
    crate::confirm::confirm(region, &uid, &request).await?;
    Ok(Json(crate::confirm::study_recognition(region, &uid).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImagesAvailable {
    images_available: bool,
    #[serde(default)]
    reason: String,
}

async fn put_images_available(
    State(state): State<Arc<ApiState>>,
    Path(uid): Path<String>,
    Body(change): Body<ImagesAvailable>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let uid = study_uid(&uid)?;
    let region = region(&state)?;
    if change.reason.len() > 500 {
        return Err(ApiError::BadRequest(
            "reason is limited to 500 bytes".into(),
        ));
    }
    crate::confirm::set_images_available(
        region,
        &uid,
        change.images_available,
        change.reason.trim(),
    )
    .await?;
    Ok(Json(serde_json::json!({
        "study_instance_uid": uid, "images_available": change.images_available,
    })))
}

async fn confirmation_counts(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let region = region(&state)?;
    let (confirmed, corrected) = crate::confirm::counts(region).await?;
    Ok(Json(serde_json::json!({
        "hospital_id": region.config().hospital_id,
        "confirmed": confirmed, "corrected": corrected,
    })))
}
