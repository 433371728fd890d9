//! Opening a prior's images from the page (issue 19): "查看影像" on the
//! timeline and on the warning card leads here.
//!
//! - A study held here opens in the viewer (`/viewer`) at once; the session
//!   is recorded as having opened it, which is what lets the viewer's
//!   DICOMweb requests through (`dicomweb::auth`).
//! - A prior held at another hospital starts the peer fetch (grant,
//!   consent and audit as for any fetch: `crate::peer`), series by series,
//!   and this page shows its progress, refreshing itself (the page has no
//!   scripts: a `<meta http-equiv="refresh">`), with the thumbnails of the
//!   series complete so far and a link to open them; when the whole study
//!   is here it goes on to the viewer.
//!   Once the fetch's manifest is verified, the page instead shows the
//!   viewer at once, reading the study as it arrives (`crate::peer::Live`),
//!   under a strip with the fetch's progress: both framed by this page,
//!   same origin only.
//! - When the images cannot be opened (peer down, no consent, failed
//!   verification) the page says which and why.
//!
//! Thumbnails (one per series, on the timeline, the warning card and here)
//! are rendered from the series' middle instance and kept in memory by
//! blob hash: content-addressed, so never stale, and bounded.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;

use super::{Answer, Page, PageState};
use crate::index::Index;
use crate::peer::{FailureKind, FetchState};
use crate::types::{BlobHash, Uid};

/// Thumbnails fit this square (a list's size; the page shows them at 96).
const THUMBNAIL_PX: u32 = 128;
/// Bytes of thumbnails kept (about 4 KB each: thousands of series).
const THUMBNAIL_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// How often the progress page reloads while a fetch runs.
const REFRESH_SECS: u32 = 1;

pub(super) fn routes() -> Router<Arc<PageState>> {
    Router::new()
        .route("/ui/studies/{uid}/images", get(open_images))
        .route("/ui/studies/{uid}/images/progress", get(progress_strip))
        .route(
            "/ui/studies/{uid}/series/{series}/thumbnail",
            get(thumbnail),
        )
}

/// The link a prior's "查看影像" follows.
pub fn images_link(study_instance_uid: &str) -> String {
    format!("/ui/studies/{study_instance_uid}/images")
}

/// Rendered thumbnails by the hash of the blob they were drawn from,
/// oldest evicted first past [`THUMBNAIL_CACHE_BYTES`].
#[derive(Default)]
pub struct ThumbnailCache {
    map: HashMap<BlobHash, Arc<Vec<u8>>>,
    order: VecDeque<BlobHash>,
    bytes: usize,
}

impl ThumbnailCache {
    fn get(&self, hash: &BlobHash) -> Option<Arc<Vec<u8>>> {
        self.map.get(hash).cloned()
    }

    fn put(&mut self, hash: BlobHash, jpeg: Arc<Vec<u8>>) {
        if self.map.contains_key(&hash) {
            return;
        }
        self.bytes += jpeg.len();
        self.map.insert(hash, jpeg);
        self.order.push_back(hash);
        while self.bytes > THUMBNAIL_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(j) = self.map.remove(&old) {
                self.bytes -= j.len();
            }
        }
    }
}

/// The series of a study held here, in series number order, each with its
/// description, image count and thumbnail URL (empty when not held). A
/// series of a regional prior whose fetch has not brought all of it is
/// left out, as QIDO-RS leaves it out: part of a series is never shown as
/// if it were all (`crate::peer::incomplete_series`).
pub(super) async fn series_of(
    index: &Index,
    region: Option<&crate::publish::Region>,
    uid: &str,
) -> Result<Vec<Value>, sqlx::Error> {
    let hidden = region
        .map(|r| crate::peer::incomplete_series(r, uid))
        .unwrap_or_default();
    let rows = sqlx::query(
        "SELECT se.series_instance_uid, se.modality, se.series_number, se.series_description, \
         se.number_of_series_related_instances FROM series se \
         JOIN study st ON st.study_key = se.study_key \
         WHERE st.study_instance_uid = $1 AND se.number_of_series_related_instances > 0 \
         ORDER BY se.series_number, se.series_instance_uid",
    )
    .bind(uid)
    .fetch_all(index.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let series: String = r.try_get(0)?;
        if hidden.contains(&series) {
            continue;
        }
        out.push(json!({
            "uid": series,
            "modality": r.try_get::<String, _>(1)?,
            "number": r.try_get::<Option<i64>, _>(2)?,
            "description": r.try_get::<String, _>(3)?,
            "count": r.try_get::<i64, _>(4)?,
            "thumbnail": format!("/ui/studies/{uid}/series/{series}/thumbnail"),
        }));
    }
    Ok(out)
}

/// The patient key a study of this hospital's is published under (`None`
/// inside when its patient has no cross-enterprise identifier); `None`
/// for a study this node does not publish (a regional prior's copy).
async fn held_patient_key(index: &Index, uid: &str) -> Result<Option<Option<String>>, sqlx::Error> {
    sqlx::query("SELECT patient_key FROM study_publication WHERE study_instance_uid = $1")
        .bind(uid)
        .fetch_optional(index.pool())
        .await?
        .map(|r| r.try_get::<Option<String>, _>(0))
        .transpose()
}

async fn thumbnail(
    State(state): State<Arc<PageState>>,
    page: Page,
    Path((study, series)): Path<(String, String)>,
) -> Answer {
    // Patient images: for a signed-in doctor only (no redirect: an <img>).
    if page.session.is_none() {
        return Err(StatusCode::UNAUTHORIZED.into_response());
    }
    if Uid::parse(&study).is_err() || Uid::parse(&series).is_err() {
        return Err(StatusCode::NOT_FOUND.into_response());
    }
    let cache = &state.thumbnails;
    let drawn = crate::http::dicomweb::render::series_thumbnail(
        &state.ingest,
        &study,
        &series,
        THUMBNAIL_PX,
        |hash| cache.lock().expect("thumbnail cache").get(hash),
    )
    .await;
    match drawn {
        Ok((hash, jpeg)) => {
            cache
                .lock()
                .expect("thumbnail cache")
                .put(hash, jpeg.clone());
            Ok((
                [(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))],
                jpeg.as_ref().clone(),
            )
                .into_response())
        }
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::error!(error = %e, study, series, "page: thumbnail failed");
            }
            Err(status.into_response())
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OpenQuery {
    /// Start the fetch again after a failure.
    retry: Option<String>,
}

async fn open_images(
    State(state): State<Arc<PageState>>,
    page: Page,
    Path(raw): Path<String>,
    Query(query): Query<OpenQuery>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let session = page.user()?.clone();
    let Ok(uid) = Uid::parse(&raw) else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    let uid = uid.as_str().to_string();
    let progress = crate::peer::progress(region, &uid);
    let running = progress
        .as_ref()
        .is_some_and(|p| p.state == FetchState::Running);
    let failed = progress
        .as_ref()
        .is_some_and(|p| p.state == FetchState::Failed);
    let held = match state.index.study(&uid).await {
        Ok(s) => s.is_some(),
        Err(e) => return Err(state.unavailable(&page, "images", &e).await),
    };
    // The audit names the study's patient: for a study held here, the key
    // it is published under (none when its patient has no cross-enterprise
    // identifier), never the patient the session happens to look at; a
    // regional prior is reached from that patient's timeline.
    let session_key = || session.patient.as_ref().and_then(|p| p.patient_key.clone());
    let patient_key = if held {
        match held_patient_key(&state.index, &uid).await {
            Ok(Some(key)) => key,
            // A copy of a regional prior is not published here: reached,
            // as a prior not yet fetched, from its patient's timeline.
            Ok(None) => session_key(),
            Err(e) => return Err(state.unavailable(&page, "images", &e).await),
        }
    } else {
        session_key()
    };
    // From here on, this session may read the study (what is here of it)
    // in the viewer: recorded before the viewer is opened or the fetch
    // started, for a study held here or known to be held elsewhere.
    let open_study = || async {
        match super::auth::open_study(&state.index, &session.session_hash, &uid).await {
            Ok(()) => Ok(()),
            Err(e) => Err(state.unavailable(&page, "images", &e).await),
        }
    };
    if held && !running && !failed {
        open_study().await?;
        state
            .audit(
                &page,
                "open_images",
                patient_key.as_deref(),
                &format!("study={uid}"),
            )
            .await?;
        return Ok(Redirect::to(&crate::http::viewer::study_url(&uid)).into_response());
    }
    let hospital_id = match progress.as_ref().map(|p| p.hospital_id.clone()) {
        Some(h) => Some(h),
        None => match crate::peer::regional_holder(&state.ingest, &uid).await {
            Ok(h) => h,
            Err(e) => return Err(state.unavailable(&page, "images", &e).await),
        },
    };
    let Some(hospital_id) = hospital_id else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    open_study().await?;
    let start = !running && (!failed || query.retry.is_some());
    if start {
        state
            .audit(
                &page,
                "fetch_images",
                patient_key.as_deref(),
                &format!("study={uid} hospital={hospital_id}"),
            )
            .await?;
        crate::peer::start(
            region.clone(),
            state.ingest.clone(),
            hospital_id.clone(),
            uid.clone(),
            session.user_id.clone(),
            format!("page: images opened by {}", session.user_id),
        );
        // The manifest is usually in within a fraction of a second: the
        // next look then shows the viewer at once rather than after the
        // progress page's first refresh. It waits for that a little, no
        // longer (a slow registry or peer gets the progress page).
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline
            && crate::peer::live(region, &uid).is_none()
            && crate::peer::progress(region, &uid).is_some_and(|p| p.state == FetchState::Running)
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Some(live) = crate::peer::live(region, &uid) {
            live.prefetch_metadata();
        }
        // The next look shows the fetch running (without `retry`).
        return Ok(Redirect::to(&images_link(&uid)).into_response());
    }
    // Here a fetch is running or has failed: its progress is known.
    let Some(progress) = crate::peer::progress(region, &uid) else {
        return Ok(Redirect::to(&images_link(&uid)).into_response());
    };
    // Past the manifest: the viewer reads the study as it arrives, under
    // the fetch's progress; the series' metadata it will ask for first is
    // asked of the holding node now, while the viewer starts.
    if let Some(live) = crate::peer::live(region, &uid) {
        live.prefetch_metadata();
        let mut response = state
            .render(
                &page,
                StatusCode::OK,
                "images_live.html",
                json!({
                    "uid": uid,
                    "viewer_url": crate::http::viewer::study_url(&uid),
                    "progress_url": format!("{}/progress", images_link(&uid)),
                }),
            )
            .await;
        own_policy(
            &mut response,
            "default-src 'none'; style-src 'unsafe-inline'; frame-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            false,
        );
        return Ok(response);
    }
    let hospital = hospital_name(region, &hospital_id).await;
    let complete = progress.complete_series();
    let series: Vec<Value> = match series_of(&state.index, Some(region.as_ref()), &uid).await {
        Ok(s) => s
            .into_iter()
            .filter(|s| {
                s["uid"]
                    .as_str()
                    .is_some_and(|u| complete.iter().any(|c| c == u))
            })
            .collect(),
        Err(e) => return Err(state.unavailable(&page, "images", &e).await),
    };
    let (status, refresh) = match progress.state {
        FetchState::Running => (StatusCode::OK, true),
        // Done between two looks: on to the viewer.
        FetchState::Done => {
            return Ok(Redirect::to(&crate::http::viewer::study_url(&uid)).into_response());
        }
        FetchState::Failed => {
            let kind = progress.failure.as_ref().map(|f| f.kind);
            if kind == Some(FailureKind::NoConsent) && !held {
                // Refused: the session's permission to read the study,
                // recorded before the fetch began, is taken back.
                if let Err(e) =
                    super::auth::close_study(&state.index, &session.session_hash, &uid).await
                {
                    return Err(state.unavailable(&page, "images", &e).await);
                }
            }
            let status = match kind {
                Some(FailureKind::NoConsent) => StatusCode::FORBIDDEN,
                Some(FailureKind::Local) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_GATEWAY,
            };
            (status, false)
        }
    };
    let failure = progress.failure.as_ref().map(|f| {
        json!({
            "kind": serde_json::to_value(f.kind).unwrap_or(Value::Null),
            "detail": f.detail,
        })
    });
    let mut response = state
        .render(
            &page,
            status,
            "images.html",
            json!({
                "uid": uid,
                "holding": hospital,
                "progress": progress,
                "failure": failure,
                "series": series,
                "refresh": refresh.then_some(REFRESH_SECS),
                "viewer_url": crate::http::viewer::study_url(&uid),
                "retry_url": format!("{}?retry=1", images_link(&uid)),
            }),
        )
        .await;
    if refresh {
        // Also as a header: the same reload for a client that reads no
        // HTML head.
        if let Ok(v) = HeaderValue::from_str(&REFRESH_SECS.to_string()) {
            response.headers_mut().insert("refresh", v);
        }
    }
    Ok(response)
}

/// The strip above the viewer while a prior arrives: the fetch's
/// progress, reloading itself every second until it ends (then its
/// outcome). Framed by the images page only (same origin).
async fn progress_strip(
    State(state): State<Arc<PageState>>,
    page: Page,
    Path(raw): Path<String>,
) -> Answer {
    let region = state.need_region(&page).await?;
    page.user()?;
    let Ok(uid) = Uid::parse(&raw) else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    let uid = uid.as_str().to_string();
    let Some(progress) = crate::peer::progress(region, &uid) else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    let holding = hospital_name(region, &progress.hospital_id).await;
    let running = progress.state == FetchState::Running;
    let failure = progress.failure.as_ref().map(|f| {
        json!({
            "kind": serde_json::to_value(f.kind).unwrap_or(Value::Null),
            "detail": f.detail,
        })
    });
    let mut response = state
        .render(
            &page,
            StatusCode::OK,
            "images_progress.html",
            json!({
                "uid": uid,
                "holding": holding,
                "progress": progress,
                "failure": failure,
                "refresh": running.then_some(REFRESH_SECS),
                "retry_url": format!("{}?retry=1", images_link(&uid)),
            }),
        )
        .await;
    own_policy(
        &mut response,
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'; \
         base-uri 'none'; form-action 'none'",
        true,
    );
    Ok(response)
}

/// The holding hospital's name from the region's directory (its id when
/// the directory is out of reach).
pub(super) async fn hospital_name(region: &crate::publish::Region, hospital_id: &str) -> String {
    region
        .directory()
        .await
        .and_then(|d| {
            d.hospitals
                .into_iter()
                .find(|h| h.hospital_id == hospital_id)
        })
        .map_or_else(|| hospital_id.to_string(), |h| h.name)
}

/// A page's own Content-Security-Policy, which `security_headers` keeps;
/// `framed_here`: framed by a page of this node (same origin only).
fn own_policy(response: &mut Response, csp: &'static str, framed_here: bool) {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    if framed_here {
        h.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thumbnail_cache_stays_within_its_bound() {
        let hash = |n: u8| BlobHash::from_hash(blake3::hash(&[n]));
        let mut cache = ThumbnailCache::default();
        let jpeg = Arc::new(vec![0u8; THUMBNAIL_CACHE_BYTES / 4]);
        for n in 0..6 {
            cache.put(hash(n), jpeg.clone());
        }
        assert!(cache.bytes <= THUMBNAIL_CACHE_BYTES);
        // The oldest went first; the newest four stay.
        assert!(cache.get(&hash(0)).is_none() && cache.get(&hash(1)).is_none());
        assert!((2..6).all(|n| cache.get(&hash(n)).is_some()));
        // The same blob twice is kept once.
        cache.put(hash(5), jpeg.clone());
        assert_eq!(cache.order.len(), 4);
    }
}
