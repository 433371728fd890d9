//! Security regressions (issue 22), one test per hole, each against the
//! real `huren` binary (and a real registry process where a grant is
//! involved), with real clients: reqwest for HTTP, pynetdicom and dcmtk
//! for DICOM. Each test fails on main at b6c0119, before the fixes.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::Digest;

use crate::lifecycle::{Generated, gen_study, rejection_note, uid_root};
use crate::metrics::{Process, spawn, spawn_registry_with, store};
use crate::region::{ADMIN_TOKEN, Api, RID, SECRET, add_hospital, make_study, wait_record};
use crate::support;

/// The operator's API and DICOMweb token of the nodes started here.
const TOKEN: &str = "security-test-operator-token-0001";
const HOSP_A: &str = "HOSPA0000000000001";
const HOSP_B: &str = "HOSPB0000000000002";

/// A node process configured by a TOML file: `top` holds top-level keys;
/// DICOMweb is open or not, and has the operator's token either way.
fn spawn_node(dir: &Path, open: bool, top: &str, envs: &[(&str, &str)]) -> Process {
    let config = dir.join("node.toml");
    let sha = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
    std::fs::write(
        &config,
        format!(
            "{top}\n[dicomweb]\nopen = {open}\n\n[[dicomweb.tokens]]\nname = \"operator\"\n\
             sha256 = \"{sha}\"\nscopes = [\"read\", \"write\"]\n"
        ),
    )
    .unwrap();
    let data = dir.join("data");
    spawn(
        dir,
        &[
            "node",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        envs,
        &["DICOM listening on ", "HTTP listening on "],
    )
}

/// GET with an optional bearer token: (status, JSON body or Null).
async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut rb = reqwest::Client::new()
        .get(url)
        .header("accept", "application/dicom+json");
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let response = rb.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn values(answer: &Value, tag: &str) -> Vec<String> {
    answer
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m[tag]["Value"][0].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Hole 1, first half: on the paths that name a study (or a series), a
/// query parameter for the same attribute is refused, whatever its value,
/// even on a node whose DICOMweb is open; the search stays in the study.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_key_never_replaces_the_uid_of_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_node(dir.path(), true, "", &[]);
    let (dicom, http) = (node.addrs[0], node.addrs[1]);
    let work = tempfile::tempdir().unwrap();
    let mine = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "sec-mine",
        &["--patient-id", "SEC-MINE"],
    );
    let other = make_study(
        work.path(),
        "p2-mr-knee-2025",
        "sec-other",
        &["--patient-id", "SEC-OTHER"],
    );
    store(dicom, &mine.files).await;
    store(dicom, &other.files).await;
    let base = format!(
        "http://{http}/dicom-web/studies/{}",
        mine.study_instance_uid
    );

    let (status, answer) = get(&format!("{base}/series?includefield=PatientID"), None).await;
    assert_eq!(status, 200);
    let series = values(&answer, "0020000E");
    assert_eq!(series.len(), 2, "{answer}");
    assert_eq!(
        values(&answer, "0020000D"),
        vec![mine.study_instance_uid.clone(); 2]
    );

    for widening in [
        "StudyInstanceUID=".to_string(),
        "StudyInstanceUID=*".to_string(),
        "0020000D=*".to_string(),
        format!("StudyInstanceUID={}", other.study_instance_uid),
        format!(
            "StudyInstanceUID={}\\{}",
            mine.study_instance_uid, other.study_instance_uid
        ),
    ] {
        for level in ["series", "instances"] {
            let url = format!("{base}/{level}?{widening}&includefield=PatientName,PatientID");
            let (status, answer) = get(&url, None).await;
            assert_eq!(status, 400, "{url}: {answer}");
            let (status, _) = get(&url, Some(TOKEN)).await;
            assert_eq!(status, 400, "with a token too: {url}");
        }
    }
    let url = format!("{base}/series/{}/instances?SeriesInstanceUID=*", series[0]);
    assert_eq!(get(&url, None).await.0, 400, "{url}");
    // The study-wide search still finds both patients (the node is open).
    let (status, all) = get(&format!("http://{http}/dicom-web/studies"), None).await;
    assert_eq!(status, 200);
    assert_eq!(all.as_array().unwrap().len(), 2);
}

/// Hole 1, second half, and the emergency grant: a registry and node B as
/// processes; node A's hospital asks the registry for grants with its own
/// token. A grant admits searches inside its study only; an emergency
/// grant needs an emergency encounter and a named user, is capped per
/// hospital per hour, and every refusal is in the registry's audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_opens_its_own_study_only_and_break_the_glass_needs_an_emergency() {
    let dir = tempfile::tempdir().unwrap();
    let registry = spawn_registry_with(dir.path(), &["--emergency-grants-per-hour", "2"]);
    let registry_url = format!("http://{}", registry.addrs[0]);
    let admin = Api::new(&registry_url, Some(ADMIN_TOKEN));
    let token_a = add_hospital(&admin, HOSP_A, "三级甲等", None).await;
    // B's DICOMweb URL is only needed by fetching nodes; none fetches here.
    let token_b = add_hospital(&admin, HOSP_B, "二级甲等", None).await;
    let (token_file, secret_file) = (dir.path().join("b.token"), dir.path().join("secret"));
    std::fs::write(&token_file, &token_b).unwrap();
    std::fs::write(&secret_file, SECRET).unwrap();
    let b_dir = dir.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let node_b = spawn_node(
        &b_dir,
        false,
        "",
        &[
            ("HUREN_REGISTRY_URL", registry_url.as_str()),
            ("HUREN_HOSPITAL_ID", HOSP_B),
            ("HUREN_REGISTRY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("HUREN_REGION_SECRET_FILE", secret_file.to_str().unwrap()),
            ("HUREN_IDENTIFIER_ISSUERS", "RESIDENT_ID=RID"),
            ("HUREN_STUDY_QUIET_SECS", "0.3"),
        ],
    );
    let (dicom, http) = (node_b.addrs[0], node_b.addrs[1]);
    let work = tempfile::tempdir().unwrap();
    let granted = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "sec-granted",
        &["--resident-id", RID],
    );
    let other = make_study(
        work.path(),
        "p2-mr-knee-2025",
        "sec-other-patient",
        &["--patient-id", "SEC-OTHER"],
    );
    store(dicom, &granted.files).await;
    store(dicom, &other.files).await;
    wait_record(&admin, HOSP_B, &granted.study_instance_uid, 1).await;

    let reg_a = Api::new(&registry_url, Some(&token_a));
    let ask = |encounter: Option<&'static str>, user: &'static str| {
        let reg_a = reg_a.clone();
        let uid = granted.study_instance_uid.clone();
        async move {
            let mut body = json!({"holding_hospital_id": HOSP_B, "study_instance_uid": uid,
                "purpose": "emergency", "user_id": user});
            if let Some(e) = encounter {
                body["encounter"] = json!(e);
            }
            reg_a.call("POST", "/v1/grants", Some(body)).await
        }
    };
    // Break-the-glass outside an emergency encounter, or by nobody: refused.
    for encounter in [None, Some("outpatient"), Some("inpatient")] {
        let (status, body) = ask(encounter, "dr.zhao").await;
        assert_eq!(status, 403, "{encounter:?}: {body}");
    }
    // Nobody named: not a request the registry takes at all.
    let (status, body) = ask(Some("emergency"), " ").await;
    assert_eq!(status, 400, "{body}");
    // The same rule for a priors query with purpose emergency.
    let (status, body) = reg_a
        .call(
            "POST",
            "/v1/priors/query",
            Some(json!({"patient_key": crate::region::patient_key(RID),
                "purpose": "emergency", "user_id": "dr.zhao", "encounter": "outpatient"})),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    let (status, grant) = ask(Some("emergency"), "dr.zhao").await;
    assert_eq!(status, 201, "{grant}");
    let grant_token = grant["token"].as_str().unwrap().to_string();
    let study_url = format!(
        "http://{http}/dicom-web/studies/{}",
        granted.study_instance_uid
    );
    let (status, answer) = get(&format!("{study_url}/series"), Some(&grant_token)).await;
    assert_eq!(status, 200, "the grant's own study");
    assert!(
        values(&answer, "0020000D")
            .iter()
            .all(|u| u == &granted.study_instance_uid)
    );
    for widening in [
        "StudyInstanceUID=",
        "StudyInstanceUID=*",
        "00200000D=*",
        "StudyInstanceUID=1.2.3",
    ] {
        let url = format!(
            "{study_url}/series?{widening}&includefield=PatientName,PatientID,PatientBirthDate"
        );
        let (status, answer) = get(&url, Some(&grant_token)).await;
        assert_eq!(status, 400, "{url}: {answer}");
        assert!(!answer.to_string().contains("SEC-OTHER"), "{answer}");
    }
    for url in [
        format!("http://{http}/dicom-web/studies?PatientName=*"),
        format!("http://{http}/dicom-web/series"),
        format!(
            "http://{http}/dicom-web/studies/{}/series",
            other.study_instance_uid
        ),
    ] {
        let (status, _) = get(&url, Some(&grant_token)).await;
        assert_eq!(status, 403, "{url}");
    }

    // The cap of two emergency grants an hour for hospital A.
    let (status, _) = ask(Some("emergency"), "dr.qian").await;
    assert_eq!(status, 201);
    let (status, body) = ask(Some("emergency"), "dr.sun").await;
    assert_eq!(status, 403, "past the hourly cap: {body}");

    let audit = admin.call("GET", "/v1/audit?limit=10000", None).await.1;
    let entries = audit["entries"].as_array().unwrap();
    let count = |action: &str, outcome: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == outcome && e["actor"] == HOSP_A)
            .count()
    };
    assert_eq!(count("grant_issue", "refused_emergency"), 3, "{audit}");
    assert_eq!(count("priors_query", "refused_emergency"), 1);
    assert_eq!(count("grant_issue", "break_the_glass"), 2);
    assert_eq!(count("grant_issue", "refused_rate_limit"), 1);
    drop(node_b);
    drop(registry);
}

/// Hole 2: `dicomweb open` opens DICOMweb to a viewer, never the JSON API:
/// without the token, no deletion, no identifier mapping, no consent, no
/// region query, no peer fetch; the study is still there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_dicomweb_leaves_the_api_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_node(dir.path(), true, "", &[]);
    let (dicom, http) = (node.addrs[0], node.addrs[1]);
    let work = tempfile::tempdir().unwrap();
    let study = make_study(
        work.path(),
        "p2-mr-knee-2025",
        "sec-api",
        &["--patient-id", "SEC-API"],
    );
    store(dicom, &study.files).await;
    let uid = &study.study_instance_uid;
    let anonymous = Api::new(&format!("http://{http}"), None);
    let calls: Vec<(&str, String, Option<Value>)> = vec![
        (
            "DELETE",
            format!("/api/v1/studies/{uid}"),
            Some(json!({"reason": "x"})),
        ),
        ("GET", "/api/v1/deletions".into(), None),
        ("GET", "/api/v1/publication".into(), None),
        (
            "POST",
            "/api/v1/patient-identifiers".into(),
            Some(
                json!({"patient_id": "SEC-API", "issuer_of_patient_id": "", "identifier_type": "RID", "identifier": RID}),
            ),
        ),
        (
            "POST",
            "/api/v1/priors".into(),
            Some(
                json!({"patient": {"identifier_type": "RID", "identifier": RID},
                "purpose": "emergency", "encounter": "emergency", "user_id": "x"}),
            ),
        ),
        (
            "POST",
            "/api/v1/consents".into(),
            Some(
                json!({"patient": {"identifier_type": "RID", "identifier": RID}, "method": "qr_code",
                "recorded_by": "x", "state": "granted", "expires_at": "9999-12-31T00:00:00Z"}),
            ),
        ),
        (
            "POST",
            "/api/v1/peer/fetch".into(),
            Some(json!({"hospital_id": HOSP_B, "study_instance_uid": uid,
                "purpose": "emergency", "encounter": "emergency", "user_id": "x"})),
        ),
    ];
    for (method, path, body) in &calls {
        let (status, answer) = anonymous.call(method, path, body.clone()).await;
        assert_eq!(status, 401, "{method} {path}: {answer}");
    }
    let (status, answer) = get(
        &format!("http://{http}/dicom-web/studies/{uid}/series"),
        None,
    )
    .await;
    assert_eq!(status, 200, "DICOMweb stays open: {answer}");
    // With the token the same deletion is done.
    let operator = Api::new(&format!("http://{http}"), Some(TOKEN));
    let (status, answer) = operator
        .call(
            "DELETE",
            &format!("/api/v1/studies/{uid}"),
            Some(json!({"reason": "test"})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    // No match: an empty array (PS3.18 8.3.4.4; once a 204).
    let (status, body) = get(
        &format!("http://{http}/dicom-web/studies/{uid}/series"),
        None,
    )
    .await;
    assert_eq!((status, body), (200, serde_json::json!([])));
}

/// Sends `files` with pynetdicom under `calling_ae_title`; their statuses.
async fn send_as(
    calling_ae_title: &str,
    dicom: std::net::SocketAddr,
    files: &[PathBuf],
) -> Vec<i64> {
    let mut args = vec![
        "send".to_string(),
        dicom.ip().to_string(),
        dicom.port().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let ae = calling_ae_title.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::python_tool_env("dicom_tool.py", &args, &[("CALLING_AE_TITLE", &ae)])
            .iter()
            .map(|l| l["status"].as_i64().expect("a status"))
            .collect()
    })
    .await
    .unwrap()
}

async fn instances(http: std::net::SocketAddr, study: &str) -> Vec<String> {
    let (status, answer) = get(
        &format!("http://{http}/dicom-web/studies/{study}/instances"),
        Some(TOKEN),
    )
    .await;
    assert!(status == 200 || status == 204, "{status}");
    values(&answer, "00080018")
}

/// Hole 3: an IOCM rejection note deletes only when it comes from an AE
/// allowed to reject (by default the AE directory's, when storing is open
/// to all) and names instances of its own patient and study; every refusal
/// is a C-STORE 0124 and a Security Alert in the audit log, and nothing
/// is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_note_deletes_only_its_own_patients_images_from_an_allowed_ae() {
    let dir = tempfile::tempdir().unwrap();
    let audit_log = dir.path().join("audit.log");
    let top = format!(
        "audit_log = \"{}\"\n\n[[remote_ae]]\nae_title = \"PACS\"\nhost = \"127.0.0.1\"\nport = 1\n",
        audit_log.display()
    );
    let node = spawn_node(dir.path(), false, &top, &[]);
    let (dicom, http) = (node.addrs[0], node.addrs[1]);
    let work = tempfile::tempdir().unwrap();
    let study = uid_root();
    let second = uid_root();
    let files = gen_study(work.path(), &study, 1, 3, "20250301");
    let second_files = gen_study(work.path(), &second, 1, 1, "20250302");
    let all: Vec<PathBuf> = files
        .iter()
        .chain(&second_files)
        .map(|g| g.file.clone())
        .collect();
    assert_eq!(send_as("MODALITY", dicom, &all).await, vec![0; 4]);
    assert_eq!(instances(http, &study).await.len(), 3);
    let target: &Generated = &files[0];

    let quality = huren::lifecycle::REJECTED_FOR_QUALITY_REASONS;
    // 1. From an AE that is not allowed to reject (it may store).
    let note = rejection_note(work.path(), quality, &study, &[target]);
    assert_eq!(
        send_as("MODALITY", dicom, std::slice::from_ref(&note)).await,
        vec![0x0124]
    );
    // 2. From the allowed AE, but the note names another patient.
    let foreign = {
        let path = work.path().join("foreign-patient.dcm");
        let line = support::python_tool_env(
            "lifecycle_tool.py",
            &[
                "kos",
                path.to_str().unwrap(),
                quality,
                &study,
                &format!("{}:{}", target.series, target.sop),
            ],
            &[("KOS_PATIENT_ID", "SOMEONE-ELSE")],
        );
        PathBuf::from(line[0]["file"].as_str().unwrap())
    };
    assert_eq!(send_as("PACS", dicom, &[foreign]).await, vec![0x0124]);
    // 3. From the allowed AE, a note of the second study naming an instance
    // of the first.
    let cross = rejection_note(work.path(), quality, &second, &[target]);
    assert_eq!(send_as("PACS", dicom, &[cross]).await, vec![0x0124]);
    assert_eq!(
        instances(http, &study).await.len(),
        3,
        "nothing deleted by a refused note"
    );
    // The refused notes barred nothing: the instance is stored again fine.
    assert_eq!(
        send_as("MODALITY", dicom, std::slice::from_ref(&target.file)).await,
        vec![0]
    );

    // 4. The allowed AE, the note of the instance's own study and patient.
    assert_eq!(send_as("PACS", dicom, &[note]).await, vec![0]);
    let left = instances(http, &study).await;
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&target.sop));
    assert_eq!(
        send_as("MODALITY", dicom, std::slice::from_ref(&target.file)).await,
        vec![0x0124],
        "rejected for quality: refused when sent again"
    );

    // Security Alert, event type Use of Restricted Function (DCM 110132),
    // once per refused note.
    let log = std::fs::read_to_string(&audit_log).unwrap();
    let refused = log.matches("\"110132\"").count();
    assert_eq!(refused, 3, "a Security Alert per refused note:\n{log}");
    drop(node);
}
