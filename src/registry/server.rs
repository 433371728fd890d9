//! The registry's HTTP API (`/v1/...`), as proto/huren.openapi.json
//! describes it. Every error is RFC 9457 problem+json; a 5xx says nothing
//! about the registry's insides (the detail is logged inside the request's
//! span).

use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::db::{self, AuditRecord, Db};
use super::refusals::{self, Decision};
use crate::common::{Body, problem};
use crate::contract::*;

pub struct RegistryState {
    pub db: Db,
    /// SHA-256 of the admin token.
    pub admin_token_sha256: [u8; 32],
    pub max_request_bytes: usize,
    /// The bound on refusal entries per caller and minute.
    pub refusals: refusals::Limiter,
    /// The federation this registry belongs to, if any.
    pub federation: Option<Arc<super::federation::Federation>>,
}

/// The registry's one error type; each variant is one status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body or a parameter is malformed; the detail says how.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no token, or one the registry does not know.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// 403: the token may not do this (another hospital's records, an
    /// admin action).
    #[error("{0}")]
    Forbidden(String),
    /// 403, refused by a policy whose own audit entry is written already
    /// (a publication for another hospital, a grant without consent): the
    /// refusal middleware does not write a second one.
    #[error("{0}")]
    Refused(String),
    /// 404.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: the thing to create exists.
    #[error("{0} exists already")]
    Conflict(&'static str),
    /// 503: the database cannot be reached; detail logged, not sent.
    #[error("service unavailable")]
    Unavailable(String),
}

impl From<db::Error> for ApiError {
    fn from(e: db::Error) -> Self {
        match e {
            db::Error::Invalid(m) => ApiError::BadRequest(m),
            db::Error::NotFound(what) => ApiError::NotFound(what),
            db::Error::Conflict(what) => ApiError::Conflict(what),
            db::Error::Refused(why) => ApiError::Refused(why),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) | ApiError::Refused(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        if let ApiError::Unavailable(detail) = &self {
            tracing::error!(%status, detail, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let mut response = problem(status, kind, &self.to_string());
        if matches!(self, ApiError::Refused(_)) {
            response.extensions_mut().insert(AlreadyAudited);
        }
        response
    }
}

/// Marks a refusal whose audit entry its handler wrote.
#[derive(Clone, Copy)]
struct AlreadyAudited;

/// Who is calling: the region's admin, or one hospital's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Hospital(String),
}

impl Caller {
    /// Whose records a listing covers: the admin's choice, or always the
    /// calling hospital's own (never another's).
    fn scope(&self, requested: Option<String>) -> Option<String> {
        match self {
            Caller::Admin => requested,
            Caller::Hospital(id) => Some(id.clone()),
        }
    }

    pub(crate) fn actor(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Hospital(id) => id.clone(),
        }
    }
}

/// Hospital tokens are `HOSPITAL_ID.SECRET`: the ID finds the one stored
/// hash, compared in constant time; the admin token is compared the same
/// way. Only hashes are stored.
async fn authenticate(state: &RegistryState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (kind, token) = v.trim().split_once(' ')?;
            kind.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(ApiError::Unauthorized)?;
    let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    if bool::from(hash.ct_eq(&state.admin_token_sha256)) {
        return Ok(Caller::Admin);
    }
    let (hospital_id, _) = presented.split_once('.').ok_or(ApiError::Unauthorized)?;
    let stored = state
        .db
        .hospital_token_sha256(hospital_id)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let mut known = [0u8; 32];
    hex::decode_to_slice(&stored, &mut known).map_err(|_| ApiError::Unauthorized)?;
    if bool::from(hash.ct_eq(&known)) {
        Ok(Caller::Hospital(hospital_id.to_string()))
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The user at the calling node, for the audit (`X-Huren-User`).
fn user_id(headers: &HeaderMap, caller: &Caller) -> String {
    headers
        .get("x-huren-user")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| match caller {
            Caller::Admin => "admin".into(),
            Caller::Hospital(_) => "node".into(),
        })
}

/// Authenticates a /v1 request before its handler (and so its body
/// extractor) runs; the caller goes to the handler as an extension. Each
/// 401 and 403 on the way back is audited, unless its handler audited it.
async fn authenticated(
    State(state): State<Arc<RegistryState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = format!(
        "{} {}",
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map_or("(unmatched)", MatchedPath::as_str)
    );
    let peer = req
        .extensions()
        .get::<ConnectInfo<crate::tls::PeerAddr>>()
        .map(|c| c.0.0);
    match authenticate(&state, req.headers()).await {
        Ok(caller) => {
            let user = user_id(req.headers(), &caller);
            req.extensions_mut().insert(caller.clone());
            let response = next.run(req).await;
            let status = response.status();
            if (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
                && response.extensions().get::<AlreadyAudited>().is_none()
            {
                let entry = refusal(Some(&caller), user, &route, peer, status);
                audit_bounded(&state, &caller.actor(), entry).await;
            }
            response
        }
        Err(ApiError::Unauthorized) => {
            let entry = refusal(
                None,
                "anonymous".into(),
                &route,
                peer,
                StatusCode::UNAUTHORIZED,
            );
            let key = match peer {
                Some(p) => format!("anonymous@{}", p.ip()),
                None => "anonymous".into(),
            };
            audit_bounded(&state, &key, entry).await;
            ApiError::Unauthorized.into_response()
        }
        Err(other) => other.into_response(),
    }
}

/// The audit entry of one refusal: who (as far as known), the route
/// (its template, so no identifier of the path is repeated), from where.
fn refusal(
    caller: Option<&Caller>,
    user_id: String,
    route: &str,
    peer: Option<std::net::SocketAddr>,
    status: StatusCode,
) -> AuditRecord {
    let from = peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
    AuditRecord {
        actor: caller.map_or_else(|| "anonymous".to_string(), Caller::actor),
        user_id,
        action: "refusal",
        patient_key: None,
        purpose: None,
        records_returned: 0,
        outcome: if status == StatusCode::UNAUTHORIZED {
            "unauthorized".into()
        } else {
            "forbidden".into()
        },
        detail: format!("{} {route} from {from}", status.as_u16()),
    }
}

/// Appends a refusal-like entry within the caller's bound (refusals.rs):
/// the entry, a one-time `rate_limited` notice, or only a count. The
/// summaries of minutes that ended are written first. A trail that cannot
/// be written is logged; the refusal is answered anyway.
pub(crate) async fn audit_bounded(state: &RegistryState, key: &str, entry: AuditRecord) {
    let minute = now_minute();
    let (decision, summaries) = state.refusals.admit(key, minute);
    let mut entries = summary_entries(summaries);
    match decision {
        Decision::Audit => entries.push(entry),
        Decision::RateLimited => entries.push(AuditRecord {
            outcome: "rate_limited".into(),
            detail: format!(
                "{}; {} refusals of this caller this minute are audited one by one, \
                 the further ones are counted and summarized when the minute ends",
                entry.detail,
                state.refusals.per_minute()
            ),
            ..entry
        }),
        Decision::Count => {}
    }
    if entries.is_empty() {
        return;
    }
    if let Err(error) = state.db.audit(&entries).await {
        tracing::error!(%error, "a refusal could not be audited");
    }
}

/// Writes the summaries of the minutes that ended (called every minute).
pub(crate) async fn flush_refusal_summaries(state: &RegistryState) {
    let entries = summary_entries(state.refusals.roll(now_minute()));
    if !entries.is_empty()
        && let Err(error) = state.db.audit(&entries).await
    {
        tracing::error!(%error, "refusal summaries could not be audited");
    }
}

fn now_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

fn summary_entries(summaries: refusals::Summaries) -> Vec<AuditRecord> {
    summaries
        .into_iter()
        .map(|(minute, key, n)| {
            let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs(minute * 60);
            AuditRecord {
                actor: key.split('@').next().unwrap_or("anonymous").to_string(),
                user_id: key.clone(),
                action: "refusal",
                patient_key: None,
                purpose: None,
                records_returned: n.into(),
                outcome: "summary".into(),
                detail: format!(
                    "{n} further refusals of {key} in the minute from {} were counted, not audited one by one",
                    humantime::format_rfc3339_seconds(start)
                ),
            }
        })
        .collect()
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Hospital(_) => Err(ApiError::Forbidden("this needs the admin token".into())),
    }
}

pub fn router(state: Arc<RegistryState>) -> Router {
    let limit = state.max_request_bytes;
    // Every /v1 route needs a token, checked before any extractor reads
    // the body (a 401 comes before a 400), and each refusal is audited.
    let v1 = Router::new()
        .route("/v1/hospitals", get(directory).post(add_hospital))
        .route("/v1/hospitals/{hospital_id}", patch(update_hospital))
        .route("/v1/hospitals/{hospital_id}/records", post(publish))
        .route(
            "/v1/hospitals/{hospital_id}/records/{study_instance_uid}",
            get(record),
        )
        .route("/v1/priors/query", post(priors))
        .route("/v1/consents", get(consents).post(add_consent))
        .route("/v1/consents/{consent_id}/state", post(change_consent))
        .route("/v1/audit", get(audit))
        .route("/v1/recognition-list", get(get_list).put(put_list))
        .route("/v1/recognition/events", post(add_events))
        .route("/v1/grants", post(issue_grant))
        .route("/v1/grants/verify", post(verify_grant))
        .route("/v1/recognition/statistics", get(statistics))
        .route("/v1/federation/consents", post(add_federation_consent))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticated,
        ));
    // Registry to registry: signed by a member's key instead of a token.
    let members = Router::new()
        .route("/v1/federation/priors", post(federated_priors))
        .route("/v1/federation/grants", post(federated_grant))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            member_authenticated,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .merge(members)
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "not-found", "no such resource") })
        .layer(axum::middleware::map_response(problem_for_plain_errors))
        .layer(DefaultBodyLimit::max(limit))
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(
                tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
            ),
        )
        .with_state(state)
}

/// Every error answer as RFC 9457 problem+json (docs/registry.md), also
/// those axum writes itself: a query string that does not deserialise
/// (plain text), a method the route lacks (405, empty; its `Allow` header
/// kept).
async fn problem_for_plain_errors(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let kind = match status {
        StatusCode::BAD_REQUEST => "bad-request",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        _ => "error",
    };
    let mut out = problem(status, kind, &detail);
    if let Some(allow) = parts.headers.get(axum::http::header::ALLOW) {
        out.headers_mut()
            .insert(axum::http::header::ALLOW, allow.clone());
    }
    out
}

/// Liveness: the process serves HTTP. The database is readiness's
/// question (`/ready`): restarting a registry whose database is down
/// does not bring the database back.
async fn health() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Readiness: the database answers (the registry starts serving only once
/// its start, migrations and the startup list, has finished). 503 names
/// the reason, not the error.
async fn ready(State(state): State<Arc<RegistryState>>) -> Response {
    match state.db.ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(error) => {
            tracing::error!(%error, "readiness: database unreachable");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database unreachable",
            )
        }
    }
}

async fn metrics(State(state): State<Arc<RegistryState>>) -> Response {
    crate::metrics::ready(state.db.ping().await.is_ok());
    let handle = crate::metrics::install(crate::metrics::Process::Registry);
    crate::metrics::render(&handle)
}

/// The directory, with an ETag so nodes poll it with conditional GETs.
async fn directory(
    State(state): State<Arc<RegistryState>>,
    Extension(_): Extension<Caller>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hospitals = state.db.hospitals().await?;
    let version = blake3::hash(
        serde_json::to_string(&hospitals)
            .expect("hospitals serialise")
            .as_bytes(),
    )
    .to_hex()
    .to_string();
    let etag = format!("\"{version}\"");
    if not_modified(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        [(header::ETAG, etag)],
        Json(HospitalDirectory { version, hospitals }),
    )
        .into_response())
}

/// Whether a conditional GET names the current ETag.
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
}

/// A new hospital token: `HOSPITAL_ID.` and 256 random bits.
pub fn new_hospital_token(hospital_id: &str) -> (String, String) {
    let token = format!("{hospital_id}.{}", crate::common::random_hex(32));
    let sha = hex::encode(Sha256::digest(token.as_bytes()));
    (token, sha)
}

async fn add_hospital(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Body<NewHospital>, Response>,
) -> Result<Response, ApiError> {
    // Who may, before what: a hospital's token gets its 403 (audited)
    // whatever it sent, not a 400 that describes the body.
    require_admin(&caller)?;
    let Body(new) = match body {
        Ok(body) => body,
        Err(rejection) => return Ok(rejection),
    };
    let (token, sha) = new_hospital_token(&new.hospital_id);
    let audit = AuditRecord {
        actor: caller.actor(),
        user_id: user_id(&headers, &caller),
        action: "hospital_add",
        patient_key: None,
        purpose: None,
        records_returned: 0,
        outcome: "ok".into(),
        detail: format!("hospital {} level {}", new.hospital_id, new.level.name()),
    };
    let hospital = state.db.add_hospital(&new, &sha, audit).await?;
    Ok((
        StatusCode::CREATED,
        Json(HospitalAdmin {
            hospital,
            token: Some(token),
        }),
    )
        .into_response())
}

async fn update_hospital(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(hospital_id): Path<String>,
    body: Result<Body<HospitalUpdate>, Response>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let Body(update) = match body {
        Ok(body) => body,
        Err(rejection) => return Ok(rejection),
    };
    let token = update
        .rotate_token
        .then(|| new_hospital_token(&hospital_id));
    let audit = AuditRecord {
        actor: caller.actor(),
        user_id: user_id(&headers, &caller),
        action: "hospital_set",
        patient_key: None,
        purpose: None,
        records_returned: 0,
        outcome: "ok".into(),
        detail: format!(
            "hospital {hospital_id}: {}",
            serde_json::to_string(&update).expect("update serialises")
        ),
    };
    let hospital = state
        .db
        .update_hospital(
            &hospital_id,
            &update,
            token.as_ref().map(|(_, sha)| sha.as_str()),
            audit,
        )
        .await?;
    Ok(Json(HospitalAdmin {
        hospital,
        token: token.map(|(t, _)| t),
    })
    .into_response())
}

async fn publish(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(hospital_id): Path<String>,
    body: Result<Body<PublishRequest>, Response>,
) -> Result<Response, ApiError> {
    let user = user_id(&headers, &caller);
    if caller != Caller::Hospital(hospital_id.clone()) {
        // A token publishes for its own hospital only; the attempt is kept.
        state
            .db
            .audit(&[AuditRecord {
                actor: caller.actor(),
                user_id: user,
                action: "publish",
                patient_key: None,
                purpose: None,
                records_returned: 0,
                outcome: "denied".into(),
                detail: match &body {
                    Ok(Body(request)) => format!(
                        "tried to publish {} records and {} retractions for hospital {hospital_id}",
                        request.records.len(),
                        request.retractions.len()
                    ),
                    Err(_) => {
                        format!("tried to publish for hospital {hospital_id} (a body not valid)")
                    }
                },
            }])
            .await?;
        tracing::warn!(actor = %caller.actor(), target = %hospital_id, "publication for another hospital refused");
        return Err(ApiError::Refused(
            "a hospital publishes only its own records".into(),
        ));
    }
    let Body(request) = match body {
        Ok(body) => body,
        Err(rejection) => return Ok(rejection),
    };
    let results = state.db.publish(&hospital_id, &user, &request).await?;
    for r in &results {
        crate::metrics::registry_published(match r.outcome {
            PublishOutcome::Applied => "applied",
            PublishOutcome::Unchanged => "unchanged",
        });
    }
    Ok(Json(PublishResponse { results }).into_response())
}

async fn record(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Path((hospital_id, study_instance_uid)): Path<(String, String)>,
) -> Result<Json<RegistryRecord>, ApiError> {
    if caller != Caller::Admin && caller != Caller::Hospital(hospital_id.clone()) {
        return Err(ApiError::Forbidden(
            "another hospital's record is read through the priors query".into(),
        ));
    }
    state
        .db
        .record(&hospital_id, &study_instance_uid)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("record"))
}

async fn priors(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(query): Body<PriorsQuery>,
) -> Result<Json<PriorsAnswer>, ApiError> {
    let started = std::time::Instant::now();
    let Caller::Hospital(hospital_id) = caller else {
        return Err(ApiError::Forbidden(
            "the priors query is asked by a hospital for its patient".into(),
        ));
    };
    let answer = match &state.federation {
        Some(federation) if query.page_token.is_none() => {
            federated(&state, federation, &hospital_id, &query).await?
        }
        _ => state.db.priors(&hospital_id, &query).await?,
    };
    crate::metrics::registry_priors_query(started);
    Ok(Json(answer))
}

/// The priors query of a registry in a federation: its own answer and the
/// members' at once; a member that has not answered by the deadline is
/// reported `not_reached`, and the answer goes out without it.
async fn federated(
    state: &RegistryState,
    federation: &super::federation::Federation,
    hospital_id: &str,
    query: &PriorsQuery,
) -> Result<PriorsAnswer, ApiError> {
    let started = std::time::Instant::now();
    let now = crate::common::now_rfc3339();
    // Both reads at once (two pool connections): the fan-out waits on them.
    let (known_pseudonym, asking_consent) = tokio::join!(
        state.db.pseudonym_of(&query.patient_key),
        state
            .db
            .consent_state(&query.patient_key, hospital_id, &now)
    );
    let known_pseudonym = known_pseudonym?;
    // A pseudonym the node sent that this registry did not know (or knew
    // another) is remembered in the query's one transaction, below.
    let new_pseudonym = query
        .federation_pseudonym
        .as_deref()
        .filter(|p| known_pseudonym.as_deref() != Some(*p));
    // Else the one learnt earlier from this hospital's node (a check with
    // the identifier, or a pilot hospital's publication).
    let pseudonym = query.federation_pseudonym.clone().or(known_pseudonym);
    let Some(pseudonym) = pseudonym.filter(|_| federation.in_pilot(hospital_id)) else {
        if let Some(p) = new_pseudonym {
            state.db.remember_pseudonym(&query.patient_key, p).await?;
        }
        return Ok(state.db.priors(hospital_id, query).await?);
    };
    let asking_consent =
        query.purpose == Purpose::Treatment && asking_consent? == Some(ConsentState::Granted);
    let request_id = crate::common::random_hex(16);
    let remote_query = FederatedQuery {
        federation: federation.name.clone(),
        pseudonym,
        items: query.items.clone(),
        since: query.since.clone(),
        purpose: query.purpose,
        asking_hospital_id: hospital_id.to_string(),
        user_id: query.user_id.clone(),
        asking_consent,
        request_id: request_id.clone(),
    };
    // The local answer, what `federation_prior` holds and the asking
    // hospital's directory entry are read while the members answer; this
    // registry's writes (its audit entries) wait for the members and go in
    // one commit.
    let local = async {
        let local = state.db.priors_to_audit(hospital_id, query).await?;
        let known = state.db.federation_priors_of(&query.patient_key).await?;
        let asking = state.db.hospital(hospital_id).await?;
        Ok::<_, ApiError>((local, known, asking))
    };
    let (local, remote) = if query.purpose == Purpose::Emergency {
        // Break-the-glass is checked (and a misuse refused and audited)
        // here first: no other province hears of a refused one.
        let local = local.await?;
        (local, federation.fan_out(&remote_query).await)
    } else {
        let (local, remote) = tokio::join!(local, federation.fan_out(&remote_query));
        (local?, remote)
    };
    let fanned_out = started.elapsed();
    let ((mut answer, local_audit), known, asking) = local;
    let asking = asking.ok_or(ApiError::NotFound("hospital"))?;
    let today = crate::recognition::check::today_in_shanghai();
    let mut summary = FederationSummary {
        name: federation.name.clone(),
        members: Vec::new(),
        hospitals: Vec::new(),
    };
    let mut audit = vec![local_audit];
    let mut shown = Vec::new();
    for r in &remote {
        let mut outcome = MemberOutcome {
            member_id: r.member.id.clone(),
            province: r.member.province.clone(),
            status: MemberStatus::Reached,
            records: 0,
            withheld_count: 0,
            items_not_recognised: 0,
            elapsed_ms: r.elapsed.as_millis() as i64,
        };
        match &r.answer {
            Ok(a) => {
                let (records, hospitals, not_recognised) =
                    federation.judge(&asking, &query.patient_key, a, today);
                outcome.records = records.len() as i64;
                outcome.withheld_count = a.withheld_count;
                // Withheld across the border counts like withheld here:
                // the doctor learns that records exist, not what they are.
                answer.withheld_count += a.withheld_count;
                outcome.items_not_recognised = not_recognised;
                shown.push((r.member.id.as_str(), records.clone()));
                answer.records.extend(records);
                for h in hospitals {
                    if !summary
                        .hospitals
                        .iter()
                        .any(|x| x.hospital_id == h.hospital_id)
                    {
                        summary.hospitals.push(h);
                    }
                }
            }
            Err(status) => outcome.status = *status,
        }
        let status = match outcome.status {
            MemberStatus::Reached => "reached",
            MemberStatus::NotReached => "not_reached",
            MemberStatus::Refused => "refused",
        };
        audit.push(AuditRecord {
            actor: hospital_id.to_string(),
            user_id: query.user_id.clone(),
            action: "federation_query",
            patient_key: Some(query.patient_key.clone()),
            purpose: Some(query.purpose.as_str().to_string()),
            records_returned: outcome.records,
            outcome: status.into(),
            detail: format!(
                "to member {} ({}) request {request_id}: {} records, {} withheld, {} without recognised items, {} ms",
                r.member.id,
                r.member.province,
                outcome.records,
                outcome.withheld_count,
                outcome.items_not_recognised,
                outcome.elapsed_ms
            ),
        });
        summary.members.push(outcome);
    }
    let shown: Vec<_> = shown
        .iter()
        .map(|(member_id, records)| db::FederationPriorsShown {
            member_id,
            patient_key: &query.patient_key,
            pseudonym: &remote_query.pseudonym,
            known: &known,
            records,
        })
        .collect();
    let before_commit = started.elapsed();
    state
        .db
        .commit_federated_query(
            new_pseudonym.map(|p| (query.patient_key.as_str(), p)),
            &shown,
            &audit,
        )
        .await?;
    // Where a federated query's time goes (benches/federation.sh runs the
    // registries with HUREN_BENCH_LOG to read these).
    tracing::debug!(
        fanned_out_us = fanned_out.as_micros() as u64,
        judged_us = (before_commit - fanned_out).as_micros() as u64,
        committed_us = (started.elapsed() - before_commit).as_micros() as u64,
        members_ms = ?summary.members.iter().map(|m| m.elapsed_ms).collect::<Vec<_>>(),
        "federated priors query"
    );
    answer.federation = Some(summary);
    Ok(answer)
}

/// Who a verified member request comes from.
#[derive(Debug, Clone)]
struct MemberCaller(super::federation::Member);

/// A verified member request whose nonce its handler records, in the
/// transaction of its audit entry (the priors query: one commit, not two);
/// with what a refusal's entry names.
#[derive(Debug, Clone)]
struct PendingNonce {
    nonce: String,
    timestamp: u64,
    from: String,
}

/// The 403 of a refused member request, audited (within the refusal
/// bound) with what it claimed to be and why.
async fn refuse_member(
    state: &RegistryState,
    from: &str,
    route: &str,
    claimed: Option<String>,
    reason: &str,
) -> Response {
    let claimed = claimed.unwrap_or_else(|| "-".into());
    let entry = AuditRecord {
        actor: format!("registry:{claimed}"),
        user_id: "registry".into(),
        action: "refusal",
        patient_key: None,
        purpose: None,
        records_returned: 0,
        outcome: "forbidden".into(),
        detail: format!("403 {route} from {from}: claimed member {claimed}: {reason}"),
    };
    let ip = from.rsplit_once(':').map_or(from, |(ip, _)| ip);
    audit_bounded(state, &format!("registry:{claimed}@{ip}"), entry).await;
    tracing::warn!(claimed = %claimed, reason, "federation request refused");
    let mut response = problem(
        StatusCode::FORBIDDEN,
        "forbidden",
        "not a request signed by a member of this federation",
    );
    response.extensions_mut().insert(AlreadyAudited);
    response
}

/// Verifies a member's signed request (its key in the federation
/// configuration, the clock, a nonce never seen) before the handler; a
/// refusal is 403 and audited with what the request claimed to be. A
/// registry outside a federation has no such routes (404).
async fn member_authenticated(
    State(state): State<Arc<RegistryState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(federation) = state.federation.clone() else {
        return problem(StatusCode::NOT_FOUND, "not-found", "no such resource");
    };
    let peer = req
        .extensions()
        .get::<ConnectInfo<crate::tls::PeerAddr>>()
        .map(|c| c.0.0);
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, state.max_request_bytes).await else {
        return ApiError::BadRequest("the body is too large or unreadable".into()).into_response();
    };
    let path = parts.uri.path().to_string();
    let from = peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
    let route = format!("{} {path}", parts.method);
    let v = match federation.verify(&parts.headers, parts.method.as_str(), &path, &bytes) {
        Ok(v) => v,
        Err(r) => return refuse_member(&state, &from, &route, r.claimed, r.reason).await,
    };
    // The priors query records its nonce with its audit entry; any other
    // request here before its handler runs.
    let deferred = path == "/v1/federation/priors";
    if !deferred {
        match state
            .db
            .federation_nonce(&v.nonce, v.timestamp, super::federation::MAX_SKEW_SECS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                return refuse_member(&state, &from, &route, Some(v.member.id), REPLAY).await;
            }
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
    req.extensions_mut().insert(MemberCaller(v.member));
    req.extensions_mut().insert(PendingNonce {
        nonce: v.nonce,
        timestamp: v.timestamp,
        from,
    });
    next.run(req).await
}

const REPLAY: &str = "a replayed request (its nonce was seen)";

/// A member asks for a patient's records here by pseudonym; answered under
/// this province's consent policy, from its pilot hospitals only, audited
/// with the member's identity.
async fn federated_priors(
    State(state): State<Arc<RegistryState>>,
    Extension(MemberCaller(member)): Extension<MemberCaller>,
    Extension(pending): Extension<PendingNonce>,
    Body(q): Body<FederatedQuery>,
) -> Result<Response, ApiError> {
    let federation = state
        .federation
        .clone()
        .ok_or(ApiError::NotFound("federation"))?;
    if q.federation != federation.name {
        return Err(ApiError::BadRequest(
            "federation is not this registry's federation".into(),
        ));
    }
    for (field, value, max) in [
        ("asking_hospital_id", &q.asking_hospital_id, 64),
        ("user_id", &q.user_id, 128),
        ("request_id", &q.request_id, 64),
    ] {
        crate::contract::check_printable(field, value, max).map_err(ApiError::BadRequest)?;
    }
    if q.items.as_ref().is_some_and(|i| i.len() > 64) {
        return Err(ApiError::BadRequest(
            "items has more than 64 entries".into(),
        ));
    }
    if let Some(since) = &q.since
        && chrono::NaiveDate::parse_from_str(since, "%Y-%m-%d").is_err()
    {
        return Err(ApiError::BadRequest(
            "since must be a date, YYYY-MM-DD".into(),
        ));
    }
    let started = std::time::Instant::now();
    let view = state
        .db
        .member_view(&q.pseudonym, &member.id, q.since.as_deref())
        .await?;
    let patient_key = view.patient_key;
    let holding_consent = view.consent == Some(ConsentState::Granted);
    let mut records = view.records;
    records.retain(|r| federation.in_pilot(&r.hospital.hospital_id));
    if let Some(items) = &q.items {
        records.retain(|r| {
            r.record
                .record
                .items
                .iter()
                .any(|i| items.contains(&i.code))
        });
    }
    use super::federation::ConsentPolicy;
    let consent = match federation.consent_policy {
        ConsentPolicy::Holding => holding_consent,
        ConsentPolicy::Asking => q.asking_consent,
        ConsentPolicy::Both => holding_consent && q.asking_consent,
    };
    let access = if consent {
        AccessBasis::Consent
    } else if q.purpose == Purpose::Emergency {
        AccessBasis::BreakTheGlass
    } else {
        AccessBasis::None
    };
    let mut withheld_count = 0;
    if access == AccessBasis::None {
        withheld_count = match federation.withheld {
            super::federation::Withheld::Count => records.len() as i64,
            super::federation::Withheld::Nothing => 0,
        };
        records.clear();
    }
    let out: Vec<FederatedRecord> = records
        .into_iter()
        .map(|r| {
            let mut record = r.record.record;
            // This province's key stays here: the member knows the pseudonym.
            record.patient_key = q.pseudonym.clone();
            record.federation_pseudonym = Some(q.pseudonym.clone());
            FederatedRecord {
                hospital: r.hospital,
                published_at: r.record.published_at,
                record,
            }
        })
        .collect();
    let outcome = match access {
        AccessBasis::Consent => "ok",
        AccessBasis::BreakTheGlass => "break_the_glass",
        AccessBasis::None if federation.withheld == super::federation::Withheld::Count => {
            "count_only"
        }
        AccessBasis::None => "withheld",
    };
    let read = started.elapsed();
    let recorded = state
        .db
        .audit_with_nonce(
            &[AuditRecord {
            actor: format!("registry:{}", member.id),
            user_id: format!("{}/{}", q.asking_hospital_id, q.user_id)
                .chars()
                .take(200)
                .collect(),
            action: "federation_query",
            patient_key,
            purpose: Some(q.purpose.as_str().to_string()),
            records_returned: out.len() as i64,
            outcome: outcome.into(),
            detail: format!(
                "from member {} ({}) for hospital {}, request {}, policy {}: {} records, {} withheld",
                member.id,
                member.province,
                q.asking_hospital_id,
                q.request_id,
                federation.consent_policy.as_str(),
                out.len(),
                withheld_count
            ),
        }],
            &pending.nonce,
            pending.timestamp,
        )
        .await?;
    tracing::debug!(
        read_us = read.as_micros() as u64,
        committed_us = (started.elapsed() - read).as_micros() as u64,
        records = out.len(),
        "member priors query answered"
    );
    if !recorded {
        return Ok(refuse_member(
            &state,
            &pending.from,
            "POST /v1/federation/priors",
            Some(member.id),
            REPLAY,
        )
        .await);
    }
    Ok(Json(FederatedAnswer {
        member_id: federation.member_id.clone(),
        province: federation.province.clone(),
        access,
        records: out,
        withheld_count,
    })
    .into_response())
}

/// The patient's consent, in this (the holding) province, to show its
/// records of them to a member's hospitals: recorded by the admin (the
/// province's health app) or one of this province's hospitals.
async fn add_federation_consent(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(new): Body<NewFederationConsent>,
) -> Result<Response, ApiError> {
    let federation = state
        .federation
        .clone()
        .ok_or(ApiError::NotFound("federation"))?;
    let audit = AuditRecord {
        actor: caller.actor(),
        user_id: new.recorded_by.clone(),
        action: "federation_consent",
        patient_key: Some(new.patient_key.clone()),
        purpose: None,
        records_returned: 0,
        outcome: new.state.as_str().into(),
        detail: format!(
            "for member {} by {} until {}",
            new.member_id,
            new.method.as_str(),
            new.expires_at
        ),
    };
    let consent = state
        .db
        .add_federation_consent(&new, federation.member(&new.member_id).is_some(), audit)
        .await?;
    Ok((StatusCode::CREATED, Json(consent)).into_response())
}

async fn add_consent(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(new): Body<NewConsent>,
) -> Result<Response, ApiError> {
    if caller != Caller::Admin && caller != Caller::Hospital(new.hospital_id.clone()) {
        return Err(ApiError::Forbidden(
            "a hospital records consents given to itself only".into(),
        ));
    }
    let audit = AuditRecord {
        actor: caller.actor(),
        user_id: new.recorded_by.clone(),
        action: "consent_add",
        patient_key: Some(new.patient_key.clone()),
        purpose: None,
        records_returned: 0,
        outcome: new.state.as_str().into(),
        detail: format!(
            "for hospital {} by {} until {}",
            new.hospital_id,
            new.method.as_str(),
            new.expires_at
        ),
    };
    let consent = state.db.add_consent(&new, audit).await?;
    Ok((StatusCode::CREATED, Json(consent)).into_response())
}

#[derive(Deserialize)]
struct ConsentFilter {
    patient_key: String,
    hospital_id: Option<String>,
}

async fn consents(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Query(filter): Query<ConsentFilter>,
) -> Result<Json<ConsentList>, ApiError> {
    // A hospital sees the consents given to it, never another's.
    let hospital = caller.scope(filter.hospital_id.clone());
    let consents = state
        .db
        .consents(&filter.patient_key, hospital.as_deref())
        .await?;
    Ok(Json(ConsentList { consents }))
}

async fn change_consent(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Path(consent_id): Path<String>,
    Body(change): Body<ConsentChange>,
) -> Result<Json<Consent>, ApiError> {
    let current = state
        .db
        .consent(&consent_id)
        .await?
        .ok_or(ApiError::NotFound("consent"))?;
    if caller != Caller::Admin && caller != Caller::Hospital(current.hospital_id.clone()) {
        return Err(ApiError::NotFound("consent"));
    }
    let audit = AuditRecord {
        actor: caller.actor(),
        user_id: change.recorded_by.clone(),
        action: "consent_change",
        patient_key: Some(current.patient_key.clone()),
        purpose: None,
        records_returned: 0,
        outcome: change.state.as_str().into(),
        detail: format!("consent {consent_id} for hospital {}", current.hospital_id),
    };
    Ok(Json(
        state.db.change_consent(&consent_id, &change, audit).await?,
    ))
}

#[derive(Deserialize)]
struct AuditParams {
    after_seq: Option<i64>,
    limit: Option<i64>,
    /// json (default), jsonl or csv.
    format: Option<String>,
}

async fn audit(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<AuditParams>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let page = state
        .db
        .audit_page(params.after_seq.unwrap_or(0), params.limit.unwrap_or(1000))
        .await?;
    match params.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(page).into_response()),
        "jsonl" => Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            super::audit_jsonl(&page.entries),
        )
            .into_response()),
        "csv" => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            super::audit_csv(&page.entries),
        )
            .into_response()),
        other => Err(ApiError::BadRequest(format!(
            "format {other:?}: use json, jsonl or csv"
        ))),
    }
}

/// The active recognition list as its TOML text; the ETag is its content
/// hash, so nodes poll with conditional GETs.
async fn get_list(
    State(state): State<Arc<RegistryState>>,
    Extension(_): Extension<Caller>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (hash, text) = state
        .db
        .active_list()
        .await?
        .ok_or(ApiError::NotFound("recognition list"))?;
    let etag = format!("\"{hash}\"");
    if not_modified(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok((
        [
            (header::ETAG, etag),
            (
                header::CONTENT_TYPE,
                "application/toml; charset=utf-8".to_string(),
            ),
        ],
        text,
    )
        .into_response())
}

/// Activates a new list (admin). An invalid list is refused with every
/// error (line and field) and the active list stays.
async fn put_list(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    text: String,
) -> Result<Json<ListActivated>, ApiError> {
    require_admin(&caller)?;
    Ok(Json(
        state
            .db
            .activate_list(&text, &user_id(&headers, &caller))
            .await?,
    ))
}

async fn add_events(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(events): Body<RecognitionEvents>,
) -> Result<Json<EventsAccepted>, ApiError> {
    let Caller::Hospital(hospital_id) = caller else {
        return Err(ApiError::Forbidden(
            "events are reported by a hospital's node".into(),
        ));
    };
    let accepted = state.db.add_events(&hospital_id, &events.events).await?;
    Ok(Json(EventsAccepted { accepted }))
}

#[derive(Deserialize)]
struct StatisticsFilter {
    month: Option<String>,
    hospital_id: Option<String>,
    item_code: Option<String>,
}

/// Statistics for the region (admin) or for the asking hospital.
async fn statistics(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Query(f): Query<StatisticsFilter>,
) -> Result<Json<Statistics>, ApiError> {
    let hospital = caller.scope(f.hospital_id.clone());
    let rows = state
        .db
        .statistics(
            f.month.as_deref(),
            hospital.as_deref(),
            f.item_code.as_deref(),
        )
        .await?;
    Ok(Json(Statistics { rows }))
}

/// A grant to fetch one study from the hospital that holds it (peer
/// retrieval); 403 without consent or break-the-glass.
async fn issue_grant(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(request): Body<GrantRequest>,
) -> Result<Response, ApiError> {
    let Caller::Hospital(asking) = caller else {
        return Err(ApiError::Forbidden(
            "grants are asked by a hospital's node".into(),
        ));
    };
    if let Some(federation) = &state.federation
        && let Some((member_id, patient_key, pseudonym)) = state
            .db
            .federation_prior(&request.holding_hospital_id, &request.study_instance_uid)
            .await?
        && state
            .db
            .hospital(&request.holding_hospital_id)
            .await?
            .is_none()
    {
        return cross_border_grant(
            &state,
            federation,
            &asking,
            &request,
            &member_id,
            &patient_key,
            pseudonym,
        )
        .await;
    }
    match state.db.issue_grant(&asking, &request).await? {
        Ok(grant) => Ok((StatusCode::CREATED, Json(grant)).into_response()),
        Err(why) => Err(ApiError::Refused(why)),
    }
}

/// A grant for a study of another province: this registry vouches for its
/// hospital to the member that holds the study (which applies its consent
/// policy and issues the grant); audited here with the member's identity.
async fn cross_border_grant(
    state: &RegistryState,
    federation: &super::federation::Federation,
    asking: &str,
    request: &GrantRequest,
    member_id: &str,
    patient_key: &str,
    pseudonym: String,
) -> Result<Response, ApiError> {
    if request.purpose == Purpose::Emergency && request.encounter != Some(Encounter::Emergency) {
        return Err(ApiError::BadRequest(
            "a break-the-glass grant names the emergency encounter".into(),
        ));
    }
    let member = federation
        .member(member_id)
        .ok_or(ApiError::NotFound("federation member"))?;
    let asking_consent = state
        .db
        .consent_state(patient_key, asking, &crate::common::now_rfc3339())
        .await?
        == Some(ConsentState::Granted);
    let request_id = crate::common::random_hex(16);
    let remote = FederatedGrantRequest {
        federation: federation.name.clone(),
        pseudonym,
        holding_hospital_id: request.holding_hospital_id.clone(),
        study_instance_uid: request.study_instance_uid.clone(),
        purpose: request.purpose,
        asking_hospital_id: asking.to_string(),
        user_id: request.user_id.clone(),
        asking_consent,
        request_id: request_id.clone(),
    };
    let result = federation.grant(member, &remote).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(MemberStatus::Refused) => "refused",
        Err(_) => "not_reached",
    };
    state
        .db
        .audit(&[AuditRecord {
            actor: asking.to_string(),
            user_id: request.user_id.clone(),
            action: "federation_grant",
            patient_key: Some(patient_key.to_string()),
            purpose: Some(request.purpose.as_str().to_string()),
            records_returned: 0,
            outcome: outcome.into(),
            detail: format!(
                "study {} at {} held by member {} ({}), request {request_id}; reference {}",
                request.study_instance_uid,
                request.holding_hospital_id,
                member.id,
                member.province,
                request.reference.as_deref().unwrap_or("-")
            ),
        }])
        .await?;
    match result {
        Ok(grant) => Ok((StatusCode::CREATED, Json(grant)).into_response()),
        Err(MemberStatus::Refused) => Err(ApiError::Refused(format!(
            "member {} refused the grant (its consent policy)",
            member.id
        ))),
        Err(_) => Err(ApiError::Unavailable(format!(
            "member {} not reached for a grant",
            member.id
        ))),
    }
}

/// A member vouches for its hospital and asks for a grant on a study of
/// this province.
async fn federated_grant(
    State(state): State<Arc<RegistryState>>,
    Extension(MemberCaller(member)): Extension<MemberCaller>,
    Body(r): Body<FederatedGrantRequest>,
) -> Result<Response, ApiError> {
    let federation = state
        .federation
        .clone()
        .ok_or(ApiError::NotFound("federation"))?;
    if r.federation != federation.name {
        return Err(ApiError::BadRequest(
            "federation is not this registry's federation".into(),
        ));
    }
    match state
        .db
        .issue_federated_grant(
            &member.id,
            federation.consent_policy.as_str(),
            federation.in_pilot(&r.holding_hospital_id),
            &r,
        )
        .await?
    {
        Ok(grant) => Ok((StatusCode::CREATED, Json(grant)).into_response()),
        Err(why) => Err(ApiError::Refused(why)),
    }
}

/// The holding hospital confirms a grant presented to it. A grant that is
/// not valid (unknown, another hospital's, expired: 404; its patient's
/// consent revoked or expired since it was issued: 403) is audited, within
/// the holding hospital's refusal bound: a stranger presenting forged
/// grants to a node must not fill the trail through it.
async fn verify_grant(
    State(state): State<Arc<RegistryState>>,
    Extension(caller): Extension<Caller>,
    Body(request): Body<GrantVerify>,
) -> Result<Json<GrantConfirmed>, ApiError> {
    let Caller::Hospital(holding) = caller else {
        return Err(ApiError::Forbidden(
            "grants are verified by the holding hospital".into(),
        ));
    };
    match state.db.verify_grant(&holding, &request.token).await? {
        Ok(confirmed) => Ok(Json(confirmed)),
        Err(invalid) => {
            let entry = AuditRecord {
                actor: holding.clone(),
                user_id: "node".into(),
                action: "grant_verify",
                patient_key: invalid.patient_key.clone(),
                purpose: None,
                records_returned: 0,
                outcome: "refused".into(),
                detail: invalid.reason.to_string(),
            };
            audit_bounded(&state, &holding, entry).await;
            if invalid.consent_withdrawn {
                Err(ApiError::Refused(invalid.reason.to_string()))
            } else {
                Err(ApiError::NotFound("valid grant for this hospital"))
            }
        }
    }
}
