//! Registries of several provinces in one federation (docs/federation.md):
//! the configuration, the Ed25519 signatures of member requests, the
//! fan-out of a priors query to the members with a deadline, and the
//! judgement of another province's records against the federation's list.
//!
//! Nothing here sees an identifier: members ask each other by the
//! federation pseudonym, which the nodes compute.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use axum::http::HeaderMap;
use serde::Deserialize;

use crate::contract::*;
use crate::recognition::list::RecognitionList;

/// Headers of a signed member request.
pub const H_MEMBER: &str = "x-huren-federation-member";
pub const H_TIMESTAMP: &str = "x-huren-federation-timestamp";
pub const H_NONCE: &str = "x-huren-federation-nonce";
pub const H_SIGNATURE: &str = "x-huren-federation-signature";

/// How far a request's timestamp may be from this registry's clock; a
/// nonce is remembered this long, so a replay is refused either way.
pub const MAX_SKEW_SECS: u64 = 300;

/// Which consent lets another province's hospital see this province's
/// records of a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentPolicy {
    /// The patient's consent recorded in the holding province for the
    /// asking member (the default: the province that holds the records
    /// answers for them under its own rules).
    Holding,
    /// The patient's consent for the asking hospital in the asking
    /// province, as that registry asserts it.
    Asking,
    /// Both.
    Both,
}

impl ConsentPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentPolicy::Holding => "holding",
            ConsentPolicy::Asking => "asking",
            ConsentPolicy::Both => "both",
        }
    }
}

/// What a member learns of records withheld under the consent rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Withheld {
    /// Their number (as the regional answer does).
    Count,
    /// Nothing: not even whether the province has seen the patient.
    Nothing,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    federation: FileFederation,
    #[serde(default)]
    member: Vec<FileMember>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFederation {
    name: String,
    member_id: String,
    province: String,
    /// 64 hex digits: the Ed25519 seed of this registry's signing key.
    signing_key_file: PathBuf,
    /// A recognition list (the format of the regional one).
    recognition_list: PathBuf,
    #[serde(default)]
    consent_policy: Option<ConsentPolicy>,
    #[serde(default)]
    withheld: Option<Withheld>,
    #[serde(default)]
    deadline_ms: Option<u64>,
    /// This province's hospitals in the pilot; empty: all of them.
    #[serde(default)]
    pilot_hospitals: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMember {
    id: String,
    province: String,
    url: String,
    /// 64 hex digits: the member's Ed25519 public key.
    public_key: String,
}

/// Another registry of the federation.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub province: String,
    pub url: String,
    pub public_key: [u8; 32],
}

pub struct Federation {
    pub name: String,
    pub member_id: String,
    pub province: String,
    key: Ed25519KeyPair,
    pub members: Vec<Member>,
    pub list: Arc<RecognitionList>,
    pub pilot_hospitals: Vec<String>,
    pub consent_policy: ConsentPolicy,
    pub withheld: Withheld,
    pub deadline: Duration,
    http: reqwest::Client,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("name", &self.name)
            .field("member_id", &self.member_id)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

fn hex32(what: &str, s: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut out)
        .map_err(|_| format!("{what} must be 64 hex digits"))?;
    Ok(out)
}

fn member_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes a new signing key (the seed, hex, mode 600) and returns the
/// public key to give the other members.
pub fn generate_key(path: &Path) -> Result<String, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness: {e}"))?;
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| e.to_string())?;
    super::write_secret_file(path, &hex::encode(seed))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(hex::encode(pair.public_key().as_ref()))
}

/// The public key of a signing key file.
pub fn public_key_of(path: &Path) -> Result<String, String> {
    let pair = read_key(path)?;
    Ok(hex::encode(pair.public_key().as_ref()))
}

fn read_key(path: &Path) -> Result<Ed25519KeyPair, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let seed = hex32("the signing key", &text)?;
    Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|e| e.to_string())
}

/// The bytes a member signs: a version tag, who signs, the request line,
/// the time and nonce (replay), and the body's BLAKE3.
fn signed_message(
    member: &str,
    method: &str,
    path: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    format!(
        "huren-federation-v1\n{member}\n{method}\n{path}\n{timestamp}\n{nonce}\n{}",
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

/// Why a member request was refused (403, audited).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The member the request claimed to come from, if it said.
    pub claimed: Option<String>,
    pub reason: &'static str,
}

/// A verified member request: who, and its nonce (checked against replay
/// in the database by the caller).
#[derive(Debug, Clone)]
pub struct Verified {
    pub member: Member,
    pub nonce: String,
    pub timestamp: u64,
}

/// One member's part of a fan-out.
#[derive(Debug)]
pub struct MemberResult {
    pub member: Member,
    pub answer: Result<FederatedAnswer, MemberStatus>,
    pub elapsed: Duration,
}

impl Federation {
    /// Reads and checks the federation configuration; paths in it are
    /// relative to its directory.
    pub fn load(path: &Path) -> Result<Federation, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let f = file.federation;
        if !member_id_ok(&f.member_id) {
            return Err("member_id is 1 to 64 ASCII letters, digits, - or _".into());
        }
        let key = read_key(&dir.join(&f.signing_key_file))?;
        let list_path = dir.join(&f.recognition_list);
        let list_text = std::fs::read_to_string(&list_path)
            .map_err(|e| format!("cannot read {}: {e}", list_path.display()))?;
        let list = RecognitionList::parse(&list_text).map_err(|errors| {
            format!(
                "the federation's list {} is not valid (huren recognition check-list): {}",
                list_path.display(),
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        let mut members = Vec::new();
        for m in file.member {
            if !member_id_ok(&m.id) || m.id == f.member_id {
                return Err(format!(
                    "member {:?}: an ID of 1 to 64 ASCII letters, digits, - or _, not this registry's own",
                    m.id
                ));
            }
            if members.iter().any(|x: &Member| x.id == m.id) {
                return Err(format!("member {} is listed twice", m.id));
            }
            members.push(Member {
                public_key: hex32(&format!("member {} public_key", m.id), &m.public_key)?,
                id: m.id,
                province: m.province,
                url: m.url.trim_end_matches('/').to_string(),
            });
        }
        let deadline = Duration::from_millis(f.deadline_ms.unwrap_or(1000).clamp(10, 30_000));
        Ok(Federation {
            name: f.name,
            member_id: f.member_id,
            province: f.province,
            key,
            members,
            list: Arc::new(list),
            pilot_hospitals: f.pilot_hospitals,
            consent_policy: f.consent_policy.unwrap_or(ConsentPolicy::Holding),
            withheld: f.withheld.unwrap_or(Withheld::Count),
            deadline,
            // One client for the process: its pool keeps a connection to
            // each member alive between queries (no TCP or TLS handshake
            // per fan-out), and TCP_NODELAY (reqwest's default, said
            // here) keeps a request's last segment from waiting for an ACK.
            // Idle connections are let go before the member's server
            // closes them (20 s, `tls::serve`), so none is reused as it
            // closes.
            http: reqwest::Client::builder()
                .connect_timeout(deadline)
                .tcp_nodelay(true)
                .pool_idle_timeout(crate::tls::CLIENT_POOL_IDLE)
                .build()
                .map_err(|e| e.to_string())?,
        })
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Whether a hospital of this province takes part in the pilot.
    pub fn in_pilot(&self, hospital_id: &str) -> bool {
        self.pilot_hospitals.is_empty() || self.pilot_hospitals.iter().any(|h| h == hospital_id)
    }

    /// The signature headers of a request to another member.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let timestamp = unix_now().to_string();
        let nonce = crate::common::random_hex(16);
        let message = signed_message(&self.member_id, method, path, &timestamp, &nonce, body);
        let signature = self.key.sign(&message);
        vec![
            (H_MEMBER, self.member_id.clone()),
            (H_TIMESTAMP, timestamp),
            (H_NONCE, nonce),
            (H_SIGNATURE, hex::encode(signature.as_ref())),
        ]
    }

    /// Checks a member request's signature and clock; the nonce's replay
    /// check is the caller's (it needs the database).
    pub fn verify(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Verified, Refusal> {
        let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
        let claimed = get(H_MEMBER).map(|m| {
            // The claimed name goes into the audit: bounded and printable.
            m.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect::<String>()
        });
        let refuse = |reason| Refusal {
            claimed: claimed.clone(),
            reason,
        };
        let (Some(member_id), Some(timestamp), Some(nonce), Some(signature)) = (
            get(H_MEMBER),
            get(H_TIMESTAMP),
            get(H_NONCE),
            get(H_SIGNATURE),
        ) else {
            return Err(refuse("not a signed member request"));
        };
        let Some(member) = self.member(member_id) else {
            return Err(refuse("not a member of this federation"));
        };
        let ts: u64 = timestamp
            .parse()
            .map_err(|_| refuse("the timestamp is not a number"))?;
        if unix_now().abs_diff(ts) > MAX_SKEW_SECS {
            return Err(refuse("the timestamp is outside the allowed clock skew"));
        }
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refuse("the nonce is not 32 hex digits"));
        }
        let sig = hex::decode(signature).map_err(|_| refuse("the signature is not hex"))?;
        let message = signed_message(member_id, method, path, timestamp, nonce, body);
        UnparsedPublicKey::new(&ED25519, &member.public_key)
            .verify(&message, &sig)
            .map_err(|_| refuse("the signature does not verify with the member's key"))?;
        Ok(Verified {
            member: member.clone(),
            nonce: nonce.to_ascii_lowercase(),
            timestamp: ts,
        })
    }

    /// Sends one signed JSON request to a member.
    async fn call<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        member: &Member,
        path: &str,
        body: &T,
    ) -> Result<R, MemberStatus> {
        let bytes = serde_json::to_vec(body).expect("body serialises");
        let mut request = self
            .http
            .post(format!("{}{path}", member.url))
            .header("content-type", "application/json")
            .body(bytes.clone());
        for (name, value) in self.sign("POST", path, &bytes) {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|error| {
            tracing::warn!(member = %member.id, %error, "federation member not reached");
            MemberStatus::NotReached
        })?;
        match response.status().as_u16() {
            200 | 201 => response.json::<R>().await.map_err(|error| {
                tracing::warn!(member = %member.id, %error, "federation member's answer is not valid");
                MemberStatus::NotReached
            }),
            401 | 403 => Err(MemberStatus::Refused),
            status => {
                tracing::warn!(member = %member.id, status, "federation member answered with an error");
                Err(MemberStatus::NotReached)
            }
        }
    }

    /// Asks every member in parallel; each has the deadline, so the whole
    /// fan-out ends within it whatever a member does.
    pub async fn fan_out(&self, query: &FederatedQuery) -> Vec<MemberResult> {
        let calls = self.members.iter().map(|member| async move {
            let started = Instant::now();
            let answer = match tokio::time::timeout(
                self.deadline,
                self.call::<_, FederatedAnswer>(member, "/v1/federation/priors", query),
            )
            .await
            {
                Ok(Ok(a)) if a.member_id == member.id => Ok(a),
                Ok(Ok(_)) => Err(MemberStatus::NotReached),
                Ok(Err(status)) => Err(status),
                Err(_) => {
                    tracing::warn!(member = %member.id, deadline_ms = self.deadline.as_millis() as u64, "federation member past the deadline");
                    Err(MemberStatus::NotReached)
                }
            };
            let elapsed = started.elapsed();
            crate::metrics::federation_member_called(
                &member.id,
                elapsed,
                !matches!(answer, Err(MemberStatus::NotReached)),
            );
            MemberResult {
                member: member.clone(),
                answer,
                elapsed,
            }
        });
        futures::future::join_all(calls).await
    }

    /// Asks the member that holds a study for a grant, vouching for the
    /// asking hospital.
    pub async fn grant(
        &self,
        member: &Member,
        request: &FederatedGrantRequest,
    ) -> Result<Grant, MemberStatus> {
        match tokio::time::timeout(
            self.deadline * 5,
            self.call::<_, Grant>(member, "/v1/federation/grants", request),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(MemberStatus::NotReached),
        }
    }

    /// Another province's records judged against the federation's list:
    /// an item counts only if the list has it, the holding hospital is
    /// eligible for the asking one under the list's rules, and it is within
    /// the list's window (from the report's date, else the study's, as of
    /// `today`). Items that do not count are removed (the record still
    /// shows on the timeline). Returns the records, as the asking registry
    /// answers them, and how many lost items.
    pub fn judge(
        &self,
        asking: &Hospital,
        patient_key: &str,
        answer: &FederatedAnswer,
        today: chrono::NaiveDate,
    ) -> (Vec<RegistryRecord>, Vec<Hospital>, i64) {
        let mut records = Vec::new();
        let mut hospitals: Vec<Hospital> = Vec::new();
        let mut not_recognised = 0;
        for fr in &answer.records {
            let mut hospital = fr.hospital.clone();
            hospital.province = Some(answer.province.clone());
            let eligible =
                crate::recognition::check::eligible(&self.list, &hospital, asking).is_some();
            let mut record = fr.record.clone();
            let before = record.items.len();
            let from = record
                .report_issued_date
                .as_deref()
                .or(record.study_date.as_deref())
                .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
            record.items.retain(|i| {
                eligible
                    && self.list.item(&i.code).is_some_and(|item| {
                        from.is_some_and(|f| (today - f).num_days() <= item.window_days)
                    })
            });
            if record.items.len() != before {
                not_recognised += 1;
            }
            // The asking province's key for its node; the pseudonym stays
            // between registries.
            record.patient_key = patient_key.to_string();
            record.federation_pseudonym = None;
            records.push(RegistryRecord {
                hospital_id: hospital.hospital_id.clone(),
                published_at: fr.published_at.clone(),
                retracted: false,
                record,
                province: Some(answer.province.clone()),
            });
            if !hospitals
                .iter()
                .any(|h| h.hospital_id == hospital.hospital_id)
            {
                hospitals.push(hospital);
            }
        }
        (records, hospitals, not_recognised)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn federation(dir: &Path, members: &[(&str, &str)]) -> Federation {
        let key = dir.join("self.key");
        if !key.exists() {
            generate_key(&key).unwrap();
        }
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/recognition/jiangsu-example.toml"
            ),
            dir.join("list.toml"),
        )
        .unwrap();
        let mut text = String::from(
            "[federation]\nname = \"test\"\nmember_id = \"self\"\nprovince = \"P\"\n\
             signing_key_file = \"self.key\"\nrecognition_list = \"list.toml\"\n",
        );
        for (id, pk) in members {
            text.push_str(&format!(
                "[[member]]\nid = \"{id}\"\nprovince = \"Q\"\nurl = \"http://127.0.0.1:1\"\npublic_key = \"{pk}\"\n"
            ));
        }
        std::fs::write(dir.join("federation.toml"), text).unwrap();
        Federation::load(&dir.join("federation.toml")).unwrap()
    }

    /// A request signed by a member verifies; any change of method, path,
    /// body or member, or a key the federation does not list, is refused.
    #[test]
    fn signatures() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let a_pub = generate_key(&a.path().join("self.key")).unwrap();
        let fed_b = federation(b.path(), &[("self-a", &a_pub)]);
        // A registry that calls itself "self-a" with A's key.
        let mut fed_a = federation(a.path(), &[]);
        fed_a.member_id = "self-a".into();
        let body = br#"{"x":1}"#;
        let headers = |sig: Vec<(&'static str, String)>| {
            let mut h = HeaderMap::new();
            for (k, v) in sig {
                h.insert(k, v.parse().unwrap());
            }
            h
        };
        let good = headers(fed_a.sign("POST", "/v1/federation/priors", body));
        let v = fed_b
            .verify(&good, "POST", "/v1/federation/priors", body)
            .unwrap();
        assert_eq!(v.member.id, "self-a");
        for (method, path, body) in [
            ("GET", "/v1/federation/priors", &body[..]),
            ("POST", "/v1/federation/grants", &body[..]),
            ("POST", "/v1/federation/priors", &br#"{"x":2}"#[..]),
        ] {
            assert!(fed_b.verify(&good, method, path, body).is_err());
        }
        // An impostor's key under A's name.
        let c = tempfile::tempdir().unwrap();
        let mut fed_c = federation(c.path(), &[]);
        fed_c.member_id = "self-a".into();
        let forged = headers(fed_c.sign("POST", "/v1/federation/priors", body));
        let refusal = fed_b
            .verify(&forged, "POST", "/v1/federation/priors", body)
            .unwrap_err();
        assert_eq!(refusal.claimed.as_deref(), Some("self-a"));
        // A name the federation does not list.
        fed_c.member_id = "stranger".into();
        let stranger = headers(fed_c.sign("POST", "/v1/federation/priors", body));
        assert_eq!(
            fed_b
                .verify(&stranger, "POST", "/v1/federation/priors", body)
                .unwrap_err()
                .reason,
            "not a member of this federation"
        );
        assert!(
            fed_b
                .verify(&HeaderMap::new(), "POST", "/v1/federation/priors", body)
                .is_err()
        );
    }

    /// The federation list's judgement of another province's records, one
    /// case a row: which items survive, and that the province's key and the
    /// pseudonym never reach the node.
    #[test]
    fn judgement_under_the_federation_list() {
        let dir = tempfile::tempdir().unwrap();
        let fed = federation(dir.path(), &[]);
        let today = chrono::NaiveDate::from_ymd_opt(2026, 12, 7).unwrap();
        let hospital = |id: &str, level: Level, qc: QcStatus| Hospital {
            hospital_id: id.into(),
            name: id.into(),
            level,
            groups: vec![],
            accepts_lower_level_results: false,
            qc_status: qc,
            dicomweb_base_url: None,
            province: None,
        };
        let asking = hospital(
            "ASKING",
            Level::parse("三级甲等").unwrap(),
            QcStatus::Passed,
        );
        let top = Level::parse("三级甲等").unwrap();
        let low = Level::parse("二级乙等").unwrap();
        for (case, level, qc, code, reported, kept) in [
            (
                "recognised",
                top,
                QcStatus::Passed,
                "CT-0301-01",
                "2026-12-04",
                true,
            ),
            (
                "not on the list",
                top,
                QcStatus::Passed,
                "XX-0000-01",
                "2026-12-04",
                false,
            ),
            (
                "past the window",
                top,
                QcStatus::Passed,
                "CT-0301-01",
                "2026-10-01",
                false,
            ),
            (
                "ineligible level",
                low,
                QcStatus::Passed,
                "CT-0301-01",
                "2026-12-04",
                false,
            ),
            (
                "QC failed",
                top,
                QcStatus::Failed,
                "CT-0301-01",
                "2026-12-04",
                false,
            ),
        ] {
            let record = StudyRecord {
                study_instance_uid: "1.2.3".into(),
                record_version: 1,
                patient_key: "p".repeat(64),
                items: vec![RecordItem {
                    code: code.into(),
                    laterality: None,
                    confidence: None,
                    evidence: vec![],
                    view_positions: vec![],
                    confirmed_by: None,
                }],
                modalities: vec!["CT".into()],
                body_parts: vec!["CHEST".into()],
                contrast: Contrast::None,
                laterality: vec![],
                view_positions: vec![],
                study_date: Some("2024-03-14".into()),
                study_time: None,
                report_status: ReportStatus::Final,
                report_issued_date: Some(reported.into()),
                qc_status: QcStatus::Passed,
                images_available: true,
                number_of_series: 1,
                number_of_instances: 1,
                bytes: 1,
                content_root: "0".repeat(64),
                federation_pseudonym: Some("p".repeat(64)),
            };
            let answer = FederatedAnswer {
                member_id: "js".into(),
                province: "江苏省".into(),
                access: AccessBasis::Consent,
                records: vec![FederatedRecord {
                    hospital: hospital("HOLDING", level, qc),
                    published_at: "2026-12-04T00:00:00Z".into(),
                    record,
                }],
                withheld_count: 0,
            };
            let (records, hospitals, not_recognised) =
                fed.judge(&asking, &"k".repeat(64), &answer, today);
            assert_eq!(records.len(), 1, "{case}: the record still shows");
            assert_eq!(records[0].record.items.is_empty(), !kept, "{case}");
            assert_eq!(not_recognised, i64::from(!kept), "{case}");
            assert_eq!(records[0].province.as_deref(), Some("江苏省"), "{case}");
            assert_eq!(records[0].record.patient_key, "k".repeat(64), "{case}");
            assert_eq!(records[0].record.federation_pseudonym, None, "{case}");
            assert_eq!(hospitals[0].province.as_deref(), Some("江苏省"), "{case}");
        }
    }
}
