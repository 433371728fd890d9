//! The node's answers about a patient's prior exams, shared by the JSON API
//! and the doctor's page: the region's priors (with the node's own when the
//! registry cannot be reached), the duplicate-exam check, the doctor's
//! decision, and the statistics of this hospital.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::contract::*;
use crate::patient_key::{Identifier, IdentifierType};
use crate::publish::Region;
use crate::recognition::check::{self, CheckInput, CheckResult, Encounter, Order, Prior};
use crate::registry::client;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be answered as asked (400).
    #[error("{0}")]
    Invalid(String),
    #[error("no recognition list is active yet")]
    NoList,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("index: {0}")]
    Index(String),
    /// The registry refused (4xx): its detail.
    #[error("registry: {0}")]
    Registry(String),
    /// Refused by policy (403), here or at the registry.
    #[error("{0}")]
    Refused(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Index(e.to_string())
    }
}

impl From<crate::publish::Error> for Error {
    fn from(e: crate::publish::Error) -> Self {
        Error::Index(e.to_string())
    }
}

/// A patient as the hospital names them: a local Patient ID (with its
/// issuer), or a cross-enterprise identifier. Never in a URL.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PatientRef {
    #[serde(default)]
    pub patient_id: Option<String>,
    #[serde(default)]
    pub issuer_of_patient_id: String,
    #[serde(default)]
    pub identifier_type: Option<IdentifierType>,
    #[serde(default)]
    pub identifier: Option<String>,
}

/// The patient key, or why the identity cannot be verified.
pub async fn resolve_patient(
    region: &Region,
    patient: &PatientRef,
) -> Result<Result<String, String>, Error> {
    match (
        &patient.identifier_type,
        &patient.identifier,
        &patient.patient_id,
    ) {
        (Some(kind), Some(number), _) => Ok(Identifier::parse(*kind, number)
            .map(|id| region.secret().patient_key(&id))
            .map_err(|e| format!("{} ({e})", e.code()))),
        (None, None, Some(pid)) if !pid.trim().is_empty() => Ok(region
            .patient_key_of_local(pid.trim(), patient.issuer_of_patient_id.trim())
            .await?
            .map_err(|e| format!("{} ({e})", e.code()))),
        _ => Err(Error::Invalid(
            "give patient_id, or identifier_type and identifier".into(),
        )),
    }
}

/// The patient's federation pseudonym, where this node takes part in a
/// federation (docs/federation.md) and the identifier is known here; the
/// identifier itself never leaves the node.
pub async fn federation_pseudonym(region: &Region, patient: &PatientRef) -> Option<String> {
    let secret = region.config().federation_secret.as_ref()?;
    let identifier = match (
        &patient.identifier_type,
        &patient.identifier,
        &patient.patient_id,
    ) {
        (Some(kind), Some(number), _) => Identifier::parse(*kind, number).ok()?,
        (None, None, Some(pid)) if !pid.trim().is_empty() => region
            .identifier_of_local(pid.trim(), patient.issuer_of_patient_id.trim())
            .await
            .ok()?
            .ok()?,
        _ => return None,
    };
    Some(secret.pseudonym(&identifier))
}

/// Remembers who holds each regional prior of an answer: a C-MOVE or
/// C-GET of it later knows where to fetch it.
pub async fn remember_holders(region: &Region, answer: &PriorsAnswer) {
    let own = &region.config().hospital_id;
    for r in answer.records.iter().filter(|r| &r.hospital_id != own) {
        let _ = sqlx::query(
            "INSERT INTO regional_prior (study_instance_uid, hospital_id, seen_at) \
             VALUES ($1, $2, $3) ON CONFLICT (study_instance_uid) DO UPDATE SET \
             hospital_id = excluded.hospital_id, seen_at = excluded.seen_at",
        )
        .bind(&r.record.study_instance_uid)
        .bind(&r.hospital_id)
        .bind(crate::common::now_rfc3339())
        .execute(region.index().pool())
        .await;
    }
}

/// The region's records of a patient for this hospital; when the registry
/// cannot be reached, this node's own published records (and `false`).
pub async fn priors(
    region: &Region,
    patient_key: &str,
    purpose: Purpose,
    encounter: Option<Encounter>,
    user_id: &str,
) -> Result<(PriorsAnswer, bool), Error> {
    priors_federated(region, patient_key, None, purpose, encounter, user_id).await
}

/// [`priors`], with the patient's federation pseudonym where the node knows
/// it: the registry then asks the federation's members too.
pub async fn priors_federated(
    region: &Region,
    patient_key: &str,
    federation_pseudonym: Option<String>,
    purpose: Purpose,
    encounter: Option<Encounter>,
    user_id: &str,
) -> Result<(PriorsAnswer, bool), Error> {
    let query = PriorsQuery {
        federation_pseudonym,
        patient_key: patient_key.to_string(),
        items: None,
        since: None,
        purpose,
        encounter,
        user_id: user_id.to_string(),
        page_size: Some(1000),
        page_token: None,
    };
    match region.client().priors(&query).await {
        Ok(answer) => {
            remember_holders(region, &answer).await;
            Ok((answer, true))
        }
        Err(client::Error::Status {
            status: 403,
            detail,
        }) => Err(Error::Refused(detail)),
        Err(client::Error::Status { status, detail }) if status < 500 => {
            Err(Error::Registry(format!("{status}: {detail}")))
        }
        Err(error) => {
            tracing::warn!(%error, "registry unreachable: answering from this node's own priors");
            let rows = sqlx::query(
                "SELECT record FROM study_publication WHERE patient_key = $1 \
                 AND state = 'published' AND record IS NOT NULL",
            )
            .bind(patient_key)
            .fetch_all(region.index().pool())
            .await?;
            let mut records = Vec::new();
            for r in rows {
                let json: String = r.try_get(0)?;
                if let Ok(record) = serde_json::from_str::<StudyRecord>(&json) {
                    records.push(RegistryRecord {
                        hospital_id: region.config().hospital_id.clone(),
                        published_at: String::new(),
                        retracted: false,
                        record,
                        province: None,
                    });
                }
            }
            records.sort_by(|a, b| b.record.study_date.cmp(&a.record.study_date));
            Ok((
                PriorsAnswer {
                    patient_key: patient_key.to_string(),
                    access: AccessBasis::None,
                    consent_state: None,
                    records,
                    withheld_count: 0,
                    next_page_token: None,
                    federation: None,
                },
                false,
            ))
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub patient: PatientRef,
    pub order: Order,
    pub ordering_doctor: String,
    pub encounter: Encounter,
    /// Break-the-glass: other hospitals' priors without consent (audited
    /// and flagged at the registry).
    #[serde(default)]
    pub break_the_glass: bool,
    /// YYYY-MM-DD; default today in Asia/Shanghai (re-evaluation, audits).
    #[serde(default)]
    pub as_of: Option<String>,
}

/// The ordered item as the answer names it.
#[derive(Debug, Clone, Serialize)]
pub struct ItemView {
    pub code: String,
    pub name_zh: String,
    pub name_en: String,
    pub window_days: i64,
    pub window_is_default: bool,
    pub mark: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckAnswer {
    pub check_id: String,
    pub outcome: check::Outcome,
    pub ordered_item: ItemView,
    pub cited: Option<check::PriorView>,
    pub other_qualifying: Vec<check::PriorView>,
    pub not_counted: Vec<check::PriorView>,
    pub reasons: Vec<String>,
    pub withheld_count: i64,
    pub as_of: String,
    /// The list's content hash and its version name.
    pub list_version: String,
    pub list_name: String,
    pub registry_reached: bool,
    /// Where each prior opens (study UID → URL).
    pub links: std::collections::BTreeMap<String, String>,
    /// The province of each prior held in another province of the
    /// federation (study UID → province).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub provinces: std::collections::BTreeMap<String, String>,
    /// What each member of the federation answered (absent outside one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationSummary>,
}

/// The URL a prior's images open at: an OHIF viewer configured elsewhere,
/// else this node's page, which fetches a regional prior and opens it in
/// the node's own viewer (src/http/page/images.rs).
pub fn link(region: &Region, study_instance_uid: &str) -> String {
    match &region.config().ohif_url {
        Some(ohif) => format!(
            "{}/viewer?StudyInstanceUIDs={study_instance_uid}",
            ohif.trim_end_matches('/')
        ),
        None => format!("/ui/studies/{study_instance_uid}/images"),
    }
}

/// The ordering hospital as the directory knows it (this node's).
async fn this_hospital(region: &Region) -> Hospital {
    let id = &region.config().hospital_id;
    region
        .directory()
        .await
        .and_then(|d| d.hospitals.into_iter().find(|h| &h.hospital_id == id))
        .unwrap_or_else(|| Hospital {
            // Not in a directory pulled yet: only its own priors can count
            // (same hospital), which needs no level.
            hospital_id: id.clone(),
            name: id.clone(),
            level: Level::Primary,
            groups: Vec::new(),
            accepts_lower_level_results: false,
            qc_status: QcStatus::Passed,
            dicomweb_base_url: None,
            province: None,
        })
}

fn month_of(date: &chrono::NaiveDate) -> String {
    date.format("%Y-%m").to_string()
}

/// The duplicate-exam check: asks the registry (or falls back to this
/// node's priors), applies the list, records the check, and queues a
/// warning event for the region's statistics.
pub async fn run_check(region: &Arc<Region>, request: &CheckRequest) -> Result<CheckAnswer, Error> {
    let list = region.list().ok_or(Error::NoList)?;
    crate::contract::check_printable("ordering_doctor", &request.ordering_doctor, 128)
        .map_err(Error::Invalid)?;
    let doctor = request.ordering_doctor.trim();
    let ordered = request.order.item(&list).map_err(Error::Invalid)?;
    let as_of = match &request.as_of {
        Some(d) => chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|_| Error::Invalid("as_of must be YYYY-MM-DD".into()))?,
        None => check::today_in_shanghai(),
    };
    // Break-the-glass only in an emergency (recognition-facts.md, "Rules
    // huren keeps"): refused here before anything is asked; the registry
    // refuses and audits it too.
    if request.break_the_glass && request.encounter != Encounter::Emergency {
        return Err(Error::Refused(
            "break-the-glass is allowed for an emergency encounter only".into(),
        ));
    }
    let key = resolve_patient(region, &request.patient).await?;
    let purpose = if request.break_the_glass {
        Purpose::Emergency
    } else {
        Purpose::Treatment
    };
    let pseudonym = federation_pseudonym(region, &request.patient).await;
    let (answer, reached) = match &key {
        Ok(key) => {
            priors_federated(
                region,
                key,
                pseudonym,
                purpose,
                Some(request.encounter),
                doctor,
            )
            .await?
        }
        Err(_) => (
            PriorsAnswer {
                patient_key: String::new(),
                access: AccessBasis::None,
                consent_state: None,
                records: Vec::new(),
                withheld_count: 0,
                next_page_token: None,
                federation: None,
            },
            true,
        ),
    };
    let directory = region.directory().await;
    // Priors whose images this node failed to fetch lately count as
    // unavailable, whatever their holder published: the doctor could not
    // open them.
    let unretrievable = crate::peer::unretrievable(region)
        .await
        .map_err(|e| Error::Index(e.to_string()))?;
    // Another province's hospitals are not in this region's directory: the
    // registry passes them on from the member that holds the record.
    let foreign = answer.federation.as_ref().map(|f| &f.hospitals);
    let prior_list: Vec<Prior> = answer
        .records
        .iter()
        .map(|r| {
            let mut record = r.record.clone();
            if unretrievable
                .contains_key(&(r.hospital_id.clone(), record.study_instance_uid.clone()))
            {
                record.images_available = false;
            }
            (r, record)
        })
        .map(|(r, record)| Prior {
            hospital_id: r.hospital_id.clone(),
            hospital: match &r.province {
                None => directory.as_ref().and_then(|d| {
                    d.hospitals
                        .iter()
                        .find(|h| h.hospital_id == r.hospital_id)
                        .cloned()
                }),
                Some(_) => foreign
                    .and_then(|hs| hs.iter().find(|h| h.hospital_id == r.hospital_id))
                    .cloned(),
            },
            record,
        })
        .collect();
    let provinces: std::collections::BTreeMap<String, String> = answer
        .records
        .iter()
        .filter_map(|r| {
            r.province
                .clone()
                .map(|p| (r.record.study_instance_uid.clone(), p))
        })
        .collect();
    let ordering = this_hospital(region).await;
    let result: CheckResult = check::check(&CheckInput {
        list: &list,
        order: &request.order,
        ordering_hospital: &ordering,
        priors: &prior_list,
        withheld_count: answer.withheld_count,
        as_of,
        encounter: request.encounter,
        identity_verified: key.is_ok(),
    })
    .map_err(Error::Invalid)?;
    let check_id = crate::common::random_hex(16);
    let mut links = std::collections::BTreeMap::new();
    for p in result
        .cited
        .iter()
        .chain(&result.other_qualifying)
        .chain(&result.not_counted)
    {
        links.insert(
            p.study_instance_uid.clone(),
            link(region, &p.study_instance_uid),
        );
    }
    let out = CheckAnswer {
        check_id: check_id.clone(),
        outcome: result.outcome,
        ordered_item: ItemView {
            code: ordered.code.clone(),
            name_zh: ordered.name_zh.clone(),
            name_en: ordered.name_en.clone(),
            window_days: ordered.window_days,
            window_is_default: ordered.window_is_default,
            mark: list.mark_of(ordered).to_string(),
        },
        cited: result.cited.clone(),
        other_qualifying: result.other_qualifying.clone(),
        not_counted: result.not_counted.clone(),
        reasons: result.reasons.clone(),
        withheld_count: result.withheld_count,
        as_of: as_of.format("%Y-%m-%d").to_string(),
        list_version: list.content_hash.clone(),
        list_name: list.meta.version.clone(),
        registry_reached: reached,
        links,
        provinces,
        federation: answer.federation.clone(),
    };
    let outcome = serde_json::to_value(out.outcome)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let now = crate::common::now_rfc3339();
    sqlx::query(
        "INSERT INTO recognition_check (check_id, created_at, month, user_id, patient_key, \
         item_code, outcome, list_version, registry_reached, result) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&check_id)
    .bind(&now)
    .bind(month_of(&check::today_in_shanghai()))
    .bind(doctor)
    .bind(key.as_ref().ok().cloned())
    .bind(&ordered.code)
    .bind(&outcome)
    .bind(&list.content_hash)
    .bind(i64::from(reached))
    .bind(serde_json::to_string(&out).expect("answer serialises"))
    .execute(region.index().pool())
    .await?;
    crate::metrics::recognition_check(&outcome, reached);
    // Prefetch: the recognised priors held elsewhere start coming now, so
    // that the images are here when the doctor opens them.
    if region.config().prefetch_priors
        && let Some(ingest) = region.ingest()
    {
        let own = &region.config().hospital_id;
        for p in out.cited.iter().chain(&out.other_qualifying) {
            if &p.hospital_id != own {
                crate::peer::prefetch(
                    region.clone(),
                    ingest.clone(),
                    p.hospital_id.clone(),
                    p.study_instance_uid.clone(),
                    format!("check {check_id}"),
                );
            }
        }
    }
    if out.outcome == check::Outcome::Warn {
        region
            .enqueue_event(RecognitionEvent {
                event_id: format!("{check_id}-w"),
                check_id,
                kind: EventKind::Warning,
                item_code: ordered.code.clone(),
                reason_code: None,
                non_recognition: false,
                list_version: list.content_hash.clone(),
                at: now,
                user_id: doctor.to_string(),
            })
            .await?;
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The prior is accepted: the order is dropped.
    Accepted,
    /// The exam is repeated, for a reason of the list.
    Repeated,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    pub check_id: String,
    pub decision: Decision,
    #[serde(default)]
    pub reason_code: Option<String>,
    #[serde(default)]
    pub free_text: Option<String>,
    pub doctor: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecisionRecorded {
    pub check_id: String,
    pub decision: Decision,
    pub reason_code: Option<String>,
    /// false for reasons 98 and 99 (not counted as non-recognition).
    pub non_recognition: bool,
    pub list_version: String,
}

/// Records the doctor's decision on a check (once) and queues it for the
/// registry.
pub async fn decide(region: &Arc<Region>, d: &DecisionRequest) -> Result<DecisionRecorded, Error> {
    let list = region.list().ok_or(Error::NoList)?;
    let doctor = d.doctor.trim();
    if doctor.is_empty() || doctor.len() > 128 {
        return Err(Error::Invalid("doctor must be 1 to 128 characters".into()));
    }
    let row = sqlx::query(
        "SELECT item_code, list_version, decision, outcome FROM recognition_check \
         WHERE check_id = $1",
    )
    .bind(&d.check_id)
    .fetch_optional(region.index().pool())
    .await?
    .ok_or(Error::NotFound("check"))?;
    let item_code: String = row.try_get(0)?;
    let list_version: String = row.try_get(1)?;
    if row.try_get::<Option<String>, _>(2)?.is_some() {
        return Err(Error::Invalid("this check has a decision already".into()));
    }
    // A decision answers a warning: accepting drops the order for the
    // prior the warning cited, repeating it may count as non-recognition.
    // Without a warning there was no prior to recognise, and a decision
    // would only skew the statistics.
    let outcome: String = row.try_get(3)?;
    if outcome != "warn" {
        return Err(Error::Invalid(format!(
            "this check gave no warning (outcome {outcome}): there is no decision to record"
        )));
    }
    let (reason_code, non_recognition) = match d.decision {
        Decision::Accepted => (None, false),
        Decision::Repeated => {
            let code = d
                .reason_code
                .as_deref()
                .ok_or_else(|| Error::Invalid("a repeat needs a reason_code".into()))?;
            let reason = list
                .reason(code)
                .ok_or_else(|| Error::Invalid(format!("reason {code:?} is not in the list")))?;
            (Some(code.to_string()), reason.counts_as_non_recognition)
        }
    };
    let free_text = d
        .free_text
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if free_text.is_some_and(|t| t.len() > 2000) {
        return Err(Error::Invalid("free_text is limited to 2000 bytes".into()));
    }
    let decision = match d.decision {
        Decision::Accepted => EventKind::Accepted,
        Decision::Repeated => EventKind::Repeated,
    };
    let now = crate::common::now_rfc3339();
    let updated = sqlx::query(
        "UPDATE recognition_check SET decision = $2, reason_code = $3, free_text = $4, \
         decided_by = $5, decided_at = $6 WHERE check_id = $1 AND decision IS NULL",
    )
    .bind(&d.check_id)
    .bind(decision.as_str())
    .bind(reason_code.clone())
    .bind(free_text.map(str::to_string))
    .bind(doctor)
    .bind(&now)
    .execute(region.index().pool())
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(Error::Invalid("this check has a decision already".into()));
    }
    region
        .enqueue_event(RecognitionEvent {
            event_id: format!("{}-d", d.check_id),
            check_id: d.check_id.clone(),
            kind: decision,
            item_code,
            reason_code: reason_code.clone(),
            non_recognition,
            list_version: list_version.clone(),
            at: now,
            user_id: doctor.to_string(),
        })
        .await?;
    Ok(DecisionRecorded {
        check_id: d.check_id.clone(),
        decision: d.decision,
        reason_code,
        non_recognition,
        list_version,
    })
}

/// This hospital's statistics from its own checks, per month and item.
pub async fn statistics(region: &Region, month: Option<&str>) -> Result<Vec<StatisticsRow>, Error> {
    let rows = sqlx::query(
        "SELECT month, item_code, outcome, decision, reason_code, COUNT(*) FROM recognition_check \
         WHERE (month = $1 OR $1 IS NULL) \
         GROUP BY month, item_code, outcome, decision, reason_code ORDER BY month, item_code",
    )
    .bind(month.map(str::to_string))
    .fetch_all(region.index().pool())
    .await?;
    let list = region.list();
    let mut out: Vec<StatisticsRow> = Vec::new();
    for r in rows {
        let m: String = r.try_get(0)?;
        let item: String = r.try_get(1)?;
        let outcome: String = r.try_get(2)?;
        let decision: Option<String> = r.try_get(3)?;
        let reason: Option<String> = r.try_get(4)?;
        let n: i64 = r.try_get(5)?;
        if out
            .last()
            .is_none_or(|l| (&l.month, &l.item_code) != (&m, &item))
        {
            out.push(StatisticsRow {
                month: m,
                hospital_id: region.config().hospital_id.clone(),
                item_code: item,
                warnings: 0,
                accepted: 0,
                repeated: 0,
                non_recognition: 0,
                repeated_by_reason: Default::default(),
                confirmed: None,
                corrected: None,
            });
        }
        let row = out.last_mut().expect("pushed above");
        if outcome == "warn" {
            row.warnings += n;
        }
        match decision.as_deref() {
            Some("accepted") => row.accepted += n,
            Some("repeated") => {
                row.repeated += n;
                let counts = reason
                    .as_deref()
                    .and_then(|c| list.as_ref().and_then(|l| l.reason(c)))
                    .is_none_or(|r| r.counts_as_non_recognition);
                if counts {
                    row.non_recognition += n;
                }
                *row.repeated_by_reason
                    .entry(reason.unwrap_or_default())
                    .or_default() += n;
            }
            _ => {}
        }
    }
    Ok(out)
}
