//! What full durability's single flush needs around it.
//!
//! An acknowledgement waits for one flush that covers the blob and its index
//! row (crate::ingest). The row is committed before that flush ends, so a
//! crash in between can leave a row whose blob is missing or short. Every
//! new row is named in a journal (migration 0009, written by a trigger in
//! the row's own transaction); the sweeper forgets entries once a flush has
//! covered them, and at start, before any association is accepted, the
//! recovery checks the rows still named: a row whose blob is gone or does
//! not hash to its key was never acknowledged, and is removed with
//! whatever blob is left.
//!
//! Before that check, blobs a crashed collector pass left in its trash go
//! back where a row names them (crate::gc::settle).
//!
//! Blobs without rows (a rename that reached the disk, a commit that did
//! not) were not acknowledged either; they stay until `huren verify
//! --remove-orphans` or the garbage collector takes them.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::index;
use crate::ingest::Ingest;
use crate::storage;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("index: {0}")]
    Index(#[from] index::Error),
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("collector trash: {0}")]
    Trash(#[from] crate::gc::Error),
}

/// What the recovery at start found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Rows the journal named, each checked against its blob.
    pub checked: usize,
    /// Rows removed: blob missing or not matching its key.
    pub removed: usize,
}

/// Checks the rows committed since the last covering flush, removes those
/// whose blob did not survive, and forgets the journal. First, blobs a
/// crashed collector pass left in its trash go back where a row names them
/// (`gc_grace`: the collector's own grace period).
pub async fn recover(ingest: &Ingest, gc_grace: Duration) -> Result<Report, Error> {
    crate::gc::settle(ingest, gc_grace).await?;
    let index = ingest.index();
    let store = ingest.store();
    let high_water = index.unsynced_high_water().await?;
    let Some(high_water) = high_water else {
        return Ok(Report::default());
    };
    let mut report = Report::default();
    for row in index.unsynced_instances().await? {
        report.checked += 1;
        let damaged = match store.verify(&row.blob_hash).await {
            Ok(size) => size != row.blob_size,
            Err(storage::Error::NotFound(_) | storage::Error::Corrupt { .. }) => true,
            Err(e) => return Err(e.into()),
        };
        if !damaged {
            continue;
        }
        tracing::warn!(
            sop_instance_uid = %row.sop_instance_uid,
            blob = %row.blob_hash,
            "index row from before the crash has no intact blob; it was never acknowledged and is removed"
        );
        index.remove_unacknowledged(row.instance_key).await?;
        // A short or corrupt file under the key would be taken for the
        // blob by the next instance with these bytes; gone, it is written
        // whole again. Another row may still name it (same bytes, an
        // earlier instance): then its own check decides.
        if index.blob_referenced(&row.blob_hash).await? {
            continue;
        }
        match store.delete(&row.blob_hash).await {
            Ok(()) | Err(storage::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        report.removed += 1;
    }
    store.flush().await?;
    index.forget_unsynced(high_water).await?;
    if report.checked > 0 {
        tracing::info!(
            checked = report.checked,
            removed = report.removed,
            "recovery: index rows committed after the last flush checked"
        );
    }
    Ok(report)
}

/// Every `interval`, flushes the store (and with it, for SQLite, the index)
/// and forgets the journal entries that flush covered. In relaxed
/// durability this flush is also what bounds how much a power loss can take.
pub fn spawn_sweeper(
    ingest: Ingest,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            if let Err(e) = sweep(&ingest).await {
                tracing::warn!(error = %e, "flushing the journal of unflushed rows failed; retrying later");
            }
        }
    })
}

/// One flush and trim of the journal; the node runs it once more after its
/// servers have stopped, so a clean stop leaves nothing to check at start.
pub async fn sweep(ingest: &Ingest) -> Result<(), Error> {
    // Entries up to the high water were committed before the flush starts,
    // and their blobs published before their commit: the flush covers
    // both. Entries committed later keep their place for the next sweep.
    let Some(high_water) = ingest.index().unsynced_high_water().await? else {
        return Ok(());
    };
    ingest.store().flush().await?;
    ingest.index().forget_unsynced(high_water).await?;
    Ok(())
}
