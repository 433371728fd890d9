//! The index's one writer per process: the statements that file an
//! instance (its patient, study and series upserts, its row, the rejection
//! check). When several associations store at once their instances share
//! a transaction (group commit): on the callers' own tasks when a commit
//! costs no fsync (`Index::store_in_turn`), else by the writer task, whose
//! one fsync then covers them all. An instance alone of a known series is
//! one INSERT on the caller's task.
//!
//! The statements are written once, against [`Statements`], and run on one
//! of two connections:
//! - SQLite files: a rusqlite connection of the writer's own, stepped on the
//!   calling thread. sqlx's SQLite driver runs every statement on a worker
//!   thread of its own and wakes the caller back; on small instances those
//!   two thread hops and sqlx's statement plumbing cost more CPU than
//!   SQLite's insert and commit themselves (docs/benchmarks.md, "the
//!   index writer").
//! - PostgreSQL (and an in-memory SQLite, which only the pool's connections
//!   can share): a sqlx connection taken from the pool for good.
//!
//! Either way the writer keeps the same connection from one commit to the
//! next: SQLite drops a connection's page cache whenever another connection
//! has written since it last looked, and a pooled connection taken at
//! random re-read the B-tree pages it was about to change (13% of the
//! node's CPU on small instances, in pread).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{CommitSync, Error, NewInstance, StoreOutcome};
use crate::part10::InstanceAttributes;

pub(super) struct WriteRequest {
    pub instance: NewInstance,
    pub reply: oneshot::Sender<Result<StoreOutcome, Error>>,
}

/// Most instances one group commit takes: bounds the transaction's length.
pub(super) const MAX_BATCH: usize = 64;

/// Most instances a commit without an fsync writes on the caller's thread:
/// one per association waiting at that moment, each tens of microseconds in
/// the page cache. A longer batch goes to a blocking thread.
const MAX_INLINE_BATCH: usize = 8;

/// Patient, study and series keys the writer has recently written, by
/// Series Instance UID, with a fingerprint of the attribute values written.
/// An instance of a known series whose patient/study/series attributes are
/// unchanged skips the three upserts: most instances of a study are such.
pub(super) type HierarchyCache = HashMap<String, (i64, i64, u64)>;

/// Bounds the cache; clearing it costs a few upserts, never correctness.
const MAX_CACHED_SERIES: usize = 10_000;

/// Where the writer's connection comes from.
pub(super) enum Target {
    /// A SQLite database file, opened by rusqlite with the pool's pragmas.
    SqliteFile { path: PathBuf, sync: CommitSync },
    /// A connection taken from the pool.
    Pool(AnyPool),
}

impl Target {
    /// Whether a SQLite commit may run on the caller's thread: without an
    /// fsync of its own it writes to the page cache only (tens of
    /// microseconds, see `storage::run_short_blocking`).
    pub fn commits_inline(&self) -> bool {
        matches!(
            self,
            Target::SqliteFile {
                sync: CommitSync::Deferred,
                ..
            }
        )
    }
}

enum Conn {
    /// Not open yet, or dropped after an error (a connection that failed a
    /// statement is not trusted with the next).
    Closed,
    Sqlite(Box<rusqlite::Connection>),
    Pooled(AnyConnection),
}

/// What the one writer of this process holds, behind the index's write
/// lock: the hierarchy cache and its own connection.
pub(super) struct Writer {
    target: Target,
    conn: Conn,
    pub cache: HierarchyCache,
    checkpointer: Option<Checkpointer>,
    /// Transactions committed: what group commit saves shows here.
    pub transactions: u64,
}

/// Instances committed between two nudges of the checkpointer: about a
/// megabyte of WAL for small instances.
const CHECKPOINT_EVERY: u32 = 256;

/// Copies the WAL's pages into the database file from a thread of its own.
/// The writer's connection never checkpoints (`wal_autocheckpoint = 0`):
/// a checkpoint writes and fsyncs tens of megabytes, and on the writer it
/// ran inside whichever commit crossed the threshold, on the thread that
/// acknowledges the instance. A PASSIVE checkpoint runs beside the writer's
/// commits; the WAL starts over once one has copied everything.
struct Checkpointer {
    nudge: std::sync::mpsc::SyncSender<()>,
    commits: u32,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: PathBuf) -> Option<Checkpointer> {
        let (nudge, nudged) = std::sync::mpsc::sync_channel::<()>(1);
        let spawned = std::thread::Builder::new()
            .name("huren-checkpoint".into())
            .spawn(move || {
                let mut conn = None;
                loop {
                    // Every nudge, and every few seconds in case nudges
                    // stop (few commits, or only the pool's).
                    match nudged.recv_timeout(Duration::from_secs(5)) {
                        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        // The writer is gone: the index was closed.
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if conn.is_none() {
                        conn = rusqlite::Connection::open(&path)
                            .and_then(|c| c.busy_timeout(Duration::from_secs(10)).map(|()| c))
                            .map_err(|e| tracing::warn!(error = %e, "WAL checkpointer cannot open the index"))
                            .ok();
                    }
                    if let Some(c) = &conn
                        && let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                        conn = None;
                    }
                }
            });
        match spawned {
            Ok(thread) => Some(Checkpointer {
                nudge,
                commits: 0,
                thread,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no WAL checkpointer thread");
                None
            }
        }
    }

    fn committed(&mut self, instances: usize) {
        self.commits += instances as u32;
        if self.commits >= CHECKPOINT_EVERY {
            self.commits = 0;
            let _ = self.nudge.try_send(());
        }
    }
}

impl Writer {
    pub fn new(target: Target) -> Writer {
        let checkpointer = match &target {
            Target::SqliteFile { path, .. } => Checkpointer::start(path.clone()),
            Target::Pool(_) => None,
        };
        Writer {
            target,
            conn: Conn::Closed,
            cache: HierarchyCache::new(),
            checkpointer,
            transactions: 0,
        }
    }

    /// Closes the writer's connection and the checkpointer's, so that
    /// once the pool's are closed too SQLite checkpoints the WAL into the
    /// database file and removes it: a node stopped cleanly leaves one
    /// file, which an operator may copy. A write after this opens a
    /// connection again (without a checkpointer).
    pub async fn close(&mut self) {
        self.conn = Conn::Closed;
        if let Some(Checkpointer { nudge, thread, .. }) = self.checkpointer.take() {
            // The thread ends on the closed channel, closing its connection.
            drop(nudge);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn committed(&mut self, instances: usize) {
        self.transactions += 1;
        if let Some(checkpointer) = &mut self.checkpointer {
            checkpointer.committed(instances);
        }
    }

    /// Forgets what a failed write may have left untrue: cached keys of
    /// rows a rollback removed, and the connection.
    fn reset(&mut self) {
        self.cache.clear();
        self.conn = Conn::Closed;
    }

    async fn open(&mut self) -> Result<(), Error> {
        if !matches!(self.conn, Conn::Closed) {
            return Ok(());
        }
        self.conn = match &self.target {
            Target::SqliteFile { path, sync } => {
                let path = path.clone();
                let sync = *sync;
                let conn = tokio::task::spawn_blocking(move || open_sqlite(&path, sync))
                    .await
                    .map_err(|e| Error::Writer(e.to_string()))??;
                Conn::Sqlite(Box::new(conn))
            }
            Target::Pool(pool) => Conn::Pooled(pool.acquire().await?.detach()),
        };
        Ok(())
    }

    /// See [`Target::commits_inline`].
    fn commits_inline(&self) -> bool {
        self.target.commits_inline()
    }

    /// The direct path: inserts an instance of a series the cache knows,
    /// unchanged, as a new SOP Instance UID, in one statement. `Ok(false)`
    /// when it is not such (series not cached or changed, already held,
    /// another version current, rejected): the caller then writes it as a
    /// batch, whose statements tell these apart.
    pub async fn insert_new(&mut self, instance: &NewInstance) -> Result<bool, Error> {
        let a = &instance.attributes;
        let Some(&(series_key, _, known)) = self.cache.get(&a.series_instance_uid) else {
            return Ok(false);
        };
        if known != hierarchy_fingerprint(a) {
            return Ok(false);
        }
        let result = self.try_insert_new(instance, series_key).await;
        match result {
            Ok(true) => self.committed(1),
            Ok(false) => {}
            Err(_) => self.reset(),
        }
        result
    }

    async fn try_insert_new(
        &mut self,
        instance: &NewInstance,
        series_key: i64,
    ) -> Result<bool, Error> {
        self.open().await?;
        let received_at = rfc3339(instance.received_at);
        if self.commits_inline()
            && let Conn::Sqlite(conn) = &mut self.conn
        {
            match insert_new(&mut **conn, instance, series_key, &received_at)
                .now_or_never()
                .expect("SQLite statements complete when called")
            {
                // Another connection holds the write lock: wait for it
                // below, on a blocking thread. The statement wrote nothing.
                Err(e) if is_busy(&e) => {}
                done => return done,
            }
        }
        match &mut self.conn {
            Conn::Sqlite(_) => {
                let Conn::Sqlite(mut conn) = std::mem::replace(&mut self.conn, Conn::Closed) else {
                    unreachable!("matched above")
                };
                let instance = instance.clone();
                let (conn, result) = tokio::task::spawn_blocking(move || {
                    let result = waiting(&mut conn, |conn| {
                        insert_new(conn, &instance, series_key, &received_at)
                            .now_or_never()
                            .expect("SQLite statements complete when called")
                    });
                    (conn, result)
                })
                .await
                .map_err(|e| Error::Writer(e.to_string()))?;
                self.conn = Conn::Sqlite(conn);
                result
            }
            Conn::Pooled(conn) => insert_new(conn, instance, series_key, &received_at).await,
            Conn::Closed => unreachable!("opened above"),
        }
    }

    /// Writes a batch in one transaction. An instance barred by a rejection
    /// note gets its own `Err` and writes nothing (not even its patient,
    /// study or series), without failing its neighbours; any other error
    /// fails the batch, rolled back.
    async fn write_batch(
        &mut self,
        batch: Vec<NewInstance>,
    ) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
        let result = self.try_write_batch(batch).await;
        match &result {
            Ok(outcomes) => self.committed(outcomes.len()),
            // The rolled-back transaction may have created rows the cache
            // now names.
            Err(_) => self.reset(),
        }
        result
    }

    async fn try_write_batch(
        &mut self,
        batch: Vec<NewInstance>,
    ) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
        self.open().await?;
        if self.cache.len() > MAX_CACHED_SERIES {
            self.cache.clear();
        }
        let inline = self.commits_inline() && batch.len() <= MAX_INLINE_BATCH;
        match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Sqlite(mut conn) => {
                let mut cache = std::mem::take(&mut self.cache);
                // One instance committed to the page cache stays on this
                // thread, unless another connection holds the write lock;
                // a batch of many, or a commit that fsyncs, goes to a
                // blocking thread.
                if inline {
                    match sqlite_transaction(&mut conn, &batch, &mut cache) {
                        Err(e) if is_busy(&e) => {
                            // Rolled back: keys it cached may not exist.
                            cache.clear();
                        }
                        result => {
                            self.conn = Conn::Sqlite(conn);
                            self.cache = cache;
                            return result;
                        }
                    }
                }
                let (conn, cache, result) = tokio::task::spawn_blocking(move || {
                    let result = waiting(&mut conn, |conn| {
                        sqlite_transaction(conn, &batch, &mut cache)
                    });
                    (conn, cache, result)
                })
                .await
                .map_err(|e| Error::Writer(e.to_string()))?;
                self.conn = Conn::Sqlite(conn);
                self.cache = cache;
                result
            }
            Conn::Pooled(mut conn) => {
                let result = pooled_transaction(&mut conn, &batch, &mut self.cache).await;
                self.conn = Conn::Pooled(conn);
                result
            }
            Conn::Closed => unreachable!("opened above"),
        }
    }
}

/// How long a write waits, on a blocking thread, for another connection's
/// write lock (a deletion, the page's writes): the pool's `busy_timeout`.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Whether SQLite refused for a lock another connection holds.
fn is_busy(e: &Error) -> bool {
    matches!(e, Error::Sqlite(rusqlite::Error::SqliteFailure(f, _))
        if f.code == rusqlite::ErrorCode::DatabaseBusy)
}

/// Runs a write that may wait up to [`BUSY_WAIT`] for the write lock: only
/// ever on a blocking thread. On the caller's thread the writer's connection
/// waits for nothing (`busy_timeout` 0), so that a lock held elsewhere never
/// stalls a runtime thread in SQLite's busy handler.
fn waiting<T>(
    conn: &mut rusqlite::Connection,
    write: impl FnOnce(&mut rusqlite::Connection) -> Result<T, Error>,
) -> Result<T, Error> {
    conn.busy_timeout(BUSY_WAIT)?;
    let result = write(conn);
    conn.busy_timeout(Duration::ZERO)?;
    result
}

/// Opens the writer's SQLite connection with the pragmas the pool's
/// connections get (src/index/mod.rs), but no checkpoints of its own (see
/// [`Checkpointer`]); the migrations have run by then.
fn open_sqlite(path: &std::path::Path, sync: CommitSync) -> Result<rusqlite::Connection, Error> {
    let conn = rusqlite::Connection::open(path)?;
    // See `waiting`.
    conn.busy_timeout(Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(32);
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {}; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA foreign_keys = ON;",
        match sync {
            CommitSync::EveryCommit => "FULL",
            CommitSync::Deferred => "NORMAL",
        }
    ))?;
    Ok(conn)
}

fn sqlite_transaction(
    conn: &mut rusqlite::Connection,
    batch: &[NewInstance],
    cache: &mut HierarchyCache,
) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
    // IMMEDIATE: take the write lock at BEGIN, so a reader's snapshot never
    // has to be upgraded mid-transaction (SQLITE_BUSY without waiting).
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = write_all(conn, batch, cache)
        .now_or_never()
        .expect("SQLite statements complete when called")
        .and_then(|outcomes| {
            conn.execute_batch("COMMIT")?;
            Ok(outcomes)
        });
    if result.is_err() {
        // Also after a failed COMMIT, which may leave the transaction
        // open (SQLITE_BUSY); when SQLite has already rolled it back this
        // fails harmlessly.
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

async fn pooled_transaction(
    conn: &mut AnyConnection,
    batch: &[NewInstance],
    cache: &mut HierarchyCache,
) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
    let mut tx = conn.begin().await?;
    let outcomes = write_all(&mut *tx, batch, cache).await?;
    tx.commit().await?;
    Ok(outcomes)
}

pub(super) async fn writer_task(
    mut rx: mpsc::Receiver<WriteRequest>,
    write_lock: std::sync::Arc<tokio::sync::Mutex<Writer>>,
) {
    while let Some(first) = rx.recv().await {
        let mut writer = write_lock.lock().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        writer.write_and_reply(batch).await;
    }
}

impl Writer {
    /// Writes the requests in one transaction and answers each.
    pub(super) async fn write_and_reply(&mut self, batch: Vec<WriteRequest>) {
        let (instances, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|r| (r.instance, r.reply)).unzip();
        let size = instances.len();
        match self.write_batch(instances.clone()).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(batch_error) => {
                // One bad instance must not fail its neighbours: retry each
                // alone, so only the one at fault gets the error.
                if size > 1 {
                    tracing::warn!(error = %batch_error, size, "group commit failed; retrying one by one");
                }
                for (instance, reply) in instances.into_iter().zip(replies) {
                    let result = self
                        .write_batch(vec![instance])
                        .await
                        .and_then(|mut o| o.remove(0));
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// A parameter of a statement, bound by its `$n` number.
#[derive(Debug, Clone, Copy)]
enum Param<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

fn int(v: i64) -> Param<'static> {
    Param::Int(Some(v))
}

fn text(v: &str) -> Param<'_> {
    Param::Text(Some(v))
}

/// A column value read back.
#[derive(Debug)]
enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    fn int(&self) -> Result<i64, Error> {
        match self {
            Value::Int(v) => Ok(*v),
            other => Err(Error::Writer(format!(
                "expected an integer, read {other:?}"
            ))),
        }
    }

    fn text(self) -> Result<String, Error> {
        match self {
            Value::Text(v) => Ok(v),
            other => Err(Error::Writer(format!("expected text, read {other:?}"))),
        }
    }
}

/// Runs one statement of the write path and returns its rows (none for a
/// statement without `RETURNING`): the one thing the write path needs of a
/// connection, so that its statements are written once for both.
trait Statements {
    fn rows<'a>(
        &'a mut self,
        sql: &'static str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<Vec<Vec<Value>>, Error>> + Send + 'a;
}

impl Statements for AnyConnection {
    async fn rows<'a>(
        &'a mut self,
        sql: &'static str,
        params: &'a [Param<'a>],
    ) -> Result<Vec<Vec<Value>>, Error> {
        let mut query = sqlx::query(sql);
        for param in params {
            query = match *param {
                Param::Int(v) => query.bind(v),
                Param::Text(v) => query.bind(v),
            };
        }
        let rows = query.fetch_all(&mut *self).await?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| {
                        if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
                            return Ok(v.map_or(Value::Null, Value::Int));
                        }
                        Ok(row
                            .try_get::<Option<String>, _>(i)?
                            .map_or(Value::Null, Value::Text))
                    })
                    .collect::<Result<Vec<_>, Error>>()
            })
            .collect()
    }
}

impl Statements for rusqlite::Connection {
    /// Steps the statement at once, on the calling thread: the future it
    /// returns is already complete.
    fn rows<'a>(
        &'a mut self,
        sql: &'static str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<Vec<Vec<Value>>, Error>> + Send + 'a {
        std::future::ready(sqlite_rows(self, sql, params))
    }
}

fn sqlite_rows(
    conn: &rusqlite::Connection,
    sql: &'static str,
    params: &[Param<'_>],
) -> Result<Vec<Vec<Value>>, Error> {
    use rusqlite::types::ValueRef;
    let mut statement = conn.prepare_cached(sql)?;
    // SQLite numbers `$n` parameters in the order they first appear, not
    // by n: bind each by its name (a statement may name $2 before $1).
    for index in 1..=statement.parameter_count() {
        let name = statement.parameter_name(index).unwrap_or_default();
        let n: usize = name
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Writer(format!("parameter {name:?} is not $n")))?;
        let param = params
            .get(n - 1)
            .ok_or_else(|| Error::Writer(format!("no value for ${n}")))?;
        match *param {
            Param::Int(v) => statement.raw_bind_parameter(index, v)?,
            Param::Text(v) => statement.raw_bind_parameter(index, v)?,
        }
    }
    let columns = statement.column_count();
    let mut rows = statement.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                other => {
                    return Err(Error::Writer(format!(
                        "unexpected {:?} column",
                        other.data_type()
                    )));
                }
            });
        }
        out.push(values);
    }
    Ok(out)
}

/// The first column of the first row, if any.
async fn first<S: Statements>(
    conn: &mut S,
    sql: &'static str,
    params: &[Param<'_>],
) -> Result<Option<Value>, Error> {
    Ok(conn
        .rows(sql, params)
        .await?
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next()))
}

async fn first_int<S: Statements>(
    conn: &mut S,
    sql: &'static str,
    params: &[Param<'_>],
) -> Result<i64, Error> {
    first(conn, sql, params)
        .await?
        .ok_or_else(|| Error::Writer(format!("no row from {sql}")))?
        .int()
}

async fn write_all<S: Statements + Send>(
    conn: &mut S,
    batch: &[NewInstance],
    cache: &mut HierarchyCache,
) -> Result<Vec<Result<StoreOutcome, Error>>, Error> {
    let mut outcomes = Vec::with_capacity(batch.len());
    // Instance counts and last_received_at follow in triggers (migration
    // 0002).
    let mut new_hierarchy = BTreeSet::new();
    for instance in batch {
        // The common case first: a new SOP Instance UID of a series written
        // unchanged. Its INSERT checks for a rejection note itself, so it
        // needs no query of its own; anything else (a rejection, a version)
        // falls through to the statements that tell these apart.
        let a = &instance.attributes;
        if let Some(&(series_key, _, known)) = cache.get(&a.series_instance_uid)
            && known == hierarchy_fingerprint(a)
            && insert_new(conn, instance, series_key, &rfc3339(instance.received_at)).await?
        {
            outcomes.push(Ok(StoreOutcome::Stored));
            continue;
        }
        if let Some(reason_code) = rejection(conn, a).await? {
            outcomes.push(Err(Error::RejectedInstance { reason_code }));
            continue;
        }
        let written = write_one(conn, instance, cache).await?;
        if written.hierarchy_written {
            new_hierarchy.insert(written.study_key);
        }
        outcomes.push(Ok(written.outcome));
    }
    // A new series, or a series whose attributes changed, may change the
    // study's series count and Modalities in Study.
    for study_key in new_hierarchy {
        let modalities = conn
            .rows(
                "SELECT DISTINCT modality FROM series WHERE study_key = $1 AND modality <> '' ORDER BY modality",
                &[int(study_key)],
            )
            .await?
            .into_iter()
            .filter_map(|row| row.into_iter().next())
            .map(Value::text)
            .collect::<Result<Vec<_>, _>>()?
            .join("\\");
        conn.rows(
            "UPDATE study SET modalities_in_study = $2, \
             number_of_study_related_series = (SELECT COUNT(*) FROM series WHERE study_key = $1) \
             WHERE study_key = $1",
            &[int(study_key), text(&modalities)],
        )
        .await?;
    }
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

async fn write_one<S: Statements + Send>(
    conn: &mut S,
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
async fn write_hierarchy<S: Statements + Send>(
    conn: &mut S,
    a: &InstanceAttributes,
    received_at: &str,
) -> Result<(i64, i64), Error> {
    // Patient-level attributes follow the latest instance: corrections made
    // at the modality reach the index with the next instance sent.
    let patient_key = first_int(
        conn,
        "INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date, patient_sex) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (patient_id, issuer_of_patient_id) DO UPDATE SET \
           patient_name = excluded.patient_name, \
           patient_birth_date = excluded.patient_birth_date, \
           patient_sex = excluded.patient_sex \
         RETURNING patient_key",
        &[
            text(&a.patient_id),
            text(&a.issuer_of_patient_id),
            text(&a.patient_name),
            text(&a.patient_birth_date),
            text(&a.patient_sex),
        ],
    )
    .await?;

    // A study stays with the patient it was first indexed under; its other
    // attributes follow the latest instance.
    let study_key = first_int(
        conn,
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
        &[
            int(patient_key),
            text(&a.study_instance_uid),
            text(&a.study_date),
            text(&a.study_time),
            text(&a.accession_number),
            text(&a.study_id),
            text(&a.referring_physician_name),
            text(&a.study_description),
            text(received_at),
        ],
    )
    .await?;

    let series_key = first_int(
        conn,
        "INSERT INTO series (study_key, series_instance_uid, modality, series_number, \
           series_description, body_part_examined) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (series_instance_uid) DO UPDATE SET \
           modality = excluded.modality, series_number = excluded.series_number, \
           series_description = excluded.series_description, \
           body_part_examined = excluded.body_part_examined \
         RETURNING series_key",
        &[
            int(study_key),
            text(&a.series_instance_uid),
            text(&a.modality),
            Param::Int(a.series_number),
            text(&a.series_description),
            text(&a.body_part_examined),
        ],
    )
    .await?;
    Ok((series_key, study_key))
}

/// Adds the instance row, or makes a known version current again.
async fn write_instance<S: Statements + Send>(
    conn: &mut S,
    instance: &NewInstance,
    series_key: i64,
    received_at: &str,
) -> Result<StoreOutcome, Error> {
    if insert_new(conn, instance, series_key, received_at).await? {
        return Ok(StoreOutcome::Stored);
    }
    let a = &instance.attributes;
    let hash_hex = instance.blob_hash.to_hex();
    let versions = conn
        .rows(
            "SELECT blob_hash, version, is_current FROM instance WHERE sop_instance_uid = $1",
            &[text(&a.sop_instance_uid)],
        )
        .await?;
    let mut max_version = 0i64;
    let mut same_bytes: Option<bool> = None; // Some(is_current) when already held
    let held = !versions.is_empty();
    for row in versions {
        let mut columns = row.into_iter();
        let (Some(hash), Some(version), Some(is_current)) =
            (columns.next(), columns.next(), columns.next())
        else {
            return Err(Error::Writer("short instance version row".into()));
        };
        let version = version.int()?;
        max_version = max_version.max(version);
        if hash.text()? == hash_hex {
            same_bytes = Some(is_current.int()? == 1);
        }
    }

    let outcome = match same_bytes {
        Some(true) => StoreOutcome::Duplicate,
        Some(false) => {
            // Bytes of an earlier version sent again: that version becomes
            // current once more; nothing new is stored.
            conn.rows(
                "UPDATE instance SET is_current = 0 WHERE sop_instance_uid = $1 AND is_current = 1",
                &[text(&a.sop_instance_uid)],
            )
            .await?;
            let version = first_int(
                conn,
                "UPDATE instance SET is_current = 1, received_at = $3 \
                 WHERE sop_instance_uid = $1 AND blob_hash = $2 RETURNING version",
                &[
                    text(&a.sop_instance_uid),
                    text(&hash_hex),
                    text(received_at),
                ],
            )
            .await?;
            StoreOutcome::NewVersion { version }
        }
        None => {
            if held {
                conn.rows(
                    "UPDATE instance SET is_current = 0 WHERE sop_instance_uid = $1 AND is_current = 1",
                    &[text(&a.sop_instance_uid)],
                )
                .await?;
            }
            let version = max_version + 1;
            conn.rows(
                "INSERT INTO instance (series_key, sop_instance_uid, sop_class_uid, instance_number, \
                   transfer_syntax_uid, blob_hash, blob_size, calling_ae_title, received_at, version, is_current) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1)",
                &[
                    &row_params(instance, series_key, &hash_hex, received_at)[..],
                    &[int(version)],
                ]
                .concat(),
            )
            .await?;
            if held {
                StoreOutcome::NewVersion { version }
            } else {
                StoreOutcome::Stored
            }
        }
    };
    Ok(outcome)
}

/// `$1`-`$9` of both statements that insert an instance row.
fn row_params<'a>(
    instance: &'a NewInstance,
    series_key: i64,
    hash_hex: &'a str,
    received_at: &'a str,
) -> [Param<'a>; 9] {
    let a = &instance.attributes;
    [
        int(series_key),
        text(&a.sop_instance_uid),
        text(&a.sop_class_uid),
        Param::Int(a.instance_number),
        text(&a.transfer_syntax_uid),
        text(hash_hex),
        int(instance.blob_size as i64),
        Param::Text(instance.calling_ae_title.as_deref()),
        text(received_at),
    ]
}

/// The reason code under which an IOCM rejection note bars the instance
/// (migrations 0010, 0011), if one does: the same condition as the `WHERE
/// NOT EXISTS` of [`insert_new`]. A bar set for an instance the node did
/// not hold covers only the note's study and patient.
async fn rejection<S: Statements + Send>(
    conn: &mut S,
    a: &InstanceAttributes,
) -> Result<Option<String>, Error> {
    first(
        conn,
        "SELECT reason_code FROM rejected_instance WHERE sop_instance_uid = $1 \
         AND (study_instance_uid IS NULL OR study_instance_uid = $2) \
         AND (patient_id IS NULL OR patient_id = $3)",
        &[
            text(&a.sop_instance_uid),
            text(&a.study_instance_uid),
            text(&a.patient_id),
        ],
    )
    .await?
    .map(Value::text)
    .transpose()
}

/// The common case in one statement: a SOP Instance UID never seen, and not
/// barred by a rejection note, becomes version 1, current. Anything else
/// (these bytes already held, another current version, a rejection)
/// leaves the row out and returns `false`, and the caller takes the path
/// that tells these apart. (`WHERE` also keeps SQLite from reading `ON
/// CONFLICT` as a join constraint of the `SELECT`.)
async fn insert_new<S: Statements + Send>(
    conn: &mut S,
    instance: &NewInstance,
    series_key: i64,
    received_at: &str,
) -> Result<bool, Error> {
    let a = &instance.attributes;
    let hash_hex = instance.blob_hash.to_hex();
    let inserted = first(
        conn,
        "INSERT INTO instance (series_key, sop_instance_uid, sop_class_uid, instance_number, \
           transfer_syntax_uid, blob_hash, blob_size, calling_ae_title, received_at, version, is_current) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, 1, 1 \
         WHERE NOT EXISTS (SELECT 1 FROM rejected_instance r WHERE r.sop_instance_uid = $2 \
           AND (r.study_instance_uid IS NULL OR r.study_instance_uid = $10) \
           AND (r.patient_id IS NULL OR r.patient_id = $11)) \
         ON CONFLICT DO NOTHING RETURNING instance_key",
        &[
            &row_params(instance, series_key, &hash_hex, received_at)[..],
            &[text(&a.study_instance_uid), text(&a.patient_id)],
        ]
        .concat(),
    )
    .await?;
    Ok(inserted.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite numbers parameters by first appearance; a statement naming
    /// $2 before $1 must still get each value in its place.
    #[test]
    fn sqlite_parameters_bind_by_their_number() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let rows = sqlite_rows(&conn, "SELECT $2, $1, $2 || $1", &[text("a"), int(7)]).unwrap();
        let row: Vec<String> = rows[0].iter().map(|v| format!("{v:?}")).collect();
        assert_eq!(row, ["Int(7)", "Text(\"a\")", "Text(\"7a\")"]);
        assert!(sqlite_rows(&conn, "SELECT $3", &[int(1)]).is_err());
    }

    /// The writer never checkpoints; the checkpointer thread copies its
    /// commits into the database file once nudged.
    #[test]
    fn the_checkpointer_copies_the_writers_commits_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let conn = open_sqlite(&path, CommitSync::Deferred).unwrap();
        conn.execute_batch("CREATE TABLE t (v TEXT)").unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for i in 0..2000 {
            conn.execute("INSERT INTO t VALUES (?1)", [format!("{i:0>200}")])
                .unwrap();
        }
        // No checkpoint ran: the rows are in the WAL only.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        let mut checkpointer = Checkpointer::start(path.clone()).unwrap();
        checkpointer.committed(CHECKPOINT_EVERY as usize);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // 2,000 rows of 200 bytes.
        while std::fs::metadata(&path).unwrap().len() < 400_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 10 s"
            );
            std::thread::yield_now();
        }
    }

    fn instance(n: u32) -> NewInstance {
        NewInstance {
            attributes: InstanceAttributes {
                sop_instance_uid: format!("1.2.3.{n}"),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                study_instance_uid: "1.2.3".into(),
                series_instance_uid: "1.2.3.1".into(),
                patient_id: "P1".into(),
                transfer_syntax_uid: "1.2.840.10008.1.2.1".into(),
                ..InstanceAttributes::default()
            },
            blob_hash: crate::types::BlobHash::from_hash(blake3::hash(&n.to_le_bytes())),
            blob_size: 1,
            calling_ae_title: None,
            received_at: SystemTime::now(),
        }
    }

    /// An index on a SQLite file in a new directory (kept while the
    /// returned guard lives), commits without an fsync of their own.
    async fn sqlite_index() -> (tempfile::TempDir, PathBuf, super::super::Index) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let url = format!("sqlite://{}", path.display());
        let index = super::super::Index::open(&url, CommitSync::Deferred)
            .await
            .unwrap();
        (dir, path, index)
    }

    /// While another connection holds SQLite's write lock, an instance
    /// waits for it on a blocking thread, not on the runtime's: on a
    /// single-threaded runtime, the task that lets the lock go still runs.
    /// (Waiting in SQLite's busy handler on the runtime's thread would
    /// hold that task off until the wait timed out, and the store fail.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_lock_held_elsewhere_is_waited_for_off_the_runtime() {
        let (_dir, path, index) = sqlite_index().await;
        // The first instance of the series: the batch path, which writes
        // the series.
        index.store(instance(1)).await.unwrap();

        for n in [2, 3] {
            let (locked, wait_locked) = std::sync::mpsc::channel();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let holder_path = path.clone();
            let holder = std::thread::spawn(move || {
                let other = rusqlite::Connection::open(holder_path).unwrap();
                other.execute_batch("BEGIN IMMEDIATE").unwrap();
                locked.send(()).unwrap();
                // Let go when the runtime's task says so; a runtime thread
                // stuck in the busy handler never says it.
                let told = released.recv_timeout(Duration::from_secs(5)).is_ok();
                other.execute_batch("COMMIT").unwrap();
                told
            });
            wait_locked.recv().unwrap();
            // The series is cached: the direct path, inline first.
            let store = tokio::spawn({
                let index = index.clone();
                async move { index.store(instance(n)).await }
            });
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            assert!(!store.is_finished(), "stored while the lock was held");
            let _ = release.send(());
            assert_eq!(store.await.unwrap().unwrap(), StoreOutcome::Stored);
            assert!(
                holder.join().unwrap(),
                "the runtime's thread waited in SQLite's busy handler"
            );
        }
        assert_eq!(index.count_current_instances().await.unwrap(), 3);
    }

    /// Instances stored at once share transactions: whoever gets the
    /// writer writes every instance queued by then. Each still gets its
    /// own outcome: a rejected one fails alone, the same bytes twice are a
    /// duplicate, and every other row is there.
    #[tokio::test(flavor = "current_thread")]
    async fn instances_stored_at_once_share_a_commit_and_keep_their_outcomes() {
        let (_dir, _path, index) = sqlite_index().await;
        sqlx::query(
            "INSERT INTO rejected_instance (sop_instance_uid, reason_code, rejection_note_uid, at) \
             VALUES ('1.2.3.7', '113001', '9.9', '2026-12-07T00:00:00Z')",
        )
        .execute(index.pool())
        .await
        .unwrap();
        // The writer opens its connection on a blocking thread during the
        // first store: the others queue meanwhile.
        let stores: Vec<_> = (1..=16)
            .chain([3])
            .map(|n| {
                let index = index.clone();
                tokio::spawn(async move { index.store(instance(n)).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for store in stores {
            outcomes.push(store.await.unwrap());
        }
        for (n, outcome) in (1..=16).chain([3]).zip(&outcomes) {
            match n {
                7 => assert!(
                    matches!(outcome, Err(Error::RejectedInstance { reason_code }) if reason_code == "113001"),
                    "{outcome:?}"
                ),
                _ => assert!(outcome.is_ok(), "instance {n}: {outcome:?}"),
            }
        }
        let duplicates = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(StoreOutcome::Duplicate)))
            .count();
        assert_eq!(duplicates, 1, "{outcomes:?}");
        assert_eq!(index.count_current_instances().await.unwrap(), 15);
        let transactions = index.write_lock.lock().await.transactions;
        assert!(
            transactions <= 3,
            "17 instances in {transactions} transactions"
        );
    }

    /// A clean close leaves the database in one file: the WAL checkpointed
    /// into it and removed, as an operator copying the file expects.
    #[tokio::test]
    async fn a_closed_index_leaves_no_wal_behind() {
        let (dir, path, index) = sqlite_index().await;
        for n in 1..=3 {
            index.store(instance(n)).await.unwrap();
        }
        let wal = dir.path().join("index.db-wal");
        assert!(wal.exists());
        index.close().await;
        assert!(!wal.exists(), "the WAL outlived the close");
        let conn = rusqlite::Connection::open(&path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM instance", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
    }
}
