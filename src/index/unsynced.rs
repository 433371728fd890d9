//! The journal of instance rows not yet known to be flushed with their
//! blobs (migration 0009), and the removal of a row whose blob did not
//! survive a crash. Used by crate::recovery.

use sqlx::{Connection, Row};

use super::{Error, Index};
use crate::types::BlobHash;

/// An instance row the journal names, with what its blob must be.
#[derive(Debug, Clone)]
pub struct UnsyncedInstance {
    pub instance_key: i64,
    pub sop_instance_uid: String,
    pub blob_hash: BlobHash,
    pub blob_size: u64,
}

impl Index {
    /// The newest journal entry committed so far: everything up to it may
    /// be forgotten once a flush that started after this call has ended.
    pub async fn unsynced_high_water(&self) -> Result<Option<i64>, Error> {
        let row = sqlx::query("SELECT MAX(seq) FROM unsynced_instance")
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?)
    }

    /// Drops the journal entries up to `seq`, covered by a completed flush.
    pub async fn forget_unsynced(&self, seq: i64) -> Result<u64, Error> {
        let done = sqlx::query("DELETE FROM unsynced_instance WHERE seq <= $1")
            .bind(seq)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// The instance rows the journal names (rows removed since are skipped).
    pub async fn unsynced_instances(&self) -> Result<Vec<UnsyncedInstance>, Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT i.instance_key, i.sop_instance_uid, i.blob_hash, i.blob_size \
             FROM unsynced_instance u JOIN instance i ON i.instance_key = u.instance_key \
             ORDER BY i.instance_key",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let hex: String = r.try_get(2)?;
                Ok(UnsyncedInstance {
                    instance_key: r.try_get(0)?,
                    sop_instance_uid: r.try_get(1)?,
                    blob_hash: BlobHash::parse(&hex).map_err(|_| Error::BadHash(hex))?,
                    blob_size: r.try_get::<i64, _>(3)? as u64,
                })
            })
            .collect()
    }

    /// Whether any instance row names the blob.
    pub async fn blob_referenced(&self, hash: &BlobHash) -> Result<bool, Error> {
        let row = sqlx::query("SELECT 1 FROM instance WHERE blob_hash = $1 LIMIT 1")
            .bind(hash.to_hex())
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }

    /// Removes an instance row that was never acknowledged (its blob did not
    /// reach the disk). An earlier version of the same SOP Instance UID
    /// becomes current again, and series and studies left without instances
    /// go too, so nothing half-stored stays visible. Counts follow in the
    /// triggers of migration 0002.
    pub async fn remove_unacknowledged(&self, instance_key: i64) -> Result<(), Error> {
        let mut writer = self.write_lock.lock().await;
        // Keys of rows about to go may be cached by the writer.
        writer.cache.clear();
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT i.sop_instance_uid, i.series_key, se.study_key, st.patient_key \
             FROM instance i JOIN series se ON se.series_key = i.series_key \
             JOIN study st ON st.study_key = se.study_key WHERE i.instance_key = $1",
        )
        .bind(instance_key)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(());
        };
        let sop_instance_uid: String = row.try_get(0)?;
        let series_key: i64 = row.try_get(1)?;
        let study_key: i64 = row.try_get(2)?;
        let patient_key: i64 = row.try_get(3)?;
        // Not current first, so the count trigger takes it away.
        sqlx::query("UPDATE instance SET is_current = 0 WHERE instance_key = $1")
            .bind(instance_key)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM instance WHERE instance_key = $1")
            .bind(instance_key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE instance SET is_current = 1 WHERE instance_key = \
             (SELECT instance_key FROM instance WHERE sop_instance_uid = $1 \
              ORDER BY version DESC LIMIT 1) \
             AND NOT EXISTS (SELECT 1 FROM instance WHERE sop_instance_uid = $1 AND is_current = 1)",
        )
        .bind(&sop_instance_uid)
        .execute(&mut *tx)
        .await?;
        remove_series_if_empty(&mut tx, series_key).await?;
        sqlx::query(
            "UPDATE study SET number_of_study_related_series = \
             (SELECT COUNT(*) FROM series WHERE study_key = $1) WHERE study_key = $1",
        )
        .bind(study_key)
        .execute(&mut *tx)
        .await?;
        remove_study_if_empty(&mut tx, study_key).await?;
        remove_patient_if_empty(&mut tx, patient_key).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Removes a series left without instances; how many rows went (0 or 1).
/// Shared by the recovery and the deletion path (crate::lifecycle).
pub async fn remove_series_if_empty(
    conn: &mut sqlx::AnyConnection,
    series_key: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM series WHERE series_key = $1 \
         AND NOT EXISTS (SELECT 1 FROM instance WHERE series_key = $1)",
    )
    .bind(series_key)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Removes a study left without series (0 or 1 rows).
pub async fn remove_study_if_empty(
    conn: &mut sqlx::AnyConnection,
    study_key: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM study WHERE study_key = $1 \
         AND NOT EXISTS (SELECT 1 FROM series WHERE study_key = $1)",
    )
    .bind(study_key)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Removes a patient left without studies (0 or 1 rows).
pub async fn remove_patient_if_empty(
    conn: &mut sqlx::AnyConnection,
    patient_key: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        "DELETE FROM patient WHERE patient_key = $1 \
         AND NOT EXISTS (SELECT 1 FROM study WHERE patient_key = $1)",
    )
    .bind(patient_key)
    .execute(conn)
    .await?
    .rows_affected())
}
