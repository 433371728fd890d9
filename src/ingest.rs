//! The one ingest path: C-STORE (and STOW-RS, when it comes) hand it a data
//! set as a stream of fragments; it writes the Part-10 object to staging
//! while hashing, checks it, publishes the blob, commits the index row, and
//! only then reports success. Any failure before the end leaves nothing:
//! the staging file is deleted and no row exists.

use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use crate::index::{self, Index, NewInstance, StoreOutcome};
use crate::part10;
use crate::storage::{self, BlobStore, StagingWriter};
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
}

/// The result of a stored instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub hash: BlobHash,
    pub size: u64,
    pub outcome: StoreOutcome,
}

#[derive(Clone)]
pub struct Ingest {
    store: Arc<BlobStore>,
    index: Index,
}

/// An instance being received.
pub struct Incoming {
    writer: StagingWriter<Result<part10::InstanceAttributes, part10::Error>>,
    sop_class_uid: Uid,
    sop_instance_uid: Uid,
    calling_ae_title: Option<String>,
    received_at: SystemTime,
}

impl Incoming {
    /// Appends a fragment of the data set. `false` means the staging writer
    /// failed; `Ingest::finish` then says why.
    pub async fn write(&self, fragment: Vec<u8>) -> bool {
        self.writer.write(fragment).await
    }
}

impl Ingest {
    pub fn new(store: Arc<BlobStore>, index: Index) -> Ingest {
        Ingest { store, index }
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
        let meta_len = prefix.len() as u64;
        let ts = transfer_syntax_uid.as_str().to_string();
        // The structural check and the header parse run on the writer's
        // thread right after the last byte: no extra hop per instance.
        let inspect = move |path: &std::path::Path| {
            part10::check_structure(path, meta_len, &ts)?;
            part10::read_attributes(path)
        };
        Incoming {
            writer: self.store.stage(prefix, inspect),
            sop_class_uid,
            sop_instance_uid,
            calling_ae_title,
            received_at: SystemTime::now(),
        }
    }

    /// Completes a data set whose last fragment has been written.
    pub async fn finish(&self, incoming: Incoming) -> Result<Stored, Error> {
        let started = std::time::Instant::now();
        let (staged, attributes) = incoming.writer.finish().await?;
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
        self.store.publish(staged).await?;
        let published_at = started.elapsed();
        let outcome = self
            .index
            .store(NewInstance {
                attributes,
                blob_hash: hash,
                blob_size: size,
                calling_ae_title: incoming.calling_ae_title,
                received_at: incoming.received_at,
            })
            .await?;
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
            StoreOutcome::Stored => {}
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
        // Dropping the staged result deletes its temporary file.
        let _ = incoming.writer.finish().await;
    }
}
