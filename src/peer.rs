//! Peer retrieval: this node fetches a prior study held at another
//! hospital's node, verified byte for byte, and serves it like a local one.
//!
//! 1. The registry issues a short-lived grant (consent or break-the-glass
//!    checked and audited there, linked to the check that led to it) and the
//!    study's published content root.
//! 2. The holding node serves the study manifest and the instances (WADO-RS
//!    with `transfer-syntax=*`: the stored bytes) to a request carrying the
//!    grant, after confirming it with the registry.
//! 3. This node checks that the manifest hashes to the published content
//!    root, fetches only the instances it does not hold with the same hash,
//!    and ingests each through the one ingest path with the expected hash:
//!    a mismatch stores nothing. The study is kept as a cached copy (never
//!    published as this hospital's), evicted least recently used past the
//!    budget.

use std::sync::Arc;

use serde::Serialize;
use sqlx::Row;

use crate::contract::*;
use crate::ingest::{self, Ingest};
use crate::publish::{self, Region};
use crate::registry::client;
use crate::types::{BlobHash, Uid};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hospital {0} has no DICOMweb base URL in the directory")]
    NoPeer(String),
    /// The registry refused the grant (no consent, no such record).
    #[error("registry refused access: {0}")]
    Refused(String),
    /// The peer's answers do not match what it published: nothing
    /// unverified was kept.
    #[error("integrity: {0}")]
    Integrity(String),
    #[error("peer: {0}")]
    Peer(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("index: {0}")]
    Index(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Index(e.to_string())
    }
}

impl From<client::Error> for Error {
    fn from(e: client::Error) -> Self {
        match e {
            client::Error::Status { status, detail } if status == 403 || status == 404 => {
                Error::Refused(detail)
            }
            other => Error::Registry(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub study_instance_uid: String,
    pub hospital_id: String,
    pub instances: usize,
    /// Instances this fetch transferred.
    pub fetched: usize,
    /// Instances already held with the same hash: not transferred.
    pub already_present: usize,
    pub bytes_fetched: u64,
    pub grant_id: String,
    /// Caches evicted to stay within the budget.
    pub evicted: Vec<String>,
}

fn now() -> String {
    crate::common::now_rfc3339()
}

/// Where a fetch of a study stands, for the doctor's page (issue 19): it
/// polls while the images arrive, and says why when they cannot.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub hospital_id: String,
    pub state: FetchState,
    /// Known once the manifest is in.
    pub series_total: usize,
    /// Series whose every instance is here and verified.
    pub series_done: usize,
    pub instances_total: usize,
    pub instances_done: usize,
    pub failure: Option<Failure>,
    /// Series in fetch order, each with its instances and how many are
    /// here: the page shows each series as it completes.
    #[serde(skip)]
    series: Vec<(String, usize, usize)>,
    /// While the fetch runs, past the manifest: what the viewer reads the
    /// study through before it is all here ([`Live`]).
    #[serde(skip)]
    live: Option<Arc<Live>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FetchState {
    Running,
    Done,
    Failed,
}

/// Why images cannot be opened, in the words the page uses.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The holding hospital's node has no address in the directory, or does
    /// not answer, or answers with an error.
    PeerDown,
    /// The registry refused the grant: no consent of the patient for this
    /// hospital (or no such record).
    NoConsent,
    /// What the peer sent does not match what it published: nothing
    /// unverified was kept.
    Integrity,
    /// The registry could not be asked.
    Registry,
    /// This node's own index failed.
    Local,
}

impl Error {
    pub fn failure(&self) -> Failure {
        let kind = match self {
            Error::NoPeer(_) | Error::Peer(_) => FailureKind::PeerDown,
            Error::Refused(_) => FailureKind::NoConsent,
            Error::Integrity(_) => FailureKind::Integrity,
            Error::Registry(_) => FailureKind::Registry,
            Error::Index(_) => FailureKind::Local,
        };
        Failure {
            kind,
            detail: self.to_string(),
        }
    }
}

/// The fetches of this process, by node (its hospital ID) and Study
/// Instance UID ([`progress_key`]): progress is kept in memory (a fetch
/// runs in one process; a node restarted mid-fetch resumes with what is
/// missing when the study is opened again). The hospital is part of the
/// key because one process may run several nodes (the test suite does),
/// and B serving a study must not see A's fetch of it.
fn fetches() -> &'static std::sync::Mutex<std::collections::HashMap<String, Progress>> {
    static FETCHES: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Progress>>,
    > = std::sync::OnceLock::new();
    FETCHES.get_or_init(Default::default)
}

fn progress_key(region: &Region, study_instance_uid: &str) -> String {
    format!("{} {study_instance_uid}", region.config().hospital_id)
}

fn update(key: &str, f: impl FnOnce(&mut Progress)) {
    if let Some(p) = fetches().lock().expect("fetches lock").get_mut(key) {
        f(p);
    }
}

fn progress_by_key(key: &str) -> Option<Progress> {
    fetches().lock().expect("fetches lock").get(key).cloned()
}

/// The progress of this node's latest fetch of a study.
pub fn progress(region: &Region, study_instance_uid: &str) -> Option<Progress> {
    progress_by_key(&progress_key(region, study_instance_uid))
}

/// The series of a study this process is fetching, or failed to fetch,
/// that are not complete: DICOMweb leaves them out (a series becomes
/// visible once complete and verified, issue 19), so that a viewer opened
/// on what has arrived never shows part of a series as if it were all.
/// Empty once the fetch is done, and for a study not being fetched.
pub fn incomplete_series(region: &Region, study_instance_uid: &str) -> Vec<String> {
    incomplete_by_key(&progress_key(region, study_instance_uid))
}

fn incomplete_by_key(key: &str) -> Vec<String> {
    match progress_by_key(key) {
        Some(p) if p.state != FetchState::Done => p
            .series
            .into_iter()
            .filter(|(_, total, done)| done < total)
            .map(|(uid, _, _)| uid)
            .collect(),
        _ => Vec::new(),
    }
}

/// Records a fetch's progress as given: tests/viewer.rs catches a fetch
/// in the middle of a series with it, which a loopback fetch is too fast
/// to be caught in. Each series is (Series Instance UID, instances,
/// instances here).
#[doc(hidden)]
pub fn record_progress_for_tests(
    node_hospital_id: &str,
    study_instance_uid: &str,
    holding_hospital_id: &str,
    state: FetchState,
    series: &[(&str, usize, usize)],
) {
    let mut p = Progress::starting(holding_hospital_id);
    p.state = state;
    p.series = series
        .iter()
        .map(|(s, t, d)| (s.to_string(), *t, *d))
        .collect();
    p.series_total = p.series.len();
    p.series_done = p.series.iter().filter(|(_, t, d)| d >= t).count();
    p.instances_total = p.series.iter().map(|(_, t, _)| t).sum();
    p.instances_done = p.series.iter().map(|(_, _, d)| d).sum();
    fetches()
        .lock()
        .expect("fetches lock")
        .insert(format!("{node_hospital_id} {study_instance_uid}"), p);
}

impl Progress {
    fn starting(hospital_id: &str) -> Progress {
        Progress {
            hospital_id: hospital_id.to_string(),
            state: FetchState::Running,
            series_total: 0,
            series_done: 0,
            instances_total: 0,
            instances_done: 0,
            failure: None,
            series: Vec::new(),
            live: None,
        }
    }

    /// The Series Instance UIDs complete so far, in fetch order.
    pub fn complete_series(&self) -> Vec<String> {
        self.series
            .iter()
            .filter(|(_, total, done)| done >= total)
            .map(|(uid, _, _)| uid.clone())
            .collect()
    }

    fn instance_done(&mut self, series_instance_uid: &str) {
        self.instances_done += 1;
        if let Some(s) = self
            .series
            .iter_mut()
            .find(|(uid, _, _)| uid == series_instance_uid)
        {
            s.2 += 1;
            if s.2 == s.1 {
                self.series_done += 1;
            }
        }
    }
}

/// An instance of a running fetch is here and verified: counted once (one
/// the viewer asked for is fetched ahead of the series stream, which then
/// skips it), and whoever waits for it is woken.
fn instance_arrived(key: &str, series_instance_uid: &str, sop_instance_uid: &str) {
    update(key, |p| {
        if p.live
            .as_ref()
            .is_none_or(|l| l.mark_arrived(sop_instance_uid))
        {
            p.instance_done(series_instance_uid);
        }
    });
}

/// The fetch of a study the viewer may read through while it runs (issue
/// 19): the viewer opens as soon as the manifest is verified; its searches
/// and metadata requests are answered by the holding node under the grant
/// (URLs rewritten to this node's, [`Live::ask_peer`]), and each image it
/// asks for is served from here once that instance has arrived and been
/// verified, fetched on its own ahead of the series stream when the stream
/// has not brought it yet ([`Live::wait_for`]). No pixel is served that was
/// not verified against the published content root.
pub struct Live {
    key: String,
    study_instance_uid: String,
    pub holding: String,
    base: String,
    token: String,
    http: reqwest::Client,
    ingest: Ingest,
    pace: Arc<crate::common::Pace>,
    /// The verified manifest: SOP Instance UID → (entry, expected hash).
    instances: std::collections::HashMap<String, (ManifestInstance, BlobHash)>,
    state: std::sync::Mutex<LiveState>,
    changed: tokio::sync::Notify,
    /// Instances fetched on their own at once (the viewer's asks).
    asks: tokio::sync::Semaphore,
    /// The viewer has asked for an instance the stream had not brought: the
    /// series stream then stops at its next part and the rest comes one
    /// instance at a time, so that nothing crosses the link twice.
    asked_ahead: std::sync::atomic::AtomicBool,
    /// The holding node's answers to the viewer's searches and metadata
    /// requests, by path and query: asked once per fetch. Each request has
    /// its own cell, so that different requests go to the holding node at
    /// once and the same one is asked once.
    answers:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::OnceCell<PeerAnswer>>>>,
    /// The study's series in manifest order.
    series_order: Vec<String>,
    /// The series' metadata has been asked for ahead ([`Live::prefetch_metadata`]).
    prefetching: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("study_instance_uid", &self.study_instance_uid)
            .field("holding", &self.holding)
            .field("instances", &self.instances.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct LiveState {
    arrived: std::collections::HashSet<String>,
    asked: std::collections::HashSet<String>,
    /// Instances the series stream brought that an ask had brought first.
    twice: usize,
    ended: bool,
}

/// What the holding node answered a search or metadata request with.
#[derive(Debug, Clone)]
pub struct PeerAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: bytes::Bytes,
}

/// Why an answer of the holding node is not kept ([`Live::ask_peer`]).
enum HoldingAnswer {
    NotKept(PeerAnswer),
    Failed(Error),
}

/// What the viewer's metadata requests accept (DICOMweb's JSON), and so
/// what a metadata request asked ahead asks.
const METADATA_ACCEPT: &str = "application/dicom+json";

/// How long a viewer's request waits for an instance still on its way.
const WAIT_FOR_INSTANCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Instances fetched on their own, ahead of the stream, at once.
const ASKS_AT_ONCE: usize = 2;

impl Live {
    /// Records an arrival; false when it was recorded already.
    fn mark_arrived(&self, sop_instance_uid: &str) -> bool {
        let new = self
            .state
            .lock()
            .expect("live lock")
            .arrived
            .insert(sop_instance_uid.to_string());
        self.changed.notify_waiters();
        new
    }

    fn is_here(&self, sop_instance_uid: &str) -> bool {
        self.state
            .lock()
            .expect("live lock")
            .arrived
            .contains(sop_instance_uid)
    }

    fn end(&self) {
        self.state.lock().expect("live lock").ended = true;
        self.changed.notify_waiters();
    }

    /// Whether the manifest lists this instance.
    pub fn lists(&self, sop_instance_uid: &str) -> bool {
        self.instances.contains_key(sop_instance_uid)
    }

    /// The instances of a series (of the study, when `None`) by the manifest.
    pub fn instances_of(&self, series_instance_uid: Option<&str>) -> Vec<String> {
        self.instances
            .values()
            .filter(|(i, _)| series_instance_uid.is_none_or(|s| s == i.series_instance_uid))
            .map(|(i, _)| i.sop_instance_uid.clone())
            .collect()
    }

    /// Waits until these instances are here and verified; one instance the
    /// stream has not brought yet is fetched on its own first (`ask`).
    /// False when the fetch ended (or the wait timed out) without them:
    /// the caller answers from what is here.
    pub async fn wait_for(self: &Arc<Self>, sop_instance_uids: &[String], ask: bool) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_INSTANCE;
        if ask && let [one] = sop_instance_uids {
            self.ask(one);
        }
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.state.lock().expect("live lock");
                if sop_instance_uids.iter().all(|s| state.arrived.contains(s)) {
                    return true;
                }
                if state.ended {
                    return false;
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Fetches one instance on its own, ahead of the series stream, unless
    /// it is here or asked for already; [`ASKS_AT_ONCE`] at a time, and an
    /// ask whose instance the stream brought meanwhile is dropped.
    fn ask(self: &Arc<Self>, sop_instance_uid: &str) {
        let Some((instance, hash)) = self.instances.get(sop_instance_uid).cloned() else {
            return;
        };
        {
            let mut state = self.state.lock().expect("live lock");
            if state.arrived.contains(sop_instance_uid) || state.ended {
                return;
            }
            if !state.asked.insert(sop_instance_uid.to_string()) {
                return;
            }
        }
        self.asked_ahead
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let live = self.clone();
        tokio::spawn(async move {
            let asked = std::time::Instant::now();
            let permit = live.asks.acquire().await;
            let waited = asked.elapsed();
            if permit.is_ok() && !live.is_here(&instance.sop_instance_uid) {
                // The doctor waits for this one: the rest of the fetch
                // holds back on the link until it is here.
                let _urgent = live.pace.urgent();
                let url = format!(
                    "{}/studies/{}/series/{}/instances/{}",
                    live.base.trim_end_matches('/'),
                    live.study_instance_uid,
                    instance.series_instance_uid,
                    instance.sop_instance_uid
                );
                match fetch_instance(
                    &live.http,
                    &live.ingest,
                    &live.pace,
                    &url,
                    &live.token,
                    &instance,
                    hash,
                    &live.holding,
                    true,
                )
                .await
                {
                    Ok(_) => {
                        // Where a viewer's wait for an image goes (docs/viewer.md).
                        tracing::debug!(
                            sop_instance_uid = %instance.sop_instance_uid,
                            waited_ms = waited.as_millis() as u64,
                            fetched_ms = (asked.elapsed() - waited).as_millis() as u64,
                            "instance fetched ahead of the stream"
                        );
                        instance_arrived(
                            &live.key,
                            &instance.series_instance_uid,
                            &instance.sop_instance_uid,
                        )
                    }
                    // The stream (or the one-by-one pass after it) still
                    // brings it; the waiter waits for that.
                    Err(e) => {
                        tracing::warn!(error = %e, sop_instance_uid = %instance.sop_instance_uid, "an instance the viewer asked for could not be fetched ahead")
                    }
                }
            }
            live.state
                .lock()
                .expect("live lock")
                .asked
                .remove(&instance.sop_instance_uid);
            live.changed.notify_waiters();
        });
    }

    /// Asks the holding node for each series' metadata now, in manifest
    /// order, one series at a time, so that the viewer about to open finds
    /// the answer here: the holding node reads every instance's header to
    /// make it (about 0.3 s for 500 CT instances), which would otherwise
    /// come between the viewer's start and its first image. Once per
    /// fetch; a failure is not kept (the viewer's own request asks again).
    pub fn prefetch_metadata(self: &Arc<Self>) {
        if self
            .prefetching
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let live = self.clone();
        tokio::spawn(async move {
            for series in &live.series_order {
                let path = format!(
                    "/studies/{}/series/{series}/metadata",
                    live.study_instance_uid
                );
                if let Err(e) = live.answer(&path, METADATA_ACCEPT).await {
                    let e = match e {
                        HoldingAnswer::NotKept(a) => format!("status {}", a.status),
                        HoldingAnswer::Failed(e) => e.to_string(),
                    };
                    tracing::debug!(series, error = %e, "metadata asked ahead not kept");
                }
            }
        });
    }

    /// The holding node's answer to `path_and_query`, asked once per fetch
    /// and kept when it is a success.
    async fn answer(
        &self,
        path_and_query: &str,
        accept: &str,
    ) -> Result<PeerAnswer, HoldingAnswer> {
        let cell = self
            .answers
            .lock()
            .expect("answers lock")
            .entry(path_and_query.to_string())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let answer = self.ask_holding(path_and_query, accept).await?;
            if (200..300).contains(&answer.status) {
                Ok(answer)
            } else {
                Err(HoldingAnswer::NotKept(answer))
            }
        })
        .await
        .cloned()
    }

    /// The holding node's answer to a search or metadata request of this
    /// study (`path_and_query` below its DICOMweb base), under the grant;
    /// asked once per fetch. JSON answers have their URLs (RetrieveURL,
    /// BulkDataURI) rewritten to `local_base`, this node's DICOMweb base:
    /// the viewer's retrieves come here, where each instance is served
    /// once it has arrived and been verified.
    pub async fn ask_peer(
        &self,
        path_and_query: &str,
        accept: &str,
        local_base: &str,
    ) -> Result<PeerAnswer, Error> {
        // Only a success is kept; an error answer is passed on and asked
        // again next time.
        match self.answer(path_and_query, accept).await {
            Ok(a) => Ok(rebase_answer(&a, local_base)),
            Err(HoldingAnswer::NotKept(a)) => Ok(rebase_answer(&a, local_base)),
            Err(HoldingAnswer::Failed(e)) => Err(e),
        }
    }

    async fn ask_holding(
        &self,
        path_and_query: &str,
        accept: &str,
    ) -> Result<PeerAnswer, HoldingAnswer> {
        let url = format!("{}{path_and_query}", self.base.trim_end_matches('/'));
        let failed = |e: reqwest::Error| HoldingAnswer::Failed(Error::Peer(e.to_string()));
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .map_err(failed)?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(failed)?;
        Ok(PeerAnswer {
            status,
            content_type,
            body,
        })
    }
}

/// A JSON answer of the holding node with every URL it names (RetrieveURL
/// 0008,1190 and BulkDataURI) moved to `local_base`: the part from
/// `/studies/` on is kept. Other answers are passed as they are.
fn rebase_answer(answer: &PeerAnswer, local_base: &str) -> PeerAnswer {
    fn rebase(url: &str, local_base: &str) -> Option<String> {
        url.find("/studies/")
            .map(|i| format!("{}{}", local_base.trim_end_matches('/'), &url[i..]))
    }
    fn walk(v: &mut serde_json::Value, local_base: &str) {
        match v {
            serde_json::Value::Array(items) => items.iter_mut().for_each(|i| walk(i, local_base)),
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    match (k.as_str(), &mut *v) {
                        ("BulkDataURI", serde_json::Value::String(s)) => {
                            if let Some(r) = rebase(s, local_base) {
                                *s = r;
                            }
                        }
                        ("00081190", serde_json::Value::Object(attr)) => {
                            if let Some(serde_json::Value::Array(urls)) = attr.get_mut("Value") {
                                for u in urls.iter_mut() {
                                    if let serde_json::Value::String(s) = u
                                        && let Some(r) = rebase(s, local_base)
                                    {
                                        *s = r;
                                    }
                                }
                            }
                        }
                        _ => walk(v, local_base),
                    }
                }
            }
            _ => {}
        }
    }
    let is_json = answer
        .content_type
        .as_deref()
        .is_some_and(|c| c.contains("json"));
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .map_err(|_| ())
        .and_then(|j| if is_json { Ok(j) } else { Err(()) })
    else {
        return answer.clone();
    };
    walk(&mut json, local_base);
    PeerAnswer {
        status: answer.status,
        content_type: answer.content_type.clone(),
        body: serde_json::to_vec(&json).unwrap_or_default().into(),
    }
}

/// The fetch of a study running at this node, once its manifest is
/// verified: the viewer reads the study through it ([`Live`]).
pub fn live(region: &Region, study_instance_uid: &str) -> Option<Arc<Live>> {
    match progress(region, study_instance_uid) {
        Some(p) if p.state == FetchState::Running => p.live,
        _ => None,
    }
}

/// Starts fetching a study in the background unless a fetch of it is
/// already running here; the page follows it with [`progress`]. Returns
/// whether this call started one.
pub fn start(
    region: Arc<Region>,
    ingest: Ingest,
    holding: String,
    study_instance_uid: String,
    user_id: String,
    reference: String,
) -> bool {
    {
        let key = progress_key(&region, &study_instance_uid);
        let mut map = fetches().lock().expect("fetches lock");
        if map
            .get(&key)
            .is_some_and(|p| p.state == FetchState::Running)
        {
            return false;
        }
        map.insert(key, Progress::starting(&holding));
    }
    tokio::spawn(async move {
        match fetch_study(
            &region,
            &ingest,
            &holding,
            &study_instance_uid,
            Asked::treatment(&user_id, reference),
        )
        .await
        {
            Ok(r) => tracing::info!(study_instance_uid, fetched = r.fetched, "fetched a prior"),
            Err(e) => tracing::warn!(study_instance_uid, error = %e, "fetch of a prior failed"),
        }
    });
    true
}

/// The node part of a DICOMweb base URL (`…/dicom-web` → `…`), where the
/// JSON API lives.
fn api_base(dicomweb_base_url: &str) -> String {
    let base = dicomweb_base_url.trim_end_matches('/');
    base.strip_suffix("/dicom-web").unwrap_or(base).to_string()
}

/// A grant a peer presents, confirmed by the registry; the first
/// confirmation is recorded in the peer audit. A confirmation is cached
/// for a minute at most (not until the grant expires): the registry
/// refuses a grant whose patient revoked consent since it was issued, and
/// the cache must not outlive that by the grant's 15 minutes.
pub async fn verify_grant(region: &Region, token: &str) -> Option<GrantConfirmed> {
    use sha2::Digest;
    let key = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let now = now();
    if let Some(g) = region
        .grant_cache()
        .lock()
        .expect("grants lock")
        .get(&key)
        .cloned()
        && g.expires_at > now
    {
        return Some(g);
    }
    match region.client().verify_grant(token).await {
        Ok(g) => {
            if region.first_serving(&g, &now) {
                audit_served(region, &g).await;
            }
            region.grant_cache().lock().expect("grants lock").insert(
                key,
                GrantConfirmed {
                    expires_at: (g.expires_at.clone()).min(
                        humantime::format_rfc3339_micros(
                            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
                        )
                        .to_string(),
                    ),
                    ..g.clone()
                },
            );
            Some(g)
        }
        Err(error) => {
            tracing::warn!(%error, "a peer's grant was not confirmed");
            None
        }
    }
}

/// Who asks for a peer fetch and why: what the grant request carries to
/// the registry (and its audit).
pub struct Asked<'a> {
    pub purpose: Purpose,
    /// Required with purpose `emergency`.
    pub encounter: Option<Encounter>,
    pub user_id: &'a str,
    /// The check or query that led here.
    pub reference: Option<String>,
}

impl<'a> Asked<'a> {
    /// A fetch for the care of the patient, by `user_id`.
    pub fn treatment(user_id: &'a str, reference: String) -> Asked<'a> {
        Asked {
            purpose: Purpose::Treatment,
            encounter: None,
            user_id,
            reference: Some(reference),
        }
    }
}

/// Fetches a study held at `holding` (missing instances only), verified
/// against the content root the registry published, a series at a time
/// (each series is complete before the next starts, so the viewer has
/// whole series to show while the rest arrives). `reference` is the check
/// or query that led here (the registry's audit links them). Its progress
/// is kept for [`progress`], whoever started it (the page, WADO-RS, C-MOVE).
///
/// A fetch that fails for want of the images (peer down or without a node
/// URL, bytes that do not verify) is remembered, and this node's check
/// stops warning on that prior until a fetch succeeds (`unretrievable`).
pub async fn fetch_study(
    region: &Arc<Region>,
    ingest: &Ingest,
    holding: &str,
    study_instance_uid: &str,
    asked: Asked<'_>,
) -> Result<FetchReport, Error> {
    let key = progress_key(region, study_instance_uid);
    fetches()
        .lock()
        .expect("fetches lock")
        .insert(key.clone(), Progress::starting(holding));
    let result = fetch_series_by_series(region, ingest, holding, study_instance_uid, asked).await;
    update(&key, |p| {
        match &result {
            Ok(_) => p.state = FetchState::Done,
            Err(e) => {
                p.state = FetchState::Failed;
                p.failure = Some(e.failure());
            }
        }
        // Whoever waits for an instance answers from what is here now.
        if let Some(live) = &p.live {
            live.end();
        }
    });
    let remembered = match &result {
        Ok(_) => forget_failure(region, holding, study_instance_uid).await,
        Err(e @ (Error::NoPeer(_) | Error::Peer(_) | Error::Integrity(_))) => {
            remember_failure(region, holding, study_instance_uid, &e.to_string()).await
        }
        // Refused (no consent, no record), the registry or the index
        // failing: nothing is known of the images.
        Err(_) => Ok(()),
    };
    if let Err(e) = remembered {
        tracing::warn!(error = %e, holding, study_instance_uid, "the outcome of a peer fetch was not remembered");
    }
    result
}

/// How long a failed fetch keeps the check from warning when no fetch of
/// the study is tried again: a peer down for a day is a peer to ask again.
pub const FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

async fn remember_failure(
    region: &Region,
    holding: &str,
    study_instance_uid: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    // The reason is ours (error text), bounded for the page.
    let reason: String = reason.chars().take(300).collect();
    sqlx::query(
        "INSERT INTO peer_fetch_failure (hospital_id, study_instance_uid, reason, failed_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (hospital_id, study_instance_uid) DO UPDATE SET \
         reason = excluded.reason, failed_at = excluded.failed_at",
    )
    .bind(holding)
    .bind(study_instance_uid)
    .bind(reason)
    .bind(crate::common::now_rfc3339())
    .execute(region.index().pool())
    .await?;
    Ok(())
}

async fn forget_failure(
    region: &Region,
    holding: &str,
    study_instance_uid: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM peer_fetch_failure WHERE hospital_id = $1 AND study_instance_uid = $2",
    )
    .bind(holding)
    .bind(study_instance_uid)
    .execute(region.index().pool())
    .await?;
    Ok(())
}

/// The priors this node failed to retrieve within [`FAILURE_MEMORY`]:
/// (holding hospital, study) → why.
pub async fn unretrievable(
    region: &Region,
) -> Result<std::collections::HashMap<(String, String), String>, sqlx::Error> {
    // The same format as `now_rfc3339`, so the strings compare as times.
    let since =
        humantime::format_rfc3339_micros(std::time::SystemTime::now() - FAILURE_MEMORY).to_string();
    let rows = sqlx::query(
        "SELECT hospital_id, study_instance_uid, reason, failed_at FROM peer_fetch_failure",
    )
    .fetch_all(region.index().pool())
    .await?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let failed_at: String = row.try_get(3)?;
        if failed_at.as_str() >= since.as_str() {
            out.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
        }
    }
    Ok(out)
}

async fn fetch_series_by_series(
    region: &Arc<Region>,
    ingest: &Ingest,
    holding: &str,
    study_instance_uid: &str,
    asked: Asked<'_>,
) -> Result<FetchReport, Error> {
    let Asked {
        purpose,
        encounter,
        user_id,
        reference,
    } = asked;
    let metered = crate::metrics::PeerFetch::start();
    let uid = Uid::parse(study_instance_uid)
        .map_err(|_| Error::Peer(format!("{study_instance_uid:?} is not a UID")))?;
    let hospital = region
        .directory()
        .await
        .and_then(|d| d.hospitals.into_iter().find(|h| h.hospital_id == holding));
    // A hospital of another province is not in this region's directory:
    // its registry names its node's URL in the grant (docs/federation.md).
    if hospital
        .as_ref()
        .is_some_and(|h| h.dicomweb_base_url.is_none())
    {
        return Err(Error::NoPeer(holding.to_string()));
    }
    let grant = region
        .client()
        .grant(&GrantRequest {
            holding_hospital_id: holding.to_string(),
            study_instance_uid: uid.as_str().to_string(),
            purpose,
            user_id: user_id.to_string(),
            reference,
            encounter,
        })
        .await?;
    let base = hospital
        .and_then(|h| h.dicomweb_base_url)
        .or_else(|| grant.dicomweb_base_url.clone())
        .ok_or_else(|| Error::NoPeer(holding.to_string()))?;
    let http = region.peer_http();
    let url = format!(
        "{}/api/v1/studies/{}/manifest",
        api_base(&base),
        uid.as_str()
    );
    // A fetch that fails before its first instance is audited as any
    // failed fetch: the grant was issued in the doctor's name.
    let hashes = match fetch_manifest(&http, &url, &grant.token).await {
        Ok(manifest) => manifest
            .instances
            .iter()
            .map(|i| {
                BlobHash::parse(&i.blob_hash)
                    .map(|h| (i.sop_instance_uid.clone(), h))
                    .map_err(|_| Error::Integrity(format!("manifest hash {:?}", i.blob_hash)))
            })
            .collect::<Result<Vec<_>, Error>>()
            .map(|hashes| (manifest, hashes)),
        Err(e) => Err(e),
    };
    // Every failed fetch is one `fetch_failed` entry, whatever its stage.
    let (study, grant_id) = (uid.as_str(), grant.grant_id.as_str());
    let failed = |detail: String| async move {
        audit(
            region,
            "fetch_failed",
            holding,
            study,
            purpose,
            user_id,
            grant_id,
            &detail,
        )
        .await
    };
    let (manifest, hashes) = match hashes {
        Ok(ok) => ok,
        Err(e) => {
            failed(format!("0 fetched; manifest: {e}")).await;
            return Err(e);
        }
    };
    let root = publish::content_root(hashes.iter().map(|(s, h)| (s.as_str(), h)));
    if root != grant.content_root || manifest.content_root != grant.content_root {
        tracing::error!(
            hospital = holding,
            study_instance_uid = uid.as_str(),
            published = %grant.content_root,
            manifest = %root,
            "INTEGRITY: the peer's manifest does not match the content root it published"
        );
        audit(
            region,
            "integrity_error",
            holding,
            uid.as_str(),
            purpose,
            user_id,
            &grant.grant_id,
            "manifest does not hash to the published content root",
        )
        .await;
        return Err(Error::Integrity(
            "the peer's manifest does not hash to its published content root".into(),
        ));
    }
    // Only what is missing: an instance held with the same hash costs
    // nothing (an interrupted fetch resumes here).
    let mut missing = Vec::new();
    for (i, (_, hash)) in manifest.instances.iter().zip(&hashes) {
        let held = ingest
            .index()
            .instance_versions(&i.sop_instance_uid)
            .await
            .map_err(|e| Error::Index(e.to_string()))?
            .iter()
            .any(|v| v.is_current && v.blob_hash == *hash);
        if !held {
            missing.push((i.clone(), *hash));
        }
    }
    let already_present = manifest.instances.len() - missing.len();
    // Marked as a cached copy before the first instance arrives, so that
    // the stability worker never takes it for this hospital's exam.
    let total_bytes: i64 = manifest.instances.iter().map(|i| i.size).sum();
    let t = now();
    sqlx::query(
        "INSERT INTO cached_study (study_instance_uid, hospital_id, content_root, bytes, \
         fetched_at, last_access) VALUES ($1, $2, $3, $4, $5, $5) \
         ON CONFLICT (study_instance_uid) DO UPDATE SET content_root = excluded.content_root, \
         bytes = excluded.bytes, fetched_at = excluded.fetched_at, last_access = excluded.last_access",
    )
    .bind(uid.as_str())
    .bind(holding)
    .bind(&grant.content_root)
    .bind(total_bytes)
    .bind(&t)
    .execute(ingest.index().pool())
    .await?;

    // The series in manifest order, each with its instances and how many
    // are here already: the page's progress.
    let mut order: Vec<(String, usize, usize)> = Vec::new();
    for i in &manifest.instances {
        let present = !missing
            .iter()
            .any(|(m, _)| m.sop_instance_uid == i.sop_instance_uid);
        match order
            .iter_mut()
            .find(|(s, _, _)| *s == i.series_instance_uid)
        {
            Some(s) => {
                s.1 += 1;
                s.2 += usize::from(present);
            }
            None => order.push((i.series_instance_uid.clone(), 1, usize::from(present))),
        }
    }
    let live = Arc::new(Live {
        key: progress_key(region, uid.as_str()),
        study_instance_uid: uid.as_str().to_string(),
        holding: holding.to_string(),
        base: base.clone(),
        token: grant.token.clone(),
        http: http.clone(),
        ingest: ingest.clone(),
        pace: region.peer_pace(),
        instances: manifest
            .instances
            .iter()
            .zip(&hashes)
            .map(|(i, (_, h))| (i.sop_instance_uid.clone(), (i.clone(), *h)))
            .collect(),
        state: std::sync::Mutex::new(LiveState {
            arrived: manifest
                .instances
                .iter()
                .filter(|i| {
                    !missing
                        .iter()
                        .any(|(m, _)| m.sop_instance_uid == i.sop_instance_uid)
                })
                .map(|i| i.sop_instance_uid.clone())
                .collect(),
            ..LiveState::default()
        }),
        changed: tokio::sync::Notify::new(),
        asks: tokio::sync::Semaphore::new(ASKS_AT_ONCE),
        asked_ahead: std::sync::atomic::AtomicBool::new(false),
        answers: std::sync::Mutex::new(std::collections::HashMap::new()),
        series_order: order.iter().map(|(s, _, _)| s.clone()).collect(),
        prefetching: std::sync::atomic::AtomicBool::new(false),
    });
    update(&progress_key(region, uid.as_str()), |p| {
        p.series_total = order.len();
        p.series_done = order.iter().filter(|(_, t, d)| d >= t).count();
        p.instances_total = manifest.instances.len();
        p.instances_done = already_present;
        p.series = order.clone();
        p.live = Some(live.clone());
    });

    let mut fetched = 0;
    let mut bytes = 0u64;
    let mut failure = None;
    for (series_uid, _, _) in &order {
        let mut series_missing: Vec<(ManifestInstance, BlobHash)> = missing
            .iter()
            .filter(|(i, _)| &i.series_instance_uid == series_uid)
            .cloned()
            .collect();
        if series_missing.is_empty() {
            continue;
        }
        let (n, b, e) = fetch_one_series(
            region,
            ingest,
            &live,
            &http,
            &base,
            uid.as_str(),
            series_uid,
            &grant.token,
            holding,
            &mut series_missing,
        )
        .await;
        fetched += n;
        bytes += b;
        if let Some(e) = e {
            failure.get_or_insert(e);
        }
    }
    metered.bytes(bytes);
    if let Some(e) = failure {
        failed(format!("{fetched} fetched, {already_present} present; {e}")).await;
        if matches!(e, Error::Integrity(_)) {
            tracing::error!(hospital = holding, study_instance_uid = uid.as_str(), error = %e, "INTEGRITY: a peer instance failed verification");
        }
        return Err(e);
    }
    audit(
        region,
        "fetched",
        holding,
        uid.as_str(),
        purpose,
        user_id,
        &grant.grant_id,
        &format!(
            "{fetched} instances fetched ({bytes} bytes), {already_present} already present{}",
            match live.state.lock().expect("live lock").twice {
                0 => String::new(),
                n => format!(
                    ", {n} asked for by the viewer ahead of the series stream and sent twice"
                ),
            }
        ),
    )
    .await;
    let evicted = evict(region, ingest, Some(uid.as_str())).await?;
    metered.succeeded();
    Ok(FetchReport {
        study_instance_uid: uid.as_str().to_string(),
        hospital_id: holding.to_string(),
        instances: manifest.instances.len(),
        fetched,
        already_present,
        bytes_fetched: bytes,
        grant_id: grant.grant_id,
        evicted,
    })
}

/// One series' missing instances: the whole series by one WADO-RS request
/// when nothing of it is here (each part verified as it completes, the
/// commits of several instances in flight at once, sharing the group
/// commit's flush); what that leaves, or a series partly here, one
/// instance at a time (`peer_parallel` at once, each retried once).
/// Returns the instances stored, their bytes, and the first error.
#[allow(clippy::too_many_arguments)]
async fn fetch_one_series(
    region: &Region,
    ingest: &Ingest,
    live: &Arc<Live>,
    http: &reqwest::Client,
    base: &str,
    study: &str,
    series: &str,
    token: &str,
    holding: &str,
    missing: &mut Vec<(ManifestInstance, BlobHash)>,
) -> (usize, u64, Option<Error>) {
    let mut fetched = 0;
    let mut bytes = 0u64;
    let mut failure = None;
    let key = progress_key(region, study);
    let whole = missing.len() > 1
        && progress_by_key(&key)
            .and_then(|p| p.series.into_iter().find(|(s, _, _)| s == series))
            .is_none_or(|(_, _, done)| done == 0);
    if whole {
        let url = format!(
            "{}/studies/{study}/series/{series}",
            base.trim_end_matches('/')
        );
        let expected: std::collections::HashMap<String, (ManifestInstance, BlobHash)> = missing
            .iter()
            .map(|(i, h)| (i.sop_instance_uid.clone(), (i.clone(), *h)))
            .collect();
        let (done, stream_bytes, stream_error) =
            fetch_stream(http, ingest, live, &url, token, &expected, holding).await;
        if let Some(e) = stream_error {
            tracing::warn!(error = %e, done = done.len(), "series stream from the peer failed; fetching the rest one by one");
            if matches!(e, Error::Integrity(_)) {
                failure = Some(e);
            }
        }
        fetched += done.len();
        bytes += stream_bytes;
        missing.retain(|(i, _)| !done.contains(&i.sop_instance_uid));
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(
        region.config().peer_parallel.max(1),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for (instance, hash) in missing.drain(..) {
        // Brought meanwhile by an ask of the viewer's.
        if live.is_here(&instance.sop_instance_uid) {
            fetched += 1;
            continue;
        }
        let permit = limit.clone().acquire_owned().await.expect("semaphore open");
        let live = live.clone();
        let http = http.clone();
        let ingest = ingest.clone();
        let url = format!(
            "{}/studies/{study}/series/{}/instances/{}",
            base.trim_end_matches('/'),
            instance.series_instance_uid,
            instance.sop_instance_uid
        );
        let token = token.to_string();
        let holding = holding.to_string();
        let key = key.clone();
        tasks.spawn(async move {
            let _permit = permit;
            // A failure is retried once; a second one fails the fetch.
            let mut last = None;
            for _ in 0..2 {
                match fetch_instance(
                    &http, &ingest, &live.pace, &url, &token, &instance, hash, &holding, false,
                )
                .await
                {
                    Ok(size) => {
                        instance_arrived(
                            &key,
                            &instance.series_instance_uid,
                            &instance.sop_instance_uid,
                        );
                        return Ok(size);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, sop_instance_uid = %instance.sop_instance_uid, "peer instance fetch failed");
                        last = Some(e);
                    }
                }
            }
            Err(last.expect("two attempts"))
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(size)) => {
                fetched += 1;
                bytes += size;
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(e) => {
                failure.get_or_insert(Error::Peer(e.to_string()));
            }
        }
    }
    // The series' instances were stored without waiting for a flush each
    // (Ingest::finish_unflushed): one flush covers them all, and those the
    // viewer asked for ahead, before the fetch reports them stored.
    // (Relaxed durability leaves it to the OS, as for C-STORE.)
    if fetched > 0
        && ingest.store().ack_waits_for_flush()
        && let Err(e) = ingest.store().flush().await
    {
        failure.get_or_insert(Error::Peer(format!("flushing the fetched series: {e}")));
    }
    (fetched, bytes, failure)
}

/// A whole study by one WADO-RS request (`transfer-syntax=*`): each part
/// is matched to its manifest entry by the SOP Instance UID of its file
/// meta and ingested with the expected hash; up to eight commits in flight.
/// Returns the instances stored, their bytes, and the error that stopped
/// the stream, if any.
async fn fetch_stream(
    http: &reqwest::Client,
    ingest: &Ingest,
    live: &Live,
    url: &str,
    token: &str,
    expected: &std::collections::HashMap<String, (ManifestInstance, BlobHash)>,
    holding: &str,
) -> (std::collections::HashSet<String>, u64, Option<Error>) {
    let mut done = std::collections::HashSet::new();
    let mut bytes = 0u64;
    let mut error: Option<Error> = None;
    // What a finished commit means: counted, and shown on the page at once.
    let mut settle = |joined: Result<
        (String, String, Result<ingest::Stored, ingest::Error>),
        tokio::task::JoinError,
    >,
                      error: &mut Option<Error>| {
        match joined {
            Ok((sop, series, Ok(stored))) => {
                stored.count(crate::metrics::source::PEER, ingest.store().durability());
                bytes += stored.size;
                instance_arrived(&live.key, &series, &sop);
                done.insert(sop);
            }
            Ok((sop, _, Err(ingest::Error::HashMismatch { expected, actual }))) => {
                error.get_or_insert(Error::Integrity(format!(
                    "instance {sop} hashes to {actual}, the manifest says {expected}"
                )));
            }
            Ok((_, _, Err(e))) => {
                error.get_or_insert(Error::Peer(e.to_string()));
            }
            Err(e) => {
                error.get_or_insert(Error::Peer(e.to_string()));
            }
        }
    };
    let mut finishing = tokio::task::JoinSet::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(8));
    let mut skipped = std::collections::HashSet::new();
    let result: Result<(), Error> = async {
        let response = http
            .get(url)
            .bearer_auth(token)
            .header(
                reqwest::header::ACCEPT,
                "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
            )
            .send()
            .await
            .map_err(|e| Error::Peer(e.to_string()))?;
        if !response.status().is_success() {
            return Err(Error::Peer(format!("{url}: {}", response.status())));
        }
        let boundary = boundary_of(&response)?;
        let mut multipart = multer::Multipart::new(response.bytes_stream(), boundary);
        loop {
            // The viewer asks ahead: the series stream stops here (between
            // parts: nothing half-read), the rest comes one by one.
            if live.asked_ahead.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let Some(mut field) = multipart
                .next_field()
                .await
                .map_err(|e| Error::Peer(e.to_string()))?
            else {
                break;
            };
            // The head: the part's file meta names the instance.
            let mut gathered = Vec::new();
            let (head, meta_len) = loop {
                match field
                    .chunk()
                    .await
                    .map_err(|e| Error::Peer(e.to_string()))?
                {
                    Some(c) => {
                        live.pace.take(c.len()).await;
                        if let Some(head) = gather_head(&mut gathered, c)? {
                            break head;
                        }
                    }
                    None => return Err(Error::Integrity("truncated part".into())),
                }
            };
            let meta = dicom_object::meta::FileMetaTable::from_reader(&head[128..meta_len])
                .map_err(|e| Error::Integrity(format!("part file meta: {e}")))?;
            let sop = meta
                .media_storage_sop_instance_uid()
                .trim_end_matches(['\0', ' '])
                .to_string();
            let Some((instance, hash)) = expected.get(&sop) else {
                return Err(Error::Integrity(format!(
                    "the peer sent instance {sop}, which its manifest does not list"
                )));
            };
            // Brought first by an ask of the viewer's: its bytes are read
            // past (the stream cannot skip them), nothing stored twice.
            if live.is_here(&sop) {
                while let Some(c) = field
                    .chunk()
                    .await
                    .map_err(|e| Error::Peer(e.to_string()))?
                {
                    live.pace.take(c.len()).await;
                }
                live.state.lock().expect("live lock").twice += 1;
                skipped.insert(sop);
                continue;
            }
            let parse = |s: &str| {
                Uid::parse(s).map_err(|_| Error::Integrity(format!("manifest UID {s:?}")))
            };
            let mut incoming = ingest.begin(
                parse(&instance.sop_class_uid)?,
                parse(&instance.sop_instance_uid)?,
                parse(&instance.transfer_syntax_uid)?,
                Some(format!("peer:{holding}")),
            );
            if head.len() > meta_len {
                ingest.write(&mut incoming, &head[meta_len..]);
            }
            loop {
                match field.chunk().await {
                    Ok(Some(c)) => {
                        live.pace.take(c.len()).await;
                        ingest.write(&mut incoming, &c)
                    }
                    Ok(None) => break,
                    Err(e) => {
                        ingest.abandon(incoming).await;
                        return Err(Error::Peer(e.to_string()));
                    }
                }
            }
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let ingest = ingest.clone();
            let hash = *hash;
            let series = instance.series_instance_uid.clone();
            finishing.spawn(async move {
                let _permit = permit;
                (sop, series, ingest.finish_unflushed(incoming, hash).await)
            });
            while let Some(joined) = finishing.try_join_next() {
                settle(joined, &mut error);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        error.get_or_insert(e);
    }
    while let Some(joined) = finishing.join_next().await {
        settle(joined, &mut error);
    }
    done.extend(skipped);
    (done, bytes, error)
}

/// The boundary of a multipart/related answer (multer's own parser takes
/// multipart/form-data only).
fn boundary_of(response: &reqwest::Response) -> Result<String, Error> {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| {
            ct.split(';').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("boundary")
                    .then(|| v.trim().trim_matches('"').to_string())
            })
        })
        .ok_or_else(|| Error::Peer("no multipart boundary".into()))
}

/// One instance by WADO-RS (`transfer-syntax=*`), streamed through the
/// ingest path with its expected hash. Returns its size.
#[allow(clippy::too_many_arguments)]
async fn fetch_instance(
    http: &reqwest::Client,
    ingest: &Ingest,
    pace: &crate::common::Pace,
    url: &str,
    token: &str,
    instance: &ManifestInstance,
    expected: BlobHash,
    holding: &str,
    urgent: bool,
) -> Result<u64, Error> {
    let response = http
        .get(url)
        .bearer_auth(token)
        .header(
            reqwest::header::ACCEPT,
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .await
        .map_err(|e| Error::Peer(e.to_string()))?;
    if !response.status().is_success() {
        return Err(Error::Peer(format!("{url}: {}", response.status())));
    }
    let boundary = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| {
            // multer's own parser takes multipart/form-data only.
            ct.split(';').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("boundary")
                    .then(|| v.trim().trim_matches('"').to_string())
            })
        })
        .ok_or_else(|| Error::Peer("no multipart boundary".into()))?;
    let mut multipart = multer::Multipart::new(response.bytes_stream(), boundary);
    let mut field = multipart
        .next_field()
        .await
        .map_err(|e| Error::Peer(e.to_string()))?
        .ok_or_else(|| Error::Peer("empty multipart answer".into()))?;
    let parse =
        |s: &str| Uid::parse(s).map_err(|_| Error::Integrity(format!("manifest UID {s:?}")));
    let mut incoming = ingest.begin(
        parse(&instance.sop_class_uid)?,
        parse(&instance.sop_instance_uid)?,
        parse(&instance.transfer_syntax_uid)?,
        Some(format!("peer:{holding}")),
    );
    // The part is the peer's Part-10 object: its file meta (written the
    // same deterministic way as ours) is skipped, the data set streamed.
    let mut gathered = Vec::new();
    let mut meta_done = false;
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                ingest.abandon(incoming).await;
                return Err(Error::Peer(e.to_string()));
            }
        };
        if urgent {
            pace.take_urgent(chunk.len()).await;
        } else {
            pace.take(chunk.len()).await;
        }
        if meta_done {
            ingest.write(&mut incoming, &chunk);
            continue;
        }
        match gather_head(&mut gathered, chunk) {
            Ok(Some((head, n))) => {
                meta_done = true;
                if head.len() > n {
                    ingest.write(&mut incoming, &head[n..]);
                }
            }
            Ok(None) => {}
            Err(e) => {
                ingest.abandon(incoming).await;
                return Err(e);
            }
        }
    }
    if !meta_done {
        ingest.abandon(incoming).await;
        return Err(Error::Integrity("truncated part".into()));
    }
    drop(field);
    match ingest.finish_unflushed(incoming, expected).await {
        Ok(stored) => {
            stored.count(crate::metrics::source::PEER, ingest.store().durability());
            Ok(stored.size)
        }
        Err(ingest::Error::HashMismatch { expected, actual }) => Err(Error::Integrity(format!(
            "instance {} hashes to {actual}, the manifest says {expected}",
            instance.sop_instance_uid
        ))),
        Err(e) => Err(Error::Peer(e.to_string())),
    }
}

/// The most a study manifest may take (one JSON entry per instance, a few
/// hundred bytes each: about 200,000 instances). Another hospital's node,
/// broken or hostile, must not be able to make this node hold more.
const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;

/// How long the holding node has to send the whole manifest.
const MANIFEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// The holding node's manifest of a study, read to at most
/// [`MAX_MANIFEST_BYTES`] within [`MANIFEST_DEADLINE`].
async fn fetch_manifest(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<StudyManifest, Error> {
    let read = async {
        let mut response = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| Error::Peer(e.to_string()))?;
        if !response.status().is_success() {
            return Err(Error::Peer(format!("manifest: {}", response.status())));
        }
        let too_large = || {
            Error::Peer(format!(
                "manifest: larger than {} MiB",
                MAX_MANIFEST_BYTES >> 20
            ))
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Error::Peer(format!("manifest: {e}")))?
        {
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| Error::Peer(format!("manifest: {e}")))
    };
    tokio::time::timeout(MANIFEST_DEADLINE, read)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Peer(format!(
                "manifest: not received within {} s",
                MANIFEST_DEADLINE.as_secs()
            )))
        })
}

#[allow(clippy::too_many_arguments)]
async fn audit(
    region: &Region,
    action: &str,
    peer: &str,
    uid: &str,
    purpose: Purpose,
    user_id: &str,
    grant_id: &str,
    detail: &str,
) {
    if let Err(error) = sqlx::query(
        "INSERT INTO peer_audit (at, action, peer_hospital_id, study_instance_uid, purpose, \
         user_id, grant_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(now())
    .bind(action)
    .bind(peer)
    .bind(uid)
    .bind(purpose.as_str())
    .bind(user_id)
    .bind(grant_id)
    .bind(detail)
    .execute(region.index().pool())
    .await
    {
        tracing::error!(%error, "cannot write the peer audit");
    }
}

/// The holding side: records that a study was served to a peer under a
/// grant (once per grant).
pub async fn audit_served(region: &Region, g: &GrantConfirmed) {
    audit(
        region,
        "served",
        &g.requesting_hospital_id,
        &g.study_instance_uid,
        g.purpose,
        &g.user_id,
        &g.grant_id,
        if g.purpose == Purpose::Emergency {
            "served under break-the-glass"
        } else {
            "served under consent"
        },
    )
    .await;
}

/// Evicts cached studies, least recently used first, until the cache fits
/// its budget. Only rows of `cached_study` are candidates: the hospital's
/// own studies are never touched; a blob another row still names stays.
pub async fn evict(
    region: &Region,
    ingest: &Ingest,
    keep: Option<&str>,
) -> Result<Vec<String>, Error> {
    let pool = ingest.index().pool();
    let budget = region.config().peer_cache_budget_bytes as i64;
    let mut evicted = Vec::new();
    loop {
        // PostgreSQL's SUM of a BIGINT is a NUMERIC: cast back, for the
        // Any driver (and both backends) to read an i64.
        let total: i64 =
            sqlx::query("SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM cached_study")
                .fetch_one(pool)
                .await?
                .try_get(0)?;
        if total <= budget {
            return Ok(evicted);
        }
        let Some(row) = sqlx::query(
            "SELECT study_instance_uid FROM cached_study WHERE study_instance_uid <> $1 \
             ORDER BY last_access, study_instance_uid LIMIT 1",
        )
        .bind(keep.unwrap_or(""))
        .fetch_optional(pool)
        .await?
        else {
            return Ok(evicted);
        };
        let uid: String = row.try_get(0)?;
        let hashes: Vec<String> = sqlx::query(
            "SELECT DISTINCT i.blob_hash FROM instance i JOIN series se ON se.series_key = i.series_key \
             JOIN study st ON st.study_key = se.study_key WHERE st.study_instance_uid = $1",
        )
        .bind(&uid)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "DELETE FROM instance WHERE series_key IN (SELECT se.series_key FROM series se \
             JOIN study st ON st.study_key = se.study_key WHERE st.study_instance_uid = $1)",
        )
        .bind(&uid)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM series WHERE study_key IN (SELECT study_key FROM study WHERE study_instance_uid = $1)",
        )
        .bind(&uid)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM study WHERE study_instance_uid = $1")
            .bind(&uid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM cached_study WHERE study_instance_uid = $1")
            .bind(&uid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        for hex in hashes {
            let still_named = sqlx::query("SELECT 1 FROM instance WHERE blob_hash = $1 LIMIT 1")
                .bind(&hex)
                .fetch_optional(pool)
                .await?
                .is_some();
            if !still_named && let Ok(hash) = BlobHash::parse(&hex) {
                let _ = ingest.store().delete(&hash).await;
            }
        }
        tracing::info!(study_instance_uid = %uid, "evicted a cached peer study");
        evicted.push(uid);
    }
}

/// The holding hospital of a regional prior this node has been told of,
/// when the study is not held here.
pub async fn regional_holder(ingest: &Ingest, uid: &str) -> Result<Option<String>, Error> {
    if ingest
        .index()
        .study(uid)
        .await
        .map_err(|e| Error::Index(e.to_string()))?
        .is_some()
    {
        return Ok(None);
    }
    Ok(
        sqlx::query("SELECT hospital_id FROM regional_prior WHERE study_instance_uid = $1")
            .bind(uid)
            .fetch_optional(ingest.index().pool())
            .await?
            .map(|r| r.try_get(0))
            .transpose()?,
    )
}

/// Marks a cached study as used (the eviction order).
pub async fn touch(ingest: &Ingest, uid: &str) {
    let _ = sqlx::query("UPDATE cached_study SET last_access = $2 WHERE study_instance_uid = $1")
        .bind(uid)
        .bind(now())
        .execute(ingest.index().pool())
        .await;
}

/// Starts fetching in the background (prefetch at order time); errors are
/// logged.
pub fn prefetch(
    region: Arc<Region>,
    ingest: Ingest,
    holding: String,
    uid: String,
    reference: String,
) {
    tokio::spawn(async move {
        match fetch_study(
            &region,
            &ingest,
            &holding,
            &uid,
            Asked::treatment("prefetch", reference),
        )
        .await
        {
            Ok(r) => {
                tracing::info!(study_instance_uid = %uid, fetched = r.fetched, "prefetched a prior")
            }
            Err(e) => tracing::warn!(study_instance_uid = %uid, error = %e, "prefetch failed"),
        }
    });
}

/// Gathers the first chunks of a multipart part until its Part-10 file meta
/// is whole, then returns the bytes gathered and the meta's length (the
/// data set follows). The first chunk usually holds the meta whole and is
/// returned as it came, without a copy.
fn gather_head(
    gathered: &mut Vec<u8>,
    chunk: bytes::Bytes,
) -> Result<Option<(bytes::Bytes, usize)>, Error> {
    let joined = if gathered.is_empty() {
        chunk
    } else {
        gathered.extend_from_slice(&chunk);
        bytes::Bytes::from(std::mem::take(gathered))
    };
    match crate::part10::file_meta_len(&joined) {
        Some(n) if joined.len() >= n => Ok(Some((joined, n))),
        _ if joined.len() > 1 << 20 => Err(Error::Integrity(
            "no Part-10 file meta in the peer's part".into(),
        )),
        _ => {
            *gathered = joined.into();
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However the part's bytes are cut into chunks, the head gathered is
    /// the part's first bytes up to at least the end of its file meta, and
    /// the meta's length is the same; a first chunk holding the meta whole
    /// is returned as it came (the same buffer, not a copy).
    #[test]
    fn a_parts_head_is_gathered_however_it_is_chunked() {
        let mut part = vec![0u8; 128];
        part.extend_from_slice(b"DICM");
        // (0002,0000) UL 4, group length 30, then 30 bytes of meta.
        part.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        part.extend_from_slice(&30u32.to_le_bytes());
        part.extend_from_slice(&[7u8; 30]);
        let meta_len = part.len();
        part.extend_from_slice(&[9u8; 100]); // the data set
        for cut in [1, 2, 50, 143, 144, 173, 174, 200, part.len()] {
            let mut gathered = Vec::new();
            let mut result = None;
            for chunk in part.chunks(cut) {
                let chunk = bytes::Bytes::copy_from_slice(chunk);
                if let Some(head) = gather_head(&mut gathered, chunk).unwrap() {
                    result = Some(head);
                    break;
                }
            }
            let (head, n) = result.unwrap_or_else(|| panic!("no head with chunks of {cut}"));
            assert_eq!(n, meta_len, "chunks of {cut}");
            assert!(
                head.len() >= n && part.starts_with(&head),
                "chunks of {cut}"
            );
        }
        let whole = bytes::Bytes::from(part.clone());
        let (head, _) = gather_head(&mut Vec::new(), whole.clone())
            .unwrap()
            .unwrap();
        assert_eq!(head.as_ptr(), whole.as_ptr());
        // No file meta within 1 MiB: refused, not gathered for ever.
        let mut gathered = Vec::new();
        let junk = bytes::Bytes::from(vec![0u8; 600 << 10]);
        assert!(gather_head(&mut gathered, junk.clone()).unwrap().is_none());
        assert!(matches!(
            gather_head(&mut gathered, junk),
            Err(Error::Integrity(_))
        ));
    }

    #[test]
    fn why_images_cannot_be_opened() {
        let cases = [
            (Error::NoPeer("H".into()), FailureKind::PeerDown),
            (
                Error::Peer("connection refused".into()),
                FailureKind::PeerDown,
            ),
            (Error::Refused("no consent".into()), FailureKind::NoConsent),
            (Error::Integrity("hash".into()), FailureKind::Integrity),
            (Error::Registry("timeout".into()), FailureKind::Registry),
            (Error::Index("locked".into()), FailureKind::Local),
        ];
        for (error, kind) in cases {
            let failure = error.failure();
            assert_eq!(failure.kind, kind, "{error}");
            assert_eq!(failure.detail, error.to_string());
        }
        // A 403 or 404 from the registry's grant is a refusal.
        let refused: Error = client::Error::Status {
            status: 403,
            detail: "no consent".into(),
        }
        .into();
        assert_eq!(refused.failure().kind, FailureKind::NoConsent);
    }

    #[test]
    fn incomplete_series_are_hidden_until_the_fetch_is_done() {
        let series = [("1.9.1", 3, 3), ("1.9.2", 3, 1)];
        let hidden = |node: &str, study: &str| incomplete_by_key(&format!("{node} {study}"));
        record_progress_for_tests("A", "1.9", "B", FetchState::Running, &series);
        assert_eq!(hidden("A", "1.9"), vec!["1.9.2".to_string()]);
        // Another node of the same process does not see A's fetch.
        assert!(hidden("B", "1.9").is_empty());
        record_progress_for_tests("A", "1.9", "B", FetchState::Failed, &series);
        assert_eq!(hidden("A", "1.9"), vec!["1.9.2".to_string()]);
        record_progress_for_tests("A", "1.9", "B", FetchState::Done, &series);
        assert!(hidden("A", "1.9").is_empty());
        assert!(hidden("A", "1.8").is_empty());
    }

    #[test]
    fn a_peer_answer_names_this_node_in_its_urls() {
        let body = serde_json::json!([{
            "00081190": {"vr": "UR", "Value": ["https://b.example:8443/dicom-web/studies/1.2"]},
            "7FE00010": {"vr": "OW", "BulkDataURI":
                "http://10.0.0.2/pacs/dicom-web/studies/1.2/series/1.3/instances/1.4/bulkdata/7FE00010"},
            "00400275": {"vr": "SQ", "Value": [{"00081190": {"vr": "UR", "Value": ["http://b/dicom-web/studies/9"]}}]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "ZHANG^SAN"}]}
        }]);
        let answer = PeerAnswer {
            status: 200,
            content_type: Some("application/dicom+json".into()),
            body: serde_json::to_vec(&body).unwrap().into(),
        };
        let local = rebase_answer(&answer, "http://a:8042/dicom-web");
        let json: serde_json::Value = serde_json::from_slice(&local.body).unwrap();
        assert_eq!(
            json[0]["00081190"]["Value"][0],
            "http://a:8042/dicom-web/studies/1.2"
        );
        assert_eq!(
            json[0]["7FE00010"]["BulkDataURI"],
            "http://a:8042/dicom-web/studies/1.2/series/1.3/instances/1.4/bulkdata/7FE00010"
        );
        // Nested, too; other values untouched.
        assert_eq!(
            json[0]["00400275"]["Value"][0]["00081190"]["Value"][0],
            "http://a:8042/dicom-web/studies/9"
        );
        assert_eq!(json[0]["00100010"], body[0]["00100010"]);
        // Not JSON: as it came.
        let other = PeerAnswer {
            content_type: Some("text/plain".into()),
            ..answer
        };
        assert_eq!(rebase_answer(&other, "http://a").body, other.body);
    }

    #[test]
    fn a_series_is_complete_when_all_its_instances_are_here() {
        let mut p = Progress::starting("H");
        p.series = vec![("1.1".into(), 2, 0), ("1.2".into(), 1, 1)];
        p.series_done = 1;
        assert_eq!(p.complete_series(), vec!["1.2".to_string()]);
        p.instance_done("1.1");
        assert_eq!(p.series_done, 1);
        p.instance_done("1.1");
        assert_eq!((p.series_done, p.instances_done), (2, 2));
        assert_eq!(
            p.complete_series(),
            vec!["1.1".to_string(), "1.2".to_string()]
        );
    }
}
