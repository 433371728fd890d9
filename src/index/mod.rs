//! The index: patients, studies, series and instances, on SQLite (the
//! embedded default) or PostgreSQL (larger sites, several node processes).
//!
//! Both backends take the same SQL: the statements use only what both
//! dialects share (`$n` parameters, `ON CONFLICT`, `RETURNING`, partial
//! unique indexes). Where they differ (key types, pragmas) the difference is
//! a parameter here, not a second implementation, so one test suite covers
//! both. Reads go through sqlx's `Any` driver; the writer (writer.rs) runs
//! the same statements through rusqlite on a SQLite file, to spare each
//! instance two thread hops.
//!
//! Writes go through one writer per process, which commits many instances
//! in one transaction (group commit) when several associations store at
//! once: they share the commit's fsync.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::part10::InstanceAttributes;
use crate::types::BlobHash;

mod unsynced;
mod writer;
pub use unsynced::{
    UnsyncedInstance, remove_patient_if_empty, remove_series_if_empty, remove_study_if_empty,
};
use writer::{Target, WriteRequest, Writer, writer_task};

#[derive(Debug, Error)]
pub enum Error {
    #[error("index database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer's own failures: a value of an unexpected type read back,
    /// a blocking step that did not return.
    #[error("index writer: {0}")]
    Writer(String),
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

#[derive(Clone)]
pub struct Index {
    pool: AnyPool,
    dialect: Dialect,
    writer: mpsc::Sender<WriteRequest>,
    /// Held by whoever writes: the writer task for a batch, or a caller
    /// taking the direct path. One writer at a time is what SQLite allows
    /// anyway, and contending writers would wait in its busy handler's
    /// sleeps instead of queueing here.
    write_lock: Arc<tokio::sync::Mutex<Writer>>,
    /// Whether the direct path waits for the writer (see [`Index::store`]).
    queue_for_writer: bool,
    /// Instances waiting for the writer (see [`Index::store_in_turn`]).
    waiting: Arc<std::sync::Mutex<Vec<WriteRequest>>>,
}

impl Index {
    /// Connects, applies the embedded migrations and starts the writer.
    pub async fn open(url: &str, commit_sync: CommitSync) -> Result<Index, Error> {
        sqlx::any::install_default_drivers();
        let mut sqlite_file = None;
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
                && !path.is_empty()
                && !path.starts_with(":memory:")
            {
                if let Some(parent) = std::path::Path::new(path).parent()
                    && !parent.as_os_str().is_empty()
                {
                    let _ = std::fs::create_dir_all(parent);
                }
                sqlite_file = Some(std::path::PathBuf::from(path));
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
        let target = match sqlite_file {
            Some(path) => Target::SqliteFile {
                path,
                sync: commit_sync,
            },
            None => Target::Pool(pool.clone()),
        };
        let queue_for_writer = target.commits_inline();
        let write_lock = Arc::new(tokio::sync::Mutex::new(Writer::new(target)));
        tokio::spawn(writer_task(rx, write_lock.clone()));
        Ok(Index {
            pool,
            dialect,
            writer: tx,
            write_lock,
            queue_for_writer,
            waiting: Arc::default(),
        })
    }

    /// Indexes an instance whose blob is published. Returns after the
    /// transaction holding it has committed (see [`CommitSync`] for when
    /// that commit is also flushed), or [`Error::RejectedInstance`] when a
    /// rejection note bars its SOP Instance UID: that check is part of the
    /// statement that writes the row, not a query of its own (a round trip
    /// to the database per instance saved).
    pub async fn store(&self, instance: NewInstance) -> Result<StoreOutcome, Error> {
        // When a commit costs no fsync (a SQLite file whose commits are
        // flushed by the blob store's syncfs, or not at all), instances
        // queue for the writer and are written on their own tasks, those
        // that arrived during a commit together in the next: a commit costs
        // less than the hops to the writer task and its blocking thread.
        // Otherwise the direct path: the instance is new in a series already
        // written, and nobody else is writing; then one INSERT on the
        // caller's task spares the two task hops through the writer task.
        // When another instance is being written, the writer task batches
        // them (group commit: one fsync for many).
        if self.queue_for_writer {
            return self.store_in_turn(instance).await;
        }
        if let Ok(mut writer) = self.write_lock.try_lock()
            && writer.insert_new(&instance).await?
        {
            return Ok(StoreOutcome::Stored);
        }
        let (reply, wait) = oneshot::channel();
        self.writer
            .send(WriteRequest { instance, reply })
            .await
            .map_err(|_| Error::WriterStopped)?;
        wait.await.map_err(|_| Error::WriterStopped)?
    }

    /// [`Index::store`] when a commit costs no fsync: the instance joins
    /// the queue of those waiting, and whoever gets the writer next writes
    /// every instance queued by then in one transaction and answers each
    /// (group commit, on the caller's own thread; see `MAX_INLINE_BATCH`).
    /// Instances that arrive while a commit runs share the next one: with
    /// several associations storing at once, their rows share the pages of
    /// the series, the study and the table's tail, and one commit writes
    /// them. Alone, an instance of a known series is one INSERT.
    async fn store_in_turn(&self, instance: NewInstance) -> Result<StoreOutcome, Error> {
        let (reply, mut answer) = oneshot::channel();
        self.waiting
            .lock()
            .expect("the queue's holders do not panic")
            .push(WriteRequest { instance, reply });
        let mut writer = self.write_lock.lock().await;
        loop {
            // A writer before us may have taken our request: requests leave
            // the queue only under the lock, and are answered before it is
            // let go.
            match answer.try_recv() {
                Ok(outcome) => return outcome,
                // Its holder was cancelled halfway: whether the row was
                // committed is unknown. The sender gets a failure and may
                // send again; the same bytes again are a duplicate, stored
                // once.
                Err(oneshot::error::TryRecvError::Closed) => return Err(Error::WriterStopped),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let mut batch = {
                let mut waiting = self
                    .waiting
                    .lock()
                    .expect("the queue's holders do not panic");
                let take = waiting.len().min(writer::MAX_BATCH);
                waiting.drain(..take).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                // Unanswered yet not queued: cannot happen while the
                // invariant above holds; never wait for nobody.
                return Err(Error::WriterStopped);
            }
            // Alone: the direct path's one INSERT, without BEGIN and COMMIT.
            if let [request] = &batch[..] {
                match writer.insert_new(&request.instance).await {
                    Ok(false) => {}
                    done => {
                        let request = batch.pop().expect("one request");
                        let _ = request.reply.send(done.map(|_| StoreOutcome::Stored));
                        continue;
                    }
                }
            }
            writer.write_and_reply(batch).await;
        }
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

    /// Closes the writer's connection and then the pool's.
    pub async fn close(&self) {
        self.write_lock.lock().await.close().await;
        self.pool.close().await;
    }

    /// Holds off this process's writes (the writer task and the direct
    /// path) and forgets the hierarchy cache, for a deletion: the series
    /// and study rows it removes must not stay named by the cache, or the
    /// next instance of such a series would be inserted under a key that no
    /// longer exists.
    pub(crate) async fn pause_writes(&self) -> WritesPaused<'_> {
        let mut writer = self.write_lock.lock().await;
        writer.cache.clear();
        WritesPaused { _writer: writer }
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
    _writer: tokio::sync::MutexGuard<'a, Writer>,
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
