//! The collector: removes blobs no index row names (left by a deletion, or
//! by a crash between publishing a blob and committing its row), without
//! ever removing one that an ingest running at the same time refers to.
//!
//! The race: an ingest publishes its blob and then commits the row naming
//! it; a blob is content-addressed, so the ingest may publish the very blob
//! a deletion just orphaned (the same instance sent again). A collector that
//! lists blobs, reads the references and deletes could read the references
//! before that commit and delete after the publish: a committed row without
//! its blob, an acknowledged instance lost.
//!
//! Why this cannot happen here (local store), step by step:
//! 1. List the blobs, *then* read the referenced set: a row committed before
//!    the read is seen.
//! 2. A candidate must be unreferenced and older than the grace period.
//! 3. The blob is renamed into `gc-trash/` (atomic: the collector now owns
//!    exactly the file that was there, and a later publish creates a new
//!    file at the blob's path that the collector never touches).
//! 4. The renamed file's own modification time is read: the ingest path
//!    always writes a fresh file when it publishes (a rename of its staging
//!    file over the path, even when a blob with that hash exists). If the
//!    file is younger than the grace period, an ingest published it after
//!    step 1, and it is renamed back.
//! 5. The index is asked again whether a row names the blob (a rebuild by
//!    `huren verify --reindex` indexes blobs without publishing them); if so
//!    it is renamed back. Otherwise it is deleted.
//!
//! So a blob is removed only if no ingest published it within the grace
//! period before step 3, and no row named it after step 3 (the ingest that
//! publishes after step 3 writes its own file). The one assumption: an
//! ingest commits its row within the grace period of publishing its blob
//! (milliseconds in practice; the default grace is an hour). A crash
//! between 3 and 5 leaves the file in `gc-trash/`; the next pass settles it
//! with the same checks before anything else.
//!
//! A remote (S3) store has no atomic rename, and publishes a blob it
//! already holds by a HEAD (no fresh object, so no age to go by). There the
//! collector copies the blob to `gc-trash/`, deletes it, and asks the index
//! again, putting the blob back if a row now names it; and the ingest path,
//! after its row has committed, checks that its blob exists and uploads it
//! again from its staged copy if not (`BlobStore::ensure_published`, one
//! HEAD per instance). Whichever of the two comes second sees the other:
//! the collector's second look after the ingest's commit restores the blob,
//! or the ingest's check after the collector's delete re-uploads it. A
//! reader may find such a blob absent for that moment (an error, retried);
//! an acknowledged instance never loses it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::index;
use crate::ingest::Ingest;
use crate::progress::Progress;
use crate::storage::{self, BlobStore};
use crate::types::BlobHash;

#[derive(Debug, Error)]
pub enum Error {
    #[error("index: {0}")]
    Index(#[from] index::Error),
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("collector trash: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Blobs younger than this are never removed: an ingest may have
    /// published one and not committed its row yet.
    pub grace: Duration,
    /// Draw a progress bar (the CLI).
    pub progress: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub listed: u64,
    /// Blobs no row named when the references were read.
    pub unreferenced: u64,
    pub removed: u64,
    pub removed_bytes: u64,
    /// Candidates put back: published again, or referenced again, while
    /// the collector looked at them.
    pub kept: u64,
}

/// Where a local store's collector puts a blob while it decides; inside the
/// blob root so that the rename stays on one file system. Not a blob key
/// (`BlobStore::list` skips it).
const TRASH_DIR: &str = "gc-trash";

/// Decides on every blob a crashed pass left in the trash: back to its
/// path if a row names it (or it is fresh), deleted otherwise. The node
/// runs it at start before its recovery checks index rows against their
/// blobs (crate::recovery), so that a blob a crash left in the trash is not
/// taken for a lost one.
pub async fn settle(ingest: &Ingest, grace: Duration) -> Result<Report, Error> {
    let store = ingest.store();
    let index = ingest.index();
    let mut report = Report::default();
    match store.local_root() {
        Some(root) => settle_trash(index, root, grace, &mut report).await?,
        None => {
            for hash in store.list_trash().await? {
                if settle_remote(index, store, &hash).await? {
                    report.removed += 1;
                } else {
                    report.kept += 1;
                }
            }
        }
    }
    Ok(report)
}

pub async fn collect(ingest: &Ingest, options: &Options) -> Result<Report, Error> {
    let store = ingest.store();
    let index = ingest.index();
    let mut report = settle(ingest, options.grace).await?;
    let listed = store.list().await?;
    report.listed = listed.len() as u64;
    // After the listing (step 1 above).
    let referenced: BTreeSet<BlobHash> = index.blob_hashes().await?;
    let now = SystemTime::now();
    let candidates: Vec<_> = listed
        .into_iter()
        .filter(|b| !referenced.contains(&b.hash))
        .collect();
    report.unreferenced = candidates.len() as u64;
    let bar = if options.progress {
        Progress::new("gc", candidates.len() as u64, "blobs")
    } else {
        Progress::hidden()
    };
    for blob in candidates {
        let age = now.duration_since(blob.last_modified).unwrap_or_default();
        if age < options.grace {
            bar.inc(1, 0);
            continue;
        }
        let removed = match store.local_root() {
            Some(root) => remove_local(index, root, &blob.hash, options.grace).await?,
            None => remove_remote(index, store, &blob.hash, options.grace).await?,
        };
        if removed {
            report.removed += 1;
            report.removed_bytes += blob.size;
        } else {
            report.kept += 1;
        }
        bar.inc(1, blob.size);
    }
    bar.finish();
    Ok(report)
}

fn blob_path(root: &Path, hash: &BlobHash) -> PathBuf {
    root.join(BlobStore::key(hash).as_ref())
}

fn trash_path(root: &Path, hash: &BlobHash) -> PathBuf {
    root.join(TRASH_DIR).join(hash.to_hex())
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    std::fs::metadata(path)?.modified()
}

fn is_fresh(mtime: SystemTime, grace: Duration) -> bool {
    SystemTime::now()
        .duration_since(mtime)
        .is_ok_and(|age| age < grace)
        // A modification time in the future (clock step): treat as fresh.
        || mtime > SystemTime::now()
}

/// Steps 3 to 5 for one blob of a local store; true when it was removed.
async fn remove_local(
    index: &index::Index,
    root: &Path,
    hash: &BlobHash,
    grace: Duration,
) -> Result<bool, Error> {
    let path = blob_path(root, hash);
    let trash = trash_path(root, hash);
    std::fs::create_dir_all(trash.parent().expect("trash has a parent"))?;
    match std::fs::rename(&path, &trash) {
        Ok(()) => {}
        // Gone already (another collector, an operator).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    settle_one(index, root, hash, grace).await
}

/// Decides on a blob in the trash: back to its path, or deleted.
async fn settle_one(
    index: &index::Index,
    root: &Path,
    hash: &BlobHash,
    grace: Duration,
) -> Result<bool, Error> {
    let path = blob_path(root, hash);
    let trash = trash_path(root, hash);
    let keep = is_fresh(modified(&trash)?, grace) || index.references_blob(hash).await?;
    if keep {
        // If an ingest published the blob again meanwhile, the path holds
        // the same bytes; replacing them with these changes nothing.
        std::fs::rename(&trash, &path)?;
        tracing::info!(blob = %hash, "collector: blob in use again, kept");
        Ok(false)
    } else {
        std::fs::remove_file(&trash)?;
        tracing::debug!(blob = %hash, "collector: unreferenced blob removed");
        Ok(true)
    }
}

/// Blobs a crashed pass left in the trash.
async fn settle_trash(
    index: &index::Index,
    root: &Path,
    grace: Duration,
    report: &mut Report,
) -> Result<(), Error> {
    let dir = root.join(TRASH_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let Some(hash) = entry
            .file_name()
            .to_str()
            .and_then(|n| BlobHash::parse(n).ok())
        else {
            continue;
        };
        if settle_one(index, root, &hash, grace).await? {
            report.removed += 1;
        } else {
            report.kept += 1;
        }
    }
    Ok(())
}

/// A remote store, where nothing renames atomically: the blob is copied to
/// `gc-trash/` and removed, then the index is asked again; a row that
/// appeared meanwhile gets the blob back from the copy. An ingest whose row
/// commits after that second look checks the blob itself after its commit
/// (`BlobStore::ensure_published`) and uploads it again: one of the two
/// always sees the other.
async fn remove_remote(
    index: &index::Index,
    store: &BlobStore,
    hash: &BlobHash,
    grace: Duration,
) -> Result<bool, Error> {
    if index.references_blob(hash).await? {
        return Ok(false);
    }
    match store.last_modified(hash).await? {
        Some(mtime) if !is_fresh(mtime, grace) => {}
        _ => return Ok(false),
    }
    if !store.move_to_trash(hash).await? {
        return Ok(false);
    }
    settle_remote(index, store, hash).await
}

async fn settle_remote(
    index: &index::Index,
    store: &BlobStore,
    hash: &BlobHash,
) -> Result<bool, Error> {
    if index.references_blob(hash).await? {
        store.restore_from_trash(hash).await?;
        tracing::info!(blob = %hash, "collector: blob in use again, kept");
        Ok(false)
    } else {
        store.purge_trash(hash).await?;
        Ok(true)
    }
}
