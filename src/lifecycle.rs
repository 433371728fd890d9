//! Removing studies, series and instances: by an operator (JSON API,
//! `huren delete`), by a modality or PACS sending an IHE IOCM rejection note
//! (a Key Object Selection Document, by C-STORE or STOW-RS), and by the
//! retention policy. One path for all three: [`delete`].
//!
//! - The index rows go, in one transaction: every query and retrieval
//!   (C-FIND, QIDO-RS, C-MOVE/C-GET, WADO-RS, the JSON API, the page) reads
//!   the index, so the instances disappear from all of them at the commit.
//!   Series, studies and patients left empty go with them.
//! - A `deletion` row per instance version says what was removed, when, by
//!   whom and why (migration 0010).
//! - In a region, the same transaction queues the registry update: a study
//!   left empty is retracted, a study that keeps instances is evaluated
//!   again and re-published with what remains (src/publish.rs).
//! - The blobs stay until the collector (src/gc.rs) finds no row naming
//!   them: a deletion never races an ingest that shares the blob.
//!
//! A rejection for quality, patient safety or a wrong worklist entry is
//! remembered (`rejected_instance`): the same SOP Instance UID sent again is
//! refused (C-STORE 0124, STOW-RS failure), as IOCM asks of an Image
//! Manager. "Data Retention Policy Expired" and an operator's deletion are
//! not remembered that way: a study sent again after those is a deliberate
//! act and is stored again.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use sqlx::{AnyConnection, Connection, Row};
use thiserror::Error;

use crate::index::{self, Index};
use crate::publish::{self, Region};

#[derive(Debug, Error)]
pub enum Error {
    #[error("index: {0}")]
    Index(#[from] index::Error),
    #[error("index database: {0}")]
    Database(#[from] sqlx::Error),
    /// A rejection note that may not be applied: from an AE not allowed to
    /// reject, or naming instances of another patient or study.
    #[error("rejection note refused: {0}")]
    NoteRefused(String),
    /// The deletion's audit record could not be written: nothing was
    /// deleted (a deletion never happens unaudited).
    #[error("audit log: {0}; nothing was deleted")]
    Unaudited(String),
}

/// What to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Study(String),
    Series(String),
    Instance(String),
}

use crate::iocm::blocks_resend;
pub use crate::iocm::{
    DATA_RETENTION_POLICY_EXPIRED, INCORRECT_MODALITY_WORKLIST_ENTRY,
    REJECTED_FOR_PATIENT_SAFETY_REASONS, REJECTED_FOR_QUALITY_REASONS, RejectionNote,
    reason_meaning,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Operator,
    RejectionNote,
    Retention,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Operator => "operator",
            Source::RejectionNote => "rejection_note",
            Source::Retention => "retention",
        }
    }
}

/// One removal: what, who and why.
#[derive(Debug, Clone)]
pub struct Deletion {
    pub scopes: Vec<Scope>,
    pub source: Source,
    /// The API token's name, the operator's login, the rejection note's
    /// calling AE title, or "retention".
    pub actor: String,
    /// A CID 7011 code, or "" when the reason is free text.
    pub reason_code: String,
    pub reason: String,
    pub rejection_note_uid: Option<String>,
    /// A rejection note's (Study Instance UID, Patient ID): the bar on a
    /// rejected SOP Instance UID holds for that study and patient only.
    pub rejected_in: Option<(String, String)>,
    /// Where the DICOM Study Deleted message goes (PS3.15 A.5.3.8).
    pub audit: crate::audit::Audit,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// Instance rows removed (every version counts).
    pub instances_removed: u64,
    /// Studies that lost instances and keep others: re-published.
    pub studies_changed: Vec<String>,
    /// Studies left empty and removed: retracted from the registry.
    pub studies_removed: Vec<String>,
    /// SOP Instance UIDs now refused when sent again.
    pub instances_rejected: u64,
}

/// The statements for one scope: the instance rows it covers, recorded
/// then deleted. Spelled out whole because sqlx takes `&'static str`.
struct ScopeSql {
    select: &'static str,
    record: &'static str,
    delete: &'static str,
}

macro_rules! scope_sql {
    ($cond:literal) => {
        ScopeSql {
            select: concat!(
                "SELECT DISTINCT se.series_key, st.study_key, st.patient_key, st.study_instance_uid \
                 FROM instance i JOIN series se ON se.series_key = i.series_key \
                 JOIN study st ON st.study_key = se.study_key WHERE ",
                $cond
            ),
            record: concat!(
                "INSERT INTO deletion (at, study_instance_uid, series_instance_uid, sop_instance_uid, \
                 sop_class_uid, patient_id, blob_hash, version, source, actor, reason_code, reason, \
                 rejection_note_uid) \
                 SELECT $2, st.study_instance_uid, se.series_instance_uid, i.sop_instance_uid, \
                 i.sop_class_uid, p.patient_id, i.blob_hash, i.version, $3, $4, $5, $6, $7 \
                 FROM instance i JOIN series se ON se.series_key = i.series_key \
                 JOIN study st ON st.study_key = se.study_key \
                 JOIN patient p ON p.patient_key = st.patient_key WHERE ",
                $cond
            ),
            delete: concat!(
                "DELETE FROM instance WHERE instance_key IN (SELECT i.instance_key \
                 FROM instance i JOIN series se ON se.series_key = i.series_key \
                 JOIN study st ON st.study_key = se.study_key WHERE ",
                $cond,
                ")"
            ),
        }
    };
}

impl Scope {
    fn sql(&self) -> ScopeSql {
        match self {
            Scope::Study(_) => scope_sql!("st.study_instance_uid = $1"),
            Scope::Series(_) => scope_sql!("se.series_instance_uid = $1"),
            Scope::Instance(_) => scope_sql!("i.sop_instance_uid = $1"),
        }
    }

    fn uid(&self) -> &str {
        match self {
            Scope::Study(u) | Scope::Series(u) | Scope::Instance(u) => u,
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Removes what `deletion` names from the index and records it; in a
/// region, queues the registry's update in the same transaction. Names
/// that match nothing are not an error (the outcome says what was removed).
pub async fn delete(
    index: &Index,
    region: Option<&Region>,
    deletion: &Deletion,
) -> Result<Outcome, Error> {
    let paused = index.pause_writes().await;
    let mut conn = index.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    let at = now_rfc3339();
    let mut outcome = Outcome::default();
    let mut series_keys = std::collections::BTreeSet::new();
    let mut studies = std::collections::BTreeMap::new();
    let mut patient_keys = std::collections::BTreeSet::new();
    for scope in &deletion.scopes {
        let sql = scope.sql();
        let rows = sqlx::query(sql.select)
            .bind(scope.uid())
            .fetch_all(&mut *tx)
            .await?;
        for row in &rows {
            series_keys.insert(row.try_get::<i64, _>(0)?);
            studies.insert(row.try_get::<i64, _>(1)?, row.try_get::<String, _>(3)?);
            patient_keys.insert(row.try_get::<i64, _>(2)?);
        }
        sqlx::query(sql.record)
            .bind(scope.uid())
            .bind(&at)
            .bind(deletion.source.as_str())
            .bind(&deletion.actor)
            .bind(&deletion.reason_code)
            .bind(&deletion.reason)
            .bind(deletion.rejection_note_uid.as_deref())
            .execute(&mut *tx)
            .await?;
        let removed = sqlx::query(sql.delete)
            .bind(scope.uid())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        outcome.instances_removed += removed;
        if let (Scope::Instance(uid), Some(note)) = (scope, &deletion.rejection_note_uid)
            && blocks_resend(&deletion.reason_code)
        {
            let (study, patient) = deletion.rejected_in.clone().unzip();
            outcome.instances_rejected += sqlx::query(
                "INSERT INTO rejected_instance (sop_instance_uid, reason_code, rejection_note_uid, at, \
                 study_instance_uid, patient_id) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sop_instance_uid) DO NOTHING",
            )
            .bind(uid)
            .bind(&deletion.reason_code)
            .bind(note)
            .bind(&at)
            .bind(study)
            .bind(patient)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
    }
    // The counts the ingest triggers keep (migration 0002) follow inserts
    // and updates only; a deletion sets them from the rows that remain.
    for series_key in &series_keys {
        sqlx::query(
            "UPDATE series SET number_of_series_related_instances = \
             (SELECT COUNT(*) FROM instance WHERE series_key = $1 AND is_current = 1) \
             WHERE series_key = $1",
        )
        .bind(series_key)
        .execute(&mut *tx)
        .await?;
        crate::index::remove_series_if_empty(&mut tx, *series_key).await?;
    }
    for (study_key, study_instance_uid) in &studies {
        let removed = crate::index::remove_study_if_empty(&mut tx, *study_key).await?;
        if removed > 0 {
            retract_if_published(&mut tx, study_instance_uid).await?;
            // A prior fetched from another hospital and deleted here: no
            // longer held, so no longer listed as cached.
            sqlx::query("DELETE FROM cached_study WHERE study_instance_uid = $1")
                .bind(study_instance_uid)
                .execute(&mut *tx)
                .await?;
            outcome.studies_removed.push(study_instance_uid.clone());
            continue;
        }
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
             number_of_study_related_series = (SELECT COUNT(*) FROM series WHERE study_key = $1), \
             number_of_study_related_instances = (SELECT COUNT(*) FROM instance i \
               JOIN series se ON se.series_key = i.series_key \
               WHERE se.study_key = $1 AND i.is_current = 1) \
             WHERE study_key = $1",
        )
        .bind(study_key)
        .bind(modalities)
        .execute(&mut *tx)
        .await?;
        // Evaluated again by the stability worker: the registry's record
        // follows with what remains.
        publish::mark_changed_on(&mut tx, study_instance_uid).await?;
        outcome.studies_changed.push(study_instance_uid.clone());
    }
    for patient_key in &patient_keys {
        crate::index::remove_patient_if_empty(&mut tx, *patient_key).await?;
    }
    // What the audit message names, from the records just written.
    let mut deleted: std::collections::BTreeMap<(String, String), Vec<(String, u64)>> =
        Default::default();
    if deletion.audit.is_enabled() {
        let rows = sqlx::query(
            "SELECT study_instance_uid, patient_id, sop_class_uid, COUNT(*) FROM deletion \
             WHERE at = $1 AND source = $2 AND actor = $3 \
             GROUP BY study_instance_uid, patient_id, sop_class_uid",
        )
        .bind(&at)
        .bind(deletion.source.as_str())
        .bind(&deletion.actor)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let count: i64 = row.try_get(3)?;
            deleted
                .entry((row.try_get(0)?, row.try_get(1)?))
                .or_default()
                .push((row.try_get(2)?, count as u64));
        }
    }
    let studies: Vec<crate::audit::DeletedStudy> = deleted
        .into_iter()
        .map(
            |((study_instance_uid, patient_id), sop_classes)| crate::audit::DeletedStudy {
                study_instance_uid,
                patient_id,
                sop_classes,
            },
        )
        .collect();
    let actor = (deletion.source != Source::Retention).then_some(deletion.actor.as_str());
    let why = if deletion.reason_code.is_empty() {
        deletion.reason.clone()
    } else {
        format!("{} {}", deletion.reason_code, deletion.reason)
    };
    // Recorded before the deletion is committed: a deletion the audit log
    // cannot take is rolled back (the transaction dropped), never done
    // unaudited.
    deletion
        .audit
        .study_deleted(actor, &why, &studies)
        .map_err(Error::Unaudited)?;
    tx.commit().await?;
    drop(paused);
    if let Some(region) = region
        && !outcome.studies_removed.is_empty()
    {
        region.wake_publisher();
    }
    tracing::warn!(
        source = deletion.source.as_str(),
        actor = %deletion.actor,
        reason_code = %deletion.reason_code,
        reason = %deletion.reason,
        instances = outcome.instances_removed,
        studies_removed = ?outcome.studies_removed,
        studies_changed = ?outcome.studies_changed,
        "instances deleted"
    );
    Ok(outcome)
}

/// A study the registry holds is retracted; one it never received (still
/// pending, or kept local) has nothing to withdraw.
async fn retract_if_published(
    conn: &mut AnyConnection,
    study_instance_uid: &str,
) -> Result<(), sqlx::Error> {
    let state: Option<String> =
        sqlx::query("SELECT state FROM study_publication WHERE study_instance_uid = $1")
            .bind(study_instance_uid)
            .fetch_optional(&mut *conn)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
    if state.as_deref() == Some("published") {
        publish::enqueue_retraction(conn, study_instance_uid).await?;
    }
    Ok(())
}

/// The node's rejection-note step: the ingest path hands it each note it
/// receives ([`crate::ingest::RejectionHandler`]).
pub struct RejectionNotes {
    pub index: Index,
    pub senders: crate::iocm::RejectionSenders,
}

impl crate::ingest::RejectionHandler for RejectionNotes {
    fn apply<'a>(
        &'a self,
        note: &'a RejectionNote,
        calling_ae_title: Option<&'a str>,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(), crate::ingest::RejectionFailure>>
                + Send
                + 'a,
        >,
    > {
        Box::pin(async move {
            apply_rejection_note(&self.index, None, note, calling_ae_title, &self.senders)
                .await
                .map(|_| ())
                .map_err(|e| match e {
                    Error::NoteRefused(why) => crate::ingest::RejectionFailure::Refused(why),
                    other => crate::ingest::RejectionFailure::Failed(other.to_string()),
                })
        })
    }
}

/// Applies a rejection note: the instances it names are deleted, and for
/// the quality, safety and worklist reasons refused when sent again. An
/// instance the node does not hold (yet) is still remembered as rejected,
/// so that it is refused when it arrives after the note.
///
/// The note is refused whole (nothing deleted, a Security Alert audited)
/// when `senders` does not admit the calling AE title, or when it names an
/// instance of another study than its own or one the node holds for
/// another patient (IHE IOCM: a note rejects instances of its own patient
/// and study; PS3.4 KO.1).
pub async fn apply_rejection_note(
    index: &Index,
    region: Option<&Region>,
    note: &RejectionNote,
    calling_ae_title: Option<&str>,
    senders: &crate::iocm::RejectionSenders,
) -> Result<Outcome, Error> {
    let refused = |why: String| {
        crate::audit::rejection_note_refused(
            &note.sop_instance_uid,
            &note.study_instance_uid,
            &note.patient_id,
            &why,
        );
        tracing::warn!(
            calling_ae_title = ?calling_ae_title,
            rejection_note_uid = %note.sop_instance_uid,
            reason = %why,
            "IOCM rejection note refused"
        );
        Err(Error::NoteRefused(why))
    };
    if !senders.admits(calling_ae_title) {
        return refused(match calling_ae_title {
            Some(_) => "the calling AE title may not send rejection notes".into(),
            None => "rejection notes are taken over DICOM from the configured AEs only (use DELETE /api/v1 over HTTP)".into(),
        });
    }
    if note.study_instance_uid.is_empty() || note.patient_id.is_empty() {
        return refused("the note has no Study Instance UID or Patient ID".into());
    }
    for (study, _, sop) in &note.referenced {
        if study != &note.study_instance_uid {
            return refused(format!(
                "the note references an instance ({sop}) of another study than its own"
            ));
        }
        let held = sqlx::query(
            "SELECT st.study_instance_uid, p.patient_id, p.issuer_of_patient_id \
             FROM instance i JOIN series se ON se.series_key = i.series_key \
             JOIN study st ON st.study_key = se.study_key \
             JOIN patient p ON p.patient_key = st.patient_key WHERE i.sop_instance_uid = $1",
        )
        .bind(sop)
        .fetch_all(index.pool())
        .await?;
        for row in held {
            let (held_study, held_patient, held_issuer): (String, String, String) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let same_issuer = note.issuer_of_patient_id.is_empty()
                || held_issuer.is_empty()
                || held_issuer == note.issuer_of_patient_id;
            if held_study != note.study_instance_uid
                || held_patient != note.patient_id
                || !same_issuer
            {
                return refused(format!(
                    "instance {sop} is held for another patient or study than the note's"
                ));
            }
        }
    }
    let meaning = reason_meaning(&note.reason_code).unwrap_or_default();
    delete(
        index,
        region,
        &Deletion {
            scopes: note
                .referenced
                .iter()
                .map(|(_, _, sop)| Scope::Instance(sop.clone()))
                .collect(),
            source: Source::RejectionNote,
            actor: calling_ae_title.unwrap_or("").to_string(),
            reason_code: note.reason_code.clone(),
            reason: meaning.to_string(),
            rejection_note_uid: Some(note.sop_instance_uid.clone()),
            rejected_in: Some((note.study_instance_uid.clone(), note.patient_id.clone())),
            audit: crate::audit::current(),
        },
    )
    .await
}

/// The retention policy: how long a study is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub days: u32,
}

/// Removes the studies older than the retention period, at most `limit`
/// per pass. A study's age runs from its Study Date (the exam's date, the
/// one retention rules count from); a study without a Study Date counts
/// from when its last instance was received.
pub async fn retention_pass(
    index: &Index,
    region: Option<&Region>,
    retention: Retention,
    limit: i64,
    audit: &crate::audit::Audit,
) -> Result<Outcome, Error> {
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(retention.days) * 86_400);
    let cutoff_rfc3339 = humantime::format_rfc3339(cutoff).to_string();
    // DA is YYYYMMDD: ordered as text.
    let cutoff_da: String = cutoff_rfc3339[..10].replace('-', "");
    let rows = sqlx::query(
        "SELECT study_instance_uid FROM study \
         WHERE (study_date <> '' AND study_date < $1) \
            OR (study_date = '' AND last_received_at < $2) \
         ORDER BY study_key LIMIT $3",
    )
    .bind(&cutoff_da)
    .bind(&cutoff_rfc3339)
    .bind(limit)
    .fetch_all(index.pool())
    .await?;
    let mut total = Outcome::default();
    for row in rows {
        let uid: String = row.try_get(0)?;
        let outcome = delete(
            index,
            region,
            &Deletion {
                scopes: vec![Scope::Study(uid)],
                source: Source::Retention,
                actor: "retention".into(),
                reason_code: DATA_RETENTION_POLICY_EXPIRED.into(),
                reason: format!(
                    "Data Retention Policy Expired (older than {} days)",
                    retention.days
                ),
                rejection_note_uid: None,
                rejected_in: None,
                audit: audit.clone(),
            },
        )
        .await?;
        total.instances_removed += outcome.instances_removed;
        total.studies_removed.extend(outcome.studies_removed);
        total.studies_changed.extend(outcome.studies_changed);
    }
    Ok(total)
}

/// One row of the deletion record.
#[derive(Debug, Clone, Serialize)]
pub struct DeletionRecord {
    pub seq: i64,
    pub at: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub patient_id: String,
    pub blob_hash: String,
    pub version: i64,
    pub source: String,
    pub actor: String,
    pub reason_code: String,
    pub reason: String,
    pub rejection_note_uid: Option<String>,
}

/// The deletion record, newest first; `study` narrows it to one study.
pub async fn records(
    index: &Index,
    study: Option<&str>,
    limit: i64,
) -> Result<Vec<DeletionRecord>, Error> {
    let rows = sqlx::query(
        "SELECT seq, at, study_instance_uid, series_instance_uid, sop_instance_uid, \
         sop_class_uid, patient_id, blob_hash, version, source, actor, reason_code, reason, \
         rejection_note_uid FROM deletion \
         WHERE ($1 = '' OR study_instance_uid = $1) ORDER BY seq DESC LIMIT $2",
    )
    .bind(study.unwrap_or(""))
    .bind(limit)
    .fetch_all(index.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeletionRecord {
                seq: r.try_get(0)?,
                at: r.try_get(1)?,
                study_instance_uid: r.try_get(2)?,
                series_instance_uid: r.try_get(3)?,
                sop_instance_uid: r.try_get(4)?,
                sop_class_uid: r.try_get(5)?,
                patient_id: r.try_get(6)?,
                blob_hash: r.try_get(7)?,
                version: r.try_get(8)?,
                source: r.try_get(9)?,
                actor: r.try_get(10)?,
                reason_code: r.try_get(11)?,
                reason: r.try_get(12)?,
                rejection_note_uid: r.try_get(13)?,
            })
        })
        .collect()
}

/// The node's periodic lifecycle work: the retention policy and the
/// collector, each when configured.
pub fn spawn(
    ingest: crate::ingest::Ingest,
    region: Option<std::sync::Arc<Region>>,
    retention: Option<Retention>,
    gc: Option<crate::gc::Options>,
    interval: Duration,
    audit: crate::audit::Audit,
    shutdown: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if retention.is_none() && gc.is_none() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            if let Some(retention) = retention {
                // Passes of bounded size, so that one pass never holds the
                // writer for long; the next tick goes on.
                match retention_pass(ingest.index(), region.as_deref(), retention, 100, &audit)
                    .await
                {
                    Ok(o) if o.instances_removed > 0 => tracing::warn!(
                        studies = o.studies_removed.len(),
                        instances = o.instances_removed,
                        days = retention.days,
                        "retention policy: studies removed"
                    ),
                    Ok(_) => {}
                    Err(error) => tracing::error!(%error, "retention pass failed"),
                }
            }
            if let Some(options) = &gc {
                match crate::gc::collect(&ingest, options).await {
                    Ok(r) if r.removed > 0 => tracing::info!(
                        removed = r.removed,
                        bytes = r.removed_bytes,
                        "collector: unreferenced blobs removed"
                    ),
                    Ok(_) => {}
                    Err(error) => tracing::error!(%error, "collector pass failed"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_which_block_a_resend() {
        let cases = [
            (REJECTED_FOR_QUALITY_REASONS, true),
            (REJECTED_FOR_PATIENT_SAFETY_REASONS, true),
            (INCORRECT_MODALITY_WORKLIST_ENTRY, true),
            (DATA_RETENTION_POLICY_EXPIRED, false),
        ];
        for (code, blocks) in cases {
            assert!(reason_meaning(code).is_some(), "{code}");
            assert_eq!(blocks_resend(code), blocks, "{code}");
        }
        assert_eq!(reason_meaning("113002"), None);
        assert!(!blocks_resend(""));
    }
}
