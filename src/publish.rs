//! Publishing the node's exam index to the regional registry.
//!
//! Three tasks, all stateless over the index so that several node processes
//! on one PostgreSQL share the work:
//!
//! - the **stability worker** finds studies that have had no new instance
//!   for the quiet time (or whose report, QC or patient identifier changed
//!   through the node's API), describes each as a [`StudyRecord`] and, in
//!   one transaction with a compare-and-set on the study's publication row,
//!   writes it to the outbox with the next record version;
//! - the **publisher** leases outbox rows in batches, sends them, and
//!   deletes them once the registry has answered; the registry down for an
//!   hour only grows the backlog (retries with exponential backoff), and a
//!   replay is harmless (the registry keeps the highest version);
//! - the **directory poller** keeps the registry's hospital directory with
//!   conditional GETs.
//!
//! A study whose patient has no valid cross-enterprise identifier is never
//! published: it stays local with the reason, counted on the node's API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;

use crate::config::RegionConfig;
use crate::contract::*;
use crate::index::Index;
use crate::patient_key::{Identifier, IdentifierType, InvalidIdentifier, RegionSecret};
use crate::recognition::classify::{
    Code, Confidence, InstanceAttributes, SeriesAttributes, StudyAttributes, classify,
};
use crate::recognition::list::RecognitionList;
use crate::registry::client::{self, RegistryClient};
use crate::storage::BlobStore;
use crate::types::BlobHash;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("index: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index: {0}")]
    Index(#[from] crate::index::Error),
    #[error("blob store: {0}")]
    Storage(#[from] crate::storage::Error),
    #[error("outbox row {0} is malformed: {1}")]
    BadOutboxRow(i64, String),
}

/// One outbox row's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutboxItem {
    Record(Box<StudyRecord>),
    Retraction(Retraction),
    /// A duplicate-exam warning or decision, for the region's statistics.
    Event(RecognitionEvent),
}

/// The content root of a study: BLAKE3 over its current instances sorted
/// by SOP Instance UID, each as the UID's bytes, a NUL, and the 32 bytes of
/// the instance's BLAKE3 hash. A peer that fetches the study recomputes it
/// from what it received and compares it with the published one.
pub fn content_root<'a>(instances: impl IntoIterator<Item = (&'a str, &'a BlobHash)>) -> String {
    let sorted: BTreeMap<&str, &BlobHash> = instances.into_iter().collect();
    let mut hasher = blake3::Hasher::new();
    for (uid, hash) in sorted {
        hasher.update(uid.as_bytes());
        hasher.update(&[0]);
        hasher.update(hash.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// What the operator sees of the publisher (`GET /api/v1/publication`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublisherStatus {
    pub last_success_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Outbox rows the registry has answered for since this process
    /// started.
    pub delivered: u64,
    pub directory_version: Option<String>,
    pub hospitals_in_directory: usize,
}

/// The running publication machinery of one node process.
pub struct Region {
    index: Index,
    store: Arc<BlobStore>,
    config: RegionConfig,
    secret: RegionSecret,
    client: RegistryClient,
    status: Mutex<PublisherStatus>,
    wake: Notify,
    directory: RwLock<Option<HospitalDirectory>>,
    /// Distinguishes this process's outbox leases from another's.
    lease_tag: String,
    /// The active recognition list (pulled from the registry, or the
    /// configured file); `None` until one is known.
    list: std::sync::RwLock<Option<Arc<RecognitionList>>>,
    /// Where the pulled list is cached between starts.
    list_cache: std::path::PathBuf,
    /// The HTTP client for peer nodes.
    peer_http: reqwest::Client,
    /// The cap on the bytes per second peer fetches take (`peer_bandwidth`).
    peer_pace: Arc<crate::common::Pace>,
    /// The ingest path, for studies fetched from peers.
    ingest: std::sync::OnceLock<crate::ingest::Ingest>,
    /// Grants confirmed by the registry (token SHA-256 → grant), so that a
    /// peer's many instance requests cost one confirmation.
    grants: Mutex<std::collections::HashMap<String, GrantConfirmed>>,
    /// Grants whose serving is in the peer audit (grant ID → its expiry):
    /// "served" once per grant, however many requests confirm it at once
    /// or again after the confirmation cache's minute.
    served: Mutex<std::collections::HashMap<String, String>>,
}

impl Region {
    /// Loads the recognition list from the configured file (an invalid one
    /// is an error: the operator named it) or from the cache of the last
    /// pulled one (an invalid cache is ignored: the registry sends a new
    /// one).
    pub fn new(
        index: Index,
        store: Arc<BlobStore>,
        config: RegionConfig,
        data_dir: &std::path::Path,
        tls_ca_file: Option<&std::path::Path>,
    ) -> Result<Arc<Region>, String> {
        // The registry and peer nodes may carry certificates from the
        // region's own CA: trusted like the AEs' (tls_ca_file).
        let client =
            RegistryClient::trusting(&config.registry_url, &config.registry_token, tls_ca_file)?;
        let secret = config.region_secret.clone();
        let list_cache = data_dir.join("recognition-list.toml");
        let list = match &config.recognition_list_file {
            Some(path) => Some(Arc::new(crate::recognition::load(path)?)),
            None => std::fs::read_to_string(&list_cache)
                .ok()
                .and_then(|text| RecognitionList::parse(&text).ok())
                .map(Arc::new),
        };
        if let Some(l) = &list {
            tracing::info!(version = %l.meta.version, content_hash = %l.content_hash, items = l.items.len(), "recognition list active");
        }
        Ok(Arc::new(Region {
            list: std::sync::RwLock::new(list),
            list_cache,
            peer_http: crate::tls::trust_ca_file(
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // A peer that stops sending mid-answer (a hung node, a
                    // dead link) fails the fetch, visibly, instead of
                    // holding it open forever.
                    .read_timeout(PEER_READ_TIMEOUT)
                    .pool_idle_timeout(crate::tls::CLIENT_POOL_IDLE)
                    .tcp_nodelay(true)
                    .no_proxy(),
                tls_ca_file,
            )?
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?,
            peer_pace: Arc::new(crate::common::Pace::new(config.peer_bandwidth)),
            grants: Mutex::new(std::collections::HashMap::new()),
            served: Mutex::new(std::collections::HashMap::new()),
            ingest: std::sync::OnceLock::new(),
            index,
            store,
            secret,
            client,
            status: Mutex::new(PublisherStatus::default()),
            wake: Notify::new(),
            directory: RwLock::new(None),
            lease_tag: crate::common::random_hex(6),
            config,
        }))
    }

    /// Set once by the node at start (the ingest path is opened with the
    /// store and index the region shares).
    pub fn set_ingest(&self, ingest: crate::ingest::Ingest) {
        let _ = self.ingest.set(ingest);
    }

    pub fn ingest(&self) -> Option<&crate::ingest::Ingest> {
        self.ingest.get()
    }

    pub fn peer_http(&self) -> reqwest::Client {
        self.peer_http.clone()
    }

    pub fn peer_pace(&self) -> Arc<crate::common::Pace> {
        self.peer_pace.clone()
    }

    /// The grants peers presented that the registry confirmed, by the
    /// SHA-256 of their token (src/peer.rs `verify_grant`).
    pub(crate) fn grant_cache(&self) -> &Mutex<std::collections::HashMap<String, GrantConfirmed>> {
        &self.grants
    }

    /// Whether this is the first time a grant is served (and marks it
    /// served); expired grants are forgotten as new ones come.
    pub(crate) fn first_serving(&self, grant: &GrantConfirmed, now: &str) -> bool {
        let mut served = self.served.lock().expect("served lock");
        served.retain(|_, expires_at| expires_at.as_str() > now);
        served
            .insert(grant.grant_id.clone(), grant.expires_at.clone())
            .is_none()
    }

    pub fn list(&self) -> Option<Arc<RecognitionList>> {
        self.list.read().expect("list lock").clone()
    }

    /// Activates a list pulled from the registry: validated first (an
    /// invalid list never replaces the active one), cached, and every study
    /// marked for re-classification under it.
    async fn activate_pulled_list(&self, text: &str) {
        let list = match RecognitionList::parse(text) {
            Ok(l) => l,
            Err(errors) => {
                tracing::error!(
                    errors = %errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
                    "the registry's recognition list is invalid; the active list stays"
                );
                return;
            }
        };
        if self
            .list()
            .is_some_and(|l| l.content_hash == list.content_hash)
        {
            return;
        }
        let tmp = self.list_cache.with_extension("toml.part");
        if let Err(error) =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.list_cache))
        {
            tracing::warn!(%error, "cannot cache the recognition list");
        }
        tracing::info!(version = %list.meta.version, content_hash = %list.content_hash, items = list.items.len(), "recognition list activated");
        *self.list.write().expect("list lock") = Some(Arc::new(list));
        if let Err(error) = sqlx::query(
            "UPDATE study_publication SET changes = changes + 1 \
             WHERE state IN ('published', 'local_only')",
        )
        .execute(self.index.pool())
        .await
        {
            tracing::error!(%error, "cannot mark studies for re-classification");
        }
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn config(&self) -> &RegionConfig {
        &self.config
    }

    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    pub fn secret(&self) -> &RegionSecret {
        &self.secret
    }

    /// Starts the three tasks; they stop when `shutdown` fires.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let a = self.clone();
        let s = shutdown.clone();
        let stability = tokio::spawn(async move { a.stability_loop(s).await });
        let b = self.clone();
        let s = shutdown.clone();
        let publisher = tokio::spawn(async move { b.publisher_loop(s).await });
        let c = self.clone();
        let directory = tokio::spawn(async move { c.directory_loop(shutdown).await });
        vec![stability, publisher, directory]
    }

    pub async fn directory(&self) -> Option<HospitalDirectory> {
        self.directory.read().await.clone()
    }

    // -------------------------------------------------------------- stability

    async fn stability_loop(&self, shutdown: CancellationToken) {
        let interval = (self.config.study_quiet_time / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match self.scan_once().await {
                Ok(n) if n > 0 => {
                    self.wake.notify_one();
                    // More may be waiting: scan again at once.
                    if shutdown.is_cancelled() {
                        return;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "study stability scan failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Evaluates the studies that are due; returns how many outbox rows it
    /// wrote.
    pub async fn scan_once(&self) -> Result<usize, Error> {
        let cutoff = rfc3339(SystemTime::now() - self.config.study_quiet_time);
        let rows = sqlx::query(
            "SELECT st.study_instance_uid, st.last_received_at, sp.changes, \
             sp.evaluated_changes, sp.evaluated_received_at, sp.record_version, sp.state, \
             sp.fingerprint FROM study st \
             LEFT JOIN study_publication sp ON sp.study_instance_uid = st.study_instance_uid \
             WHERE st.last_received_at <= $1 AND st.number_of_study_related_instances > 0 \
             AND NOT EXISTS (SELECT 1 FROM cached_study c \
                             WHERE c.study_instance_uid = st.study_instance_uid) \
             AND (sp.study_instance_uid IS NULL \
                  OR (sp.state <> 'retracted' AND (sp.changes <> sp.evaluated_changes \
                      OR sp.evaluated_received_at <> st.last_received_at))) \
             LIMIT 200",
        )
        .bind(&cutoff)
        .fetch_all(self.index.pool())
        .await?;
        let mut written = 0;
        for row in rows {
            let snapshot = Snapshot {
                study_instance_uid: row.try_get(0)?,
                last_received_at: row.try_get(1)?,
                existing: match row.try_get::<Option<i64>, _>(2)? {
                    None => None,
                    Some(changes) => Some(Existing {
                        changes,
                        evaluated_received_at: row.try_get(4)?,
                        record_version: row.try_get(5)?,
                        state: row.try_get(6)?,
                        fingerprint: row.try_get(7)?,
                    }),
                },
            };
            match self.evaluate(&snapshot).await {
                Ok(true) => written += 1,
                Ok(false) => {}
                Err(error) => tracing::error!(
                    %error,
                    study_instance_uid = %snapshot.study_instance_uid,
                    "cannot describe study for publication"
                ),
            }
        }
        Ok(written)
    }

    /// Describes one study and moves its publication row; returns whether
    /// an outbox row was written.
    async fn evaluate(&self, snap: &Snapshot) -> Result<bool, Error> {
        let pool = self.index.pool();
        let Some(study) = sqlx::query(
            "SELECT st.study_key, st.study_date, st.study_time, p.patient_id, \
             p.issuer_of_patient_id FROM study st JOIN patient p ON p.patient_key = st.patient_key \
             WHERE st.study_instance_uid = $1",
        )
        .bind(&snap.study_instance_uid)
        .fetch_optional(pool)
        .await?
        else {
            return Ok(false);
        };
        let study_key: i64 = study.try_get(0)?;
        let study_date: String = study.try_get(1)?;
        let study_time: String = study.try_get(2)?;
        let patient_id: String = study.try_get(3)?;
        let issuer: String = study.try_get(4)?;

        let series_rows = sqlx::query(
            "SELECT series_key, modality, body_part_examined, series_instance_uid FROM series \
             WHERE study_key = $1",
        )
        .bind(study_key)
        .fetch_all(pool)
        .await?;
        let instance_rows = sqlx::query(
            "SELECT i.sop_instance_uid, i.blob_hash, i.blob_size, i.series_key FROM instance i \
             JOIN series se ON se.series_key = i.series_key \
             WHERE se.study_key = $1 AND i.is_current = 1",
        )
        .bind(study_key)
        .fetch_all(pool)
        .await?;
        let mut instances = Vec::with_capacity(instance_rows.len());
        for r in &instance_rows {
            let hex: String = r.try_get(1)?;
            let hash = BlobHash::parse(&hex).map_err(|_| crate::index::Error::BadHash(hex))?;
            instances.push((
                r.try_get::<String, _>(0)?,
                hash,
                r.try_get::<i64, _>(2)?,
                r.try_get::<i64, _>(3)?,
            ));
        }
        let mut modalities = BTreeSet::new();
        let mut body_parts = BTreeSet::new();
        let mut headers = Vec::new();
        let mut series_attributes = Vec::new();
        // Every header read, for the record's views and sides.
        let mut every = Vec::new();
        let mut series_with_instances = 0;
        for s in &series_rows {
            let series_key: i64 = s.try_get(0)?;
            let modality: String = s.try_get(1)?;
            let body_part: String = s.try_get(2)?;
            let series_uid: String = s.try_get(3)?;
            // The series' first instance (by SOP Instance UID) speaks for
            // the series' header attributes; radiographs and mammograms are
            // read per instance (side, view and body part per image).
            let mut of_series: Vec<&(String, BlobHash, i64, i64)> =
                instances.iter().filter(|i| i.3 == series_key).collect();
            if of_series.is_empty() {
                continue;
            }
            let instances_in_series = of_series.len();
            of_series.sort_by(|a, b| a.0.cmp(&b.0));
            of_series.truncate(if read_every_instance(&modality) {
                MAX_INSTANCES_READ
            } else {
                1
            });
            series_with_instances += 1;
            let mut read = Vec::with_capacity(of_series.len());
            for i in of_series {
                read.push(self.read_header(&i.1, i.2 as u64).await?);
            }
            series_attributes.push(self::series_attributes(
                &read,
                instances_in_series,
                &series_uid,
                &modality,
                &body_part,
            ));
            every.extend(read.iter().cloned());
            let header = read.swap_remove(0);
            if !modality.is_empty() {
                modalities.insert(modality);
            }
            if !body_part.is_empty() {
                body_parts.insert(body_part);
            }
            headers.push(header);
        }
        // A study whose series carry different StudyDates (re-opened days
        // later, a reused Study UID, a modality clock) is as old as its
        // oldest images: the index keeps the date of whichever instance
        // came last, which made 49-day-old images 5 days old (probe 7 N4).
        let study_date = every
            .iter()
            .map(|h| h.study_date.trim())
            .chain(std::iter::once(study_date.trim()))
            .filter(|d| d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
            .min()
            .map_or_else(|| study_date.clone(), str::to_string);
        let list = self.list();
        let summary = summarise(&every, list.as_deref().map(|l| &l.vocabulary));
        let mut classification_json: Option<String> = None;
        let (items, unclassified) = match list {
            Some(list) => {
                let c = classify(
                    &list,
                    &study_attributes(
                        &headers,
                        series_attributes,
                        Some(self.config.hospital_id.clone()),
                    ),
                );
                classification_json = Some(
                    serde_json::json!({
                        "list_version": list.content_hash,
                        "items": c.items,
                        "unclassified": c.unclassified,
                    })
                    .to_string(),
                );
                (
                    c.items
                        .into_iter()
                        .map(|i| RecordItem {
                            confirmed_by: None,
                            code: i.code,
                            laterality: i.laterality,
                            confidence: Some(match i.confidence {
                                Confidence::Certain => ItemConfidence::Certain,
                                Confidence::NeedsConfirmation => ItemConfidence::NeedsConfirmation,
                            }),
                            // Which attributes, not their values: free text
                            // stays at the hospital.
                            evidence: i
                                .evidence
                                .iter()
                                .map(|e| e.attribute.clone())
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .collect(),
                            view_positions: i
                                .views
                                .iter()
                                .map(|v| {
                                    serde_json::to_value(v)
                                        .ok()
                                        .and_then(|v| v.as_str().map(str::to_string))
                                        .unwrap_or_default()
                                })
                                .collect(),
                        })
                        .collect(),
                    c.unclassified,
                )
            }
            None => (Vec::new(), Some("no_recognition_list".to_string())),
        };

        let identifier = self
            .identifier(&patient_id, &issuer, headers.first())
            .await?
            // Never under another person's key: the study's own birth date
            // and sex must be able to be the identifier's (probe 6: a
            // mapping that named someone else put their exam on that
            // person's record, and the check cited it).
            .and_then(|id| match headers.first() {
                Some(h) if !id.agrees_with(&h.patient_birth_date, &h.patient_sex) => {
                    Err(InvalidIdentifier::DemographicsMismatch)
                }
                _ => Ok(id),
            });
        let report = sqlx::query(
            "SELECT report_status, report_issued_date, qc_status FROM study_report \
             WHERE study_instance_uid = $1",
        )
        .bind(&snap.study_instance_uid)
        .fetch_optional(pool)
        .await?;
        let (report_status, report_issued_date, qc_status) = match report {
            Some(r) => (
                ReportStatus::parse(&r.try_get::<String, _>(0)?).unwrap_or(ReportStatus::None),
                r.try_get::<Option<String>, _>(1)?,
                QcStatus::parse(&r.try_get::<String, _>(2)?).unwrap_or(QcStatus::Pending),
            ),
            None => (ReportStatus::None, None, QcStatus::Pending),
        };

        let root = content_root(instances.iter().map(|i| (i.0.as_str(), &i.1)));
        // The hospital's own confirmation wins over the classifier, for the
        // images it was made on.
        let (items, unclassified) = match confirmation(pool, &snap.study_instance_uid).await? {
            Some(c) if c.content_root == root => apply_confirmation(items, c),
            _ => (items, unclassified),
        };
        let images_marked_available =
            sqlx::query("SELECT available FROM study_images WHERE study_instance_uid = $1")
                .bind(&snap.study_instance_uid)
                .fetch_optional(pool)
                .await?
                .map(|r| r.try_get::<i64, _>(0))
                .transpose()?
                .is_none_or(|a| a != 0);
        let changes = snap.existing.as_ref().map_or(0, |e| e.changes);
        let version = snap.existing.as_ref().map_or(0, |e| e.record_version);
        let was_published = snap
            .existing
            .as_ref()
            .is_some_and(|e| e.state == "published");

        let mut published_record: Option<StudyRecord> = None;
        let (state, reason, outbox) = match identifier {
            Err(invalid) => {
                // A study that was published and has lost its identifier
                // (a mapping corrected at the hospital) is withdrawn.
                let outbox = was_published.then(|| {
                    OutboxItem::Retraction(Retraction {
                        study_instance_uid: snap.study_instance_uid.clone(),
                        record_version: version + 1,
                    })
                });
                ("local_only", Some(invalid.code()), outbox)
            }
            Ok(identifier) => {
                let mut record = StudyRecord {
                    study_instance_uid: snap.study_instance_uid.clone(),
                    record_version: 0,
                    patient_key: self.secret.patient_key(&identifier),
                    items,
                    modalities: modalities.into_iter().collect(),
                    body_parts: body_parts.into_iter().collect(),
                    contrast: summary.contrast,
                    laterality: summary.laterality,
                    view_positions: summary.view_positions,
                    study_date: dicom_date(&study_date),
                    study_time: dicom_time(&study_time),
                    report_status,
                    report_issued_date,
                    qc_status,
                    images_available: !instances.is_empty() && images_marked_available,
                    number_of_series: series_with_instances,
                    number_of_instances: instances.len() as i64,
                    bytes: instances.iter().map(|i| i.2).sum(),
                    content_root: root.clone(),
                    federation_pseudonym: self
                        .config
                        .federation_secret
                        .as_ref()
                        .map(|f| f.pseudonym(&identifier)),
                };
                let fingerprint = record_fingerprint(&record);
                let unchanged = was_published
                    && snap.existing.as_ref().map(|e| e.fingerprint.as_str())
                        == Some(fingerprint.as_str());
                record.record_version = version;
                published_record = Some(record.clone());
                if unchanged {
                    ("published", None, None)
                } else {
                    record.record_version = version + 1;
                    (
                        "published",
                        None,
                        Some(OutboxItem::Record(Box::new(record))),
                    )
                }
            }
        };
        let fingerprint = match &outbox {
            Some(OutboxItem::Record(r)) => record_fingerprint(r),
            _ => snap
                .existing
                .as_ref()
                .map(|e| e.fingerprint.clone())
                .unwrap_or_default(),
        };
        let new_version = if outbox.is_some() {
            version + 1
        } else {
            version
        };
        let now = now();
        let record_json = published_record.map(|mut r| {
            r.record_version = new_version;
            serde_json::to_string(&r).expect("record serialises")
        });
        let patient_key = record_json
            .as_ref()
            .and_then(|j| serde_json::from_str::<StudyRecord>(j).ok())
            .map(|r| r.patient_key);

        let mut tx = pool.begin().await?;
        let moved = match &snap.existing {
            None => sqlx::query(
                "INSERT INTO study_publication (study_instance_uid, evaluated_received_at, \
                 changes, evaluated_changes, state, reason, record_version, fingerprint, \
                 content_root, updated_at, record, unclassified, patient_key, classification) \
                 VALUES ($1, $2, 0, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (study_instance_uid) DO NOTHING",
            )
            .bind(&snap.study_instance_uid)
            .bind(&snap.last_received_at)
            .bind(state)
            .bind(reason)
            .bind(new_version)
            .bind(&fingerprint)
            .bind(&root)
            .bind(&now)
            .bind(record_json.clone())
            .bind(unclassified.clone())
            .bind(patient_key.clone())
            .bind(classification_json.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected(),
            Some(e) => sqlx::query(
                "UPDATE study_publication SET evaluated_received_at = $2, evaluated_changes = $3, \
                 state = $4, reason = $5, record_version = $6, fingerprint = $7, \
                 content_root = $8, updated_at = $9, record = $12, unclassified = $13, \
                 patient_key = $14, classification = $15 \
                 WHERE study_instance_uid = $1 AND changes = $3 AND record_version = $10 \
                 AND evaluated_received_at = $11",
            )
            .bind(&snap.study_instance_uid)
            .bind(&snap.last_received_at)
            .bind(changes)
            .bind(state)
            .bind(reason)
            .bind(new_version)
            .bind(&fingerprint)
            .bind(&root)
            .bind(&now)
            .bind(e.record_version)
            .bind(&e.evaluated_received_at)
            .bind(record_json.clone())
            .bind(unclassified.clone())
            .bind(patient_key.clone())
            .bind(classification_json.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected(),
        };
        if moved == 0 {
            // Another process evaluated it first, or the API changed it
            // since we read it: the next scan sees the current state.
            tx.rollback().await?;
            return Ok(false);
        }
        if let Some(item) = &outbox {
            sqlx::query(
                "INSERT INTO publication_outbox (study_instance_uid, record_version, body, \
                 created_at, attempts, lease_until, dead) VALUES ($1, $2, $3, $4, 0, '', 0)",
            )
            .bind(&snap.study_instance_uid)
            .bind(new_version)
            .bind(serde_json::to_string(item).expect("outbox item serialises"))
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        if let Some(reason) = reason {
            tracing::info!(
                study_instance_uid = %snap.study_instance_uid,
                reason,
                "study stays local: no valid cross-enterprise identifier"
            );
        }
        Ok(outbox.is_some())
    }

    /// Reads the header of one instance: the first 256 KiB usually hold it;
    /// if not, the whole (verified) blob.
    async fn read_header(&self, hash: &BlobHash, size: u64) -> Result<SeriesHeader, Error> {
        const PREFIX: u64 = 256 * 1024;
        let prefix = self.store.get_prefix(hash, size.min(PREFIX)).await?;
        if let Some(h) = parse_header(&prefix) {
            return Ok(h);
        }
        let whole = self.store.get(hash).await?;
        Ok(parse_header(&whole).unwrap_or_default())
    }

    /// The patient's cross-enterprise identifier: a mapping the hospital's
    /// systems gave through the API first (the master patient index is
    /// authoritative), then an OtherPatientIDsSequence item, then the
    /// Patient ID itself, each where its issuer is configured as one.
    async fn identifier(
        &self,
        patient_id: &str,
        issuer: &str,
        header: Option<&SeriesHeader>,
    ) -> Result<Result<Identifier, InvalidIdentifier>, Error> {
        let mapped = sqlx::query(
            "SELECT identifier_type, identifier FROM patient_identifier \
             WHERE patient_id = $1 AND issuer_of_patient_id = $2",
        )
        .bind(patient_id)
        .bind(issuer)
        .fetch_optional(self.index.pool())
        .await?;
        if let Some(r) = mapped {
            let kind: String = r.try_get(0)?;
            let number: String = r.try_get(1)?;
            let Some(kind) = IdentifierType::parse(&kind) else {
                return Ok(Err(InvalidIdentifier::DocumentFormat));
            };
            return Ok(Identifier::parse(kind, &number));
        }
        let mut first_error = None;
        if let Some(h) = header {
            for (id, id_issuer) in &h.other_patient_ids {
                if let Some(kind) = self.config.identifier_type_of(id_issuer) {
                    match Identifier::parse(kind, id) {
                        Ok(i) => return Ok(Ok(i)),
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
        }
        if let Some(kind) = self.config.identifier_type_of(issuer) {
            match Identifier::parse(kind, patient_id) {
                Ok(i) => return Ok(Ok(i)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Ok(Err(first_error.unwrap_or(InvalidIdentifier::Missing)))
    }

    /// The patient key of a local patient, from the same sources as
    /// publication uses (mapping, then a header of one of their instances).
    pub async fn patient_key_of_local(
        &self,
        patient_id: &str,
        issuer: &str,
    ) -> Result<Result<String, InvalidIdentifier>, Error> {
        Ok(self
            .identifier_of_local(patient_id, issuer)
            .await?
            .map(|id| self.secret.patient_key(&id)))
    }

    /// The cross-enterprise identifier of a local patient (stays in this
    /// node: callers turn it into keys).
    pub async fn identifier_of_local(
        &self,
        patient_id: &str,
        issuer: &str,
    ) -> Result<Result<Identifier, InvalidIdentifier>, Error> {
        let instance = sqlx::query(
            "SELECT i.blob_hash, i.blob_size FROM instance i \
             JOIN series se ON se.series_key = i.series_key \
             JOIN study st ON st.study_key = se.study_key \
             JOIN patient p ON p.patient_key = st.patient_key \
             WHERE p.patient_id = $1 AND p.issuer_of_patient_id = $2 AND i.is_current = 1 LIMIT 1",
        )
        .bind(patient_id)
        .bind(issuer)
        .fetch_optional(self.index.pool())
        .await?;
        let header = match instance {
            Some(r) => {
                let hex: String = r.try_get(0)?;
                let hash = BlobHash::parse(&hex).map_err(|_| crate::index::Error::BadHash(hex))?;
                Some(
                    self.read_header(&hash, r.try_get::<i64, _>(1)? as u64)
                        .await?,
                )
            }
            None => None,
        };
        self.identifier(patient_id, issuer, header.as_ref()).await
    }

    // -------------------------------------------------------------- publisher

    async fn publisher_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match self.publish_once().await {
                Ok(0) => {
                    backoff = Duration::from_millis(500);
                    // Rows written by another node process wake nobody
                    // here: poll as well.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
                Ok(_) => backoff = Duration::from_millis(500),
                Err(error) => {
                    crate::metrics::publish_failed();
                    tracing::warn!(%error, retry_in = ?backoff, "publication to the registry failed");
                    {
                        let mut s = self.status.lock().expect("status lock");
                        s.last_error = Some(error.to_string());
                        s.last_error_at = Some(now());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.publish_max_backoff);
                }
            }
        }
    }

    /// Sends one leased batch; returns how many rows the registry answered
    /// for, or the transient error that left them in the outbox.
    pub async fn publish_once(&self) -> Result<usize, client::Error> {
        let batch = match self.lease_batch().await {
            Ok(b) => b,
            Err(e) => return Err(client::Error::Unreachable(format!("outbox: {e}"))),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        match self.send(&batch).await {
            Ok(_) => {
                self.delete_rows(&batch).await;
                self.note_success(batch.len());
                Ok(batch.len())
            }
            Err(
                e @ client::Error::Status {
                    status: 400 | 409 | 413 | 422,
                    ..
                },
            ) => {
                // The registry refuses something in the batch itself: send
                // row by row, so that one bad row does not hold up the rest.
                tracing::warn!(error = %e, rows = batch.len(), "batch refused; sending row by row");
                let mut answered = 0;
                for row in &batch {
                    let one = std::slice::from_ref(row);
                    match self.send(one).await {
                        Ok(_) => {
                            self.delete_rows(one).await;
                            answered += 1;
                        }
                        Err(client::Error::Status { status, detail })
                            if matches!(status, 400 | 409 | 413 | 422) =>
                        {
                            tracing::error!(
                                seq = row.seq,
                                study_instance_uid = %row.study_instance_uid,
                                status,
                                detail,
                                "registry refused a record; kept as dead in the outbox"
                            );
                            let _ = sqlx::query(
                                "UPDATE publication_outbox SET dead = 1, last_error = $2 WHERE seq = $1",
                            )
                            .bind(row.seq)
                            .bind(format!("{status}: {detail}"))
                            .execute(self.index.pool())
                            .await;
                            answered += 1;
                        }
                        Err(other) => {
                            self.release_rows(&batch, &other.to_string()).await;
                            return Err(other);
                        }
                    }
                }
                self.note_success(answered);
                Ok(answered)
            }
            Err(e) => {
                self.release_rows(&batch, &e.to_string()).await;
                Err(e)
            }
        }
    }

    /// Sends outbox rows: records and retractions in one publication,
    /// events in one report. Both are idempotent at the registry.
    async fn send(&self, rows: &[OutboxRow]) -> Result<(), client::Error> {
        let request = request_of(rows);
        if !request.records.is_empty() || !request.retractions.is_empty() {
            self.client
                .publish(&self.config.hospital_id, &request)
                .await?;
        }
        let events: Vec<RecognitionEvent> = rows
            .iter()
            .filter_map(|r| match &r.item {
                OutboxItem::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect();
        if !events.is_empty() {
            self.client.events(&RecognitionEvents { events }).await?;
        }
        Ok(())
    }

    /// Queues a warning or decision for the registry's statistics: through
    /// the outbox, so that the registry being down loses none.
    pub async fn enqueue_event(&self, event: RecognitionEvent) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO publication_outbox (study_instance_uid, record_version, body, \
             created_at, attempts, lease_until, dead) VALUES ('', 0, $1, $2, 0, '', 0)",
        )
        .bind(serde_json::to_string(&OutboxItem::Event(event)).expect("event serialises"))
        .bind(now())
        .execute(self.index.pool())
        .await?;
        self.wake.notify_one();
        Ok(())
    }

    fn note_success(&self, rows: usize) {
        crate::metrics::publish_succeeded();
        let mut s = self.status.lock().expect("status lock");
        s.last_success_at = Some(now());
        s.delivered += rows as u64;
        tracing::debug!(rows, "published to the registry");
    }

    /// Leases up to a batch of rows no other process holds. The lease time
    /// check sits in the outer WHERE too: under PostgreSQL's READ
    /// COMMITTED, a second process whose subquery picked the same rows
    /// re-checks them after the first commits and skips them.
    async fn lease_batch(&self) -> Result<Vec<OutboxRow>, Error> {
        let now = now();
        let until = format!(
            "{}#{}",
            rfc3339(SystemTime::now() + Duration::from_secs(120)),
            self.lease_tag
        );
        sqlx::query(
            "UPDATE publication_outbox SET lease_until = $1, attempts = attempts + 1 \
             WHERE dead = 0 AND lease_until < $2 AND seq IN (SELECT seq FROM publication_outbox \
             WHERE dead = 0 AND lease_until < $2 ORDER BY seq LIMIT $3)",
        )
        .bind(&until)
        .bind(&now)
        .bind(self.config.publish_batch_size as i64)
        .execute(self.index.pool())
        .await?;
        let rows = sqlx::query(
            "SELECT seq, study_instance_uid, body FROM publication_outbox \
             WHERE lease_until = $1 ORDER BY seq",
        )
        .bind(&until)
        .fetch_all(self.index.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get(0)?;
                let body: String = r.try_get(2)?;
                Ok(OutboxRow {
                    seq,
                    study_instance_uid: r.try_get(1)?,
                    item: serde_json::from_str(&body)
                        .map_err(|e| Error::BadOutboxRow(seq, e.to_string()))?,
                })
            })
            .collect()
    }

    async fn delete_rows(&self, rows: &[OutboxRow]) {
        for chunk in rows.chunks(200) {
            // One statement per chunk; the seqs are integers we read.
            let list = chunk
                .iter()
                .map(|r| r.seq.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!("DELETE FROM publication_outbox WHERE seq IN ({list})");
            if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(self.index.pool())
                .await
            {
                // The rows will be sent again when their lease ends: a
                // replay the registry answers `unchanged`.
                tracing::error!(%error, "cannot delete delivered outbox rows");
            }
        }
    }

    async fn release_rows(&self, rows: &[OutboxRow], error: &str) {
        for r in rows {
            let _ = sqlx::query(
                "UPDATE publication_outbox SET lease_until = '', last_error = $2 WHERE seq = $1",
            )
            .bind(r.seq)
            .bind(error)
            .execute(self.index.pool())
            .await;
        }
    }

    // -------------------------------------------------------------- directory

    async fn directory_loop(&self, shutdown: CancellationToken) {
        loop {
            let etag = self
                .directory
                .read()
                .await
                .as_ref()
                .map(|d| d.version.clone());
            match self.client.directory(etag.as_deref()).await {
                Ok(Some(directory)) => {
                    tracing::info!(
                        version = %directory.version,
                        hospitals = directory.hospitals.len(),
                        "hospital directory updated"
                    );
                    {
                        let mut s = self.status.lock().expect("status lock");
                        s.directory_version = Some(directory.version.clone());
                        s.hospitals_in_directory = directory.hospitals.len();
                    }
                    *self.directory.write().await = Some(directory);
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot pull the hospital directory"),
            }
            if self.config.recognition_list_file.is_none() {
                let etag = self.list().map(|l| l.content_hash.clone());
                match self.client.recognition_list(etag.as_deref()).await {
                    Ok(Some((_, text))) => self.activate_pulled_list(&text).await,
                    Ok(None) => {}
                    Err(client::Error::Status { status: 404, .. }) => {
                        tracing::debug!("the registry has no recognition list yet")
                    }
                    Err(error) => tracing::warn!(%error, "cannot pull the recognition list"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.directory_interval) => {}
            }
        }
    }

    // -------------------------------------------------------------- status

    /// Sets the backlog gauges from the outbox (at each scrape).
    pub async fn refresh_metrics(&self) {
        let counted = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN dead = 0 THEN 1 ELSE 0 END), 0), \
             COALESCE(SUM(CASE WHEN dead = 1 THEN 1 ELSE 0 END), 0) FROM publication_outbox",
        )
        .fetch_one(self.index.pool())
        .await
        .and_then(|row| Ok((row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?)));
        match counted {
            Ok((backlog, dead)) => crate::metrics::publish_backlog(backlog, dead),
            Err(error) => tracing::warn!(%error, "cannot count the outbox for /metrics"),
        }
    }

    pub async fn status(&self) -> Result<serde_json::Value, Error> {
        let pool = self.index.pool();
        let count = |sql: &'static str| async move {
            let row = sqlx::query(sql).fetch_one(pool).await?;
            Ok::<i64, Error>(row.try_get(0)?)
        };
        let backlog = count("SELECT COUNT(*) FROM publication_outbox WHERE dead = 0").await?;
        let dead = count("SELECT COUNT(*) FROM publication_outbox WHERE dead = 1").await?;
        let published =
            count("SELECT COUNT(*) FROM study_publication WHERE state = 'published'").await?;
        let reasons = sqlx::query(
            "SELECT reason, COUNT(*) FROM study_publication WHERE state = 'local_only' GROUP BY reason",
        )
        .fetch_all(pool)
        .await?;
        let mut local_only = serde_json::Map::new();
        for r in reasons {
            let reason: Option<String> = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            local_only.insert(reason.unwrap_or_default(), n.into());
        }
        let rows = sqlx::query(
            "SELECT unclassified, COUNT(*) FROM study_publication \
             WHERE unclassified IS NOT NULL AND state = 'published' GROUP BY unclassified",
        )
        .fetch_all(pool)
        .await?;
        let mut unclassified = serde_json::Map::new();
        for r in rows {
            let reason: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            unclassified.insert(reason, n.into());
        }
        let list = self.list().map(|l| {
            serde_json::json!({"version": l.meta.version, "content_hash": l.content_hash, "items": l.items.len()})
        });
        let s = self.status.lock().expect("status lock").clone();
        Ok(serde_json::json!({
            "unclassified": unclassified,
            "recognition_list": list,
            "enabled": true,
            "hospital_id": self.config.hospital_id,
            "registry_url": self.config.registry_url,
            "backlog": backlog,
            "dead": dead,
            "published_studies": published,
            "local_only": local_only,
            "last_success_at": s.last_success_at,
            "last_error": s.last_error,
            "last_error_at": s.last_error_at,
            "delivered": s.delivered,
            "directory_version": s.directory_version,
            "hospitals_in_directory": s.hospitals_in_directory,
        }))
    }

    /// Studies kept local and why (no identifiers or names: UIDs only).
    pub async fn local_only(&self, limit: i64) -> Result<Vec<(String, String)>, Error> {
        let rows = sqlx::query(
            "SELECT study_instance_uid, reason FROM study_publication WHERE state = 'local_only' \
             ORDER BY study_instance_uid LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.index.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Asks the stability worker to evaluate a study again (report, QC,
    /// retraction); the row is created if the study was not yet evaluated.
    pub async fn note_change(&self, study_instance_uid: &str) -> Result<(), Error> {
        mark_changed(&self.index, study_instance_uid).await?;
        Ok(())
    }

    /// Withdraws a study from the registry: a retraction with the next
    /// version goes to the outbox, and the study is not published again
    /// automatically.
    pub async fn retract(&self, study_instance_uid: &str) -> Result<bool, Error> {
        let pool = self.index.pool();
        let mut tx = pool.begin().await?;
        if !enqueue_retraction(&mut tx, study_instance_uid).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        tx.commit().await?;
        self.wake.notify_one();
        Ok(true)
    }

    /// Has the publisher look at the outbox now (rows another transaction
    /// wrote: a deletion's retraction).
    pub fn wake_publisher(&self) {
        self.wake.notify_one();
    }
}

/// The statements of [`Region::retract`] on the caller's transaction, so
/// that a deletion (src/lifecycle.rs) and its retraction commit together.
/// Returns false when the study was already retracted (or never evaluated).
pub async fn enqueue_retraction(
    conn: &mut sqlx::AnyConnection,
    study_instance_uid: &str,
) -> Result<bool, sqlx::Error> {
    let now = now();
    let row = sqlx::query(
        "UPDATE study_publication SET record_version = record_version + 1, \
         state = 'retracted', updated_at = $2 \
         WHERE study_instance_uid = $1 AND state <> 'retracted' RETURNING record_version",
    )
    .bind(study_instance_uid)
    .bind(&now)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(false);
    };
    let version: i64 = row.try_get(0)?;
    let item = OutboxItem::Retraction(Retraction {
        study_instance_uid: study_instance_uid.to_string(),
        record_version: version,
    });
    sqlx::query(
        "INSERT INTO publication_outbox (study_instance_uid, record_version, body, \
         created_at, attempts, lease_until, dead) VALUES ($1, $2, $3, $4, 0, '', 0)",
    )
    .bind(study_instance_uid)
    .bind(version)
    .bind(serde_json::to_string(&item).expect("outbox item serialises"))
    .bind(&now)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Bumps a study's change counter (creating its publication row), so that
/// the stability worker evaluates it again.
/// A study's confirmation at this hospital (migration 0012).
#[derive(Debug, Clone)]
pub struct Confirmation {
    pub items: Vec<ConfirmedItem>,
    pub role: ConfirmerRole,
    pub content_root: String,
}

/// One item the hospital says a study is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmedItem {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub laterality: Option<Laterality>,
}

pub async fn confirmation(
    pool: &sqlx::AnyPool,
    study_instance_uid: &str,
) -> Result<Option<Confirmation>, Error> {
    let Some(row) = sqlx::query(
        "SELECT items, role, content_root FROM study_confirmation WHERE study_instance_uid = $1",
    )
    .bind(study_instance_uid)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let items: String = row.try_get(0)?;
    let role: String = row.try_get(1)?;
    let (Ok(items), Some(role)) = (
        serde_json::from_str::<Vec<ConfirmedItem>>(&items),
        ConfirmerRole::parse(&role),
    ) else {
        // Written by this node only; unreadable means not confirmed.
        return Ok(None);
    };
    Ok(Some(Confirmation {
        items,
        role,
        content_root: row.try_get(2)?,
    }))
}

/// The record's items under a confirmation: the confirmed ones, certain,
/// with `confirmed_by`; the classifier's evidence kept for an item it had
/// found, `confirmation` added. A confirmation of no item leaves the study
/// unclassified.
fn apply_confirmation(
    classified: Vec<RecordItem>,
    c: Confirmation,
) -> (Vec<RecordItem>, Option<String>) {
    if c.items.is_empty() {
        return (Vec::new(), Some("confirmed_no_item".into()));
    }
    let items = c
        .items
        .into_iter()
        .map(|i| {
            let found = classified.iter().find(|k| k.code == i.code);
            let mut evidence: Vec<String> = found.map(|k| k.evidence.clone()).unwrap_or_default();
            evidence.push("confirmation".into());
            RecordItem {
                code: i.code,
                laterality: i.laterality,
                confidence: Some(ItemConfidence::Certain),
                evidence,
                view_positions: found.map(|k| k.view_positions.clone()).unwrap_or_default(),
                confirmed_by: Some(c.role),
            }
        })
        .collect();
    (items, None)
}

pub async fn mark_changed(index: &Index, study_instance_uid: &str) -> Result<(), sqlx::Error> {
    let mut conn = index.pool().acquire().await?;
    mark_changed_on(&mut conn, study_instance_uid).await
}

/// [`mark_changed`] on the caller's connection or transaction.
pub async fn mark_changed_on(
    conn: &mut sqlx::AnyConnection,
    study_instance_uid: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO study_publication (study_instance_uid, evaluated_received_at, changes, \
         evaluated_changes, state, reason, record_version, fingerprint, content_root, updated_at) \
         VALUES ($1, '', 1, 0, 'pending', NULL, 0, '', NULL, $2) \
         ON CONFLICT (study_instance_uid) DO UPDATE SET \
         changes = study_publication.changes + 1, updated_at = excluded.updated_at",
    )
    .bind(study_instance_uid)
    .bind(now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

struct Snapshot {
    study_instance_uid: String,
    last_received_at: String,
    existing: Option<Existing>,
}

struct Existing {
    changes: i64,
    evaluated_received_at: String,
    record_version: i64,
    state: String,
    fingerprint: String,
}

struct OutboxRow {
    seq: i64,
    study_instance_uid: String,
    item: OutboxItem,
}

fn request_of(rows: &[OutboxRow]) -> PublishRequest {
    let mut request = PublishRequest::default();
    for r in rows {
        match &r.item {
            OutboxItem::Record(rec) => request.records.push((**rec).clone()),
            OutboxItem::Retraction(ret) => request.retractions.push(ret.clone()),
            OutboxItem::Event(_) => {}
        }
    }
    request
}

fn record_fingerprint(record: &StudyRecord) -> String {
    let mut r = record.clone();
    r.record_version = 0;
    blake3::hash(
        serde_json::to_string(&r)
            .expect("record serialises")
            .as_bytes(),
    )
    .to_hex()
    .to_string()
}

/// DICOM DA (YYYYMMDD) → YYYY-MM-DD; anything else → none.
fn dicom_date(s: &str) -> Option<String> {
    let s = s.trim();
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &s[..4], &s[4..6], &s[6..]))
        // An impossible date (20240230) is no date: the registry refuses it.
        .filter(|d| crate::common::is_date(d))
}

/// DICOM TM (HHMMSS[.F]) → HH:MM:SS; anything shorter than HHMMSS → none.
fn dicom_time(s: &str) -> Option<String> {
    let s = s.trim();
    let b = s.as_bytes();
    (b.len() >= 6 && b[..6].iter().all(u8::is_ascii_digit))
        .then(|| format!("{}:{}:{}", &s[..2], &s[2..4], &s[4..6]))
        .filter(|t| crate::common::is_time(t))
}

/// The header attributes of one series' first instance that a record
/// needs and the index does not keep.
#[derive(Debug, Clone, Default)]
pub struct SeriesHeader {
    /// (Patient ID, Issuer of Patient ID) of each OtherPatientIDsSequence
    /// item.
    pub other_patient_ids: Vec<(String, String)>,
    pub sop_class_uid: String,
    pub study_description: String,
    pub series_description: String,
    pub protocol_name: String,
    pub requested_procedure_description: String,
    /// The study-level code sequences (ProcedureCodeSequence,
    /// RequestedProcedureCodeSequence, RequestAttributesSequence's
    /// ScheduledProtocolCodeSequence), each code with its scheme.
    pub study_codes: Vec<Code>,
    /// PerformedProtocolCodeSequence.
    pub series_codes: Vec<Code>,
    pub modality: String,
    pub body_part_examined: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub image_type: String,
    /// ContrastBolusAgent or ContrastBolusAgentSequence present.
    pub contrast_agent: bool,
    /// ContrastBolusAgent as written.
    pub contrast_agent_text: String,
    pub contrast_agent_sequence: bool,
    pub contrast_route: String,
    pub laterality: String,
    pub image_laterality: String,
    pub view_position: String,
    /// View Code Sequence: code meaning, else value.
    pub view_code: String,
    /// NumberOfFrames, 1 when absent.
    pub number_of_frames: u32,
    /// PatientBirthDate and PatientSex as written: checked against a
    /// resident ID number before publishing.
    pub patient_birth_date: String,
    pub patient_sex: String,
    /// PatientAge (AS: 002Y, 018M, 003W, 010D) and StudyDate, for the
    /// patient's age at the study.
    pub patient_age: String,
    pub study_date: String,
    /// ContrastBolusIngredient, a ContrastBolusVolume above 0 or an
    /// intravenous route: something was injected, named or not.
    pub contrast_bolus_recorded: bool,
}

/// The patient's age in whole years at the study: PatientAge, else the
/// birth date and the study date (both YYYYMMDD).
fn age_in_years(h: &SeriesHeader) -> Option<u32> {
    let age = h.patient_age.trim();
    if age.len() == 4 && age[..3].bytes().all(|b| b.is_ascii_digit()) {
        let n: u32 = age[..3].parse().ok()?;
        return match &age[3..] {
            "Y" | "y" => Some(n),
            "M" | "m" => Some(n / 12),
            "W" | "w" => Some(n / 52),
            "D" | "d" => Some(n / 365),
            _ => None,
        };
    }
    let date = |d: &str| chrono::NaiveDate::parse_from_str(d.trim(), "%Y%m%d").ok();
    let (birth, study) = (date(&h.patient_birth_date)?, date(&h.study_date)?);
    study.years_since(birth)
}

/// Stops before Pixel Data and whatever follows: after View Code Sequence
/// (0054,0220), the last attribute recognition reads (a radiograph's view
/// where ViewPosition is empty).
const HEADER_UNTIL: Tag = Tag(0x0055, 0x0000);

/// The longest a peer may go without sending a byte of an answer it has
/// begun (or of its answer's head) before the fetch fails as `peer_down`.
pub const PEER_READ_TIMEOUT: Duration = Duration::from_secs(60);

fn parse_header(bytes: &[u8]) -> Option<SeriesHeader> {
    let after_preamble = bytes.get(128..)?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(HEADER_UNTIL)
        .from_reader(after_preamble)
        .ok()?;
    // A value present but unreadable (bytes not of the declared character
    // set) is kept as U+FFFD, not dropped: the classifier then claims less
    // (`text_unreadable`) rather than read what is left as all there is.
    let raw = |o: &InMemDicomObject, tag: Tag| -> String {
        o.get(tag)
            .map(|e| match e.to_str() {
                Ok(s) => s.trim_matches(['\0', ' ']).to_string(),
                Err(_) => "\u{FFFD}".to_string(),
            })
            .unwrap_or_default()
    };
    let charset = raw(&obj, tags::SPECIFIC_CHARACTER_SET);
    // Chinese text under a wrong or missing Specific Character Set is
    // repaired here, once, for everything downstream.
    let text = |o: &InMemDicomObject, tag: Tag| -> String {
        crate::recognition::classify::repair_text(&raw(o, tag), &charset)
    };
    let code_of = |item: &InMemDicomObject| Code {
        value: text(item, tags::CODE_VALUE),
        scheme: text(item, tags::CODING_SCHEME_DESIGNATOR),
        meaning: text(item, tags::CODE_MEANING),
    };
    let codes_of = |o: &InMemDicomObject, seq: Tag, out: &mut Vec<Code>| {
        if let Some(e) = o.get(seq)
            && let Some(items) = e.items()
        {
            for item in items {
                let c = code_of(item);
                if !c.value.is_empty() || !c.meaning.is_empty() {
                    out.push(c);
                }
                // RequestAttributesSequence nests the scheduled protocol.
                if let Some(inner) = item.get(tags::SCHEDULED_PROTOCOL_CODE_SEQUENCE)
                    && let Some(inner_items) = inner.items()
                {
                    for i in inner_items {
                        let c = code_of(i);
                        if !c.value.is_empty() || !c.meaning.is_empty() {
                            out.push(c);
                        }
                    }
                }
            }
        }
    };
    let mut h = SeriesHeader::default();
    if let Some(seq) = obj.get(tags::OTHER_PATIENT_I_DS_SEQUENCE)
        && let Some(items) = seq.items()
    {
        for item in items {
            h.other_patient_ids.push((
                text(item, tags::PATIENT_ID),
                text(item, tags::ISSUER_OF_PATIENT_ID),
            ));
        }
    }
    h.image_type = text(&obj, tags::IMAGE_TYPE);
    h.sop_class_uid = raw(&obj, tags::SOP_CLASS_UID);
    h.modality = raw(&obj, tags::MODALITY).to_ascii_uppercase();
    h.body_part_examined = text(&obj, tags::BODY_PART_EXAMINED);
    h.study_instance_uid = raw(&obj, tags::STUDY_INSTANCE_UID);
    h.series_instance_uid = raw(&obj, tags::SERIES_INSTANCE_UID);
    h.study_description = text(&obj, tags::STUDY_DESCRIPTION);
    h.series_description = text(&obj, tags::SERIES_DESCRIPTION);
    h.protocol_name = text(&obj, tags::PROTOCOL_NAME);
    h.requested_procedure_description = text(&obj, tags::REQUESTED_PROCEDURE_DESCRIPTION);
    for seq in [
        tags::PROCEDURE_CODE_SEQUENCE,
        tags::REQUESTED_PROCEDURE_CODE_SEQUENCE,
        tags::REQUEST_ATTRIBUTES_SEQUENCE,
    ] {
        codes_of(&obj, seq, &mut h.study_codes);
    }
    codes_of(
        &obj,
        tags::PERFORMED_PROTOCOL_CODE_SEQUENCE,
        &mut h.series_codes,
    );
    let agent = text(&obj, tags::CONTRAST_BOLUS_AGENT);
    let agent_seq = obj
        .get(tags::CONTRAST_BOLUS_AGENT_SEQUENCE)
        .and_then(|e| e.items().map(|i| !i.is_empty()))
        .unwrap_or(false);
    h.contrast_agent = !agent.is_empty() || agent_seq;
    h.contrast_agent_text = agent;
    h.contrast_agent_sequence = agent_seq;
    h.contrast_route = text(&obj, tags::CONTRAST_BOLUS_ROUTE).to_ascii_uppercase();
    let volume = raw(&obj, tags::CONTRAST_BOLUS_VOLUME)
        .parse::<f64>()
        .unwrap_or(0.0);
    let route = h.contrast_route.replace(['.', ' '], "");
    h.contrast_bolus_recorded = !text(&obj, tags::CONTRAST_BOLUS_INGREDIENT).is_empty()
        || volume > 0.0
        || matches!(
            route.as_str(),
            "IV" | "INTRAVENOUS" | "INTRAARTERIAL" | "IA"
        )
        || route.contains("静脉");
    h.laterality = text(&obj, tags::LATERALITY).to_ascii_uppercase();
    h.image_laterality = text(&obj, tags::IMAGE_LATERALITY).to_ascii_uppercase();
    h.view_position = text(&obj, tags::VIEW_POSITION).to_ascii_uppercase();
    h.sop_instance_uid = raw(&obj, tags::SOP_INSTANCE_UID);
    h.patient_birth_date = raw(&obj, tags::PATIENT_BIRTH_DATE);
    h.patient_sex = raw(&obj, tags::PATIENT_SEX);
    h.patient_age = raw(&obj, tags::PATIENT_AGE);
    h.study_date = raw(&obj, tags::STUDY_DATE);
    h.number_of_frames = raw(&obj, tags::NUMBER_OF_FRAMES)
        .parse::<u32>()
        .unwrap_or(1)
        .max(1);
    if let Some(seq) = obj.get(tags::VIEW_CODE_SEQUENCE)
        && let Some(item) = seq.items().and_then(|i| i.first())
    {
        let c = code_of(item);
        h.view_code = if c.meaning.is_empty() {
            c.value
        } else {
            c.meaning
        };
    }
    Some(h)
}

/// Radiographs and mammograms carry side, view and body part per image:
/// every instance is read (up to a bound), not the first of the series.
pub fn read_every_instance(modality: &str) -> bool {
    matches!(
        modality.trim().to_ascii_uppercase().as_str(),
        "DX" | "CR" | "DR" | "MG"
    )
}

/// How many instances of a radiograph or mammography series are read.
pub const MAX_INSTANCES_READ: usize = 64;

fn instance_attributes(h: &SeriesHeader) -> InstanceAttributes {
    InstanceAttributes {
        sop_instance_uid: h.sop_instance_uid.clone(),
        body_part_examined: h.body_part_examined.clone(),
        image_laterality: h.image_laterality.clone(),
        view_position: h.view_position.clone(),
        view_code: h.view_code.clone(),
    }
}

/// The series attributes the classifier takes, from the headers read (the
/// first speaks for the series) and the index's modality and body part.
fn series_attributes(
    headers: &[SeriesHeader],
    instances_in_series: usize,
    series_instance_uid: &str,
    modality: &str,
    body_part: &str,
) -> SeriesAttributes {
    let first = headers.first().cloned().unwrap_or_default();
    let images = u32::try_from(instances_in_series)
        .unwrap_or(u32::MAX)
        .saturating_mul(first.number_of_frames.max(1));
    SeriesAttributes {
        series_instance_uid: series_instance_uid.to_string(),
        modality: modality.to_string(),
        sop_class_uid: first.sop_class_uid.clone(),
        body_part_examined: body_part.to_string(),
        series_description: first.series_description.clone(),
        protocol_name: first.protocol_name.clone(),
        image_type: first.image_type.clone(),
        contrast_agent: first.contrast_agent_text.clone(),
        contrast_agent_sequence: first.contrast_agent_sequence,
        contrast_route: first.contrast_route.clone(),
        contrast_bolus_recorded: first.contrast_bolus_recorded,
        laterality: first.laterality.clone(),
        codes: first.series_codes.clone(),
        images,
        instances: headers.iter().map(instance_attributes).collect(),
    }
}

/// The study attributes of a study's series headers (first one per
/// series).
fn study_attributes(
    headers: &[SeriesHeader],
    series: Vec<SeriesAttributes>,
    hospital_id: Option<String>,
) -> StudyAttributes {
    let first = headers.first().cloned().unwrap_or_default();
    let mut codes: Vec<Code> = Vec::new();
    for c in headers.iter().flat_map(|h| h.study_codes.iter()) {
        if !codes.contains(c) {
            codes.push(c.clone());
        }
    }
    StudyAttributes {
        study_description: first.study_description,
        requested_procedure_description: first.requested_procedure_description,
        codes,
        series,
        hospital_id,
        patient_age_years: headers.first().and_then(age_in_years),
        patient_sex: headers
            .first()
            .map(|h| h.patient_sex.clone())
            .unwrap_or_default(),
    }
}

/// `huren recognition classify`: Part-10 files (directories recursively)
/// grouped by Study Instance UID, one JSON line per study.
pub fn classify_files(
    list: &RecognitionList,
    hospital_id: Option<&str>,
    paths: &[std::path::PathBuf],
) -> std::io::Result<Vec<String>> {
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
        if p.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(p)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(|e| e.path());
            for e in entries {
                walk(&e.path(), out)?;
            }
        } else {
            out.push(p.to_path_buf());
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        walk(p, &mut files)?;
    }
    // Study → series → headers (by SOP Instance UID: the first speaks for
    // the series, as on the node).
    let mut studies: BTreeMap<String, BTreeMap<String, BTreeMap<String, SeriesHeader>>> =
        BTreeMap::new();
    let mut skipped = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f)?;
        match parse_header(&bytes) {
            Some(h) if !h.study_instance_uid.is_empty() => {
                studies
                    .entry(h.study_instance_uid.clone())
                    .or_default()
                    .entry(h.series_instance_uid.clone())
                    .or_default()
                    .insert(h.sop_instance_uid.clone(), h);
            }
            _ => skipped.push(f),
        }
    }
    let mut out = Vec::new();
    for (uid, series) in studies {
        let per_series: Vec<(String, Vec<SeriesHeader>, usize)> = series
            .into_iter()
            .map(|(uid, instances)| {
                let count = instances.len();
                let mut v: Vec<SeriesHeader> = instances.into_values().collect();
                let keep = if v.first().is_some_and(|h| read_every_instance(&h.modality)) {
                    MAX_INSTANCES_READ
                } else {
                    1
                };
                v.truncate(keep);
                (uid, v, count)
            })
            .collect();
        let headers: Vec<SeriesHeader> = per_series.iter().map(|(_, v, _)| v[0].clone()).collect();
        let attrs: Vec<SeriesAttributes> = per_series
            .iter()
            .map(|(uid, v, count)| {
                series_attributes(v, *count, uid, &v[0].modality, &v[0].body_part_examined)
            })
            .collect();
        let c = classify(
            list,
            &study_attributes(&headers, attrs, hospital_id.map(str::to_string)),
        );
        out.push(
            serde_json::json!({
                "study_instance_uid": uid,
                "items": c.items,
                "unclassified": c.unclassified,
                "list_version": list.content_hash,
            })
            .to_string(),
        );
    }
    for f in skipped {
        out.push(
            serde_json::json!({"file": f.display().to_string(), "error": "not a DICOM Part-10 file with a Study Instance UID"})
                .to_string(),
        );
    }
    Ok(out)
}

struct Summary {
    contrast: Contrast,
    laterality: Vec<Laterality>,
    view_positions: Vec<String>,
}

/// Contrast is series-level: a series is enhanced when a contrast agent is
/// recorded and its route is not oral (oral contrast alone does not make an
/// enhanced scan; recognition-facts.md), read with the active list's
/// vocabulary (ContrastBolusAgent NONE, 无, - is no agent), or without a
/// list, with the route alone. Localizers (ImageType LOCALIZER) are
/// neither plain nor enhanced series of the exam.
fn summarise(
    headers: &[SeriesHeader],
    vocabulary: Option<&crate::recognition::list::Vocabulary>,
) -> Summary {
    let mut plain = false;
    let mut enhanced = false;
    let mut laterality = BTreeSet::new();
    let mut views = BTreeSet::new();
    for h in headers {
        if h.image_type.to_ascii_uppercase().contains("LOCALIZER") {
            continue;
        }
        let (given, oral) = match vocabulary {
            Some(v) => crate::recognition::classify::contrast_agent(
                v,
                &h.contrast_agent_text,
                h.contrast_agent_sequence,
                &h.contrast_route,
            ),
            None => (h.contrast_agent, h.contrast_route.contains("ORAL")),
        };
        if given && !oral {
            enhanced = true;
        } else {
            plain = true;
        }
        for l in [&h.laterality, &h.image_laterality] {
            match l.as_str() {
                "L" => {
                    laterality.insert(Laterality::Left);
                }
                "R" => {
                    laterality.insert(Laterality::Right);
                }
                "B" => {
                    laterality.insert(Laterality::Both);
                }
                _ => {}
            }
        }
        if !h.view_position.is_empty() {
            views.insert(h.view_position.clone());
        }
    }
    Summary {
        contrast: match (plain, enhanced) {
            (true, true) => Contrast::PlainAndEnhanced,
            (false, true) => Contrast::Enhanced,
            _ => Contrast::None,
        },
        laterality: laterality.into_iter().collect(),
        view_positions: views.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_root_is_order_free_and_changes_with_any_instance() {
        let h1 = BlobHash::from_hash(blake3::hash(b"one"));
        let h2 = BlobHash::from_hash(blake3::hash(b"two"));
        let a = content_root([("1.2.3", &h1), ("1.2.4", &h2)]);
        let b = content_root([("1.2.4", &h2), ("1.2.3", &h1)]);
        assert_eq!(a, b);
        assert_ne!(a, content_root([("1.2.3", &h1)]));
        assert_ne!(a, content_root([("1.2.3", &h2), ("1.2.4", &h1)]));
        // UID boundaries are unambiguous: "1.2" + "3.4" is not "1.23" + ".4".
        assert_ne!(
            content_root([("1.2", &h1), ("3.4", &h2)]),
            content_root([("1.23", &h1), (".4", &h2)])
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(dicom_date("20250131").as_deref(), Some("2025-01-31"));
        assert_eq!(dicom_date(""), None);
        assert_eq!(dicom_date("2025-01-31"), None);
        assert_eq!(dicom_time("101502.123").as_deref(), Some("10:15:02"));
        assert_eq!(dicom_time("1015"), None);
    }

    #[test]
    fn a_no_agent_value_is_no_contrast_in_the_record() {
        let list = crate::recognition::list::RecognitionList::parse(include_str!(
            "../deploy/recognition/jiangsu-example.toml"
        ))
        .unwrap();
        let h = |agent: &str, route: &str| SeriesHeader {
            contrast_agent: !agent.is_empty(),
            contrast_agent_text: agent.into(),
            contrast_route: route.into(),
            ..SeriesHeader::default()
        };
        for (agent, route, expected) in [
            ("NONE", "", Contrast::None),
            ("无", "", Contrast::None),
            ("-", "", Contrast::None),
            ("N/A", "", Contrast::None),
            ("Water", "ORAL", Contrast::None),
            ("Ultravist 370", "IV", Contrast::Enhanced),
            ("碘海醇", "", Contrast::Enhanced),
        ] {
            assert_eq!(
                summarise(&[h(agent, route)], Some(&list.vocabulary)).contrast,
                expected,
                "{agent:?} {route:?}"
            );
        }
    }

    #[test]
    fn contrast_and_sides() {
        let h = |agent: bool, route: &str, image_type: &str, lat: &str| SeriesHeader {
            contrast_agent: agent,
            contrast_route: route.into(),
            image_type: image_type.into(),
            laterality: lat.into(),
            ..SeriesHeader::default()
        };
        let cases: &[(&[SeriesHeader], Contrast)] = &[
            (
                &[h(false, "", "ORIGINAL\\PRIMARY\\AXIAL", "")],
                Contrast::None,
            ),
            (
                &[h(false, "", "ORIGINAL", ""), h(true, "IV", "ORIGINAL", "")],
                Contrast::PlainAndEnhanced,
            ),
            (
                &[h(true, "INTRAVENOUS", "ORIGINAL", "")],
                Contrast::Enhanced,
            ),
            (&[h(true, "ORAL", "ORIGINAL", "")], Contrast::None),
            (
                &[
                    h(false, "", "ORIGINAL\\PRIMARY\\LOCALIZER", ""),
                    h(true, "", "ORIGINAL", ""),
                ],
                Contrast::Enhanced,
            ),
        ];
        for (headers, expected) in cases {
            assert_eq!(summarise(headers, None).contrast, *expected, "{headers:?}");
        }
        let s = summarise(&[h(false, "", "", "L"), h(false, "", "", "R")], None);
        assert_eq!(s.laterality, vec![Laterality::Left, Laterality::Right]);
    }
}
