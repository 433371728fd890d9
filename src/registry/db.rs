//! The registry's database: SQLite (embedded default) or PostgreSQL (a
//! region, several registry processes), through sqlx's `Any` driver with
//! one set of SQL, as the node's index does.
//!
//! Every write that the audit trail must show happens in the same
//! transaction as its audit entries: a publication that committed is
//! audited, and an audit entry never describes something that rolled back.

use std::time::{Duration, SystemTime};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};

use crate::contract::*;
use crate::patient_key::is_patient_key;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registry database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("registry migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database URL {0:?} is neither sqlite:// nor postgres://")]
    UnsupportedUrl(String),
    /// A request the caller can fix; the message says what is wrong.
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0} exists already")]
    Conflict(&'static str),
    #[error("stored row is malformed: {0}")]
    Corrupt(String),
    /// Refused by policy (and audited): the message says why.
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    /// Break-the-glass grants one hospital may be issued per hour.
    emergency_grants_per_hour: u32,
    /// The latest expiry a new consent may have, in days from now.
    max_consent_days: u32,
    /// The item codes of the active recognition list, by its content hash
    /// (parsed once per list, not once per publication).
    known_codes: std::sync::Arc<std::sync::Mutex<Option<(String, KnownCodes)>>>,
}

/// The item codes of one recognition list.
type KnownCodes = std::sync::Arc<std::collections::HashSet<String>>;

/// The default of `--max-consent-days`: a year, the span of the
/// provincial health app's own authorisations; a patient seen again later
/// consents again.
pub const DEFAULT_MAX_CONSENT_DAYS: u32 = 365;

/// Why a presented grant is not confirmed; `patient_key` when the grant
/// is known (for the audit entry).
#[derive(Debug, Clone)]
pub struct InvalidGrant {
    pub reason: &'static str,
    pub patient_key: Option<String>,
    /// The grant itself is valid, but its patient's consent for the
    /// requesting hospital no longer is (403, not 404).
    pub consent_withdrawn: bool,
}

/// The bounds of a published record (proto/huren.openapi.json says the
/// same as maxLength / maxItems): a record is an index entry, not a
/// document, and a node never writes more than these.
mod bounds {
    /// Records plus retractions of one request (a node's batch is 500).
    pub const BATCH: usize = 1000;
    /// Recognition items of one study.
    pub const ITEMS: usize = 64;
    /// Modalities, body parts, view positions, evidence entries.
    pub const LIST: usize = 64;
    /// A code string (DICOM CS is 16; item codes and body parts are longer).
    pub const CODE: usize = 64;
    /// An evidence entry (`code table <name>`).
    pub const EVIDENCE: usize = 200;
}

/// The default of `--emergency-grants-per-hour`: a busy emergency
/// department sees a few patients with priors elsewhere an hour; more
/// than this is more likely a misuse than a night shift.
pub const DEFAULT_EMERGENCY_GRANTS_PER_HOUR: u32 = 20;

/// An entry to append to the audit trail (seq, time and hashes are the
/// trail's).
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub actor: String,
    pub user_id: String,
    pub action: &'static str,
    pub patient_key: Option<String>,
    pub purpose: Option<String>,
    pub records_returned: i64,
    pub outcome: String,
    pub detail: String,
}

use crate::common::{now_rfc3339, random_hex};

/// Parses an RFC 3339 time (`Z` offset) into the one form the database
/// keeps, so that text comparison is time comparison.
pub fn normalise_time(s: &str) -> Result<String> {
    let t = humantime::parse_rfc3339_weak(s.trim()).map_err(|_| {
        Error::Invalid("a time is not an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ)".into())
    })?;
    Ok(humantime::format_rfc3339_micros(t).to_string())
}

fn check_date(field: &str, s: &str) -> Result<()> {
    if crate::common::is_date(s) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{field} must be a date, YYYY-MM-DD"
        )))
    }
}

/// One published record against the contract's bounds; the message names
/// the field, never its value.
fn check_record(r: &StudyRecord, codes: &std::collections::HashSet<String>) -> Result<(), String> {
    let invalid = |e: Error| e.to_string();
    check_uid(&r.study_instance_uid).map_err(invalid)?;
    check_patient_key(&r.patient_key).map_err(invalid)?;
    if r.record_version < 1 {
        return Err("record_version must be at least 1".into());
    }
    if let Some(d) = &r.study_date {
        check_date("study_date", d).map_err(invalid)?;
    }
    if let Some(t) = &r.study_time
        && !crate::common::is_time(t)
    {
        return Err("study_time must be a time of day, HH:MM:SS".into());
    }
    if let Some(d) = &r.report_issued_date {
        check_date("report_issued_date", d).map_err(invalid)?;
    }
    if !is_patient_key(&r.content_root) {
        return Err("content_root must be 64 lower-case hex digits".into());
    }
    if r.federation_pseudonym
        .as_deref()
        .is_some_and(|p| !is_patient_key(p))
    {
        return Err("federation_pseudonym must be 64 lower-case hex digits".into());
    }
    for (field, n) in [
        ("number_of_series", r.number_of_series),
        ("number_of_instances", r.number_of_instances),
        ("bytes", r.bytes),
    ] {
        if n < 0 {
            return Err(format!("{field} must not be negative"));
        }
    }
    let list = |field: &str, values: &[String], max_items: usize, max_len: usize| {
        if values.len() > max_items {
            return Err(format!("{field} has more than {max_items} entries"));
        }
        if values
            .iter()
            .any(|v| v.is_empty() || v.len() > max_len || v.chars().any(char::is_control))
        {
            return Err(format!(
                "each of {field} must be 1 to {max_len} bytes of printable text"
            ));
        }
        Ok(())
    };
    list("modalities", &r.modalities, bounds::LIST, bounds::CODE)?;
    list("body_parts", &r.body_parts, bounds::LIST, bounds::CODE)?;
    list(
        "view_positions",
        &r.view_positions,
        bounds::LIST,
        bounds::CODE,
    )?;
    if r.laterality.len() > 3 {
        return Err("laterality has more than 3 entries".into());
    }
    if r.items.len() > bounds::ITEMS {
        return Err(format!("items has more than {} entries", bounds::ITEMS));
    }
    for (j, item) in r.items.iter().enumerate() {
        // Without an active list the registry cannot judge a code (and no
        // check can warn on it): only its form is checked below, so that
        // a region activating its first list loses no publication.
        if !codes.is_empty() && !codes.contains(&item.code) {
            return Err(format!(
                "items[{j}].code is not an item of the active recognition list"
            ));
        }
        list(
            &format!("items[{j}].evidence"),
            &item.evidence,
            bounds::LIST,
            bounds::EVIDENCE,
        )?;
        list(
            &format!("items[{j}].view_positions"),
            &item.view_positions,
            bounds::LIST,
            bounds::CODE,
        )?;
    }
    Ok(())
}

fn check_patient_key(key: &str) -> Result<()> {
    if is_patient_key(key) {
        Ok(())
    } else {
        Err(Error::Invalid(
            "patient_key must be 64 lower-case hex digits".into(),
        ))
    }
}

fn check_text(field: &str, s: &str, max: usize) -> Result<()> {
    crate::contract::check_printable(field, s, max).map_err(Error::Invalid)
}

fn check_uid(s: &str) -> Result<()> {
    if crate::types::Uid::parse(s).is_err() {
        return Err(Error::Invalid(
            "study_instance_uid is not a valid UID (digits and dots, at most 64)".into(),
        ));
    }
    Ok(())
}

/// The one URL checker: a node's DICOMweb base URL must be http(s).
fn check_url(s: &str) -> Result<()> {
    if (s.starts_with("https://") || s.starts_with("http://")) && s.len() <= 2048 {
        Ok(())
    } else {
        Err(Error::Invalid(
            "dicomweb_base_url must be an http(s) URL".into(),
        ))
    }
}

impl Db {
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let sqlite = if let Some(rest) = url.strip_prefix("sqlite:") {
            if let Some(path) = rest.trim_start_matches("//").split('?').next()
                && let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                let _ = std::fs::create_dir_all(parent);
            }
            true
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            false
        } else {
            return Err(Error::UnsupportedUrl(url.to_string()));
        };
        let mut url = url.to_string();
        if sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            });
        }
        let options: AnyConnectOptions = url.parse()?;
        let pool = if sqlite {
            AnyPoolOptions::new()
                .max_connections(4)
                // No ping per acquire (sqlx's default): a round trip more
                // per statement, on every query a node's check waits on. A
                // broken connection surfaces as the statement's own error.
                .test_before_acquire(false)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await?
        } else {
            AnyPoolOptions::new()
                .max_connections(16)
                // As above: on PostgreSQL the ping is a network round trip.
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(30))
                .connect_with(options)
                .await?
        };
        if sqlite {
            sqlx::migrate!("migrations/registry/sqlite")
                .run(&pool)
                .await?;
        } else {
            sqlx::migrate!("migrations/registry/postgres")
                .run(&pool)
                .await?;
        }
        Ok(Db {
            pool,
            emergency_grants_per_hour: DEFAULT_EMERGENCY_GRANTS_PER_HOUR,
            max_consent_days: DEFAULT_MAX_CONSENT_DAYS,
            known_codes: Default::default(),
        })
    }

    pub fn with_max_consent_days(mut self, days: u32) -> Db {
        self.max_consent_days = days.max(1);
        self
    }

    /// The item codes of the active list (empty when none is active).
    async fn known_codes(&self) -> Result<KnownCodes> {
        let Some((hash, text)) = self.active_list().await? else {
            return Ok(Default::default());
        };
        if let Some((cached, codes)) = &*self.known_codes.lock().expect("codes lock")
            && *cached == hash
        {
            return Ok(codes.clone());
        }
        let list = crate::recognition::list::RecognitionList::parse(&text)
            .map_err(|_| Error::Corrupt("the active recognition list does not parse".into()))?;
        let codes: KnownCodes =
            std::sync::Arc::new(list.items.into_iter().map(|i| i.code).collect());
        *self.known_codes.lock().expect("codes lock") = Some((hash, codes.clone()));
        Ok(codes)
    }

    pub fn with_emergency_grants_per_hour(mut self, limit: u32) -> Db {
        self.emergency_grants_per_hour = limit;
        self
    }

    /// Break-the-glass is for an emergency encounter, by a named user
    /// (issue 22; recognition-facts.md "Rules huren keeps"). A request
    /// with purpose `emergency` and any other encounter is refused and
    /// audited as a refused emergency access.
    async fn check_emergency(
        &self,
        asking: &str,
        action: &'static str,
        purpose: Purpose,
        encounter: Option<Encounter>,
        user_id: &str,
        patient_key: Option<&str>,
    ) -> Result<()> {
        if purpose != Purpose::Emergency {
            return Ok(());
        }
        let why = if encounter != Some(Encounter::Emergency) {
            Some("break-the-glass is allowed for an emergency encounter only".to_string())
        } else if user_id.trim().is_empty() {
            Some("break-the-glass needs the named user who asks".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            self.audit(&[AuditRecord {
                actor: asking.to_string(),
                user_id: user_id.to_string(),
                action,
                patient_key: patient_key.map(str::to_string),
                purpose: Some(purpose.as_str().to_string()),
                records_returned: 0,
                outcome: "refused_emergency".into(),
                detail: format!("{why}; encounter {encounter:?}"),
            }])
            .await?;
            return Err(Error::Refused(why));
        }
        Ok(())
    }
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ------------------------------------------------------------ hospitals

    pub async fn add_hospital(
        &self,
        h: &NewHospital,
        token_sha256: &str,
        audit: AuditRecord,
    ) -> Result<Hospital> {
        check_hospital_id(&h.hospital_id)?;
        check_text("name", &h.name, 200)?;
        for g in &h.groups {
            check_text("groups", g, 200)?;
        }
        if let Some(url) = &h.dicomweb_base_url {
            check_url(url)?;
        }
        let now = now_rfc3339();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO hospital (hospital_id, name, level_rank, groups, \
             accepts_lower_level_results, qc_status, dicomweb_base_url, token_sha256, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
             ON CONFLICT (hospital_id) DO NOTHING",
        )
        .bind(&h.hospital_id)
        .bind(&h.name)
        .bind(h.level.rank())
        .bind(serde_json::to_string(&h.groups).expect("strings serialise"))
        .bind(i64::from(h.accepts_lower_level_results))
        .bind(h.qc_status.as_str())
        .bind(h.dicomweb_base_url.clone())
        .bind(token_sha256)
        .bind(&now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(Error::Conflict("hospital"));
        }
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        self.hospital(&h.hospital_id)
            .await?
            .ok_or(Error::NotFound("hospital"))
    }

    /// Applies an update; `token_sha256` replaces the token when given.
    pub async fn update_hospital(
        &self,
        hospital_id: &str,
        u: &HospitalUpdate,
        token_sha256: Option<&str>,
        audit: AuditRecord,
    ) -> Result<Hospital> {
        let mut h = self
            .hospital(hospital_id)
            .await?
            .ok_or(Error::NotFound("hospital"))?;
        if let Some(name) = &u.name {
            check_text("name", name, 200)?;
            h.name = name.clone();
        }
        if let Some(level) = u.level {
            h.level = level;
        }
        if let Some(groups) = &u.groups {
            for g in groups {
                check_text("groups", g, 200)?;
            }
            h.groups = groups.clone();
        }
        if let Some(flag) = u.accepts_lower_level_results {
            h.accepts_lower_level_results = flag;
        }
        if let Some(qc) = u.qc_status {
            h.qc_status = qc;
        }
        if let Some(url) = &u.dicomweb_base_url {
            if url.is_empty() {
                h.dicomweb_base_url = None;
            } else {
                check_url(url)?;
                h.dicomweb_base_url = Some(url.clone());
            }
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE hospital SET name = $2, level_rank = $3, groups = $4, \
             accepts_lower_level_results = $5, qc_status = $6, dicomweb_base_url = $7, \
             token_sha256 = COALESCE($8, token_sha256), updated_at = $9 WHERE hospital_id = $1",
        )
        .bind(hospital_id)
        .bind(&h.name)
        .bind(h.level.rank())
        .bind(serde_json::to_string(&h.groups).expect("strings serialise"))
        .bind(i64::from(h.accepts_lower_level_results))
        .bind(h.qc_status.as_str())
        .bind(h.dicomweb_base_url.clone())
        .bind(token_sha256.map(str::to_string))
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(h)
    }

    pub async fn hospital(&self, hospital_id: &str) -> Result<Option<Hospital>> {
        let row = sqlx::query(HOSPITAL_SELECT_ONE)
            .bind(hospital_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| hospital_row(&r)).transpose()
    }

    pub async fn hospitals(&self) -> Result<Vec<Hospital>> {
        let rows = sqlx::query(HOSPITAL_SELECT_ALL)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(hospital_row).collect()
    }

    /// The stored token hash of a hospital, for authentication.
    pub async fn hospital_token_sha256(&self, hospital_id: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT token_sha256 FROM hospital WHERE hospital_id = $1")
            .bind(hospital_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    // ------------------------------------------------------------ records

    /// Upserts records and applies retractions of one hospital, in one
    /// transaction with one audit entry per record. A version not newer
    /// than the stored one changes nothing (a replay after a lost answer,
    /// or an outbox drained twice) and answers `unchanged`.
    pub async fn publish(
        &self,
        hospital_id: &str,
        user_id: &str,
        request: &PublishRequest,
    ) -> Result<Vec<PublishResult>> {
        if request.records.len() + request.retractions.len() > bounds::BATCH {
            return Err(Error::Invalid(format!(
                "a publication carries at most {} records and retractions",
                bounds::BATCH
            )));
        }
        let codes = if request.records.iter().any(|r| !r.items.is_empty()) {
            self.known_codes().await?
        } else {
            Default::default()
        };
        for (i, r) in request.records.iter().enumerate() {
            check_record(r, &codes).map_err(|e| Error::Invalid(format!("records[{i}]: {e}")))?;
        }
        for r in &request.retractions {
            check_uid(&r.study_instance_uid)?;
            if r.record_version < 1 {
                return Err(Error::Invalid("record_version must be at least 1".into()));
            }
        }
        let now = now_rfc3339();
        let mut results = Vec::with_capacity(request.records.len() + request.retractions.len());
        let mut audit = Vec::with_capacity(results.capacity());
        let mut tx = self.pool.begin().await?;
        // Multi-row upserts: a batch of 500 is a handful of statements, not
        // 500 round trips. Within one statement a study may appear once (a
        // row cannot be updated twice by one statement): the highest
        // version of each study goes in, a lower one of the same request is
        // older and so `unchanged`, as it would be one at a time.
        let mut highest: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for r in &request.records {
            let v = highest
                .entry(r.study_instance_uid.as_str())
                .or_insert(r.record_version);
            *v = (*v).max(r.record_version);
        }
        let mut sent = std::collections::HashSet::new();
        let to_write: Vec<&StudyRecord> = request
            .records
            .iter()
            .filter(|r| {
                highest[r.study_instance_uid.as_str()] == r.record_version
                    && sent.insert(r.study_instance_uid.as_str())
            })
            .collect();
        let mut applied: std::collections::HashSet<String> = std::collections::HashSet::new();
        for chunk in to_write.chunks(200) {
            let mut sql = String::from(
                "INSERT INTO study_record (hospital_id, study_instance_uid, record_version, \
                 patient_key, study_date, retracted, published_at, record) VALUES ",
            );
            sql.push_str(&row_placeholders(chunk.len(), 8));
            sql.push_str(
                " ON CONFLICT (hospital_id, study_instance_uid) DO UPDATE SET \
                 record_version = excluded.record_version, patient_key = excluded.patient_key, \
                 study_date = excluded.study_date, retracted = 0, \
                 published_at = excluded.published_at, record = excluded.record \
                 WHERE study_record.record_version < excluded.record_version \
                 RETURNING study_instance_uid",
            );
            // Placeholders only: every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for r in chunk {
                q = q
                    .bind(hospital_id)
                    .bind(&r.study_instance_uid)
                    .bind(r.record_version)
                    .bind(&r.patient_key)
                    .bind(r.study_date.clone())
                    .bind(0i64)
                    .bind(&now)
                    .bind(serde_json::to_string(r).expect("record serialises"));
            }
            for row in q.fetch_all(&mut *tx).await? {
                applied.insert(row.try_get(0)?);
            }
        }
        // A pilot hospital's records carry the patient's federation
        // pseudonym: other members find the patient here by it.
        for r in &to_write {
            if let Some(p) = &r.federation_pseudonym {
                remember_pseudonym(&mut tx, &r.patient_key, p, &now).await?;
            }
        }
        for r in &request.records {
            let outcome = if highest[r.study_instance_uid.as_str()] == r.record_version
                && applied.contains(&r.study_instance_uid)
            {
                PublishOutcome::Applied
            } else {
                PublishOutcome::Unchanged
            };
            audit.push(AuditRecord {
                actor: hospital_id.to_string(),
                user_id: user_id.to_string(),
                action: "publish",
                patient_key: Some(r.patient_key.clone()),
                purpose: None,
                records_returned: 0,
                outcome: outcome_str(outcome).into(),
                detail: format!(
                    "study {} version {}",
                    r.study_instance_uid, r.record_version
                ),
            });
            results.push(PublishResult {
                study_instance_uid: r.study_instance_uid.clone(),
                record_version: r.record_version,
                outcome,
            });
        }
        for r in &request.retractions {
            // A retraction of a study the registry never saw leaves a
            // tombstone, so that an older version arriving late cannot
            // bring the study back.
            let previous = sqlx::query(
                "SELECT patient_key FROM study_record \
                 WHERE hospital_id = $1 AND study_instance_uid = $2",
            )
            .bind(hospital_id)
            .bind(&r.study_instance_uid)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| row.try_get::<String, _>(0))
            .transpose()?;
            let applied = sqlx::query(
                "INSERT INTO study_record (hospital_id, study_instance_uid, record_version, \
                 patient_key, study_date, retracted, published_at, record) \
                 VALUES ($1, $2, $3, '', NULL, 1, $4, 'null') \
                 ON CONFLICT (hospital_id, study_instance_uid) DO UPDATE SET \
                 record_version = excluded.record_version, retracted = 1, \
                 published_at = excluded.published_at \
                 WHERE study_record.record_version < excluded.record_version",
            )
            .bind(hospital_id)
            .bind(&r.study_instance_uid)
            .bind(r.record_version)
            .bind(&now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0;
            let outcome = if applied {
                PublishOutcome::Applied
            } else {
                PublishOutcome::Unchanged
            };
            audit.push(AuditRecord {
                actor: hospital_id.to_string(),
                user_id: user_id.to_string(),
                action: "retract",
                patient_key: previous.filter(|k| !k.is_empty()),
                purpose: None,
                records_returned: 0,
                outcome: outcome_str(outcome).into(),
                detail: format!(
                    "study {} version {}",
                    r.study_instance_uid, r.record_version
                ),
            });
            results.push(PublishResult {
                study_instance_uid: r.study_instance_uid.clone(),
                record_version: r.record_version,
                outcome,
            });
        }
        append_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(results)
    }

    /// One record, retracted or not (admin and tests).
    pub async fn record(
        &self,
        hospital_id: &str,
        study_instance_uid: &str,
    ) -> Result<Option<RegistryRecord>> {
        let row = sqlx::query(
            "SELECT hospital_id, published_at, retracted, record FROM study_record \
             WHERE hospital_id = $1 AND study_instance_uid = $2 AND record <> 'null'",
        )
        .bind(hospital_id)
        .bind(study_instance_uid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| record_row(&r)).transpose()
    }

    /// The priors query, with the consent rule and its audit entry.
    pub async fn priors(&self, asking_hospital: &str, q: &PriorsQuery) -> Result<PriorsAnswer> {
        let (answer, audit) = self.priors_to_audit(asking_hospital, q).await?;
        self.audit(&[audit]).await?;
        Ok(answer)
    }

    /// The priors query's answer and the audit entry that must be committed
    /// before it goes out: the caller's, in the transaction of its choice
    /// (a federated query commits it with the members' entries, once).
    pub async fn priors_to_audit(
        &self,
        asking_hospital: &str,
        q: &PriorsQuery,
    ) -> Result<(PriorsAnswer, AuditRecord)> {
        check_patient_key(&q.patient_key)?;
        check_text("user_id", &q.user_id, 128)?;
        self.check_emergency(
            asking_hospital,
            "priors_query",
            q.purpose,
            q.encounter,
            &q.user_id,
            Some(&q.patient_key),
        )
        .await?;
        if let Some(since) = &q.since {
            check_date("since", since)?;
        }
        if q.items.as_ref().is_some_and(|i| i.len() > bounds::ITEMS) {
            return Err(Error::Invalid(format!(
                "items has more than {} entries",
                bounds::ITEMS
            )));
        }
        // The contract's minimum is 1; past 1000 a page is cut to 1000.
        if q.page_size == Some(0) {
            return Err(Error::Invalid("page_size must be at least 1".into()));
        }
        let page_size = q.page_size.unwrap_or(100).clamp(1, 1000) as usize;
        let offset: usize = match &q.page_token {
            Some(t) => t
                .parse()
                .map_err(|_| Error::Invalid("page_token is not one this registry issued".into()))?,
            None => 0,
        };
        let now = now_rfc3339();
        // Newest first; records without a study date last.
        let rows = sqlx::query(
            "SELECT hospital_id, published_at, retracted, record FROM study_record \
             WHERE patient_key = $1 AND retracted = 0 AND (study_date >= $2 OR $2 IS NULL) \
             ORDER BY (study_date IS NULL), study_date DESC, hospital_id, study_instance_uid",
        )
        .bind(&q.patient_key)
        .bind(q.since.clone())
        .fetch_all(&self.pool)
        .await?;
        let mut all = rows.iter().map(record_row).collect::<Result<Vec<_>>>()?;
        if let Some(items) = &q.items {
            all.retain(|r| r.record.items.iter().any(|i| items.contains(&i.code)));
        }
        let consent_state = self
            .consent_state(&q.patient_key, asking_hospital, &now)
            .await?;
        let access = if consent_state == Some(ConsentState::Granted) {
            AccessBasis::Consent
        } else if q.purpose == Purpose::Emergency {
            AccessBasis::BreakTheGlass
        } else {
            AccessBasis::None
        };
        let mut withheld_count = 0;
        if access == AccessBasis::None {
            let before = all.len();
            all.retain(|r| r.hospital_id == asking_hospital);
            withheld_count = (before - all.len()) as i64;
        }
        let total = all.len();
        let records: Vec<RegistryRecord> = all.into_iter().skip(offset).take(page_size).collect();
        let next_page_token =
            (offset + records.len() < total).then(|| (offset + records.len()).to_string());
        let outcome = match access {
            AccessBasis::Consent => "ok",
            AccessBasis::BreakTheGlass => "break_the_glass",
            AccessBasis::None => "count_only",
        };
        let audit = AuditRecord {
            actor: asking_hospital.to_string(),
            user_id: q.user_id.clone(),
            action: "priors_query",
            patient_key: Some(q.patient_key.clone()),
            purpose: Some(q.purpose.as_str().to_string()),
            records_returned: records.len() as i64,
            outcome: outcome.to_string(),
            detail: format!("withheld {withheld_count}"),
        };
        Ok((
            PriorsAnswer {
                patient_key: q.patient_key.clone(),
                access,
                consent_state,
                records,
                withheld_count,
                next_page_token,
                federation: None,
            },
            audit,
        ))
    }

    // ------------------------------------------------------------ consent

    /// The state of the newest consent of a patient for a hospital.
    pub async fn consent_state(
        &self,
        patient_key: &str,
        hospital_id: &str,
        now: &str,
    ) -> Result<Option<ConsentState>> {
        let row = sqlx::query(
            "SELECT state, expires_at FROM consent WHERE patient_key = $1 AND hospital_id = $2 \
             ORDER BY created_at DESC, consent_id DESC LIMIT 1",
        )
        .bind(patient_key)
        .bind(hospital_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let state: String = r.try_get(0)?;
            let expires_at: String = r.try_get(1)?;
            effective_state(&state, &expires_at, now)
        })
        .transpose()
    }

    /// A consent's `expires_at`, normalised: refused when already past or
    /// beyond the region's limit (`max_consent_days`).
    fn consent_expiry(&self, expires_at: &str) -> Result<String> {
        let expires_at = normalise_time(expires_at)?;
        if expires_at <= now_rfc3339() {
            return Err(Error::Invalid("expires_at is already past".into()));
        }
        let latest = humantime::format_rfc3339_micros(
            SystemTime::now() + Duration::from_secs(u64::from(self.max_consent_days) * 86_400),
        )
        .to_string();
        if expires_at > latest {
            return Err(Error::Invalid(format!(
                "expires_at is more than {} days ahead, the region's limit for a consent",
                self.max_consent_days
            )));
        }
        Ok(expires_at)
    }

    pub async fn add_consent(&self, c: &NewConsent, audit: AuditRecord) -> Result<Consent> {
        check_patient_key(&c.patient_key)?;
        check_text("recorded_by", &c.recorded_by, 128)?;
        if !matches!(c.state, ConsentState::Pending | ConsentState::Granted) {
            return Err(Error::Invalid("a new consent is pending or granted".into()));
        }
        // What the registry cannot see (docs/registry.md, "What the
        // registry can verify"): whether the patient acted. It takes a
        // consent as granted at once only where the method's act is done
        // when the consent is recorded: a scan in the health app, or a
        // signature before the recording doctor. An SMS code is sent when
        // the consent is recorded and answered later: pending until then.
        if c.state == ConsentState::Granted && c.method == ConsentMethod::SmsCode {
            return Err(Error::Invalid(
                "an sms_code consent is recorded pending and granted when the patient's code comes back"
                    .into(),
            ));
        }
        let expires_at = self.consent_expiry(&c.expires_at)?;
        let now = now_rfc3339();
        if self.hospital(&c.hospital_id).await?.is_none() {
            return Err(Error::NotFound("hospital"));
        }
        let consent_id = random_hex(16);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO consent (consent_id, patient_key, hospital_id, method, recorded_by, \
             state, expires_at, created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$8)",
        )
        .bind(&consent_id)
        .bind(&c.patient_key)
        .bind(&c.hospital_id)
        .bind(c.method.as_str())
        .bind(&c.recorded_by)
        .bind(c.state.as_str())
        .bind(&expires_at)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        self.consent(&consent_id)
            .await?
            .ok_or(Error::NotFound("consent"))
    }

    pub async fn consent(&self, consent_id: &str) -> Result<Option<Consent>> {
        let row = sqlx::query(CONSENT_SELECT_ONE)
            .bind(consent_id)
            .fetch_optional(&self.pool)
            .await?;
        let now = now_rfc3339();
        row.map(|r| consent_row(&r, &now)).transpose()
    }

    pub async fn consents(
        &self,
        patient_key: &str,
        hospital_id: Option<&str>,
    ) -> Result<Vec<Consent>> {
        check_patient_key(patient_key)?;
        let rows = sqlx::query(CONSENT_SELECT_BY_PATIENT)
            .bind(patient_key)
            .bind(hospital_id.map(str::to_string))
            .fetch_all(&self.pool)
            .await?;
        let now = now_rfc3339();
        rows.iter().map(|r| consent_row(r, &now)).collect()
    }

    /// Confirms a pending consent or revokes one. A revoked consent stays
    /// revoked; an expired one cannot be granted again (record a new one).
    pub async fn change_consent(
        &self,
        consent_id: &str,
        change: &ConsentChange,
        audit: AuditRecord,
    ) -> Result<Consent> {
        check_text("recorded_by", &change.recorded_by, 128)?;
        let current = self
            .consent(consent_id)
            .await?
            .ok_or(Error::NotFound("consent"))?;
        let allowed = matches!(
            (current.state, change.state),
            (ConsentState::Pending, ConsentState::Granted)
                | (
                    ConsentState::Pending | ConsentState::Granted,
                    ConsentState::Revoked
                )
        );
        if !allowed {
            return Err(Error::Invalid(format!(
                "a {} consent cannot become {}",
                current.state.as_str(),
                change.state.as_str()
            )));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE consent SET state = $2, recorded_by = $3, updated_at = $4 WHERE consent_id = $1",
        )
        .bind(consent_id)
        .bind(change.state.as_str())
        .bind(&change.recorded_by)
        .bind(now_rfc3339())
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        self.consent(consent_id)
            .await?
            .ok_or(Error::NotFound("consent"))
    }

    // ------------------------------------------------------------ grants

    /// Issues a grant for `asking` to fetch a study held at another
    /// hospital, under the consent rule of the priors query: a granted,
    /// unexpired consent of the study's patient for `asking`, or an
    /// emergency (break-the-glass, flagged). Audited either way.
    pub async fn issue_grant(
        &self,
        asking: &str,
        r: &GrantRequest,
    ) -> Result<Result<Grant, String>> {
        check_uid(&r.study_instance_uid)?;
        check_text("user_id", &r.user_id, 128)?;
        self.check_emergency(
            asking,
            "grant_issue",
            r.purpose,
            r.encounter,
            &r.user_id,
            None,
        )
        .await?;
        let row = sqlx::query(
            "SELECT patient_key, record FROM study_record WHERE hospital_id = $1 \
             AND study_instance_uid = $2 AND retracted = 0",
        )
        .bind(&r.holding_hospital_id)
        .bind(&r.study_instance_uid)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("record"))?;
        let patient_key: String = row.try_get(0)?;
        let record: StudyRecord = serde_json::from_str(&row.try_get::<String, _>(1)?)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let now = now_rfc3339();
        let consent = self.consent_state(&patient_key, asking, &now).await?;
        let mut outcome = if consent == Some(ConsentState::Granted) {
            "ok"
        } else if r.purpose == Purpose::Emergency {
            "break_the_glass"
        } else {
            "denied"
        };
        // Break-the-glass grants are counted per hospital over the last
        // hour (from the audit trail, which records every one of them) and
        // capped by the operator's limit.
        if outcome == "break_the_glass" {
            let since =
                humantime::format_rfc3339_micros(SystemTime::now() - Duration::from_secs(3600))
                    .to_string();
            let issued: i64 = sqlx::query(
                "SELECT COUNT(*) FROM audit WHERE actor = $1 AND action = 'grant_issue' \
                 AND outcome = 'break_the_glass' AND at >= $2",
            )
            .bind(asking)
            .bind(&since)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
            if issued >= i64::from(self.emergency_grants_per_hour) {
                outcome = "refused_rate_limit";
            }
        }
        let mut audit = AuditRecord {
            actor: asking.to_string(),
            user_id: r.user_id.clone(),
            action: "grant_issue",
            patient_key: Some(patient_key.clone()),
            purpose: Some(r.purpose.as_str().to_string()),
            records_returned: 0,
            outcome: outcome.to_string(),
            detail: format!(
                "study {} at {} for {}; reference {}",
                r.study_instance_uid,
                r.holding_hospital_id,
                asking,
                r.reference.as_deref().unwrap_or("-")
            ),
        };
        if outcome == "denied" {
            self.audit(&[audit]).await?;
            return Ok(Err(
                "no granted consent of this patient for the asking hospital".into(),
            ));
        }
        if outcome == "refused_rate_limit" {
            self.audit(&[audit]).await?;
            return Ok(Err(format!(
                "this hospital has had {} break-the-glass grants in the last hour, the region's limit",
                self.emergency_grants_per_hour
            )));
        }
        let grant_id = random_hex(16);
        let token = format!("hg.{}", random_hex(32));
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        let expires_at =
            humantime::format_rfc3339_micros(SystemTime::now() + Duration::from_secs(15 * 60))
                .to_string();
        audit.detail = format!("grant {grant_id}: {}", audit.detail);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO grant_token (token_sha256, grant_id, requesting_hospital_id, \
             holding_hospital_id, study_instance_uid, patient_key, purpose, user_id, reference, \
             created_at, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
        )
        .bind(&sha)
        .bind(&grant_id)
        .bind(asking)
        .bind(&r.holding_hospital_id)
        .bind(&r.study_instance_uid)
        .bind(&patient_key)
        .bind(r.purpose.as_str())
        .bind(&r.user_id)
        .bind(r.reference.clone())
        .bind(&now)
        .bind(&expires_at)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(Ok(Grant {
            grant_id,
            token,
            holding_hospital_id: r.holding_hospital_id.clone(),
            study_instance_uid: r.study_instance_uid.clone(),
            content_root: record.content_root,
            purpose: r.purpose,
            expires_at,
            dicomweb_base_url: None,
        }))
    }

    /// Issues a grant to another member's hospital (images across
    /// borders), on the request that member's registry vouches for. The
    /// study must be one of this province's pilot hospitals', live, and of
    /// the patient the pseudonym names; consent as `basis` says (the
    /// caller's policy: `holding`, `asking` or `both`), or an emergency.
    /// Audited with the member's identity either way.
    pub async fn issue_federated_grant(
        &self,
        member_id: &str,
        basis: &'static str,
        in_pilot: bool,
        r: &FederatedGrantRequest,
    ) -> Result<Result<Grant, String>> {
        check_uid(&r.study_instance_uid)?;
        check_patient_key(&r.pseudonym)?;
        check_text("user_id", &r.user_id, 128)?;
        check_text("asking_hospital_id", &r.asking_hospital_id, 64)?;
        let row = sqlx::query(
            "SELECT patient_key, record FROM study_record WHERE hospital_id = $1 \
             AND study_instance_uid = $2 AND retracted = 0",
        )
        .bind(&r.holding_hospital_id)
        .bind(&r.study_instance_uid)
        .fetch_optional(&self.pool)
        .await?;
        let keys = self.keys_of_pseudonym(&r.pseudonym).await?;
        // A study of another patient, or outside the pilot, is "not
        // found" as one that does not exist: a member learns nothing of
        // this province's other records by asking.
        let Some(row) = row.filter(|_| in_pilot) else {
            return Err(Error::NotFound("record"));
        };
        let patient_key: String = row.try_get(0)?;
        if !keys.contains(&patient_key) {
            return Err(Error::NotFound("record"));
        }
        let record: StudyRecord = serde_json::from_str(&row.try_get::<String, _>(1)?)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let holding_consent = self
            .federation_consent_state(&patient_key, member_id)
            .await?
            == Some(ConsentState::Granted);
        let consent = match basis {
            "holding" => holding_consent,
            "asking" => r.asking_consent,
            _ => holding_consent && r.asking_consent,
        };
        let outcome = if consent {
            "ok"
        } else if r.purpose == Purpose::Emergency {
            "break_the_glass"
        } else {
            "denied"
        };
        let mut audit = AuditRecord {
            actor: format!("registry:{member_id}"),
            user_id: format!("{}/{}", r.asking_hospital_id, r.user_id)
                .chars()
                .take(200)
                .collect(),
            action: "federation_grant",
            patient_key: Some(patient_key.clone()),
            purpose: Some(r.purpose.as_str().to_string()),
            records_returned: 0,
            outcome: outcome.to_string(),
            detail: format!(
                "study {} at {} for hospital {} of member {member_id}, request {}, consent policy {basis}",
                r.study_instance_uid, r.holding_hospital_id, r.asking_hospital_id, r.request_id
            ),
        };
        if outcome == "denied" {
            self.audit(&[audit]).await?;
            return Ok(Err(format!(
                "no consent of this patient under the holding province's policy ({basis})"
            )));
        }
        let base_url = self
            .hospital(&r.holding_hospital_id)
            .await?
            .and_then(|h| h.dicomweb_base_url);
        let grant_id = random_hex(16);
        let token = format!("hg.{}", random_hex(32));
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        let now = now_rfc3339();
        let expires_at =
            humantime::format_rfc3339_micros(SystemTime::now() + Duration::from_secs(15 * 60))
                .to_string();
        audit.detail = format!("grant {grant_id}: {}", audit.detail);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO grant_token (token_sha256, grant_id, requesting_hospital_id, \
             holding_hospital_id, study_instance_uid, patient_key, purpose, user_id, reference, \
             created_at, expires_at, federation_member, consent_basis) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
        )
        .bind(&sha)
        .bind(&grant_id)
        .bind(&r.asking_hospital_id)
        .bind(&r.holding_hospital_id)
        .bind(&r.study_instance_uid)
        .bind(&patient_key)
        .bind(r.purpose.as_str())
        .bind(&r.user_id)
        .bind(Some(r.request_id.clone()))
        .bind(&now)
        .bind(&expires_at)
        .bind(member_id)
        .bind(basis)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(Ok(Grant {
            grant_id,
            token,
            holding_hospital_id: r.holding_hospital_id.clone(),
            study_instance_uid: r.study_instance_uid.clone(),
            content_root: record.content_root,
            purpose: r.purpose,
            expires_at,
            dicomweb_base_url: base_url,
        }))
    }

    /// Everything a federated priors query writes at the asking registry,
    /// in one transaction (one commit, one WAL flush, before the answer goes
    /// out): the pseudonym the node sent, if new or changed; the other
    /// provinces' records shown, remembered (where a grant for one goes);
    /// and the audit entries, this registry's own priors query and one
    /// per member asked.
    pub async fn commit_federated_query(
        &self,
        pseudonym: Option<(&str, &str)>,
        shown: &[FederationPriorsShown<'_>],
        audit: &[AuditRecord],
    ) -> Result<()> {
        let now = now_rfc3339();
        let mut tx = self.pool.begin().await?;
        if let Some((patient_key, pseudonym)) = pseudonym {
            check_patient_key(patient_key)?;
            check_patient_key(pseudonym)?;
            remember_pseudonym(&mut tx, patient_key, pseudonym, &now).await?;
        }
        remember_federation_priors(&mut tx, shown, &now).await?;
        append_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// What `federation_prior` holds for a patient key: (hospital, Study
    /// Instance UID, member, pseudonym).
    pub async fn federation_priors_of(
        &self,
        patient_key: &str,
    ) -> Result<std::collections::HashSet<(String, String, String, String)>> {
        let rows = sqlx::query(
            "SELECT hospital_id, study_instance_uid, member_id, pseudonym FROM federation_prior \
             WHERE patient_key = $1",
        )
        .bind(patient_key)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect()
    }

    /// Which member holds a study of another province shown here, with the
    /// patient's key and pseudonym.
    pub async fn federation_prior(
        &self,
        hospital_id: &str,
        study_instance_uid: &str,
    ) -> Result<Option<(String, String, String)>> {
        let row = sqlx::query(
            "SELECT member_id, patient_key, pseudonym FROM federation_prior \
             WHERE hospital_id = $1 AND study_instance_uid = $2",
        )
        .bind(hospital_id)
        .bind(study_instance_uid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .transpose()
    }

    /// Confirms a grant to the hospital that holds its study (audited: the
    /// retrieval is linked to the grant and so to its reference). A grant
    /// issued under consent is confirmed only while that consent holds: a
    /// revocation (or expiry) after the grant was issued ends it. A
    /// break-the-glass grant did not rest on consent and stays valid until
    /// it expires.
    pub async fn verify_grant(
        &self,
        holding: &str,
        token: &str,
    ) -> Result<Result<GrantConfirmed, InvalidGrant>> {
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()));
        let row = sqlx::query(
            "SELECT grant_id, requesting_hospital_id, holding_hospital_id, study_instance_uid, \
             patient_key, purpose, user_id, expires_at, federation_member, consent_basis \
             FROM grant_token WHERE token_sha256 = $1",
        )
        .bind(&sha)
        .fetch_optional(&self.pool)
        .await?;
        let invalid = |reason, patient_key, consent_withdrawn| {
            Ok(Err(InvalidGrant {
                reason,
                patient_key,
                consent_withdrawn,
            }))
        };
        let Some(row) = row else {
            return invalid("a grant the registry never issued", None, false);
        };
        let patient_key: String = row.try_get(4)?;
        let holding_id: String = row.try_get(2)?;
        let expires_at: String = row.try_get(7)?;
        let now = now_rfc3339();
        if holding_id != holding {
            return invalid("a grant for another holding hospital", None, false);
        }
        if expires_at <= now {
            return invalid("an expired grant", Some(patient_key), false);
        }
        let purpose: String = row.try_get(5)?;
        let requesting: String = row.try_get(1)?;
        let member: Option<String> = row.try_get(8)?;
        let basis: Option<String> = row.try_get(9)?;
        // A grant to another member's hospital rests on the consent its
        // policy named: the holding province's is checked again, as a
        // regional grant's is; the asking registry's word holds until the
        // grant expires (this registry cannot see that consent).
        let consent_holds = match (&member, basis.as_deref()) {
            (Some(member), Some("holding" | "both")) => {
                self.federation_consent_state(&patient_key, member).await?
                    == Some(ConsentState::Granted)
            }
            (Some(_), _) => true,
            (None, _) => {
                self.consent_state(&patient_key, &requesting, &now).await?
                    == Some(ConsentState::Granted)
            }
        };
        if purpose != "emergency" && !consent_holds {
            return invalid(
                "the patient's consent for the requesting hospital was revoked or has expired since the grant was issued",
                Some(patient_key),
                true,
            );
        }
        let confirmed = GrantConfirmed {
            grant_id: row.try_get(0)?,
            requesting_hospital_id: requesting,
            study_instance_uid: row.try_get(3)?,
            purpose: if purpose == "emergency" {
                Purpose::Emergency
            } else {
                Purpose::Treatment
            },
            user_id: row.try_get(6)?,
            expires_at,
        };
        self.audit(&[AuditRecord {
            actor: holding.to_string(),
            user_id: "node".into(),
            action: "grant_verify",
            patient_key: Some(patient_key),
            purpose: Some(purpose.clone()),
            records_returned: 0,
            outcome: if purpose == "emergency" {
                "break_the_glass".into()
            } else {
                "ok".into()
            },
            detail: format!(
                "grant {} for {}: study {}",
                confirmed.grant_id, confirmed.requesting_hospital_id, confirmed.study_instance_uid
            ),
        }])
        .await?;
        Ok(Ok(confirmed))
    }

    // ------------------------------------------------------------ federation

    /// Remembers a patient key's federation pseudonym (a node sent both).
    pub async fn remember_pseudonym(&self, patient_key: &str, pseudonym: &str) -> Result<()> {
        check_patient_key(patient_key)?;
        check_patient_key(pseudonym)?;
        let mut tx = self.pool.begin().await?;
        remember_pseudonym(&mut tx, patient_key, pseudonym, &now_rfc3339()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The federation pseudonym a node told this registry for a key.
    pub async fn pseudonym_of(&self, patient_key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query("SELECT pseudonym FROM federation_identity WHERE patient_key = $1")
                .bind(patient_key)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
        )
    }

    /// Forgets the nonces of requests older than twice the allowed skew: a
    /// request that old is refused for its timestamp, so its nonce need not
    /// be kept (the registry calls this every minute).
    pub async fn forget_old_nonces(&self, now: u64, max_skew: u64) -> Result<()> {
        let cutoff = now.saturating_sub(2 * max_skew) as i64;
        sqlx::query("DELETE FROM federation_nonce WHERE seen_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a signed request's nonce; `false` when it was seen already
    /// (a replay). Nonces older than the allowed skew are forgotten: a
    /// request that old is refused for its timestamp.
    pub async fn federation_nonce(&self, nonce: &str, now: u64, max_skew: u64) -> Result<bool> {
        let cutoff = now.saturating_sub(2 * max_skew) as i64;
        sqlx::query("DELETE FROM federation_nonce WHERE seen_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO federation_nonce (nonce, seen_at) VALUES ($1, $2) \
             ON CONFLICT (nonce) DO NOTHING",
        )
        .bind(nonce)
        .bind(now as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Appends audit entries and records a signed request's nonce in one
    /// transaction (one commit per member request, not two); `false`, and
    /// nothing written, when the nonce was seen (a replay). Nonces past the
    /// skew are forgotten by [`Db::forget_old_nonces`], once a minute, not
    /// here: a statement less in each member request.
    pub async fn audit_with_nonce(
        &self,
        entries: &[AuditRecord],
        nonce: &str,
        now: u64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        if is_postgres(&tx) && !entries.is_empty() {
            // The nonce and the head's lock in one statement: the head
            // moves only if the nonce was new.
            let head = sqlx::query(
                "WITH seen AS (INSERT INTO federation_nonce (nonce, seen_at) VALUES ($1, $2) \
                 ON CONFLICT (nonce) DO NOTHING RETURNING 1) \
                 UPDATE audit_head SET seq = seq + $3 WHERE id = 1 \
                 AND EXISTS (SELECT 1 FROM seen) RETURNING seq, hash",
            )
            .bind(nonce)
            .bind(now as i64)
            .bind(entries.len() as i64)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(head) = head else {
                tx.rollback().await?;
                return Ok(false);
            };
            write_chained(&mut tx, &head, entries).await?;
            tx.commit().await?;
            return Ok(true);
        }
        let inserted = sqlx::query(
            "INSERT INTO federation_nonce (nonce, seen_at) VALUES ($1, $2) \
             ON CONFLICT (nonce) DO NOTHING",
        )
        .bind(nonce)
        .bind(now as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        append_audit(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a patient's consent that this province's records of them be
    /// shown to a member's hospitals. `member_ok` says whether the member
    /// is one of the federation's.
    pub async fn add_federation_consent(
        &self,
        c: &NewFederationConsent,
        member_ok: bool,
        audit: AuditRecord,
    ) -> Result<FederationConsent> {
        check_patient_key(&c.patient_key)?;
        check_text("recorded_by", &c.recorded_by, 128)?;
        if !member_ok {
            return Err(Error::NotFound("federation member"));
        }
        if !matches!(c.state, ConsentState::Granted | ConsentState::Revoked) {
            return Err(Error::Invalid(
                "a federation consent is recorded granted or revoked (the newest counts)".into(),
            ));
        }
        if c.state == ConsentState::Granted && c.method == ConsentMethod::SmsCode {
            return Err(Error::Invalid(
                "an sms_code consent is granted when the patient's code comes back: record it then"
                    .into(),
            ));
        }
        let expires_at = self.consent_expiry(&c.expires_at)?;
        let now = now_rfc3339();
        let consent_id = random_hex(16);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO federation_consent (consent_id, patient_key, member_id, method, \
             recorded_by, state, expires_at, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        )
        .bind(&consent_id)
        .bind(&c.patient_key)
        .bind(&c.member_id)
        .bind(c.method.as_str())
        .bind(&c.recorded_by)
        .bind(c.state.as_str())
        .bind(&expires_at)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, &[audit]).await?;
        tx.commit().await?;
        Ok(FederationConsent {
            consent_id,
            patient_key: c.patient_key.clone(),
            member_id: c.member_id.clone(),
            method: c.method,
            state: c.state,
            expires_at,
            created_at: now,
        })
    }

    /// The newest federation consent of a patient for a member.
    pub async fn federation_consent_state(
        &self,
        patient_key: &str,
        member_id: &str,
    ) -> Result<Option<ConsentState>> {
        let row = sqlx::query(
            "SELECT state, expires_at FROM federation_consent WHERE patient_key = $1 \
             AND member_id = $2 ORDER BY created_at DESC, consent_id DESC LIMIT 1",
        )
        .bind(patient_key)
        .bind(member_id)
        .fetch_optional(&self.pool)
        .await?;
        let now = now_rfc3339();
        row.map(|r| {
            let state: String = r.try_get(0)?;
            let expires_at: String = r.try_get(1)?;
            effective_state(&state, &expires_at, &now)
        })
        .transpose()
    }

    /// The patient keys a pseudonym stands for here (one, unless the
    /// province re-keyed and old records remain).
    pub async fn keys_of_pseudonym(&self, pseudonym: &str) -> Result<Vec<String>> {
        check_patient_key(pseudonym)?;
        let rows = sqlx::query("SELECT patient_key FROM federation_identity WHERE pseudonym = $1")
            .bind(pseudonym)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(Error::from))
            .collect()
    }

    /// What a member's priors query reads here, by the pseudonym alone, in
    /// two statements run at once: the live records of every patient key
    /// the pseudonym stands for (one, unless the province re-keyed), each
    /// with its holding hospital's directory entry, newest first; and the
    /// patient key with its newest federation consent for the member.
    pub async fn member_view(
        &self,
        pseudonym: &str,
        member_id: &str,
        since: Option<&str>,
    ) -> Result<MemberView> {
        check_patient_key(pseudonym)?;
        let records = sqlx::query(
            "SELECT h.hospital_id, h.name, h.level_rank, h.groups, \
             h.accepts_lower_level_results, h.qc_status, h.dicomweb_base_url, \
             r.hospital_id, r.published_at, r.retracted, r.record \
             FROM federation_identity f \
             JOIN study_record r ON r.patient_key = f.patient_key \
             JOIN hospital h ON h.hospital_id = r.hospital_id \
             WHERE f.pseudonym = $1 AND r.retracted = 0 \
             AND (r.study_date >= $2 OR $2 IS NULL) \
             ORDER BY (r.study_date IS NULL), r.study_date DESC, r.hospital_id, \
             r.study_instance_uid",
        )
        .bind(pseudonym)
        .bind(since.map(str::to_string))
        .fetch_all(&self.pool);
        let consent = sqlx::query(
            "SELECT f.patient_key, \
             (SELECT c.state || ' ' || c.expires_at FROM federation_consent c \
              WHERE c.patient_key = f.patient_key AND c.member_id = $2 \
              ORDER BY c.created_at DESC, c.consent_id DESC LIMIT 1) \
             FROM federation_identity f WHERE f.pseudonym = $1 ORDER BY f.patient_key",
        )
        .bind(pseudonym)
        .bind(member_id)
        .fetch_optional(&self.pool);
        let (records, consent) = tokio::join!(records, consent);
        let records = records?
            .iter()
            .map(|r| {
                Ok(HeldRecord {
                    hospital: hospital_row_at(r, 0)?,
                    record: record_row_at(r, 7)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (patient_key, consent) = match consent? {
            None => (None, None),
            Some(row) => {
                let key: String = row.try_get(0)?;
                let newest: Option<String> = row.try_get(1)?;
                let consent = match newest.as_deref().and_then(|n| n.split_once(' ')) {
                    Some((state, expires_at)) => {
                        Some(effective_state(state, expires_at, &now_rfc3339())?)
                    }
                    None => None,
                };
                (Some(key), consent)
            }
        };
        Ok(MemberView {
            patient_key,
            records,
            consent,
        })
    }

    // ------------------------------------------------------------ recognition

    /// Validates and activates a recognition list; an invalid list is
    /// refused with every error and the active list stays.
    pub async fn activate_list(&self, text: &str, by: &str) -> Result<ListActivated> {
        let list = crate::recognition::list::RecognitionList::parse(text).map_err(|errors| {
            Error::Invalid(
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
        let now = now_rfc3339();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO recognition_list (content_hash, version, text, activated_at, activated_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (content_hash) DO UPDATE SET \
             activated_at = excluded.activated_at, activated_by = excluded.activated_by",
        )
        .bind(&list.content_hash)
        .bind(&list.meta.version)
        .bind(text)
        .bind(&now)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        append_audit(
            &mut tx,
            &[AuditRecord {
                actor: "admin".into(),
                user_id: by.to_string(),
                action: "recognition_list_activate",
                patient_key: None,
                purpose: None,
                records_returned: 0,
                outcome: "ok".into(),
                detail: format!(
                    "list {} ({} items) {}",
                    list.meta.version,
                    list.items.len(),
                    list.content_hash
                ),
            }],
        )
        .await?;
        tx.commit().await?;
        Ok(ListActivated {
            version: list.meta.version.clone(),
            content_hash: list.content_hash.clone(),
            items: list.items.len() as i64,
            activated_at: now,
        })
    }

    /// The active list: (content hash, text).
    pub async fn active_list(&self) -> Result<Option<(String, String)>> {
        let row = sqlx::query(
            "SELECT content_hash, text FROM recognition_list \
             ORDER BY activated_at DESC, content_hash LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
    }

    /// Records events of one hospital; replays (same event ID) are ignored.
    pub async fn add_events(&self, hospital_id: &str, events: &[RecognitionEvent]) -> Result<i64> {
        let mut accepted = 0;
        let mut tx = self.pool.begin().await?;
        for e in events {
            check_text("event_id", &e.event_id, 64)?;
            check_text("item_code", &e.item_code, 64)?;
            let at = normalise_time(&e.at)?;
            let t =
                humantime::parse_rfc3339_weak(&e.at).map_err(|e| Error::Invalid(e.to_string()))?;
            let month = (chrono::DateTime::<chrono::Utc>::from(t) + chrono::Duration::hours(8))
                .format("%Y-%m")
                .to_string();
            accepted += sqlx::query(
                "INSERT INTO recognition_event (event_id, hospital_id, check_id, kind, item_code, \
                 reason_code, non_recognition, list_version, month, at, user_id) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(&e.event_id)
            .bind(hospital_id)
            .bind(&e.check_id)
            .bind(e.kind.as_str())
            .bind(&e.item_code)
            .bind(e.reason_code.clone())
            .bind(i64::from(e.non_recognition))
            .bind(&e.list_version)
            .bind(month)
            .bind(at)
            .bind(&e.user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected() as i64;
        }
        tx.commit().await?;
        Ok(accepted)
    }

    /// Warnings, accepted and repeated (by reason) per month, hospital and
    /// item; each filter optional.
    pub async fn statistics(
        &self,
        month: Option<&str>,
        hospital_id: Option<&str>,
        item_code: Option<&str>,
    ) -> Result<Vec<StatisticsRow>> {
        let rows = sqlx::query(
            "SELECT month, hospital_id, item_code, kind, reason_code, non_recognition, COUNT(*) \
             FROM recognition_event WHERE (month = $1 OR $1 IS NULL) \
             AND (hospital_id = $2 OR $2 IS NULL) AND (item_code = $3 OR $3 IS NULL) \
             GROUP BY month, hospital_id, item_code, kind, reason_code, non_recognition \
             ORDER BY month, hospital_id, item_code",
        )
        .bind(month.map(str::to_string))
        .bind(hospital_id.map(str::to_string))
        .bind(item_code.map(str::to_string))
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<StatisticsRow> = Vec::new();
        for r in rows {
            let (m, h, i): (String, String, String) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let kind: String = r.try_get(3)?;
            let reason: Option<String> = r.try_get(4)?;
            let non_recognition = r.try_get::<i64, _>(5)? != 0;
            let n: i64 = r.try_get(6)?;
            if out
                .last()
                .is_none_or(|l| (&l.month, &l.hospital_id, &l.item_code) != (&m, &h, &i))
            {
                out.push(StatisticsRow {
                    month: m,
                    hospital_id: h,
                    item_code: i,
                    warnings: 0,
                    accepted: 0,
                    repeated: 0,
                    non_recognition: 0,
                    repeated_by_reason: Default::default(),
                    confirmed: Some(0),
                    corrected: Some(0),
                });
            }
            let row = out.last_mut().expect("pushed above");
            match kind.as_str() {
                "warning" => row.warnings += n,
                "accepted" => row.accepted += n,
                "confirmed" => *row.confirmed.get_or_insert(0) += n,
                "corrected" => *row.corrected.get_or_insert(0) += n,
                _ => {
                    row.repeated += n;
                    if non_recognition {
                        row.non_recognition += n;
                    }
                    *row.repeated_by_reason
                        .entry(reason.unwrap_or_default())
                        .or_default() += n;
                }
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ audit

    /// Appends entries in a transaction of their own (refusals, admin
    /// reads).
    pub async fn audit(&self, entries: &[AuditRecord]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        append_audit(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn audit_page(&self, after_seq: i64, limit: i64) -> Result<AuditPage> {
        let limit = limit.clamp(1, 10_000);
        let rows = sqlx::query(
            "SELECT seq, at, actor, user_id, action, patient_key, purpose, records_returned, \
             outcome, detail, prev_hash, hash FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = rows.iter().map(audit_row).collect::<Result<Vec<_>>>()?;
        let more = entries.len() as i64 > limit;
        entries.truncate(limit as usize);
        let next_after_seq = if more {
            entries.last().map(|e| e.seq)
        } else {
            None
        };
        Ok(AuditPage {
            entries,
            next_after_seq,
        })
    }

    /// Walks the whole chain. Returns the number of entries checked, or the
    /// first broken one and why.
    pub async fn verify_audit(&self) -> Result<Result<i64, (i64, String)>> {
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let head_seq: i64 = head.try_get(0)?;
        let head_hash: String = head.try_get(1)?;
        let mut prev_hash = ZERO_HASH.to_string();
        let mut expected_seq = 1;
        let mut after = 0;
        loop {
            let page = self.audit_page(after, 5000).await?;
            for e in &page.entries {
                if e.seq != expected_seq {
                    return Ok(Err((
                        expected_seq,
                        format!("entry {expected_seq} is missing (next is {})", e.seq),
                    )));
                }
                if e.prev_hash != prev_hash {
                    return Ok(Err((
                        e.seq,
                        "prev_hash does not match the entry before it".into(),
                    )));
                }
                if entry_hash(e) != e.hash {
                    return Ok(Err((
                        e.seq,
                        "contents do not match the entry's hash (altered)".into(),
                    )));
                }
                prev_hash = e.hash.clone();
                expected_seq += 1;
            }
            match page.next_after_seq {
                Some(n) => after = n,
                None => break,
            }
        }
        let last = expected_seq - 1;
        if last != head_seq || prev_hash != head_hash {
            return Ok(Err((
                head_seq,
                format!(
                    "the chain ends at entry {last} but its head records entry {head_seq}: entries were removed from the end"
                ),
            )));
        }
        Ok(Ok(last))
    }
}

fn outcome_str(o: PublishOutcome) -> &'static str {
    match o {
        PublishOutcome::Applied => "applied",
        PublishOutcome::Unchanged => "unchanged",
    }
}

/// What a member's priors query reads (see [`Db::member_view`]).
#[derive(Debug)]
pub struct MemberView {
    /// The patient key the pseudonym stands for here, if any.
    pub patient_key: Option<String>,
    pub records: Vec<HeldRecord>,
    /// The newest federation consent of that key for the member.
    pub consent: Option<ConsentState>,
}

/// A live record with its holding hospital's directory entry.
#[derive(Debug)]
pub struct HeldRecord {
    pub hospital: Hospital,
    pub record: RegistryRecord,
}

/// Upserts a key's pseudonym inside a transaction.
/// One member's records shown to a hospital of this registry.
pub struct FederationPriorsShown<'a> {
    pub member_id: &'a str,
    pub patient_key: &'a str,
    pub pseudonym: &'a str,
    /// What `federation_prior` held for the patient before the query
    /// ([`Db::federation_priors_of`]).
    pub known: &'a std::collections::HashSet<(String, String, String, String)>,
    pub records: &'a [RegistryRecord],
}

/// Remembers the other provinces' records shown to this registry's
/// hospitals (where a grant for one goes). `seen_at` is when a row was
/// first written or last changed: a row that holds already is left as it
/// is, so a repeated query writes nothing here. One statement for all the
/// members' new rows, not a round trip each.
async fn remember_federation_priors(
    tx: &mut AnyConnection,
    shown: &[FederationPriorsShown<'_>],
    now: &str,
) -> Result<()> {
    // Rows that hold already are the rule (the caller read them in one
    // query), and even an upsert that changes nothing locks its row.
    let mut rows: Vec<(&FederationPriorsShown<'_>, &RegistryRecord)> = Vec::new();
    for s in shown {
        for r in s.records {
            let key = (
                r.hospital_id.clone(),
                r.record.study_instance_uid.clone(),
                s.member_id.to_string(),
                s.pseudonym.to_string(),
            );
            if s.known.contains(&key) {
                continue;
            }
            // One row per study: a second one in the same statement would
            // be an error of ON CONFLICT DO UPDATE (the last member wins,
            // as it did with a statement per row).
            rows.retain(|(_, x)| {
                (&x.hospital_id, &x.record.study_instance_uid)
                    != (&r.hospital_id, &r.record.study_instance_uid)
            });
            rows.push((s, r));
        }
    }
    for chunk in rows.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO federation_prior (hospital_id, study_instance_uid, member_id, \
             patient_key, pseudonym, seen_at) VALUES ",
        );
        sql.push_str(&row_placeholders(chunk.len(), 6));
        sql.push_str(
            " ON CONFLICT (hospital_id, study_instance_uid) DO UPDATE SET \
             member_id = excluded.member_id, patient_key = excluded.patient_key, \
             pseudonym = excluded.pseudonym, seen_at = excluded.seen_at",
        );
        // Placeholders only: every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (s, r) in chunk {
            q = q
                .bind(&r.hospital_id)
                .bind(&r.record.study_instance_uid)
                .bind(s.member_id)
                .bind(s.patient_key)
                .bind(s.pseudonym)
                .bind(now);
        }
        q.execute(&mut *tx).await?;
    }
    Ok(())
}

async fn remember_pseudonym(
    tx: &mut AnyConnection,
    patient_key: &str,
    pseudonym: &str,
    now: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO federation_identity (patient_key, pseudonym, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (patient_key) DO UPDATE SET pseudonym = excluded.pseudonym, \
         updated_at = excluded.updated_at WHERE federation_identity.pseudonym <> excluded.pseudonym",
    )
    .bind(patient_key)
    .bind(pseudonym)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: BLAKE3 over a JSON array of its fields (JSON, so
/// that no field's content can shift a boundary) and the previous hash.
pub fn entry_hash(e: &AuditEntry) -> String {
    let canonical = serde_json::to_string(&(
        e.seq,
        &e.at,
        &e.actor,
        &e.user_id,
        &e.action,
        &e.patient_key,
        &e.purpose,
        e.records_returned,
        &e.outcome,
        &e.detail,
        &e.prev_hash,
    ))
    .expect("plain values serialise");
    blake3::hash(canonical.as_bytes()).to_hex().to_string()
}

/// `($1,..,$cols),($cols+1,..)`: the VALUES of a multi-row INSERT of
/// `rows` rows, every value bound.
fn row_placeholders(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", row.join(","))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Appends to the chain inside the caller's transaction. The UPDATE of the
/// head row comes first: it takes the row lock (PostgreSQL) or the write
/// lock (SQLite) that keeps two appenders from forking the chain.
pub async fn append_audit(tx: &mut AnyConnection, entries: &[AuditRecord]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let head = sqlx::query("UPDATE audit_head SET seq = seq + $1 WHERE id = 1 RETURNING seq, hash")
        .bind(entries.len() as i64)
        .fetch_one(&mut *tx)
        .await?;
    write_chained(tx, &head, entries).await
}

/// The entries chained after `head` (the head row as the UPDATE that
/// locked it returned it: the new last seq and the old hash), written, and
/// the head's hash moved to the last of them.
async fn write_chained(
    tx: &mut AnyConnection,
    head: &sqlx::any::AnyRow,
    entries: &[AuditRecord],
) -> Result<()> {
    let last_seq: i64 = head.try_get(0)?;
    let mut prev_hash: String = head.try_get(1)?;
    let at = now_rfc3339();
    let first_seq = last_seq - entries.len() as i64 + 1;
    let mut chained = Vec::with_capacity(entries.len());
    for (seq, r) in (first_seq..).zip(entries) {
        let mut e = AuditEntry {
            seq,
            at: at.clone(),
            actor: r.actor.clone(),
            user_id: r.user_id.clone(),
            action: r.action.to_string(),
            patient_key: r.patient_key.clone(),
            purpose: r.purpose.clone(),
            records_returned: r.records_returned,
            outcome: r.outcome.clone(),
            detail: r.detail.clone(),
            prev_hash: prev_hash.clone(),
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        prev_hash = e.hash.clone();
        chained.push(e);
    }
    // On PostgreSQL the head's new hash rides with the last INSERT (a
    // data-modifying WITH): a round trip less in every audited request.
    let postgres = is_postgres(tx);
    let chunks: Vec<&[AuditEntry]> = chained.chunks(400).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        let last = n + 1 == chunks.len();
        let mut sql = if postgres && last {
            format!(
                "WITH head AS (UPDATE audit_head SET hash = ${} WHERE id = 1) ",
                chunk.len() * 12 + 1
            )
        } else {
            String::new()
        };
        sql.push_str(
            "INSERT INTO audit (seq, at, actor, user_id, action, patient_key, purpose, \
             records_returned, outcome, detail, prev_hash, hash) VALUES ",
        );
        sql.push_str(&row_placeholders(chunk.len(), 12));
        // Placeholders only: every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for e in *chunk {
            q = q
                .bind(e.seq)
                .bind(&e.at)
                .bind(&e.actor)
                .bind(&e.user_id)
                .bind(&e.action)
                .bind(e.patient_key.clone())
                .bind(e.purpose.clone())
                .bind(e.records_returned)
                .bind(&e.outcome)
                .bind(&e.detail)
                .bind(&e.prev_hash)
                .bind(&e.hash);
        }
        if postgres && last {
            q = q.bind(&prev_hash);
        }
        q.execute(&mut *tx).await?;
    }
    for e in entries {
        crate::metrics::registry_audit_appended(e.action);
    }
    if !postgres {
        sqlx::query("UPDATE audit_head SET hash = $1 WHERE id = 1")
            .bind(&prev_hash)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

fn is_postgres(conn: &AnyConnection) -> bool {
    conn.backend_name() == "PostgreSQL"
}

/// A unified social credit code is 18 characters of digits and upper-case
/// letters; other registrations (test regions, foreign-funded hospitals)
/// are allowed as long as they are plain identifiers.
fn check_hospital_id(id: &str) -> Result<()> {
    if !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(())
    } else {
        Err(Error::Invalid(
            "hospital_id must be 1 to 32 upper-case letters, digits or '-' (统一社会信用代码)"
                .into(),
        ))
    }
}

fn effective_state(state: &str, expires_at: &str, now: &str) -> Result<ConsentState> {
    let state = ConsentState::parse(state)
        .ok_or_else(|| Error::Corrupt(format!("consent state {state:?}")))?;
    Ok(match state {
        ConsentState::Granted | ConsentState::Pending if expires_at <= now => ConsentState::Expired,
        s => s,
    })
}

const HOSPITAL_SELECT_ALL: &str = "SELECT hospital_id, name, level_rank, groups, \
     accepts_lower_level_results, qc_status, dicomweb_base_url FROM hospital ORDER BY hospital_id";
const HOSPITAL_SELECT_ONE: &str = "SELECT hospital_id, name, level_rank, groups, \
     accepts_lower_level_results, qc_status, dicomweb_base_url FROM hospital WHERE hospital_id = $1";

fn hospital_row(r: &sqlx::any::AnyRow) -> Result<Hospital> {
    hospital_row_at(r, 0)
}

/// A hospital's directory entry from the row's columns `at..at + 7`.
fn hospital_row_at(r: &sqlx::any::AnyRow, at: usize) -> Result<Hospital> {
    let rank: i64 = r.try_get(at + 2)?;
    let groups: String = r.try_get(at + 3)?;
    let qc: String = r.try_get(at + 5)?;
    Ok(Hospital {
        hospital_id: r.try_get(at)?,
        name: r.try_get(at + 1)?,
        level: Level::from_rank(rank).ok_or_else(|| Error::Corrupt(format!("level {rank}")))?,
        groups: serde_json::from_str(&groups).map_err(|e| Error::Corrupt(e.to_string()))?,
        accepts_lower_level_results: r.try_get::<i64, _>(at + 4)? != 0,
        qc_status: QcStatus::parse(&qc).ok_or_else(|| Error::Corrupt(format!("qc {qc}")))?,
        dicomweb_base_url: r.try_get(at + 6)?,
        province: None,
    })
}

fn record_row(r: &sqlx::any::AnyRow) -> Result<RegistryRecord> {
    record_row_at(r, 0)
}

/// A record from the row's columns `at..at + 4`.
fn record_row_at(r: &sqlx::any::AnyRow, at: usize) -> Result<RegistryRecord> {
    let record: String = r.try_get(at + 3)?;
    Ok(RegistryRecord {
        hospital_id: r.try_get(at)?,
        published_at: r.try_get(at + 1)?,
        retracted: r.try_get::<i64, _>(at + 2)? != 0,
        record: serde_json::from_str(&record).map_err(|e| Error::Corrupt(e.to_string()))?,
        province: None,
    })
}

const CONSENT_SELECT_ONE: &str = "SELECT consent_id, patient_key, hospital_id, method, \
     recorded_by, state, expires_at, created_at, updated_at FROM consent WHERE consent_id = $1";
const CONSENT_SELECT_BY_PATIENT: &str = "SELECT consent_id, patient_key, hospital_id, method, \
     recorded_by, state, expires_at, created_at, updated_at FROM consent \
     WHERE patient_key = $1 AND (hospital_id = $2 OR $2 IS NULL) ORDER BY created_at, consent_id";

fn consent_row(r: &sqlx::any::AnyRow, now: &str) -> Result<Consent> {
    let method: String = r.try_get(3)?;
    let state: String = r.try_get(5)?;
    let expires_at: String = r.try_get(6)?;
    Ok(Consent {
        consent_id: r.try_get(0)?,
        patient_key: r.try_get(1)?,
        hospital_id: r.try_get(2)?,
        method: serde_json::from_value(serde_json::Value::String(method.clone()))
            .map_err(|_| Error::Corrupt(format!("consent method {method}")))?,
        recorded_by: r.try_get(4)?,
        state: effective_state(&state, &expires_at, now)?,
        expires_at,
        created_at: r.try_get(7)?,
        updated_at: r.try_get(8)?,
    })
}

fn audit_row(r: &sqlx::any::AnyRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        seq: r.try_get(0)?,
        at: r.try_get(1)?,
        actor: r.try_get(2)?,
        user_id: r.try_get(3)?,
        action: r.try_get(4)?,
        patient_key: r.try_get(5)?,
        purpose: r.try_get(6)?,
        records_returned: r.try_get(7)?,
        outcome: r.try_get(8)?,
        detail: r.try_get(9)?,
        prev_hash: r.try_get(10)?,
        hash: r.try_get(11)?,
    })
}

/// A connection for the CLI's direct checks (tests alter rows through it).
pub async fn connect(url: &str) -> Result<AnyConnection> {
    sqlx::any::install_default_drivers();
    Ok(AnyConnection::connect(url).await?)
}
