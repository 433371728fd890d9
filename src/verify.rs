//! `huren verify`: scrubs the blob store against the index, and rebuilds
//! the index from the store (the store is the source of truth: every blob is
//! a self-describing Part-10 object).
//!
//! - missing: the index names a blob the store lacks: an error.
//! - corrupt: a blob whose bytes no longer hash to its key: an error.
//! - orphan: a blob no index row names. A crash between publishing a blob
//!   and committing its row leaves one; that instance was never
//!   acknowledged, so an orphan is reported, not an error, and removable.

use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::index::{self, NewInstance};
use crate::ingest::Ingest;
use crate::part10;
use crate::progress::Progress;
use crate::storage;
use crate::types::BlobHash;

#[derive(Debug, Error)]
pub enum Error {
    #[error("index: {0}")]
    Index(#[from] index::Error),
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Delete orphans older than `orphan_grace`.
    pub remove_orphans: bool,
    /// Orphans younger than this may belong to an ingest still in progress
    /// on a running node; they are reported but never removed.
    pub orphan_grace: Duration,
    /// Index every blob the index lacks (rebuilds a lost index).
    pub reindex: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

#[derive(Debug, Default)]
pub struct Report {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub missing: Vec<BlobHash>,
    pub corrupt: Vec<BlobHash>,
    pub orphans: Vec<BlobHash>,
    pub orphans_removed: u64,
    pub reindexed: u64,
    /// Blobs that could not be indexed by --reindex, with why.
    pub unindexable: Vec<(BlobHash, String)>,
}

impl Report {
    /// Missing and corrupt blobs are failures; orphans are not.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.corrupt.is_empty() && self.unindexable.is_empty()
    }
}

pub async fn run(ingest: &Ingest, options: &Options) -> Result<Report, Error> {
    let store = ingest.store();
    let index = ingest.index();
    let mut report = Report::default();

    let mut listed = store.list().await?;
    listed.sort_by_key(|b| b.last_modified);

    if options.reindex {
        let known = index.blob_hashes().await?;
        let unknown: Vec<_> = listed.iter().filter(|b| !known.contains(&b.hash)).collect();
        let bar = if options.progress {
            Progress::new("reindex", unknown.len() as u64, "blobs")
        } else {
            Progress::hidden()
        };
        for blob in unknown {
            match reindex_one(ingest, blob.hash, blob.last_modified).await {
                Ok(()) => report.reindexed += 1,
                Err(why) => report.unindexable.push((blob.hash, why)),
            }
            bar.inc(1, blob.size);
        }
        bar.finish();
    }

    let referenced = index.blob_hashes().await?;
    let bar = if options.progress {
        Progress::new("verify", referenced.len() as u64, "blobs")
    } else {
        Progress::hidden()
    };
    for hash in &referenced {
        // Asked of the store even when the listing above lacked it: on a
        // running node a blob listed-after is published and indexed
        // between the listing and the index read, and is no loss.
        match store.verify(hash).await {
            Ok(size) => {
                report.blobs_checked += 1;
                report.bytes_checked += size;
                bar.inc(1, size);
                continue;
            }
            Err(storage::Error::NotFound(_)) => report.missing.push(*hash),
            Err(storage::Error::Corrupt { .. }) => report.corrupt.push(*hash),
            Err(e) => return Err(e.into()),
        }
        bar.inc(1, 0);
    }
    bar.finish();
    // And one the node deleted meanwhile (a deletion, the collector, the
    // cache's eviction) is no longer referenced: no loss either.
    if !report.missing.is_empty() {
        let still = index.blob_hashes().await?;
        report.missing.retain(|h| still.contains(h));
    }
    crate::metrics::verify_finished(
        report.blobs_checked,
        report.corrupt.len() as u64,
        report.missing.len() as u64,
    );

    for blob in &listed {
        if !referenced.contains(&blob.hash) {
            report.orphans.push(blob.hash);
        }
    }
    if options.remove_orphans {
        // Through the collector: it re-checks each orphan against a
        // concurrent ingest before removing it (src/gc.rs).
        let collected = crate::gc::collect(
            ingest,
            &crate::gc::Options {
                grace: options.orphan_grace,
                progress: false,
            },
        )
        .await
        .map_err(|e| match e {
            crate::gc::Error::Index(e) => Error::Index(e),
            crate::gc::Error::Storage(e) => Error::Storage(e),
            crate::gc::Error::Io(e) => Error::Storage(storage::Error::Io(e)),
        })?;
        report.orphans_removed = collected.removed;
    }
    Ok(report)
}

async fn reindex_one(ingest: &Ingest, hash: BlobHash, modified: SystemTime) -> Result<(), String> {
    let store = ingest.store();
    let temp = tempfile::Builder::new()
        .prefix("reindex-")
        .tempfile_in(store.staging_dir())
        .map_err(|e| e.to_string())?
        .into_temp_path();
    store
        .copy_to_file(&hash, &temp)
        .await
        .map_err(|e| e.to_string())?;
    let path = temp.to_path_buf();
    let attributes =
        tokio::task::spawn_blocking(move || -> Result<part10::InstanceAttributes, String> {
            let head = {
                use std::io::Read;
                let mut head = vec![0u8; 4096];
                let mut file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                let n = file.read(&mut head).map_err(|e| e.to_string())?;
                head.truncate(n);
                head
            };
            let meta_len = part10::file_meta_len(&head).ok_or("not a Part-10 object")?;
            let attributes = part10::read_attributes(&path).map_err(|e| e.to_string())?;
            part10::check_structure(&path, meta_len as u64, &attributes.transfer_syntax_uid)
                .map_err(|e| e.to_string())?;
            Ok(attributes)
        })
        .await
        .map_err(|e| e.to_string())??;
    let size = std::fs::metadata(&temp).map_err(|e| e.to_string())?.len();
    ingest
        .index()
        .store(NewInstance {
            attributes,
            blob_hash: hash,
            blob_size: size,
            calling_ae_title: None,
            received_at: modified,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
