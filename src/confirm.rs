//! Confirmation at the source (issue 17 section 2), shared by the JSON API
//! and the node's page: the hospital that did an exam sees the classifier's
//! items for a study with the evidence they rest on, and confirms or
//! corrects them; the publisher applies the confirmation when it builds
//! the record (`publish::apply_confirmation`). Also the operator's mark
//! that a study's images cannot be retrieved.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::contract::{ConfirmerRole, Laterality};
use crate::publish::{ConfirmedItem, Region};
use crate::recognition::list::LateralityRule;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400: an item not in the list, a side missing or not wanted.
    #[error("{0}")]
    Invalid(String),
    /// 404.
    #[error("study not found")]
    NotFound,
    /// 409: the study has not been classified yet (not evaluated since it
    /// arrived, or no list active): there is nothing to confirm.
    #[error("the study has not been classified yet")]
    NotClassified,
    #[error("index: {0}")]
    Index(String),
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

/// What the hospital says a study is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmationRequest {
    pub role: ConfirmerRole,
    /// The user at this hospital: kept here, never published.
    pub user_id: String,
    /// The items the study is; empty: none of the list's items.
    pub items: Vec<ConfirmedItem>,
}

/// A study's recognition as its own hospital sees it.
#[derive(Debug, Clone, Serialize)]
pub struct StudyRecognition {
    pub study_instance_uid: String,
    /// The classifier's answer: items with confidence, doubts and the
    /// evidence with its values; null before the study is classified.
    pub classification: Option<serde_json::Value>,
    /// The items as last published (after any confirmation).
    pub published_items: Vec<crate::contract::RecordItem>,
    pub record_version: i64,
    pub confirmation: Option<ConfirmationView>,
    pub images_available: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfirmationView {
    pub role: ConfirmerRole,
    pub user_id: String,
    pub items: Vec<ConfirmedItem>,
    /// The items differ from the classifier's.
    pub corrected: bool,
    pub confirmed_at: String,
    /// The study's images changed since: the confirmation no longer applies.
    pub lapsed: bool,
}

/// The classifier's items (code, side) in a stored classification.
fn classified_items(classification: &serde_json::Value) -> Vec<ConfirmedItem> {
    classification["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| {
                    Some(ConfirmedItem {
                        code: i["code"].as_str()?.to_string(),
                        laterality: serde_json::from_value(i["laterality"].clone()).ok(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sorted(mut items: Vec<ConfirmedItem>) -> Vec<(String, Option<Laterality>)> {
    items.sort_by(|a, b| (&a.code, a.laterality).cmp(&(&b.code, b.laterality)));
    items.into_iter().map(|i| (i.code, i.laterality)).collect()
}

pub async fn study_recognition(region: &Region, uid: &str) -> Result<StudyRecognition, Error> {
    let pool = region.index().pool();
    let Some(row) = sqlx::query(
        "SELECT classification, record, record_version, content_root FROM study_publication \
         WHERE study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_optional(pool)
    .await?
    else {
        return match region.index().study(uid).await {
            Ok(Some(_)) => Err(Error::NotClassified),
            Ok(None) => Err(Error::NotFound),
            Err(e) => Err(Error::Index(e.to_string())),
        };
    };
    let classification: Option<serde_json::Value> = row
        .try_get::<Option<String>, _>(0)?
        .and_then(|t| serde_json::from_str(&t).ok());
    let record: Option<crate::contract::StudyRecord> = row
        .try_get::<Option<String>, _>(1)?
        .and_then(|t| serde_json::from_str(&t).ok());
    let root: Option<String> = row.try_get(3)?;
    let confirmation = sqlx::query(
        "SELECT items, role, user_id, corrected, confirmed_at, content_root \
         FROM study_confirmation WHERE study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_optional(pool)
    .await?;
    let confirmation = match confirmation {
        None => None,
        Some(c) => {
            let items: String = c.try_get(0)?;
            let role: String = c.try_get(1)?;
            let confirmed_root: String = c.try_get(5)?;
            match (serde_json::from_str(&items), ConfirmerRole::parse(&role)) {
                (Ok(items), Some(role)) => Some(ConfirmationView {
                    role,
                    user_id: c.try_get(2)?,
                    items,
                    corrected: c.try_get::<i64, _>(3)? != 0,
                    confirmed_at: c.try_get(4)?,
                    lapsed: root.as_deref() != Some(confirmed_root.as_str()),
                }),
                _ => None,
            }
        }
    };
    Ok(StudyRecognition {
        study_instance_uid: uid.to_string(),
        classification,
        published_items: record.as_ref().map(|r| r.items.clone()).unwrap_or_default(),
        record_version: row.try_get(2)?,
        images_available: record.as_ref().is_none_or(|r| r.images_available),
        confirmation,
    })
}

/// Records the hospital's confirmation (or correction) of a study's items
/// and has the study published again. Returns whether it was a correction.
pub async fn confirm(
    region: &Region,
    uid: &str,
    request: &ConfirmationRequest,
) -> Result<bool, Error> {
    let list = region
        .list()
        .ok_or_else(|| Error::Invalid("no recognition list is active yet".into()))?;
    let user = request.user_id.trim();
    if user.is_empty() || user.len() > 128 {
        return Err(Error::Invalid("user_id must be 1 to 128 characters".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for i in &request.items {
        let item = list
            .item(&i.code)
            .ok_or_else(|| Error::Invalid(format!("item {:?} is not in the list", i.code)))?;
        match (item.laterality, i.laterality) {
            (LateralityRule::Required, None) => {
                return Err(Error::Invalid(format!(
                    "item {} needs the side (laterality L, R or B)",
                    i.code
                )));
            }
            (LateralityRule::None, Some(_)) => {
                return Err(Error::Invalid(format!("item {} has no side", i.code)));
            }
            (LateralityRule::Both, Some(l)) if l != Laterality::Both => {
                return Err(Error::Invalid(format!("item {} is of both sides", i.code)));
            }
            _ => {}
        }
        if !seen.insert((i.code.clone(), i.laterality)) {
            return Err(Error::Invalid(format!("item {} given twice", i.code)));
        }
    }
    let current = study_recognition(region, uid).await?;
    let Some(classification) = current.classification else {
        return Err(Error::NotClassified);
    };
    let root: String = sqlx::query_scalar(
        "SELECT content_root FROM study_publication WHERE study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_one(region.index().pool())
    .await?;
    let classified = classified_items(&classification);
    let corrected = sorted(classified.clone()) != sorted(request.items.clone());
    sqlx::query(
        "INSERT INTO study_confirmation (study_instance_uid, items, role, user_id, classified, \
         corrected, content_root, confirmed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (study_instance_uid) DO UPDATE SET items = excluded.items, \
         role = excluded.role, user_id = excluded.user_id, classified = excluded.classified, \
         corrected = excluded.corrected, content_root = excluded.content_root, \
         confirmed_at = excluded.confirmed_at",
    )
    .bind(uid)
    .bind(serde_json::to_string(&request.items).expect("items serialise"))
    .bind(request.role.as_str())
    .bind(user)
    .bind(classification["items"].to_string())
    .bind(i64::from(corrected))
    .bind(root)
    .bind(crate::common::now_rfc3339())
    .execute(region.index().pool())
    .await?;
    region.note_change(uid).await?;
    region.wake_publisher();
    // The region counts confirmations and corrections per hospital and
    // item (registry statistics): one event per item the classifier had
    // said, or one without an item when it had found none. The role, not
    // the person, goes to the registry.
    let said: Vec<String> = {
        let mut codes: Vec<String> = classified.iter().map(|i| i.code.clone()).collect();
        codes.sort();
        codes.dedup();
        if codes.is_empty() {
            vec![String::new()]
        } else {
            codes
        }
    };
    let confirmation_id = crate::common::random_hex(12);
    for (n, code) in said.into_iter().enumerate() {
        region
            .enqueue_event(crate::contract::RecognitionEvent {
                event_id: format!("confirm-{confirmation_id}-{n}"),
                check_id: String::new(),
                kind: if corrected {
                    crate::contract::EventKind::Corrected
                } else {
                    crate::contract::EventKind::Confirmed
                },
                item_code: code,
                reason_code: None,
                non_recognition: false,
                list_version: list.content_hash.clone(),
                at: crate::common::now_rfc3339(),
                user_id: request.role.as_str().to_string(),
            })
            .await
            .map_err(|e| Error::Index(e.to_string()))?;
    }
    crate::metrics::recognition_confirmation(corrected);
    tracing::info!(
        study_instance_uid = uid,
        role = request.role.as_str(),
        corrected,
        "recognition items confirmed at the source"
    );
    Ok(corrected)
}

/// The operator's mark: the study's images can (not) be retrieved. The
/// study is published again with `images_available` to match.
pub async fn set_images_available(
    region: &Region,
    uid: &str,
    available: bool,
    reason: &str,
) -> Result<(), Error> {
    match region.index().study(uid).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(Error::NotFound),
        Err(e) => return Err(Error::Index(e.to_string())),
    }
    sqlx::query(
        "INSERT INTO study_images (study_instance_uid, available, reason, updated_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (study_instance_uid) DO UPDATE SET \
         available = excluded.available, reason = excluded.reason, \
         updated_at = excluded.updated_at",
    )
    .bind(uid)
    .bind(i64::from(available))
    .bind(reason)
    .bind(crate::common::now_rfc3339())
    .execute(region.index().pool())
    .await?;
    region.note_change(uid).await?;
    region.wake_publisher();
    Ok(())
}

/// Counts of this hospital's confirmations: how often the classifier's
/// items were kept, how often corrected.
pub async fn counts(region: &Region) -> Result<(i64, i64), Error> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(CASE WHEN corrected = 0 THEN 1 ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(corrected), 0) AS BIGINT) FROM study_confirmation",
    )
    .fetch_one(region.index().pool())
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
