//! Recognition end to end: the registry serves the list, nodes pull it and
//! classify what they publish; the duplicate-exam check at hospital A warns
//! of a CT chest held at hospital B (window edges, other modality,
//! emergency), the doctor's decision is recorded and counted at the node
//! and at the registry; without the registry the node answers from its own
//! priors; a study-level C-FIND at A shows the regional prior.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::region::{
    ADMIN_TOKEN, Api, Contract, RID, Recorder, make_study, region_config, spawn_registry,
    start_proxy, store, wait_record, wait_until,
};
use crate::support::{self, Backend, python_tool, repo_path};

const HOSP_A: &str = "HOSPA0000000000001";
const HOSP_B: &str = "HOSPB0000000000002";

fn shanghai_today() -> chrono::NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive()
}

fn ymd(d: chrono::NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_exam_warning_end_to_end() {
    let registry = spawn_registry(Backend::SqliteLocal).await;
    // Every exchange goes through recording proxies and is checked against
    // proto/ at the end.
    let recorder = Recorder::default();
    let reg_url = start_proxy(registry.url(), recorder.clone(), true).await;
    let admin = Api::new(&reg_url, Some(ADMIN_TOKEN));
    let list_text =
        std::fs::read_to_string(repo_path("deploy/recognition/jiangsu-example.toml")).unwrap();

    // An invalid list is refused with its errors; the valid one activates.
    let (status, problem) = admin
        .call_text(
            "PUT",
            "/v1/recognition-list",
            &list_text.replacen("window_days = 30", "window_days = 0", 1),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("window_days"),
        "{problem}"
    );
    let (status, activated) = admin
        .call_text("PUT", "/v1/recognition-list", &list_text)
        .await;
    assert_eq!(status, 200, "{activated}");
    let hash = activated["content_hash"].as_str().unwrap().to_string();
    let (status, _) = admin
        .call_text("PUT", "/v1/recognition-list", "[list]\nversion = 1\n")
        .await;
    assert_eq!(status, 400);

    let mut tokens = Vec::new();
    for (id, level) in [(HOSP_A, "三级甲等"), (HOSP_B, "二级甲等")] {
        let (status, v) = admin
            .call(
                "POST",
                "/v1/hospitals",
                Some(json!({"hospital_id": id, "name": format!("医院{id}"), "level": level})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        tokens.push(v["token"].as_str().unwrap().to_string());
    }
    let (token_a, token_b) = (tokens[0].clone(), tokens[1].clone());
    let url = reg_url.clone();
    let node_b = support::spawn_node_with(Backend::SqliteLocal, {
        let (url, token_b) = (url.clone(), token_b.clone());
        move |c| {
            c.dicomweb.open = true;
            c.region = Some(region_config(&url, HOSP_B, &token_b));
        }
    })
    .await;
    let node_a = support::spawn_node_with(Backend::SqliteLocal, {
        let (url, token_a) = (url.clone(), token_a.clone());
        move |c| {
            c.dicomweb.open = true;
            let mut region = region_config(&url, HOSP_A, &token_a);
            region.cfind_regional_priors = true;
            c.region = Some(region);
        }
    })
    .await;
    let api_a = Api::new(
        &start_proxy(
            format!("http://{}", node_a.http_addr),
            recorder.clone(),
            false,
        )
        .await,
        Some(crate::support::NODE_API_TOKEN),
    );
    let api_b = Api::new(
        &start_proxy(
            format!("http://{}", node_b.http_addr),
            recorder.clone(),
            false,
        )
        .await,
        Some(crate::support::NODE_API_TOKEN),
    );
    for api in [&api_a, &api_b] {
        wait_until("node pulled the list", || {
            let api = api.clone();
            let hash = hash.clone();
            async move {
                let (status, v) = api.call("GET", "/api/v1/recognition/list", None).await;
                status == 200 && v["content_hash"] == hash.as_str()
            }
        })
        .await;
    }

    // A CT chest (plain + enhanced) at B, reported three days ago, QC passed.
    let work = tempfile::tempdir().unwrap();
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "rec-ct",
        &["--resident-id", RID],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    let report_date = shanghai_today() - chrono::Duration::days(3);
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final", "report_issued_date": ymd(report_date)})),
        )
        .await;
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    let reg_b = Api::new(&reg_url, Some(&token_b));
    wait_until("classified, reported, QC-passed record", || {
        let reg_b = reg_b.clone();
        let uid = uid.clone();
        async move {
            let r = wait_record(&reg_b, HOSP_B, &uid, 1).await;
            r["record"]["qc_status"] == "passed" && r["record"]["report_status"] == "final"
        }
    })
    .await;
    let rec = wait_record(&reg_b, HOSP_B, &uid, 1).await;
    // One item, certain, with the attributes it rests on (names only: the
    // free text stays at the hospital).
    let items = rec["record"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{rec}");
    assert_eq!(items[0]["code"], "CT-0301-03", "{rec}");
    assert_eq!(items[0]["confidence"], "certain", "{rec}");
    for attribute in ["BodyPartExamined", "ContrastBolusAgent", "StudyDescription"] {
        assert!(
            items[0]["evidence"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == attribute),
            "{attribute}: {rec}"
        );
    }
    assert_eq!(rec["record"]["contrast"], "plain_and_enhanced");

    // Consent for A; then A's check for a plain chest CT warns.
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    api_a
        .ok("POST", "/api/v1/consents", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "method": "qr_code", "recorded_by": "dr.zhao", "state": "granted", "expires_at": tomorrow})))
        .await;
    let check = |order: Value, encounter: &'static str, as_of: Option<String>| {
        let api_a = api_a.clone();
        async move {
            let mut body = json!({
                "patient": {"identifier_type": "RID", "identifier": RID},
                "order": order, "ordering_doctor": "dr.zhao", "encounter": encounter,
            });
            if let Some(d) = as_of {
                body["as_of"] = json!(d);
            }
            api_a
                .ok("POST", "/api/v1/recognition/check", Some(body))
                .await
        }
    };
    // as_of is the same Asia/Shanghai date the report date was computed
    // from: the test cannot flip when the Shanghai date turns (16:00 UTC).
    let as_of = report_date + chrono::Duration::days(3);
    let warn = check(
        json!({"item_code": "CT-0301-01"}),
        "outpatient",
        Some(ymd(as_of)),
    )
    .await;
    assert_eq!(warn["outcome"], "warn", "{warn}");
    assert_eq!(warn["registry_reached"], true);
    assert_eq!(warn["list_version"], hash.as_str());
    let cited = &warn["cited"];
    assert_eq!(cited["hospital_id"], HOSP_B);
    assert_eq!(cited["hospital_level"], "二级甲等");
    assert_eq!(cited["study_instance_uid"], uid.as_str());
    // Two dates, named: days ago from the study date (the exam was done in
    // 2024), the window from the report date.
    let study_date =
        chrono::NaiveDate::parse_from_str(cited["study_date"].as_str().unwrap(), "%Y-%m-%d")
            .unwrap();
    assert_eq!(
        cited["days_ago"],
        (as_of - study_date).num_days(),
        "{cited}"
    );
    assert_eq!(cited["days_since_window_from"], 3, "{cited}");
    assert_eq!(cited["window_from"], ymd(report_date).as_str());
    assert_eq!(cited["window_days"], 30);
    assert_eq!(cited["window_basis"], "report_issued_date");
    assert_eq!(cited["item_code"], "CT-0301-03");
    assert_eq!(cited["mark"], "苏HR");
    assert_eq!(cited["images_available"], true);
    assert!(
        cited["eligibility"].as_str().unwrap().contains("二级甲等"),
        "{cited}"
    );
    // What the match rests on, for the doctor to judge: the report's
    // state, what the study is made of, the item's confidence and the
    // attributes it rests on (names, never values).
    assert_eq!(cited["report_status"], "final", "{cited}");
    assert!(
        cited["number_of_instances"].as_i64().unwrap() > 2,
        "{cited}"
    );
    assert!(cited["number_of_series"].as_i64().unwrap() >= 1, "{cited}");
    assert_eq!(cited["confidence"], "certain", "{cited}");
    let evidence: Vec<&str> = cited["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(evidence.contains(&"Modality"), "{cited}");
    assert_eq!(warn["links"][&uid], format!("/ui/studies/{uid}/images"));
    // By attributes instead of an item code.
    let by_attrs = check(
        json!({"modality": "CT", "body_part": "CHEST", "contrast": "enhanced"}),
        "inpatient",
        None,
    )
    .await;
    assert_eq!(by_attrs["outcome"], "warn");
    assert_eq!(by_attrs["ordered_item"]["code"], "CT-0301-02");
    // Window edges: W days after the report is in, W+1 out.
    let edge = check(
        json!({"item_code": "CT-0301-01"}),
        "outpatient",
        Some(ymd(report_date + chrono::Duration::days(30))),
    )
    .await;
    assert_eq!(edge["outcome"], "warn");
    let out = check(
        json!({"item_code": "CT-0301-01"}),
        "outpatient",
        Some(ymd(report_date + chrono::Duration::days(31))),
    )
    .await;
    assert_eq!(out["outcome"], "no_warn");
    assert_eq!(out["not_counted"][0]["reason"], "out_of_window");
    // Another modality: no warning, the reason given.
    let mr = check(json!({"item_code": "MR-0101-01"}), "outpatient", None).await;
    assert_eq!(mr["outcome"], "no_warn");
    assert_eq!(mr["not_counted"][0]["reason"], "different_modality");
    // Emergency: shown, not warned.
    let er = check(json!({"item_code": "CT-0301-01"}), "emergency", None).await;
    assert_eq!(er["outcome"], "info");
    assert!(
        er["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("emergency_info_only"))
    );
    // An invalid ID: identity unverified, never an error.
    let (code, bad) = api_a
        .call("POST", "/api/v1/recognition/check", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": "110105194912310021"},
            "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr.zhao", "encounter": "outpatient"})))
        .await;
    assert_eq!(code, 200, "{bad}");
    assert_eq!(bad["reasons"], json!(["identity_unverified"]));
    let (code, _) = api_a
        .call("POST", "/api/v1/recognition/check", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "order": {"item_code": "NOPE"}, "ordering_doctor": "dr.zhao", "encounter": "outpatient"})))
        .await;
    assert_eq!(code, 400);
    // A user name the registry would refuse is the caller's error here
    // (400 naming the field), not the registry's refusal passed on (502).
    for (path, body) in [
        (
            "/api/v1/recognition/check",
            json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr\nzhao", "encounter": "outpatient"}),
        ),
        (
            "/api/v1/priors",
            json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "purpose": "treatment", "user_id": ""}),
        ),
        (
            "/api/v1/peer/fetch",
            json!({
            "hospital_id": "HOSPB", "study_instance_uid": "1.2.3", "purpose": "treatment",
            "user_id": "x".repeat(129)}),
        ),
    ] {
        let (code, refused) = api_a.call("POST", path, Some(body)).await;
        assert_eq!(code, 400, "{path}: {refused}");
        assert!(
            refused["detail"]
                .as_str()
                .unwrap()
                .contains("printable text"),
            "{path}: {refused}"
        );
    }

    // The decision: repeated for reason 01; a second decision is refused.
    let decided = api_a
        .ok(
            "POST",
            "/api/v1/recognition/decisions",
            Some(json!({
            "check_id": warn["check_id"], "decision": "repeated", "reason_code": "01",
            "free_text": "病情变化，需复查", "doctor": "dr.zhao"})),
        )
        .await;
    assert_eq!(decided["non_recognition"], true);
    let (code, _) = api_a
        .call(
            "POST",
            "/api/v1/recognition/decisions",
            Some(json!({
            "check_id": warn["check_id"], "decision": "accepted", "doctor": "dr.zhao"})),
        )
        .await;
    assert_eq!(code, 400);
    let (code, _) = api_a
        .call("POST", "/api/v1/recognition/decisions", Some(json!({
            "check_id": by_attrs["check_id"], "decision": "repeated", "reason_code": "77", "doctor": "dr.zhao"})))
        .await;
    assert_eq!(code, 400);
    // A check that gave no warning (no prior, or an emergency's info) has
    // nothing to decide: neither decision is recorded or counted.
    for (check, decision) in [(&out, "accepted"), (&er, "repeated")] {
        let (code, refused) = api_a
            .call(
                "POST",
                "/api/v1/recognition/decisions",
                Some(json!({
                "check_id": check["check_id"], "decision": decision, "reason_code": "01",
                "doctor": "dr.zhao"})),
            )
            .await;
        assert_eq!(code, 400, "{refused}");
        assert!(
            refused["detail"].as_str().unwrap().contains("no warning"),
            "{refused}"
        );
    }
    api_a
        .ok(
            "POST",
            "/api/v1/recognition/decisions",
            Some(json!({
            "check_id": by_attrs["check_id"], "decision": "accepted", "doctor": "dr.zhao"})),
        )
        .await;
    let month = shanghai_today().format("%Y-%m").to_string();
    let stats = api_a
        .ok(
            "GET",
            &format!("/api/v1/recognition/statistics?month={month}"),
            None,
        )
        .await;
    let row = |stats: &Value, item: &str| {
        stats["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["item_code"] == item)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let plain = row(&stats, "CT-0301-01");
    assert_eq!(plain["warnings"], 2, "{stats}"); // outpatient and the W edge; not W+1, not emergency
    assert_eq!(plain["repeated"], 1);
    assert_eq!(plain["repeated_by_reason"]["01"], 1);
    assert_eq!(row(&stats, "CT-0301-02")["accepted"], 1);
    // The registry counts them once the outbox delivered them.
    wait_until("registry statistics", || {
        let admin = admin.clone();
        let month = month.clone();
        async move {
            let s = admin
                .ok(
                    "GET",
                    &format!("/v1/recognition/statistics?month={month}"),
                    None,
                )
                .await;
            let r = s["rows"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["item_code"] == "CT-0301-01")
                .cloned();
            r.is_some_and(|r| {
                r["warnings"] == 2
                    && r["repeated"] == 1
                    && r["non_recognition"] == 1
                    && r["hospital_id"] == HOSP_A
            })
        }
    })
    .await;

    // A study-level C-FIND at A for its local patient ID shows B's prior.
    api_a
        .ok(
            "POST",
            "/api/v1/patient-identifiers",
            Some(json!({"patient_id": "A-000123", "identifier_type": "RID", "identifier": RID})),
        )
        .await;
    let out = tempfile::tempdir().unwrap();
    let output = Command::new("/usr/bin/findscu")
        .env("TCP_NODELAY", "1")
        .args(["-S", "-X", "-od"])
        .arg(out.path())
        .args([
            "-aec",
            "HUREN",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=A-000123",
            "-k",
            "StudyInstanceUID",
            "-k",
            "StudyDate",
            "-k",
            "ModalitiesInStudy",
            "-k",
            "StudyDescription",
            "-k",
            "NumberOfStudyRelatedInstances",
        ])
        .arg(node_a.host())
        .arg(node_a.port().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", support::text(&output));
    let found = python_tool("qr_tool.py", &["dump", out.path().to_str().unwrap()]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["StudyInstanceUID"], uid.as_str());
    assert_eq!(found[0]["InstitutionName"], format!("医院{HOSP_B}"));
    assert_eq!(found[0]["RetrieveAETitle"], "HUREN");
    assert_eq!(found[0]["ModalitiesInStudy"], "CT");
    assert_eq!(found[0]["NumberOfStudyRelatedInstances"], "12");
    assert!(
        found[0]["StudyDescription"]
            .as_str()
            .unwrap()
            .contains("苏HR"),
        "{found:?}"
    );

    // The contract of the recognition operations.
    Contract::load().check_all(&recorder.all(), &["recognition", "node-recognition"]);

    // The registry down: B's own check answers from B's priors.
    let (_, _dir, _db) = registry.stop().await;
    let degraded = api_b
        .ok("POST", "/api/v1/recognition/check", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr.qian", "encounter": "outpatient"})))
        .await;
    assert_eq!(degraded["registry_reached"], false, "{degraded}");
    assert_eq!(degraded["outcome"], "warn");
    assert_eq!(degraded["cited"]["hospital_id"], HOSP_B);
    assert_eq!(degraded["cited"]["eligibility"], "同一医院 (same hospital)");
    node_a.stop().await;
    node_b.stop().await;
}

/// Issue 17 sections 2 and 3 through a registry and two nodes: a study
/// classified `needs_confirmation` at B gives no warning at A; B's
/// radiologist confirms it through B's API (the page does the same in
/// tests/page.rs) and the record comes back with `confirmed_by` and a new
/// version; A then warns citing it, with days ago from the study date and
/// the window from the report date. Images marked unavailable at B stop
/// the warning (images_unavailable). A PET-CT prior is another modality
/// for a chest CT order, not a CT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_at_the_source_end_to_end() {
    let registry = spawn_registry(Backend::SqliteLocal).await;
    let recorder = Recorder::default();
    let reg_url = start_proxy(registry.url(), recorder.clone(), true).await;
    let admin = Api::new(&reg_url, Some(ADMIN_TOKEN));
    let list_text =
        std::fs::read_to_string(repo_path("deploy/recognition/jiangsu-example.toml")).unwrap();
    let (status, activated) = admin
        .call_text("PUT", "/v1/recognition-list", &list_text)
        .await;
    assert_eq!(status, 200, "{activated}");
    let hash = activated["content_hash"].as_str().unwrap().to_string();
    let mut tokens = Vec::new();
    for (id, level) in [(HOSP_A, "三级甲等"), (HOSP_B, "二级甲等")] {
        let (status, v) = admin
            .call(
                "POST",
                "/v1/hospitals",
                Some(json!({"hospital_id": id, "name": format!("医院{id}"), "level": level})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        tokens.push(v["token"].as_str().unwrap().to_string());
    }
    let mut nodes = Vec::new();
    let mut apis = Vec::new();
    for (id, token) in [(HOSP_A, &tokens[0]), (HOSP_B, &tokens[1])] {
        let (url, id, token) = (reg_url.clone(), id.to_string(), token.clone());
        let node = support::spawn_node_with(Backend::SqliteLocal, move |c| {
            c.dicomweb.open = true;
            c.region = Some(region_config(&url, &id, &token));
        })
        .await;
        let api = Api::new(
            &start_proxy(
                format!("http://{}", node.http_addr),
                recorder.clone(),
                false,
            )
            .await,
            Some(crate::support::NODE_API_TOKEN),
        );
        wait_until("node pulled the list", || {
            let (api, hash) = (api.clone(), hash.clone());
            async move {
                let (status, v) = api.call("GET", "/api/v1/recognition/list", None).await;
                status == 200 && v["content_hash"] == hash.as_str()
            }
        })
        .await;
        nodes.push(node);
        apis.push(api);
    }
    let (api_a, api_b) = (apis[0].clone(), apis[1].clone());
    let reg_b = Api::new(&reg_url, Some(&tokens[1]));

    // One Asia/Shanghai date for the whole test, passed as as_of: nothing
    // flips when the Shanghai date turns during the run.
    let as_of = shanghai_today();
    let report_date = as_of - chrono::Duration::days(3);
    let work = tempfile::tempdir().unwrap();
    // A chest CT whose BodyPartExamined says HEAD (left over from the
    // previous patient): the descriptions say chest, the classifier is not
    // sure (needs_confirmation).
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "confirm-ct",
        &["--resident-id", RID, "--set", "BodyPartExamined=HEAD"],
    );
    // A PET-CT: the chest CT's series as the attenuation CT of a PET study,
    // and a PT series.
    let pet = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "confirm-pet",
        &[
            "--resident-id",
            RID,
            "--set",
            "StudyDescription=PET/CT 全身显像",
            "--set",
            "SeriesDescription=CTAC",
        ],
    );
    let pet_pt = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "confirm-pet-pt",
        &[
            "--resident-id",
            RID,
            "--study-uid",
            &pet.study_instance_uid,
            "--limit",
            "4",
            "--set",
            "Modality=PT",
            "--set",
            "StudyDescription=PET/CT 全身显像",
            "--set",
            "SeriesDescription=PET WB",
            "--set",
            "BodyPartExamined=WHOLEBODY",
            "--set",
            "ContrastBolusAgent=",
        ],
    );
    let mut files = ct.files.clone();
    files.extend(pet.files.iter().cloned());
    files.extend(pet_pt.files.iter().cloned());
    store(&nodes[1], &files).await;
    for uid in [&ct.study_instance_uid, &pet.study_instance_uid] {
        api_b
            .ok(
                "PUT",
                &format!("/api/v1/studies/{uid}/report"),
                Some(json!({"report_status": "final", "report_issued_date": ymd(report_date)})),
            )
            .await;
        api_b
            .ok(
                "PUT",
                &format!("/api/v1/studies/{uid}/qc"),
                Some(json!({"qc_status": "passed"})),
            )
            .await;
    }
    let uid = ct.study_instance_uid.clone();
    let before = reported_record(&reg_b, &uid).await;
    assert_eq!(
        before["record"]["items"][0]["code"], "CT-0301-03",
        "{before}"
    );
    assert_eq!(
        before["record"]["items"][0]["confidence"], "needs_confirmation",
        "{before}"
    );
    reported_record(&reg_b, &pet.study_instance_uid).await;

    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    api_a
        .ok("POST", "/api/v1/consents", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "method": "qr_code", "recorded_by": "dr.zhao", "state": "granted", "expires_at": tomorrow})))
        .await;
    let check = || {
        let api_a = api_a.clone();
        async move {
            api_a
                .ok(
                    "POST",
                    "/api/v1/recognition/check",
                    Some(json!({
                        "patient": {"identifier_type": "RID", "identifier": RID},
                        "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr.zhao",
                        "encounter": "outpatient", "as_of": ymd(as_of),
                    })),
                )
                .await
        }
    };
    let reason_of = |answer: &Value, uid: &str| {
        answer["not_counted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["study_instance_uid"] == uid)
            .map(|p| p["reason"].clone())
            .unwrap_or(Value::Null)
    };
    // Unconfirmed: no warning, shown with why. The PET-CT is another
    // modality, never a CT warning nor a different region.
    let first = check().await;
    assert_eq!(first["outcome"], "no_warn", "{first}");
    assert_eq!(reason_of(&first, &uid), "needs_confirmation", "{first}");
    assert_eq!(
        reason_of(&first, &pet.study_instance_uid),
        "different_modality",
        "{first}"
    );

    // B's radiologist sees the classifier's items with their evidence
    // (values included: the hospital's own) and confirms them.
    let seen = api_b
        .ok("GET", &format!("/api/v1/studies/{uid}/recognition"), None)
        .await;
    let item = &seen["classification"]["items"][0];
    assert_eq!(item["code"], "CT-0301-03", "{seen}");
    assert_eq!(item["confidence"], "needs_confirmation");
    assert!(
        item["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["attribute"] == "BodyPartExamined" && e["value"] == "HEAD")
            || item["doubts"].to_string().contains("body_part"),
        "{seen}"
    );
    assert!(seen["confirmation"].is_null());
    // Refused: an item not in the list; a side on an item without one.
    let (status, _) = api_b
        .call(
            "PUT",
            &format!("/api/v1/studies/{uid}/confirmation"),
            Some(json!({"role": "radiologist", "user_id": "rad.sun", "items": [{"code": "NOPE"}]})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = api_b
        .call(
            "PUT",
            &format!("/api/v1/studies/{uid}/confirmation"),
            Some(json!({"role": "radiologist", "user_id": "rad.sun",
                        "items": [{"code": "CT-0301-03", "laterality": "L"}]})),
        )
        .await;
    assert_eq!(status, 400);
    let confirmed = api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/confirmation"),
            Some(json!({"role": "radiologist", "user_id": "rad.sun",
                        "items": [{"code": "CT-0301-03"}]})),
        )
        .await;
    assert_eq!(confirmed["confirmation"]["corrected"], false, "{confirmed}");
    let version = before["record"]["record_version"].as_i64().unwrap();
    let after = wait_record(&reg_b, HOSP_B, &uid, version + 1).await;
    let items = &after["record"]["items"];
    assert_eq!(items[0]["code"], "CT-0301-03", "{after}");
    assert_eq!(items[0]["confidence"], "certain", "{after}");
    assert_eq!(items[0]["confirmed_by"], "radiologist", "{after}");
    assert!(
        !after.to_string().contains("rad.sun"),
        "the registry sees a role, never a name: {after}"
    );

    // A now warns, citing it; the two dates named.
    let warn = check().await;
    assert_eq!(warn["outcome"], "warn", "{warn}");
    let cited = &warn["cited"];
    assert_eq!(cited["study_instance_uid"], uid.as_str());
    assert_eq!(cited["study_date"], "2024-03-14");
    let study_date = chrono::NaiveDate::from_ymd_opt(2024, 3, 14).unwrap();
    assert_eq!(
        cited["days_ago"],
        (as_of - study_date).num_days(),
        "{cited}"
    );
    assert_eq!(cited["days_since_window_from"], 3, "{cited}");
    assert_eq!(cited["window_basis"], "report_issued_date");
    assert_eq!(
        reason_of(&warn, &pet.study_instance_uid),
        "different_modality"
    );

    // A correction is counted per hospital: the PET-CT corrected to no item.
    let corrected = api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{}/confirmation", pet.study_instance_uid),
            Some(json!({"role": "technologist", "user_id": "tech.wu", "items": []})),
        )
        .await;
    assert_eq!(corrected["confirmation"]["corrected"], true, "{corrected}");
    let counts = api_b
        .ok("GET", "/api/v1/recognition/confirmations", None)
        .await;
    assert_eq!(counts["confirmed"], 1, "{counts}");
    assert_eq!(counts["corrected"], 1, "{counts}");
    assert_eq!(counts["hospital_id"], HOSP_B);
    // The region sees them too: B's node reports them to the registry,
    // whose statistics count them per hospital and item.
    wait_until(
        "the registry counts B's confirmation and correction",
        || {
            let admin = admin.clone();
            async move {
                let (status, stats) = admin
                    .call(
                        "GET",
                        &format!("/v1/recognition/statistics?hospital_id={HOSP_B}"),
                        None,
                    )
                    .await;
                let sum = |k: &str| -> i64 {
                    stats["rows"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| r[k].as_i64().unwrap_or(0))
                        .sum()
                };
                status == 200 && sum("confirmed") == 1 && sum("corrected") == 1
            }
        },
    )
    .await;

    // The images cannot be retrieved any more: B says so, A stops warning.
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/images-available"),
            Some(json!({"images_available": false, "reason": "archive media unreadable"})),
        )
        .await;
    let version = after["record"]["record_version"].as_i64().unwrap();
    let gone = wait_record(&reg_b, HOSP_B, &uid, version + 1).await;
    assert_eq!(gone["record"]["images_available"], false, "{gone}");
    let no_images = check().await;
    assert_eq!(no_images["outcome"], "no_warn", "{no_images}");
    assert_eq!(reason_of(&no_images, &uid), "images_unavailable");
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/images-available"),
            Some(json!({"images_available": true})),
        )
        .await;
    wait_record(&reg_b, HOSP_B, &uid, version + 2).await;
    assert_eq!(check().await["outcome"], "warn");

    // A cannot retrieve the prior (B's node is in no directory entry
    // yet): A's check stops warning on it, whatever B published; once A's
    // fetch succeeds, it warns again.
    let fetch = json!({"hospital_id": HOSP_B, "study_instance_uid": uid,
                       "purpose": "treatment", "user_id": "dr.li"});
    let (status, failed) = api_a
        .call("POST", "/api/v1/peer/fetch", Some(fetch.clone()))
        .await;
    assert_eq!(status, 400, "{failed}");
    let unreachable = check().await;
    assert_eq!(unreachable["outcome"], "no_warn", "{unreachable}");
    assert_eq!(reason_of(&unreachable, &uid), "images_unavailable");
    admin
        .ok(
            "PATCH",
            &format!("/v1/hospitals/{HOSP_B}"),
            Some(json!({"dicomweb_base_url": format!("http://{}/dicom-web", nodes[1].http_addr)})),
        )
        .await;
    wait_until("A fetched the prior from B", || {
        let (api_a, fetch) = (api_a.clone(), fetch.clone());
        async move {
            let (status, _) = api_a.call("POST", "/api/v1/peer/fetch", Some(fetch)).await;
            status == 200
        }
    })
    .await;
    assert_eq!(check().await["outcome"], "warn");

    Contract::load().check_all(&recorder.all(), &["node-confirmation"]);
    for node in nodes {
        node.stop().await;
    }
}

/// B's record of `uid` at the registry once it carries the final report and
/// the passed QC.
async fn reported_record(reg_b: &Api, uid: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = crate::region::record_at(reg_b, HOSP_B, uid).await
            && r["record"]["qc_status"] == "passed"
            && r["record"]["report_status"] == "final"
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the reported record {uid}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
