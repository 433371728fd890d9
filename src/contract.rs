//! The bodies of the node↔registry contract, as Rust types. proto/huren.openapi.json
//! is the source of truth: the contract test (tests/region.rs) validates
//! every body these types produce, on both sides, against its schemas, so a
//! field added here and not there fails CI.

use serde::{Deserialize, Serialize};

/// The contract's free-text names (a user ID, a request ID): 1 to `max`
/// bytes, not only spaces, no control characters. The registry refuses
/// anything else, so the node refuses it first, as its caller's error.
pub fn check_printable(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
        Err(format!(
            "{field} must be 1 to {max} bytes of printable text"
        ))
    } else {
        Ok(())
    }
}

/// Hospital levels (医院等级), highest first. Ordered: `a > b` means `a` is
/// the higher level. The order follows the national grading; "三级" and
/// "二级" without a grade sit below the graded hospitals of their class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    #[serde(rename = "一级")]
    Primary,
    #[serde(rename = "二级")]
    Secondary,
    #[serde(rename = "二级乙等")]
    SecondaryB,
    #[serde(rename = "二级甲等")]
    SecondaryA,
    #[serde(rename = "三级")]
    Tertiary,
    #[serde(rename = "三级乙等")]
    TertiaryB,
    #[serde(rename = "三级甲等")]
    TertiaryA,
}

impl Level {
    pub const ALL: [Level; 7] = [
        Level::TertiaryA,
        Level::TertiaryB,
        Level::Tertiary,
        Level::SecondaryA,
        Level::SecondaryB,
        Level::Secondary,
        Level::Primary,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Level::TertiaryA => "三级甲等",
            Level::TertiaryB => "三级乙等",
            Level::Tertiary => "三级",
            Level::SecondaryA => "二级甲等",
            Level::SecondaryB => "二级乙等",
            Level::Secondary => "二级",
            Level::Primary => "一级",
        }
    }

    /// ASCII aliases for the command line: 3A 3B 3 2A 2B 2 1.
    pub fn alias(self) -> &'static str {
        match self {
            Level::TertiaryA => "3A",
            Level::TertiaryB => "3B",
            Level::Tertiary => "3",
            Level::SecondaryA => "2A",
            Level::SecondaryB => "2B",
            Level::Secondary => "2",
            Level::Primary => "1",
        }
    }

    /// The database keeps the rank (1 = 一级 … 7 = 三级甲等), so that SQL
    /// can compare levels.
    pub fn rank(self) -> i64 {
        self as i64 + 1
    }

    pub fn from_rank(rank: i64) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.rank() == rank)
    }

    pub fn parse(s: &str) -> Option<Level> {
        let s = s.trim();
        Level::ALL
            .into_iter()
            .find(|l| l.name() == s || l.alias().eq_ignore_ascii_case(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QcStatus {
    Pending,
    Passed,
    Failed,
}

impl QcStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            QcStatus::Pending => "pending",
            QcStatus::Passed => "passed",
            QcStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<QcStatus> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// One hospital of the directory, as every node may read it (no
/// credentials).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hospital {
    /// The unified social credit code (统一社会信用代码), 18 characters.
    pub hospital_id: String,
    pub name: String,
    pub level: Level,
    /// Medical groups (医联体) and county medical communities (医共体).
    pub groups: Vec<String>,
    /// A tertiary hospital that opted in to accept lower-level results
    /// when their quality suffices (Jiangsu, 苏卫医政〔2022〕18号).
    pub accepts_lower_level_results: bool,
    pub qc_status: QcStatus,
    /// The DICOMweb base URL of its node (peer retrieval).
    pub dicomweb_base_url: Option<String>,
    /// The province of a hospital of another federation member (absent
    /// for the region's own hospitals): from that member's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub province: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HospitalDirectory {
    /// Content hash of the directory; also the response's ETag.
    pub version: String,
    pub hospitals: Vec<Hospital>,
}

/// An admin's request to add a hospital.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewHospital {
    pub hospital_id: String,
    pub name: String,
    pub level: Level,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub accepts_lower_level_results: bool,
    #[serde(default = "default_qc")]
    pub qc_status: QcStatus,
    #[serde(default)]
    pub dicomweb_base_url: Option<String>,
}

fn default_qc() -> QcStatus {
    QcStatus::Passed
}

/// An admin's change to a hospital: absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HospitalUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepts_lower_level_results: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qc_status: Option<QcStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicomweb_base_url: Option<String>,
    /// Issue a new token; the old one stops working at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotate_token: bool,
}

/// A hospital as the admin API returns it; `token` only when one was just
/// issued (it is never stored in the clear, so it cannot be shown again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HospitalAdmin {
    pub hospital: Hospital,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Contrast {
    /// No series with a contrast agent given intravascularly.
    None,
    /// Every (non-localizer) series with contrast.
    Enhanced,
    /// Plain and enhanced series in one study (平扫+增强).
    PlainAndEnhanced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Laterality {
    #[serde(rename = "L")]
    Left,
    #[serde(rename = "R")]
    Right,
    /// Both sides in one image or series (DICOM's `B`).
    #[serde(rename = "B")]
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    /// No report yet.
    None,
    Preliminary,
    Final,
    Amended,
}

impl ReportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReportStatus::None => "none",
            ReportStatus::Preliminary => "preliminary",
            ReportStatus::Final => "final",
            ReportStatus::Amended => "amended",
        }
    }
    pub fn parse(s: &str) -> Option<ReportStatus> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// A recognition item a study is, with the side where the item needs one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordItem {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub laterality: Option<Laterality>,
    /// `needs_confirmation`: shown to the doctor as information, never a
    /// warning. Absent only in records of nodes that predate it: certain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<ItemConfidence>,
    /// The attributes the item rests on (DICOM keywords such as
    /// BodyPartExamined or ViewPosition, `code table <name>`), without their
    /// values: free text stays at the hospital, which shows it in full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
    /// Radiographs: this item's own views (PA, AP, LATERAL, OBLIQUE): a
    /// chest PA and an abdominal AP in one study are two items, not a chest
    /// with both views.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub view_positions: Vec<String>,
    /// The item was confirmed (or chosen in a correction) at the hospital
    /// that did the exam, by someone of this role: it counts as certain.
    /// A role, never a name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_by: Option<ConfirmerRole>,
}

/// How sure the classifier is of an item (docs/recognition.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemConfidence {
    Certain,
    NeedsConfirmation,
}

/// Who at the holding hospital confirmed a study's items: the people who
/// know what the exam was (issue 17 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfirmerRole {
    Technologist,
    Radiologist,
}

impl ConfirmerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ConfirmerRole::Technologist => "technologist",
            ConfirmerRole::Radiologist => "radiologist",
        }
    }
    pub fn parse(s: &str) -> Option<ConfirmerRole> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// What a node publishes about one study. No name, birth date or raw ID:
/// the patient is a [`crate::patient_key`] key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyRecord {
    pub study_instance_uid: String,
    /// Monotonic per (hospital, study): the registry keeps the highest.
    pub record_version: i64,
    pub patient_key: String,
    /// Recognition items (empty until the study is classified).
    pub items: Vec<RecordItem>,
    pub modalities: Vec<String>,
    pub body_parts: Vec<String>,
    pub contrast: Contrast,
    pub laterality: Vec<Laterality>,
    /// ViewPosition of radiographs (PA, AP, LL, RL, …).
    pub view_positions: Vec<String>,
    /// YYYY-MM-DD, when the study has a valid StudyDate.
    pub study_date: Option<String>,
    /// HH:MM:SS, when the study has a valid StudyTime.
    pub study_time: Option<String>,
    pub report_status: ReportStatus,
    /// YYYY-MM-DD.
    pub report_issued_date: Option<String>,
    pub qc_status: QcStatus,
    pub images_available: bool,
    pub number_of_series: i64,
    pub number_of_instances: i64,
    pub bytes: i64,
    /// BLAKE3 over the study's sorted (SOP Instance UID, instance hash)
    /// list; see [`crate::publish::content_root`].
    pub content_root: String,
    /// The federation pseudonym of the patient (docs/federation.md),
    /// published by the nodes of pilot hospitals only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation_pseudonym: Option<String>,
}

/// A study withdrawn by its hospital (deleted, or merged into another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retraction {
    pub study_instance_uid: String,
    pub record_version: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    #[serde(default)]
    pub records: Vec<StudyRecord>,
    #[serde(default)]
    pub retractions: Vec<Retraction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishOutcome {
    /// The registry now holds this version.
    Applied,
    /// The registry holds this version or a newer one already: a replay.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishResult {
    pub study_instance_uid: String,
    pub record_version: i64,
    pub outcome: PublishOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishResponse {
    pub results: Vec<PublishResult>,
}

/// A record as the registry holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryRecord {
    pub hospital_id: String,
    pub published_at: String,
    pub retracted: bool,
    pub record: StudyRecord,
    /// Set on a record held in another province of the federation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub province: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Care of the patient by the asking hospital: needs consent.
    Treatment,
    /// Break-the-glass: allowed without consent, flagged in the audit.
    Emergency,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Treatment => "treatment",
            Purpose::Emergency => "emergency",
        }
    }
}

/// The kind of encounter a doctor acts in. Break-the-glass (purpose
/// `emergency`) is honoured for an emergency encounter only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encounter {
    Outpatient,
    Inpatient,
    /// Emergency: priors are shown for information, never as a warning
    /// (reason 04 applies by definition).
    Emergency,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorsQuery {
    pub patient_key: String,
    /// Only records of these item codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<String>>,
    /// Only studies on or after this date (YYYY-MM-DD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub purpose: Purpose,
    /// The doctor (or system user) at the asking hospital, for the audit.
    pub user_id: String,
    /// Required with purpose `emergency`, and must be `emergency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<Encounter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_token: Option<String>,
    /// The patient's federation pseudonym, when the node knows it: the
    /// registry asks the federation's members by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation_pseudonym: Option<String>,
}

/// On what grounds other hospitals' records were (or were not) shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessBasis {
    Consent,
    BreakTheGlass,
    /// Neither: other hospitals' records are only counted.
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorsAnswer {
    pub patient_key: String,
    pub access: AccessBasis,
    /// The asking hospital's consent for this patient, when one exists.
    pub consent_state: Option<ConsentState>,
    pub records: Vec<RegistryRecord>,
    /// Other hospitals' records that match but are not shown (no access).
    pub withheld_count: i64,
    pub next_page_token: Option<String>,
    /// What the federation's members answered (first page only, and only
    /// where the registry belongs to a federation and knows the patient's
    /// pseudonym).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationSummary>,
}

/// The federation's part of a priors answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSummary {
    pub name: String,
    /// One entry per member, whether it answered or not.
    pub members: Vec<MemberOutcome>,
    /// The other provinces' hospitals the records name (with `province`).
    pub hospitals: Vec<Hospital>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    /// Answered within the deadline.
    Reached,
    /// Down, slow past the deadline, or its answer was not valid.
    NotReached,
    /// Answered with a refusal (403: it does not know this registry).
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberOutcome {
    pub member_id: String,
    pub province: String,
    pub status: MemberStatus,
    /// Records shown (after the federation list's judgement).
    pub records: i64,
    /// Records the member withheld (its consent rule), when it says.
    pub withheld_count: i64,
    /// Records the member returned that the federation list does not
    /// recognise (item, window or eligibility), shown without those items.
    pub items_not_recognised: i64,
    pub elapsed_ms: i64,
}

/// Registry-to-registry: one member asks another for a patient's records
/// by pseudonym (`POST /v1/federation/priors`, a signed request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedQuery {
    pub federation: String,
    pub pseudonym: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    pub purpose: Purpose,
    /// The asking hospital (a unified social credit code: an organisation,
    /// not a person) and its user, for the holding registry's audit.
    pub asking_hospital_id: String,
    pub user_id: String,
    /// The patient's consent for the asking hospital holds in the asking
    /// province (the `asking` and `both` consent policies rest on it).
    pub asking_consent: bool,
    /// Ties the two registries' audit entries of this query together.
    pub request_id: String,
}

/// One record of another province, as its registry returns it: the patient
/// key is replaced by the pseudonym (a province's key never leaves it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedRecord {
    pub hospital: Hospital,
    pub published_at: String,
    pub record: StudyRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedAnswer {
    pub member_id: String,
    pub province: String,
    pub access: AccessBasis,
    pub records: Vec<FederatedRecord>,
    /// Records withheld under the holding province's consent rule; 0 when
    /// its policy is to say nothing.
    pub withheld_count: i64,
}

/// A patient's consent, recorded in the holding province, to show its
/// records of them to a member's hospitals (`POST /v1/federation/consents`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewFederationConsent {
    pub patient_key: String,
    pub member_id: String,
    pub method: ConsentMethod,
    pub recorded_by: String,
    pub state: ConsentState,
    pub expires_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConsent {
    pub consent_id: String,
    pub patient_key: String,
    pub member_id: String,
    pub method: ConsentMethod,
    pub state: ConsentState,
    pub expires_at: String,
    pub created_at: String,
}

/// A member's registry asks the holding registry for a grant (images
/// across borders): the asking registry vouches for its hospital.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedGrantRequest {
    pub federation: String,
    pub pseudonym: String,
    pub holding_hospital_id: String,
    pub study_instance_uid: String,
    pub purpose: Purpose,
    pub asking_hospital_id: String,
    pub user_id: String,
    pub asking_consent: bool,
    pub request_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentMethod {
    /// QR code scanned in the provincial health app.
    QrCode,
    SmsCode,
    DoctorAssisted,
}

impl ConsentMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentMethod::QrCode => "qr_code",
            ConsentMethod::SmsCode => "sms_code",
            ConsentMethod::DoctorAssisted => "doctor_assisted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentState {
    Pending,
    Granted,
    Expired,
    Revoked,
}

impl ConsentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentState::Pending => "pending",
            ConsentState::Granted => "granted",
            ConsentState::Expired => "expired",
            ConsentState::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<ConsentState> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewConsent {
    pub patient_key: String,
    /// The hospital the patient authorises to see their records.
    pub hospital_id: String,
    pub method: ConsentMethod,
    /// Who recorded it (a user ID at the hospital, or the health app).
    pub recorded_by: String,
    /// `pending` (waiting for the patient's SMS code, say) or `granted`.
    pub state: ConsentState,
    /// RFC 3339.
    pub expires_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentChange {
    /// `granted` (a pending consent confirmed) or `revoked`.
    pub state: ConsentState,
    pub recorded_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    pub consent_id: String,
    pub patient_key: String,
    pub hospital_id: String,
    pub method: ConsentMethod,
    pub recorded_by: String,
    /// The state now: a granted consent past its expiry reads `expired`.
    pub state: ConsentState,
    pub expires_at: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentList {
    pub consents: Vec<Consent>,
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: i64,
    /// RFC 3339, UTC.
    pub at: String,
    /// The acting hospital, or `admin`.
    pub actor: String,
    /// The user ID the node passed, or the admin's name.
    pub user_id: String,
    pub action: String,
    pub patient_key: Option<String>,
    pub purpose: Option<String>,
    pub records_returned: i64,
    /// `ok`, `denied`, `break_the_glass`, `unchanged`, …
    pub outcome: String,
    pub detail: String,
    /// BLAKE3 of the previous entry (hex), all zeros for the first.
    pub prev_hash: String,
    /// BLAKE3 of this entry's fields and `prev_hash`.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `after_seq` for the next page; absent on the last page.
    pub next_after_seq: Option<i64>,
}

/// RFC 9457 problem details: every error of the registry and of the node's
/// JSON API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A duplicate-exam warning was shown.
    Warning,
    /// The doctor accepted the prior: the order was dropped.
    Accepted,
    /// The doctor repeated the exam, with a reason.
    Repeated,
    /// The hospital that did the exam confirmed the classifier's items of
    /// a study as they were (`item_code`: one of them; empty when the
    /// classifier had found none and none was confirmed).
    Confirmed,
    /// It corrected them: the equipment's headers misled the classifier
    /// (`item_code`: what the classifier had said, or empty when it had
    /// found nothing). Counted per hospital so a region sees where.
    Corrected,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Warning => "warning",
            EventKind::Accepted => "accepted",
            EventKind::Repeated => "repeated",
            EventKind::Confirmed => "confirmed",
            EventKind::Corrected => "corrected",
        }
    }
}

/// A warning or a decision, reported by the node to the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecognitionEvent {
    /// Unique; a replay of the same event is ignored.
    pub event_id: String,
    pub check_id: String,
    pub kind: EventKind,
    pub item_code: String,
    pub reason_code: Option<String>,
    /// Repeated for a reason that counts as non-recognition (not 98/99).
    pub non_recognition: bool,
    /// Content hash of the list the check was computed under.
    pub list_version: String,
    /// RFC 3339.
    pub at: String,
    pub user_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecognitionEvents {
    pub events: Vec<RecognitionEvent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsAccepted {
    pub accepted: i64,
}

/// The active recognition list, as activated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListActivated {
    pub version: String,
    pub content_hash: String,
    pub items: i64,
    pub activated_at: String,
}

/// Counts of one hospital, item and month.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsRow {
    /// YYYY-MM (Asia/Shanghai).
    pub month: String,
    pub hospital_id: String,
    pub item_code: String,
    pub warnings: i64,
    pub accepted: i64,
    pub repeated: i64,
    /// Repeats for reasons that count as non-recognition.
    pub non_recognition: i64,
    pub repeated_by_reason: std::collections::BTreeMap<String, i64>,
    /// Studies whose items the hospital confirmed as classified, and
    /// those it corrected (registry statistics; a node's own statistics
    /// leave them out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrected: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statistics {
    pub rows: Vec<StatisticsRow>,
}

/// Hospital A asks to fetch one study held at hospital B.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub holding_hospital_id: String,
    pub study_instance_uid: String,
    pub purpose: Purpose,
    pub user_id: String,
    /// The check (check_id) or query that led to the retrieval.
    #[serde(default)]
    pub reference: Option<String>,
    /// Required with purpose `emergency`, and must be `emergency`: a
    /// break-the-glass grant names the doctor and the emergency encounter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<Encounter>,
}

/// A short-lived grant: A presents `token` to B as a bearer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub grant_id: String,
    pub token: String,
    pub holding_hospital_id: String,
    pub study_instance_uid: String,
    /// The published content root A verifies B's manifest against.
    pub content_root: String,
    pub purpose: Purpose,
    pub expires_at: String,
    /// The holding hospital's DICOMweb base URL, on a grant for a study of
    /// another province (its hospital is not in this region's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicomweb_base_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantVerify {
    pub token: String,
}

/// What the registry confirms to the holding hospital about a grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfirmed {
    pub grant_id: String,
    pub requesting_hospital_id: String,
    pub study_instance_uid: String,
    pub purpose: Purpose,
    pub user_id: String,
    pub expires_at: String,
}

/// One instance of a study manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestInstance {
    pub sop_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_class_uid: String,
    pub transfer_syntax_uid: String,
    pub blob_hash: String,
    pub size: i64,
}

/// What a peer verifies a fetched study against: the current instances
/// with their hashes, and the content root the registry record carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyManifest {
    pub study_instance_uid: String,
    pub content_root: String,
    pub instances: Vec<ManifestInstance>,
}
