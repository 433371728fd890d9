//! The one ingest path: C-STORE (and STOW-RS, when it comes) hand it a data
//! set as a stream of fragments; it writes the Part-10 object to staging
//! while hashing, checks it, publishes the blob, commits the index row, and
//! only then reports success. Any failure leaves no row: the staging file
//! is deleted, or, when the index refuses the row (a rejected SOP Instance
//! UID), the published blob is an orphan the collector removes.

use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use crate::index::{self, Index, NewInstance, StoreOutcome};
use crate::part10;
use crate::storage::{self, BlobStore, InlineStage, run_short_blocking};
use crate::types::{BlobHash, Uid};

/// Why an instance was not stored, in the node's own terms; each edge maps
/// these to its protocol's status once.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Unreadable(part10::Error),
    #[error("data set SOP Class UID {actual} differs from the announced {announced}")]
    SopClassMismatch { announced: String, actual: String },
    #[error("data set SOP Instance UID {actual} differs from the announced {announced}")]
    SopInstanceMismatch { announced: String, actual: String },
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("index: {0}")]
    Index(#[from] index::Error),
    /// A peer's instance whose bytes do not hash to what its manifest
    /// promised: nothing was stored.
    #[error("instance hashes to {actual}, not the expected {expected}")]
    HashMismatch {
        expected: BlobHash,
        actual: BlobHash,
    },
    /// The SOP Instance UID was rejected by an IOCM rejection note and stays
    /// rejected (src/lifecycle.rs): no index row was written (the blob, if
    /// published, is an orphan for the collector).
    #[error(
        "SOP Instance UID {sop_instance_uid} was rejected ({reason_code}) and is not accepted again"
    )]
    Rejected {
        sop_instance_uid: String,
        reason_code: String,
    },
    /// An IOCM rejection note that may not be applied (the handler says
    /// why): from an AE not allowed to reject, or for another patient's or
    /// study's instances.
    #[error("rejection note refused: {0}")]
    RejectionRefused(String),
    /// Applying a rejection note failed (the index).
    #[error("rejection note not applied: {0}")]
    RejectionFailed(String),
}

/// The result of a stored instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub hash: BlobHash,
    pub size: u64,
    pub outcome: StoreOutcome,
}

impl Error {
    /// The PS3.4 B.2.3 status (C-STORE-RSP, STOW-RS FailureReason) for
    /// each way the ingest path can fail.
    pub fn status(&self) -> u16 {
        use crate::status;
        match self {
            Error::Unreadable(part10::Error::MissingAttribute(_))
            | Error::Unreadable(part10::Error::InvalidUid { .. }) => {
                status::CANNOT_UNDERSTAND_MISSING_UID
            }
            Error::Unreadable(part10::Error::Io(_)) => status::OUT_OF_RESOURCES,
            Error::Unreadable(_) => status::CANNOT_UNDERSTAND,
            Error::SopClassMismatch { .. } => status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            Error::SopInstanceMismatch { .. } => status::CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
            Error::Storage(_) | Error::Index(_) => status::OUT_OF_RESOURCES,
            // Only peer fetches name an expected hash; C-STORE never does.
            Error::HashMismatch { .. } => status::CANNOT_UNDERSTAND,
            // IHE IOCM: a rejected instance sent again stays out. 0124 is a
            // refusal, not a fault the sender may retry away (PS3.7 C.5).
            Error::Rejected { .. } => status::NOT_AUTHORIZED,
            // A rejection note from an AE that may not reject, or for another
            // patient's or study's instances: refused, not a fault to retry.
            Error::RejectionRefused(_) => status::NOT_AUTHORIZED,
            Error::RejectionFailed(_) => status::OUT_OF_RESOURCES,
        }
    }
}

impl Stored {
    /// Counts the acknowledged instance (`source`: one of
    /// `metrics::source`).
    pub fn count(&self, source: &'static str, durability: crate::config::Durability) {
        let outcome = match self.outcome {
            StoreOutcome::Stored => "stored",
            StoreOutcome::Duplicate => "duplicate",
            StoreOutcome::NewVersion { .. } => "new_version",
            StoreOutcome::RejectionNote => "rejection_note",
        };
        crate::metrics::instance_stored(source, durability.as_str(), outcome, self.size);
    }
}

/// Counts the failures of an ingest (the blob store or the index; a data
/// set the peer got wrong is not a storage error), and notes whether the
/// last one ran out of room (readiness says so).
fn count_failure<T>(result: &Result<T, Error>, out_of_space: &std::sync::atomic::AtomicBool) {
    use std::sync::atomic::Ordering;
    match result {
        Err(Error::Storage(e)) => {
            crate::metrics::storage_error("write");
            if e.is_out_of_space() {
                out_of_space.store(true, Ordering::Relaxed);
            }
        }
        Err(Error::Unreadable(part10::Error::Io(_))) => crate::metrics::storage_error("write"),
        Err(Error::Index(e)) => {
            crate::metrics::storage_error("index");
            // SQLite's SQLITE_FULL, PostgreSQL's ENOSPC, as their text says.
            let text = e.to_string();
            if text.contains("disk is full") || text.contains("No space left") {
                out_of_space.store(true, Ordering::Relaxed);
            }
        }
        Ok(_) => out_of_space.store(false, Ordering::Relaxed),
        _ => {}
    }
}

#[derive(Clone)]
pub struct Ingest {
    store: Arc<BlobStore>,
    index: Index,
    order: AckOrder,
    /// The step an IOCM rejection note is handed to (src/lifecycle.rs);
    /// without one every note is refused.
    rejection_handler: Option<Arc<dyn RejectionHandler>>,
    /// Whether the last instance failed for want of room (the blob store's
    /// disk or the index's): every C-STORE is 0xA700 until room is made.
    out_of_space: Arc<std::sync::atomic::AtomicBool>,
}

/// Why a rejection note was not applied.
#[derive(Debug)]
pub enum RejectionFailure {
    /// Not allowed (the calling AE, the note's patient or study).
    Refused(String),
    /// The index failed.
    Failed(String),
}

/// Applies the IOCM rejection notes the ingest path receives: ingest
/// parses a note and hands it over; the C-STORE-RSP (or STOW-RS answer)
/// says what came of it. Implemented by src/lifecycle.rs, installed by the
/// node, so that ingest never calls the deletion code directly.
pub trait RejectionHandler: Send + Sync {
    fn apply<'a>(
        &'a self,
        note: &'a crate::iocm::RejectionNote,
        calling_ae_title: Option<&'a str>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), RejectionFailure>> + Send + 'a>,
    >;
}

/// What an acknowledgement waits for after the blob is published (renamed
/// into place on local files, PUT on S3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckOrder {
    /// The index commit only: relaxed durability, or S3 (a completed PUT is
    /// durable; the commit is flushed by the database).
    NoFlush,
    /// Full durability, local files, SQLite: commit without fsync, then one
    /// syncfs for blob and index together.
    FlushAfterCommit,
    /// Full durability, local files, PostgreSQL: the commit and the blob's
    /// syncfs side by side.
    FlushBesideCommit,
}

/// Data sets up to this size are also kept in memory while they are written
/// to staging, so that checking and parsing them needs no re-reading; past
/// it, the copy is dropped and the check and parse read the staged file. It
/// bounds an association's memory at this size plus one PDU; a CT slice
/// (0.5 MB) stays under it.
pub const IN_MEMORY_LIMIT: usize = 2 * 1024 * 1024;

/// The copy's first allocation: a CT slice fits without growing it, and the
/// allocator hands the same memory to the next instance.
const COPY_CAPACITY: usize = 1024 * 1024;

enum Body {
    /// No fragment yet.
    Empty,
    /// Written to staging from the receiving task's own thread, fragment by
    /// fragment as it arrives (while the peer is still sending), and hashed
    /// on the way: the fragment is the caller's slice (for C-STORE, a piece
    /// of the PDU read buffer), not a copy.
    Writing {
        // Boxed: the hasher's state is kilobytes, the other variants words.
        stage: Box<InlineStage>,
        /// The data set in memory while it stays under
        /// [`IN_MEMORY_LIMIT`]; `None` past it.
        copy: Option<Vec<u8>>,
    },
    /// Staging failed; the rest of the data set is dropped and `finish`
    /// reports why.
    Failed(storage::Error),
}

/// An instance being received.
pub struct Incoming {
    prefix: Vec<u8>,
    body: Body,
    transfer_syntax_uid: Uid,
    sop_class_uid: Uid,
    sop_instance_uid: Uid,
    calling_ae_title: Option<String>,
    received_at: SystemTime,
}

impl Incoming {
    /// Appends a fragment of the data set.
    fn write(&mut self, store: &BlobStore, fragment: &[u8]) {
        if let Body::Empty = self.body {
            self.body = match run_short_blocking(|| store.stage_inline(&self.prefix)) {
                Ok(stage) => Body::Writing {
                    stage: Box::new(stage),
                    copy: Some(Vec::with_capacity(COPY_CAPACITY.max(fragment.len()))),
                },
                Err(e) => Body::Failed(e),
            };
        }
        let Body::Writing { stage, copy } = &mut self.body else {
            return;
        };
        if copy
            .as_ref()
            .is_some_and(|c| c.len() + fragment.len() > IN_MEMORY_LIMIT)
        {
            *copy = None;
        }
        // A fragment's write to the page cache and its hash: shorter than a
        // hop to another thread would be (see run_short_blocking).
        match run_short_blocking(|| stage.write(fragment)) {
            Ok(()) => {
                if let Some(copy) = copy {
                    copy.extend_from_slice(fragment);
                }
            }
            Err(e) => self.body = Body::Failed(storage::Error::Staging(e)),
        }
    }
}

impl Ingest {
    pub fn new(store: Arc<BlobStore>, index: Index) -> Ingest {
        let order = match (store.ack_waits_for_flush(), index.dialect()) {
            (false, _) => AckOrder::NoFlush,
            (true, crate::index::Dialect::Sqlite) => AckOrder::FlushAfterCommit,
            (true, crate::index::Dialect::Postgres) => AckOrder::FlushBesideCommit,
        };
        Ingest {
            store,
            index,
            order,
            rejection_handler: None,
            out_of_space: Default::default(),
        }
    }

    /// Whether the last instance stored (or not) here ran out of room.
    pub fn out_of_space(&self) -> bool {
        self.out_of_space.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The step rejection notes are handed to.
    pub fn with_rejection_handler(mut self, handler: Arc<dyn RejectionHandler>) -> Ingest {
        self.rejection_handler = Some(handler);
        self
    }

    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Starts receiving a data set announced as the given SOP Instance of
    /// the given SOP Class, encoded in the given transfer syntax.
    pub fn begin(
        &self,
        sop_class_uid: Uid,
        sop_instance_uid: Uid,
        transfer_syntax_uid: Uid,
        calling_ae_title: Option<String>,
    ) -> Incoming {
        let prefix =
            part10::file_meta_prefix(&sop_class_uid, &sop_instance_uid, &transfer_syntax_uid);
        Incoming {
            prefix,
            body: Body::Empty,
            transfer_syntax_uid,
            sop_class_uid,
            sop_instance_uid,
            calling_ae_title,
            received_at: SystemTime::now(),
        }
    }

    /// Appends a fragment of the data set to an incoming instance (on the
    /// caller's thread: a write to the page cache and a hash update).
    pub fn write(&self, incoming: &mut Incoming, fragment: &[u8]) {
        incoming.write(&self.store, fragment);
    }

    /// Completes a data set whose last fragment has been written.
    pub async fn finish(&self, incoming: Incoming) -> Result<Stored, Error> {
        let result = self.finish_checked(incoming, None).await;
        count_failure(&result, &self.out_of_space);
        result
    }

    /// Completes a data set that must hash to `expected` (an instance
    /// fetched from a peer): checked before the blob is published or
    /// indexed, so a mismatch stores nothing. It does not wait for a flush:
    /// a peer fetch brings many instances, and its caller flushes
    /// once for all of them (`BlobStore::flush`) before it reports them
    /// stored. Until then a crash may take the newest of them; the
    /// journal of unflushed rows (migration 0009) names them for
    /// crate::recovery, as in relaxed durability.
    pub async fn finish_unflushed(
        &self,
        incoming: Incoming,
        expected: BlobHash,
    ) -> Result<Stored, Error> {
        let result = self.finish_checked(incoming, Some(expected)).await;
        count_failure(&result, &self.out_of_space);
        result
    }

    async fn finish_checked(
        &self,
        incoming: Incoming,
        expected: Option<BlobHash>,
    ) -> Result<Stored, Error> {
        let started = std::time::Instant::now();
        // A data set with no fragment at all goes the in-memory way too.
        let body = match incoming.body {
            Body::Empty => match run_short_blocking(|| self.store.stage_inline(&incoming.prefix)) {
                Ok(stage) => Body::Writing {
                    stage: Box::new(stage),
                    copy: Some(Vec::new()),
                },
                Err(e) => Body::Failed(e),
            },
            body => body,
        };
        let (staged, attributes) = match body {
            Body::Writing {
                stage,
                copy: Some(copy),
            } => {
                let prefix = incoming.prefix;
                let ts = incoming.transfer_syntax_uid.as_str().to_string();
                // On this thread (see run_short_blocking): a thread hop per
                // instance costs more than this step.
                run_short_blocking(move || -> Result<_, Error> {
                    let copy = std::slice::from_ref(&copy);
                    part10::check_structure_bytes(copy, &ts).map_err(Error::Unreadable)?;
                    let attributes =
                        part10::read_attributes_bytes(&prefix, copy).map_err(Error::Unreadable)?;
                    Ok(((*stage).finish(), Ok(attributes)))
                })?
            }
            Body::Writing { stage, copy: None } => {
                let meta_len = incoming.prefix.len() as u64;
                let ts = incoming.transfer_syntax_uid.as_str().to_string();
                // A large data set is checked where it lies: the check skips
                // values with seeks and the parse stops before the pixel
                // data, but it is file I/O, so off the runtime's threads.
                tokio::task::spawn_blocking(move || {
                    let staged = (*stage).finish();
                    let inspected = part10::check_structure(staged.path(), meta_len, &ts)
                        .and_then(|()| part10::read_attributes(staged.path()));
                    (staged, inspected)
                })
                .await
                .map_err(|e| Error::Storage(storage::Error::Staging(std::io::Error::other(e))))?
            }
            Body::Failed(e) => return Err(Error::Storage(e)),
            Body::Empty => unreachable!("replaced above"),
        };
        let staged_at = started.elapsed();
        let attributes = attributes.map_err(Error::Unreadable)?;

        if attributes.sop_class_uid != incoming.sop_class_uid.as_str() {
            return Err(Error::SopClassMismatch {
                announced: incoming.sop_class_uid.to_string(),
                actual: attributes.sop_class_uid,
            });
        }
        if attributes.sop_instance_uid != incoming.sop_instance_uid.as_str() {
            return Err(Error::SopInstanceMismatch {
                announced: incoming.sop_instance_uid.to_string(),
                actual: attributes.sop_instance_uid,
            });
        }

        let hash = staged.hash;
        let size = staged.len;
        if let Some(expected) = expected
            && expected != hash
        {
            // Dropping `staged` removes the staging file.
            return Err(Error::HashMismatch {
                expected,
                actual: hash,
            });
        }
        if attributes.sop_class_uid
            == dicom_dictionary_std::uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE
        {
            let path = staged.path().to_path_buf();
            let note = tokio::task::spawn_blocking(move || crate::iocm::read_rejection_note(&path))
                .await
                .map_err(|e| Error::Unreadable(part10::Error::Malformed(e.to_string())))?
                .map_err(|why| Error::Unreadable(part10::Error::Malformed(why)))?;
            if let Some(note) = note {
                // The note acts on the index and is not kept itself: the
                // deletion record names it (rejection_note_uid).
                let Some(handler) = &self.rejection_handler else {
                    return Err(Error::RejectionRefused(
                        "this node applies no rejection notes".into(),
                    ));
                };
                handler
                    .apply(&note, incoming.calling_ae_title.as_deref())
                    .await
                    .map_err(|e| match e {
                        RejectionFailure::Refused(why) => Error::RejectionRefused(why),
                        RejectionFailure::Failed(why) => Error::RejectionFailed(why),
                    })?;
                return Ok(Stored {
                    hash,
                    size,
                    outcome: StoreOutcome::RejectionNote,
                });
            }
        }
        // Whether a rejection note bars the SOP Instance UID is asked by the
        // statement that writes the row (index::Error::RejectedInstance),
        // not beforehand: a round trip to the database per instance saved.
        // A barred instance's blob is then published without a row, an
        // orphan the collector removes, like any blob whose row never came.
        let kept = self.store.publish_kept(staged).await?;
        let published_at = started.elapsed();
        let audited = expected
            .is_none()
            .then(|| crate::audit::StoredInstance::of(&attributes))
            .flatten();
        let instance = NewInstance {
            attributes,
            blob_hash: hash,
            blob_size: size,
            calling_ae_title: incoming.calling_ae_title,
            received_at: incoming.received_at,
        };
        let rejected = |e: index::Error| match e {
            // The data set's SOP Instance UID is the announced one (above).
            index::Error::RejectedInstance { reason_code } => Error::Rejected {
                sop_instance_uid: incoming.sop_instance_uid.to_string(),
                reason_code,
            },
            other => Error::Index(other),
        };
        // An instance with an expected hash comes from a peer fetch, which
        // flushes once per series itself (see `finish_unflushed`).
        let order = if expected.is_some() {
            AckOrder::NoFlush
        } else {
            self.order
        };
        let outcome = match order {
            AckOrder::NoFlush => self.index.store(instance).await.map_err(rejected)?,
            // One syncfs covers the blob and the WAL frames the commit just
            // wrote: it must start after the commit.
            AckOrder::FlushAfterCommit => {
                let outcome = self.index.store(instance).await.map_err(rejected)?;
                self.store.flush().await?;
                outcome
            }
            // PostgreSQL flushes its own commit; the blob's flush runs at
            // the same time. A crash between the two leaves a row whose blob
            // may be gone: the journal of migration 0009 names it for
            // crate::recovery.
            AckOrder::FlushBesideCommit => {
                let (outcome, flushed) =
                    tokio::join!(self.index.store(instance), self.store.flush());
                let outcome = outcome.map_err(rejected)?;
                flushed?;
                outcome
            }
        };
        if let Some(a) = audited {
            a.record(&outcome)
        }
        if let Some(staged) = kept {
            // A remote store: see src/gc.rs for why the blob is checked
            // again now that the row is committed.
            self.store.ensure_published(staged).await?;
        }
        // Per-stage latency, the figures docs/benchmarks.md reasons from
        // (HUREN_LOG=huren::ingest=trace).
        tracing::trace!(
            staged_us = staged_at.as_micros() as u64,
            published_us = published_at.as_micros() as u64,
            indexed_us = started.elapsed().as_micros() as u64,
            "ingest timings"
        );
        match outcome {
            StoreOutcome::NewVersion { version } => tracing::warn!(
                sop_instance_uid = %incoming.sop_instance_uid,
                version,
                blob = %hash,
                "SOP Instance UID received again with different bytes; earlier version kept"
            ),
            StoreOutcome::Duplicate => tracing::debug!(
                sop_instance_uid = %incoming.sop_instance_uid,
                "instance received again with the same bytes; stored once"
            ),
            StoreOutcome::Stored | StoreOutcome::RejectionNote => {}
        }
        Ok(Stored {
            hash,
            size,
            outcome,
        })
    }

    /// Gives up on a data set (the peer aborted, or the request failed
    /// before its end): the staging file is removed.
    pub async fn abandon(&self, incoming: Incoming) {
        // Dropping the stage deletes its staging file.
        drop(incoming);
    }
}

#[cfg(test)]
mod tests {
    use crate::ingest::{Error, count_failure};
    use crate::{index, part10, storage};

    #[test]
    fn running_out_of_room_is_remembered_until_an_instance_is_stored() {
        let full = std::sync::atomic::AtomicBool::new(false);
        let is_full = || full.load(std::sync::atomic::Ordering::Relaxed);
        let no_room = || -> Result<(), Error> {
            Err(Error::Storage(storage::Error::Io(std::io::Error::from(
                std::io::ErrorKind::StorageFull,
            ))))
        };
        count_failure(&no_room(), &full);
        assert!(is_full());
        // Another failure says nothing about room: still full.
        count_failure(
            &Err::<(), _>(Error::Index(index::Error::WriterStopped)),
            &full,
        );
        assert!(is_full());
        count_failure(&Ok::<(), Error>(()), &full);
        assert!(!is_full());
        let sqlite_full = Error::Index(index::Error::Database(sqlx::Error::Protocol(
            "database or disk is full".into(),
        )));
        count_failure(&Err::<(), _>(sqlite_full), &full);
        assert!(is_full());
    }

    #[test]
    fn statuses_follow_ps3_4_annex_b() {
        let cases: Vec<(Error, u16)> = vec![
            (Error::Unreadable(part10::Error::Truncated("x")), 0xC000),
            (
                Error::Unreadable(part10::Error::Malformed("x".into())),
                0xC000,
            ),
            (
                Error::Unreadable(part10::Error::Undecodable("x".into())),
                0xC000,
            ),
            (
                Error::Unreadable(part10::Error::MissingAttribute("SOP Instance UID")),
                0xC001,
            ),
            (
                Error::SopClassMismatch {
                    announced: "1.2".into(),
                    actual: "1.3".into(),
                },
                0xA900,
            ),
            (
                Error::SopInstanceMismatch {
                    announced: "1.2".into(),
                    actual: "1.3".into(),
                },
                0xC002,
            ),
            (
                Error::Storage(storage::Error::Io(std::io::Error::from(
                    std::io::ErrorKind::StorageFull,
                ))),
                0xA700,
            ),
            (Error::Index(index::Error::WriterStopped), 0xA700),
        ];
        for (error, expected) in cases {
            assert_eq!(error.status(), expected, "{error}");
        }
    }
}
