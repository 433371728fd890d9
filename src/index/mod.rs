//! The index: patients, studies, series and instances, on SQLite (the
//! embedded default) or PostgreSQL (larger sites, several node processes).
//!
//! Both backends go through sqlx's `Any` driver with the same SQL: the
//! statements use only what both dialects share (`$n` parameters, `ON
//! CONFLICT`, `RETURNING`, partial unique indexes). Where they differ (key
//! types, pragmas) the difference is a parameter here, not a second
//! implementation, so one test suite covers both.
//!
//! Writes go through one writer task per process that commits many
//! instances in one transaction (group commit): with several associations
//! storing at once, they share the commit's fsync.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::part10::InstanceAttributes;
use crate::types::BlobHash;

mod unsynced;
pub use unsynced::{
    UnsyncedInstance, remove_patient_if_empty, remove_series_if_empty, remove_study_if_empty,
};

#[derive(Debug, Error)]
pub enum Error {
    #[error("index database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("index database URL {0:?} is neither sqlite:// nor postgres://")]
    UnsupportedUrl(String),
    #[error("index writer stopped")]
    WriterStopped,
    #[error("index row holds an invalid blob hash {0:?}")]
    BadHash(String),
    /// The SOP Instance UID is barred by an IOCM rejection note
    /// (`rejected_instance`, migrations 0010 and 0011): no row was written.
    #[error("SOP Instance UID rejected ({reason_code})")]
    RejectedInstance { reason_code: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Whether a SQLite commit flushes its WAL itself (PostgreSQL's commits
/// always reach its own stable storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitSync {
    /// synchronous=FULL: every commit fsyncs the WAL.
    EveryCommit,
    /// synchronous=NORMAL: commits are written, not flushed; the caller
    /// flushes (full durability: the syncfs that also covers the blob) or
    /// accepts losing the last commits on power loss (relaxed).
    Deferred,
}

/// An instance whose blob is published (see crate::ingest for when it is
/// also flushed), ready to be indexed.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub attributes: InstanceAttributes,
    pub blob_hash: BlobHash,
    pub blob_size: u64,
    pub calling_ae_title: Option<String>,
    pub received_at: SystemTime,
}

/// What indexing an instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A SOP Instance UID the index had not seen.
    Stored,
    /// The same bytes as the current version: nothing changed.
    Duplicate,
    /// Different bytes under a known SOP Instance UID: this version is now
    /// current, earlier ones are kept.
    NewVersion { version: i64 },
    /// An IOCM rejection note (src/lifecycle.rs): applied, not indexed
    /// itself.
    RejectionNote,
}

/// One version of one instance as the index holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
    pub patient_id: String,
    pub transfer_syntax_uid: String,
    pub blob_hash: BlobHash,
    pub blob_size: u64,
    pub calling_ae_title: Option<String>,
    pub version: i64,
    pub is_current: bool,
}

/// One study with its derived attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyRow {
    pub study_instance_uid: String,
    pub patient_id: String,
    pub patient_name: String,
    pub study_date: String,
    pub study_description: String,
    pub accession_number: String,
    pub modalities_in_study: String,
    pub number_of_study_related_series: i64,
    pub number_of_study_related_instances: i64,
}

struct WriteRequest {
    instance: NewInstance,
    reply: oneshot::Sender<Result<StoreOutcome, Error>>,
}

/// Most instances one group commit takes: bounds the transaction's length.
const MAX_BATCH: usize = 64;

#[derive(Clone)]
pub struct Index {
    pool: AnyPool,
    dialect: Dialect,
    writer: mpsc::Sender<WriteRequest>,
    /// Held by whoever writes: the writer task for a batch, or a caller
    /// taking the direct path. One writer at a time is what SQLite allows
    /// anyway, and contending writers would wait in its busy handler's
    /// sleeps instead of queueing here.
    write_lock: Arc<tokio::sync::Mutex<HierarchyCache>>,
}

impl Index {
    /// Connects, applies the embedded migrations and starts the writer.
    pub async fn open(url: &str, commit_sync: CommitSync) -> Result<Index, Error> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            // Create the file on first start: no set-up step for the default.
            let mut url = format!("sqlite:{rest}");
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
            if let Some(path) = rest.trim_start_matches("//").split('?').next()
                && let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                let _ = std::fs::create_dir_all(parent);
            }
            (Dialect::Sqlite, url)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Dialect::Postgres, url.to_string())
        } else {
            return Err(Error::UnsupportedUrl(url.to_string()));
        };
        let options: AnyConnectOptions = url.parse()?;
        let pool = match dialect {
            Dialect::Sqlite => {
                // WAL lets readers (C-FIND, verify) run while the writer
                // commits. synchronous=FULL fsyncs the WAL at each commit;
                // NORMAL survives a process crash but may lose the last
                // commits on power loss unless something else flushes the
                // WAL (the blob store's syncfs, see CommitSync).
                let synchronous = match commit_sync {
                    CommitSync::EveryCommit => "PRAGMA synchronous = FULL",
                    CommitSync::Deferred => "PRAGMA synchronous = NORMAL",
                };
                AnyPoolOptions::new()
                    .max_connections(4)
                    // sqlx pings a connection before each acquire by default:
                    // one more round trip per instance to the SQLite worker
                    // thread. A broken connection surfaces as the query's own
                    // error instead.
                    .test_before_acquire(false)
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute(synchronous).await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            // A checkpoint runs inside whichever commit crosses
                            // the threshold, adding its writes and fsync to that
                            // instance's acknowledgement; fewer, larger ones
                            // (40 MB of WAL) cost the ingest path less.
                            conn.execute("PRAGMA wal_autocheckpoint = 10000").await?;
                            conn.execute("PRAGMA foreign_keys = ON").await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await?
            }
            Dialect::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    // No ping per acquire: a network round trip per instance.
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(options)
                    .await?
            }
        };
        match dialect {
            Dialect::Sqlite => sqlx::migrate!("migrations/sqlite").run(&pool).await?,
            Dialect::Postgres => sqlx::migrate!("migrations/postgres").run(&pool).await?,
        }
        let (tx, rx) = mpsc::channel(1024);
        let write_lock = Arc::new(tokio::sync::Mutex::new(HierarchyCache::new()));
        tokio::spawn(writer_task(pool.clone(), rx, write_lock.clone()));
        Ok(Index {
            pool,
            dialect,
            writer: tx,
            write_lock,
        })
    }

    /// Indexes an instance whose blob is published. Returns after the
    /// transaction holding it has committed (see [`CommitSync`] for when
    /// that commit is also flushed), or [`Error::RejectedInstance`] when a
    /// rejection note bars its SOP Instance UID: that check is part of the
    /// statement that writes the row, not a query of its own (a round trip
    /// to the database per instance saved).
    pub async fn store(&self, instance: NewInstance) -> Result<StoreOutcome, Error> {
        // Direct path: nobody else is writing and the instance is new in a
        // series already written; then one INSERT on the caller's task
        // spares the two task hops through the writer. Under contention
        // the writer task batches instead (group commit).
        if let Ok(mut cache) = self.write_lock.try_lock()
            && let Some(&(series_key, _, known)) =
                cache.get(&instance.attributes.series_instance_uid)
            && known == hierarchy_fingerprint(&instance.attributes)
        {
            let mut conn = self.pool.acquire().await?;
            let received_at = rfc3339(instance.received_at);
            match insert_new(&mut conn, &instance, series_key, &received_at).await {
                Ok(true) => return Ok(StoreOutcome::Stored),
                Ok(false) => {}
                Err(e) => {
                    cache.clear();
                    return Err(e);
                }
            }
        }
        let (reply, wait) = oneshot::channel();
        self.writer
            .send(WriteRequest { instance, reply })
            .await
            .map_err(|_| Error::WriterStopped)?;
        wait.await.map_err(|_| Error::WriterStopped)?
    }

    /// The pool, for read-only queries of other modules (the matcher).
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Every version of a SOP Instance UID, oldest first.
    pub async fn instance_versions(
        &self,
        sop_instance_uid: &str,
    ) -> Result<Vec<InstanceRow>, Error> {
        let rows = sqlx::query(INSTANCE_SELECT_BY_UID)
            .bind(sop_instance_uid)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(instance_row).collect()
    }

    /// Every instance row (all versions), for verification.
    pub async fn all_instances(&self) -> Result<Vec<InstanceRow>, Error> {
        let rows = sqlx::query(INSTANCE_SELECT_ALL)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(instance_row).collect()
    }

    /// The distinct blob hashes the index refers to.
    pub async fn blob_hashes(&self) -> Result<BTreeSet<BlobHash>, Error> {
        let rows = sqlx::query("SELECT DISTINCT blob_hash FROM instance")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let hex: String = r.try_get(0)?;
                BlobHash::parse(&hex).map_err(|_| Error::BadHash(hex))
            })
            .collect()
    }

    pub async fn study(&self, study_instance_uid: &str) -> Result<Option<StudyRow>, Error> {
        let row = sqlx::query(
            "SELECT st.study_instance_uid, p.patient_id, p.patient_name, st.study_date, \
             st.study_description, st.accession_number, st.modalities_in_study, \
             st.number_of_study_related_series, st.number_of_study_related_instances \
             FROM study st JOIN patient p ON p.patient_key = st.patient_key \
             WHERE st.study_instance_uid = $1",
        )
        .bind(study_instance_uid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(StudyRow {
                study_instance_uid: r.try_get(0)?,
                patient_id: r.try_get(1)?,
                patient_name: r.try_get(2)?,
                study_date: r.try_get(3)?,
                study_description: r.try_get(4)?,
                accession_number: r.try_get(5)?,
                modalities_in_study: r.try_get(6)?,
                number_of_study_related_series: r.try_get(7)?,
                number_of_study_related_instances: r.try_get(8)?,
            })
        })
        .transpose()
    }

    /// Number of current instances.
    pub async fn count_current_instances(&self) -> Result<i64, Error> {
        let row = sqlx::query("SELECT COUNT(*) FROM instance WHERE is_current = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Holds off this process's writes (the writer task and the direct
    /// path) and forgets the hierarchy cache, for a deletion: the series
    /// and study rows it removes must not stay named by the cache, or the
    /// next instance of such a series would be inserted under a key that no
    /// longer exists.
    pub(crate) async fn pause_writes(&self) -> WritesPaused<'_> {
        let mut cache = self.write_lock.lock().await;
        cache.clear();
        WritesPaused { _cache: cache }
    }

    /// Whether any instance row names the blob.
    pub async fn references_blob(&self, hash: &BlobHash) -> Result<bool, Error> {
        let row = sqlx::query("SELECT 1 FROM instance WHERE blob_hash = $1 LIMIT 1")
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }
}

/// See [`Index::pause_writes`]; writes resume when it is dropped.
pub(crate) struct WritesPaused<'a> {
    _cache: tokio::sync::MutexGuard<'a, HierarchyCache>,
}

/// Columns of [`InstanceRow`], in its field order. Queries are spelled out
/// whole because sqlx takes `&'static str`.
const INSTANCE_SELECT_BY_UID: &str = "SELECT i.sop_instance_uid, i.sop_class_uid, \
     se.series_instance_uid, st.study_instance_uid, p.patient_id, i.transfer_syntax_uid, \
     i.blob_hash, i.blob_size, i.calling_ae_title, i.version, i.is_current \
     FROM instance i JOIN series se ON se.series_key = i.series_key \
     JOIN study st ON st.study_key = se.study_key \
     JOIN patient p ON p.patient_key = st.patient_key \
     WHERE i.sop_instance_uid = $1 ORDER BY i.version";

const INSTANCE_SELECT_ALL: &str = "SELECT i.sop_instance_uid, i.sop_class_uid, \
     se.series_instance_uid, st.study_instance_uid, p.patient_id, i.transfer_syntax_uid, \
     i.blob_hash, i.blob_size, i.calling_ae_title, i.version, i.is_current \
     FROM instance i JOIN series se ON se.series_key = i.series_key \
     JOIN study st ON st.study_key = se.study_key \
     JOIN patient p ON p.patient_key = st.patient_key \
     ORDER BY i.instance_key";

fn instance_row(r: &sqlx::any::AnyRow) -> Result<InstanceRow, Error> {
    let hex: String = r.try_get(6)?;
    let blob_hash = BlobHash::parse(&hex).map_err(|_| Error::BadHash(hex))?;
    let size: i64 = r.try_get(7)?;
    let is_current: i64 = r.try_get(10)?;
    Ok(InstanceRow {
        sop_instance_uid: r.try_get(0)?,
        sop_class_uid: r.try_get(1)?,
        series_instance_uid: r.try_get(2)?,
        study_instance_uid: r.try_get(3)?,
        patient_id: r.try_get(4)?,
        transfer_syntax_uid: r.try_get(5)?,
        blob_hash,
        blob_size: size as u64,
        calling_ae_title: r.try_get(8)?,
        version: r.try_get(9)?,
        is_current: is_current == 1,
    })
}

/// Patient, study and series keys the writer has recently written, by
/// Series Instance UID, with a fingerprint of the attribute values written.
/// An instance of a known series whose patient/study/series attributes are
/// unchanged skips the three upserts: most instances of a study are such,
/// and each statement is a round trip to the database.
type HierarchyCache = HashMap<String, (i64, i64, u64)>;

/// Bounds the cache; clearing it costs a few upserts, never correctness.
const MAX_CACHED_SERIES: usize = 10_000;

async fn writer_task(
    pool: AnyPool,
    mut rx: mpsc::Receiver<WriteRequest>,
    write_lock: Arc<tokio::sync::Mutex<HierarchyCache>>,
) {
    while let Some(first) = rx.recv().await {
        let mut cache = write_lock.lock().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let instances: Vec<&NewInstance> = batch.iter().map(|r| &r.instance).collect();
        if cache.len() > MAX_CACHED_SERIES {
            cache.clear();
        }
        let cache = &mut *cache;
        match write_batch(&pool, &instances, cache).await {
            Ok(outcomes) => {
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
            }
            Err(batch_error) => {
                // The rolled-back transaction may have created rows the
                // cache now names.
                cache.clear();
                // One bad instance must not fail its neighbours: retry each
                // alone, so only the one at fault gets the error.
                if batch.len() > 1 {
                    tracing::warn!(error = %batch_error, size = batch.len(), "group commit failed; retrying one by one");
                }
                for request in batch {
                    let result = write_batch(&pool, &[&request.instance], cache)
                        .await
                        .and_then(|mut o| o.remove(0));
                    if result.is_err() {
                        cache.clear();
                    }
                    let _ = request.reply.send(result);
                }
            }
        }
    }
}

/// Writes a batch in one transaction. An instance barred by a rejection
/// note gets its own `Err` and writes nothing (not even its patient, study
/// or series), without failing its neighbours; any other error fails the
/// batch.
async fn write_batch(
    pool: &AnyPool,
    batch: &[&NewInstance],
    cache: &mut HierarchyCache,
) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    // Instance counts and last_received_at follow in triggers (migration
    // 0002).
    let mut new_hierarchy = BTreeSet::new();
    for instance in batch {
        if let Some(reason_code) = rejection(&mut tx, &instance.attributes).await? {
            outcomes.push(Err(Error::RejectedInstance { reason_code }));
            continue;
        }
        let written = write_one(&mut tx, instance, cache).await?;
        if written.hierarchy_written {
            new_hierarchy.insert(written.study_key);
        }
        outcomes.push(Ok(written.outcome));
    }
    // A new series, or a series whose attributes changed, may change the
    // study's series count and Modalities in Study.
    for study_key in new_hierarchy {
        let modalities = sqlx::query(
            "SELECT DISTINCT modality FROM series WHERE study_key = $1 AND modality <> '' ORDER BY modality",
        )
        .bind(study_key)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>(0))
        .collect::<Result<Vec<_>, _>>()?
        .join("\\");
        sqlx::query(
            "UPDATE study SET modalities_in_study = $2, \
             number_of_study_related_series = (SELECT COUNT(*) FROM series WHERE study_key = $1) \
             WHERE study_key = $1",
        )
        .bind(study_key)
        .bind(modalities)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

struct Written {
    outcome: StoreOutcome,
    study_key: i64,
    /// Whether the patient/study/series rows were written (not skipped
    /// thanks to the cache).
    hierarchy_written: bool,
}

fn hierarchy_fingerprint(a: &InstanceAttributes) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &a.patient_id,
        &a.issuer_of_patient_id,
        &a.patient_name,
        &a.patient_birth_date,
        &a.patient_sex,
        &a.study_instance_uid,
        &a.study_date,
        &a.study_time,
        &a.accession_number,
        &a.study_id,
        &a.referring_physician_name,
        &a.study_description,
    )
        .hash(&mut h);
    (
        &a.modality,
        a.series_number,
        &a.series_description,
        &a.body_part_examined,
    )
        .hash(&mut h);
    h.finish()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

async fn write_one(
    conn: &mut AnyConnection,
    instance: &NewInstance,
    cache: &mut HierarchyCache,
) -> Result<Written, Error> {
    let a = &instance.attributes;
    let received_at = rfc3339(instance.received_at);
    let fingerprint = hierarchy_fingerprint(a);
    let (series_key, study_key, hierarchy_written) = match cache.get(&a.series_instance_uid) {
        Some(&(series_key, study_key, known)) if known == fingerprint => {
            (series_key, study_key, false)
        }
        _ => {
            let (series_key, study_key) = write_hierarchy(conn, a, &received_at).await?;
            cache.insert(
                a.series_instance_uid.clone(),
                (series_key, study_key, fingerprint),
            );
            (series_key, study_key, true)
        }
    };
    let outcome = write_instance(conn, instance, series_key, &received_at).await?;
    Ok(Written {
        outcome,
        study_key,
        hierarchy_written,
    })
}

/// Upserts the patient, study and series rows; returns the series and
/// study keys.
async fn write_hierarchy(
    conn: &mut AnyConnection,
    a: &InstanceAttributes,
    received_at: &str,
) -> Result<(i64, i64), Error> {
    // Patient-level attributes follow the latest instance: corrections made
    // at the modality reach the index with the next instance sent.
    let patient_key: i64 = sqlx::query(
        "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET \
           patient_name = excluded.patient_name, \
           patient_birth_date = excluded.patient_birth_date, \
           patient_sex = excluded.patient_sex \
         RETURNING patient_key",
    )
    .bind(&a.patient_id)
    .bind(&a.issuer_of_patient_id)
    .bind(&a.patient_name)
    .bind(&a.patient_birth_date)
    .bind(&a.patient_sex)
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)?;

    // A study stays with the patient it was first indexed under; its other
    // attributes follow the latest instance.
    let study_key: i64 = sqlx::query(
        "INSERT INTO study (patient_key, study_instance_uid, study_date, study_time, accession_number, \
           study_id, referring_physician_name, study_description, last_received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (study_instance_uid) DO UPDATE SET \
           study_date = excluded.study_date, study_time = excluded.study_time, \
           accession_number = excluded.accession_number, study_id = excluded.study_id, \
           referring_physician_name = excluded.referring_physician_name, \
           study_description = excluded.study_description, \
           last_received_at = excluded.last_received_at \
         RETURNING study_key",
    )
    .bind(patient_key)
    .bind(&a.study_instance_uid)
    .bind(&a.study_date)
    .bind(&a.study_time)
    .bind(&a.accession_number)
    .bind(&a.study_id)
    .bind(&a.referring_physician_name)
    .bind(&a.study_description)
    .bind(received_at)
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)?;

    let series_key: i64 = sqlx::query(
        "INSERT INTO series (study_key, series_instance_uid, modality, series_number, \
           series_description, body_part_examined) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (series_instance_uid) DO UPDATE SET \
           modality = excluded.modality, series_number = excluded.series_number, \
           series_description = excluded.series_description, \
           body_part_examined = excluded.body_part_examined \
         RETURNING series_key",
    )
    .bind(study_key)
    .bind(&a.series_instance_uid)
    .bind(&a.modality)
    .bind(a.series_number)
    .bind(&a.series_description)
    .bind(&a.body_part_examined)
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)?;
    Ok((series_key, study_key))
}

/// Adds the instance row, or makes a known version current again.
async fn write_instance(
    conn: &mut AnyConnection,
    instance: &NewInstance,
    series_key: i64,
    received_at: &str,
) -> Result<StoreOutcome, Error> {
    if insert_new(conn, instance, series_key, received_at).await? {
        return Ok(StoreOutcome::Stored);
    }
    let a = &instance.attributes;
    let hash_hex = instance.blob_hash.to_hex();
    let versions = sqlx::query(
        "SELECT blob_hash, version, is_current FROM instance WHERE sop_instance_uid = $1",
    )
    .bind(&a.sop_instance_uid)
    .fetch_all(&mut *conn)
    .await?;
    let mut max_version = 0i64;
    let mut same_bytes: Option<bool> = None; // Some(is_current) when already held
    for row in &versions {
        let hash: String = row.try_get(0)?;
        let version: i64 = row.try_get(1)?;
        let is_current: i64 = row.try_get(2)?;
        max_version = max_version.max(version);
        if hash == hash_hex {
            same_bytes = Some(is_current == 1);
        }
    }

    let outcome = match same_bytes {
        Some(true) => StoreOutcome::Duplicate,
        Some(false) => {
            // Bytes of an earlier version sent again: that version becomes
            // current once more; nothing new is stored.
            sqlx::query(
                "UPDATE instance SET is_current = 0 WHERE sop_instance_uid = $1 AND is_current = 1",
            )
            .bind(&a.sop_instance_uid)
            .execute(&mut *conn)
            .await?;
            let row = sqlx::query(
                "UPDATE instance SET is_current = 1, received_at = $3 \
                 WHERE sop_instance_uid = $1 AND blob_hash = $2 RETURNING version",
            )
            .bind(&a.sop_instance_uid)
            .bind(&hash_hex)
            .bind(received_at)
            .fetch_one(&mut *conn)
            .await?;
            StoreOutcome::NewVersion {
                version: row.try_get(0)?,
            }
        }
        None => {
            if !versions.is_empty() {
                sqlx::query(
                    "UPDATE instance SET is_current = 0 WHERE sop_instance_uid = $1 AND is_current = 1",
                )
                .bind(&a.sop_instance_uid)
                .execute(&mut *conn)
                .await?;
            }
            let version = max_version + 1;
            sqlx::query(
                "INSERT INTO instance (series_key, sop_instance_uid, sop_class_uid, instance_number, \
                   transfer_syntax_uid, blob_hash, blob_size, calling_ae_title, received_at, version, is_current) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1)",
            )
            .bind(series_key)
            .bind(&a.sop_instance_uid)
            .bind(&a.sop_class_uid)
            .bind(a.instance_number)
            .bind(&a.transfer_syntax_uid)
            .bind(&hash_hex)
            .bind(instance.blob_size as i64)
            .bind(instance.calling_ae_title.as_deref())
            .bind(received_at)
            .bind(version)
            .execute(&mut *conn)
            .await?;
            if versions.is_empty() {
                StoreOutcome::Stored
            } else {
                StoreOutcome::NewVersion { version }
            }
        }
    };
    Ok(outcome)
}

/// The reason code under which an IOCM rejection note bars the instance
/// (migrations 0010, 0011), if one does: the same condition as the `WHERE
/// NOT EXISTS` of [`insert_new`]. A bar set for an instance the node did
/// not hold covers only the note's study and patient.
async fn rejection(
    conn: &mut AnyConnection,
    a: &InstanceAttributes,
) -> Result<Option<String>, Error> {
    let row = sqlx::query(
        "SELECT reason_code FROM rejected_instance WHERE sop_instance_uid = $1 \
         AND (study_instance_uid IS NULL OR study_instance_uid = $2) \
         AND (patient_id IS NULL OR patient_id = $3)",
    )
    .bind(&a.sop_instance_uid)
    .bind(&a.study_instance_uid)
    .bind(&a.patient_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// The common case in one statement: a SOP Instance UID never seen, and not
/// barred by a rejection note, becomes version 1, current. Anything else
/// (these bytes already held, another current version, a rejection)
/// leaves the row out and returns `false`, and the caller takes the path
/// that tells these apart. (`WHERE` also keeps SQLite from reading `ON
/// CONFLICT` as a join constraint of the `SELECT`.)
async fn insert_new(
    conn: &mut AnyConnection,
    instance: &NewInstance,
    series_key: i64,
    received_at: &str,
) -> Result<bool, Error> {
    let a = &instance.attributes;
    let inserted = sqlx::query(
        "INSERT INTO instance (series_key, sop_instance_uid, sop_class_uid, instance_number, \
           transfer_syntax_uid, blob_hash, blob_size, calling_ae_title, received_at, version, is_current) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 1, 1 \
         WHERE NOT EXISTS (SELECT 1 FROM rejected_instance r WHERE r.sop_instance_uid = $2 \
           AND (r.study_instance_uid IS NULL OR r.study_instance_uid = $10) \
           AND (r.patient_id IS NULL OR r.patient_id = $11)) \
         ON CONFLICT DO NOTHING RETURNING instance_key",
    )
    .bind(series_key)
    .bind(&a.sop_instance_uid)
    .bind(&a.sop_class_uid)
    .bind(a.instance_number)
    .bind(&a.transfer_syntax_uid)
    .bind(instance.blob_hash.to_hex())
    .bind(instance.blob_size as i64)
    .bind(instance.calling_ae_title.as_deref())
    .bind(received_at)
    .bind(&a.study_instance_uid)
    .bind(&a.patient_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(inserted.is_some())
}
