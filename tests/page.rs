//! The doctor's page (/ui) in a real browser: a registry, hospital A
//! (三级甲等) and hospital B (二级甲等); a chest CT at B, reported and
//! QC-passed; the patient's consent for A; a doctor at A signs in, finds the
//! patient, sees B's exam on the timeline, checks an order for a plain chest
//! CT, gets the warning citing B, and repeats the exam for reason 01.
//! tests/support/page_test.py drives Debian's chromium through Playwright;
//! this test then checks what the node recorded, the CSRF refusal and the
//! login redirect.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Connection;

use crate::region::{
    ADMIN_TOKEN, Api, RID, make_study, patient_key, spawn_region_node, spawn_registry, store,
    wait_until,
};
use crate::support::{self, Backend, repo_path};

const HOSPITAL_A: &str = "HOSPA0000000000001";
const HOSPITAL_B: &str = "HOSPB0000000000002";
const NAME_A: &str = "江苏省人民医院（测试）";
const NAME_B: &str = "南京市第二医院（测试）";
const DOCTOR: &str = "dr.wang";
const PASSWORD: &str = "correct-horse-battery";
/// 胸部CT平扫 in deploy/recognition/jiangsu-example.toml.
const CT_CHEST_PLAIN: &str = "CT-0301-01";

support::on_both_backends!(doctor_page);

/// recognition_check: outcome, decision, reason_code, user_id, patient_key.
type CheckRow = (
    String,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

/// A hospital with a name of its own (the page shows it).
pub async fn add_named_hospital(admin: &Api, id: &str, name: &str, level: &str) -> String {
    let (status, v) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(json!({"hospital_id": id, "name": name, "level": level})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// The region both page tests run in: a registry with the shipped list
/// active, hospitals A and B, a node for each that has pulled the list and
/// the directory, and the operator's API of each node.
struct PageRegion {
    registry: crate::region::TestRegistry,
    token_b: String,
    node_a: crate::support::TestNode,
    node_b: crate::support::TestNode,
    api_a: Api,
    api_b: Api,
}

async fn spawn_page_region(backend: Backend) -> PageRegion {
    let registry = spawn_registry(backend).await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let token_a = add_named_hospital(&admin, HOSPITAL_A, NAME_A, "三级甲等").await;
    let token_b = add_named_hospital(&admin, HOSPITAL_B, NAME_B, "二级甲等").await;
    let list =
        std::fs::read_to_string(repo_path("deploy/recognition/jiangsu-example.toml")).unwrap();
    let (status, body) = admin.call_text("PUT", "/v1/recognition-list", &list).await;
    assert_eq!(status, 200, "{body}");
    let node_b = spawn_region_node(backend, &registry.url(), HOSPITAL_B, &token_b).await;
    let node_a = spawn_region_node(backend, &registry.url(), HOSPITAL_A, &token_a).await;
    let api = |node: &crate::support::TestNode| {
        Api::new(
            &format!("http://{}", node.http_addr),
            Some(crate::support::NODE_API_TOKEN),
        )
    };
    let (api_a, api_b) = (api(&node_a), api(&node_b));
    for api in [&api_a, &api_b] {
        wait_until("list and directory pulled", || {
            let api = api.clone();
            async move {
                let (status, _) = api.call("GET", "/api/v1/recognition/list", None).await;
                let p = api.ok("GET", "/api/v1/publication", None).await;
                status == 200 && p["hospitals_in_directory"] == 2
            }
        })
        .await;
    }
    PageRegion {
        registry,
        token_b,
        node_a,
        node_b,
        api_a,
        api_b,
    }
}

/// `name=value` of the first Set-Cookie header setting `name`.
pub fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_string())
}

/// The value of the first hidden `csrf` field of a page.
pub fn csrf_field(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[start..].split('"').next().unwrap().to_string()
}

pub fn form_body(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Signs in with plain HTTP; returns the status, the session cookie
/// (`name=value`), every Set-Cookie and the body.
pub async fn sign_in(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
) -> (u16, Option<String>, String, String) {
    let r = http.get(format!("{base}/ui/login")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let login_cookie = set_cookie(&r, "huren_login_csrf").expect("login CSRF cookie");
    let csrf = csrf_field(&r.text().await.unwrap());
    let r = http
        .post(format!("{base}/ui/login"))
        .header("cookie", login_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", &csrf),
            ("user_id", user),
            ("password", password),
        ]))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let session = set_cookie(&r, "huren_session");
    let set = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("\n");
    (status, session, set, r.text().await.unwrap())
}

fn run_browser(base: &str, screenshots: Option<String>) -> Vec<Value> {
    let mut cmd = Command::new(support::env("HUREN_TEST_PYTHON"));
    cmd.arg(repo_path("tests/support/page_test.py"))
        .args(["--base", base, "--user", DOCTOR, "--rid", RID])
        .args(["--item", CT_CHEST_PLAIN, "--hospital", NAME_B])
        .env("HUREN_PAGE_PASSWORD", PASSWORD)
        .stdin(Stdio::null());
    match screenshots {
        Some(dir) => cmd.env("HUREN_SCREENSHOTS", dir),
        None => cmd.env_remove("HUREN_SCREENSHOTS"),
    };
    let out = cmd.output().expect("run page_test.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "page_test.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {lines:#?}"))
}

async fn doctor_page(backend: Backend) {
    let PageRegion {
        registry,
        token_b,
        node_a,
        node_b,
        api_a,
        api_b,
    } = spawn_page_region(backend).await;
    let work = tempfile::tempdir().unwrap();

    // A chest CT at B (plain and enhanced series), reported today, QC passed.
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-b",
        &["--resident-id", RID],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    wait_until("study indexed at B", || {
        let api_b = api_b.clone();
        let uid = uid.clone();
        async move {
            api_b
                .call("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
                .await
                .0
                == 200
        }
    })
    .await;
    let today = huren::recognition::check::today_in_shanghai()
        .format("%Y-%m-%d")
        .to_string();
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final", "report_issued_date": today})),
        )
        .await;
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    let reg_b = Api::new(&registry.url(), Some(&token_b));
    wait_until("B's record classified, reported and QC-passed", || {
        let (reg_b, uid, today) = (reg_b.clone(), uid.clone(), today.clone());
        async move {
            let (status, r) = reg_b
                .call(
                    "GET",
                    &format!("/v1/hospitals/{HOSPITAL_B}/records/{uid}"),
                    None,
                )
                .await;
            let r = &r["record"];
            status == 200
                && r["qc_status"] == "passed"
                && r["report_issued_date"] == today.as_str()
                && r["items"].as_array().is_some_and(|i| !i.is_empty())
        }
    })
    .await;

    // The patient's consent for A, recorded through A's API.
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    api_a
        .ok(
            "POST",
            "/api/v1/consents",
            Some(
                json!({"patient": {"identifier_type": "RID", "identifier": RID},
                "method": "doctor_assisted", "recorded_by": "dr.li", "state": "granted",
                "expires_at": tomorrow}),
            ),
        )
        .await;

    // A doctor's account at A.
    let index = node_a.ingest.index();
    let short = huren::http::page::add_user(index, DOCTOR, "王医生", "short").await;
    assert!(short.is_err(), "a 5-character password is refused");
    huren::http::page::add_user(index, DOCTOR, "王医生", PASSWORD)
        .await
        .unwrap();
    assert!(matches!(
        huren::http::page::add_user(index, DOCTOR, "王医生", PASSWORD).await,
        Err(huren::http::page::AuthError::Exists(_))
    ));

    // The browser.
    let base = format!("http://{}", node_a.http_addr);
    let screenshots = std::env::var("HUREN_SCREENSHOTS")
        .ok()
        .filter(|_| backend == Backend::SqliteLocal);
    let lines = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || run_browser(&base, screenshots))
            .await
            .unwrap()
    };
    assert!(
        step(&lines, "redirect")["url"]
            .as_str()
            .unwrap()
            .ends_with("/ui/login"),
        "{lines:#?}"
    );
    assert_eq!(
        step(&lines, "wrong_password")["error"],
        "用户名或密码错误。"
    );
    let login = step(&lines, "login");
    assert!(
        login["header"].as_str().unwrap().contains("王医生"),
        "{login}"
    );
    assert!(
        login["header"].as_str().unwrap().contains(NAME_A),
        "{login}"
    );
    assert_eq!(login["cookie"]["http_only"], true);
    assert_eq!(login["cookie"]["same_site"], "Strict");
    // Path=/: the viewer's DICOMweb requests carry it too (issue 19).
    assert_eq!(login["cookie"]["path"], "/");
    let timeline = step(&lines, "timeline");
    let rows = timeline["rows"].as_array().unwrap();
    let prior = rows
        .iter()
        .find(|r| r["uid"] == uid.as_str())
        .unwrap_or_else(|| panic!("B's prior not on the timeline: {timeline:#}"));
    let text = prior["text"].as_str().unwrap();
    assert!(text.contains(NAME_B), "{text}");
    assert!(text.contains("胸部CT平扫+增强"), "{text}");
    assert!(text.contains("苏HR"), "{text}");
    assert!(text.contains("2024-03-14"), "{text}");
    assert!(text.contains("质控合格"), "{text}");
    assert_eq!(timeline["withheld"], 0);
    let check = step(&lines, "check");
    assert_eq!(check["warning"], true, "{check:#}");
    assert_eq!(check["hospital"], true, "{check:#}");
    let warning = check["text"].as_str().unwrap();
    assert!(warning.contains("该患者近期做过类似检查"), "{warning}");
    assert!(warning.contains("二级甲等"), "{warning}");
    assert!(warning.contains(&today), "{warning}");
    assert!(warning.contains("0 天"), "{warning}");
    assert!(warning.contains("30 天"), "{warning}");
    // What the match rests on: the report's state, what the prior is
    // made of, the attributes its item rests on.
    assert!(warning.contains("报告状态"), "{warning}");
    assert!(warning.contains("正式报告"), "{warning}");
    assert!(warning.contains("个序列"), "{warning}");
    assert!(warning.contains("判定依据"), "{warning}");
    assert!(warning.contains("BodyPartExamined"), "{warning}");
    assert_eq!(check["links"], json!([format!("/ui/studies/{uid}/images")]));
    let decision = step(&lines, "decision");
    assert_eq!(decision["confirmed"], true, "{decision:#}");
    assert_eq!(decision["title"], "处理意见已记录");
    assert!(
        decision["text"].as_str().unwrap().contains("01 病情变化"),
        "{decision:#}"
    );
    let study = step(&lines, "study");
    assert_eq!(study["held_elsewhere"], true, "{study:#}");
    assert!(study["text"].as_str().unwrap().contains(NAME_B));
    let english = step(&lines, "english");
    assert_eq!(
        english["title"],
        "Prior imaging exams (this hospital and the region)"
    );
    assert_eq!(english["find"], "Find a patient");
    assert!(
        step(&lines, "signed_out")["url"]
            .as_str()
            .unwrap()
            .ends_with("/ui/login")
    );
    // No identifier in any URL the browser asked for.
    for url in step(&lines, "urls")["urls"].as_array().unwrap() {
        let url = url.as_str().unwrap().to_ascii_uppercase();
        assert!(!url.contains(RID) && !url.contains("19580412"), "{url}");
    }

    // What node A recorded: the check and its decision, the audit trail.
    let mut db = sqlx::AnyConnection::connect(&node_a.config.database_url)
        .await
        .unwrap();
    let checks: Vec<CheckRow> = sqlx::query_as(
        "SELECT outcome, decision, reason_code, user_id, patient_key FROM recognition_check",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let (outcome, decided, reason, user, key) = &checks[0];
    assert_eq!(outcome, "warn");
    assert_eq!(decided.as_deref(), Some("repeated"));
    assert_eq!(reason.as_deref(), Some("01"));
    assert_eq!(user, DOCTOR);
    assert_eq!(key.as_deref(), Some(patient_key(RID).as_str()));
    let audit: Vec<(String, String, Option<String>, String)> =
        sqlx::query_as("SELECT user_id, action, patient_key, detail FROM ui_audit ORDER BY seq")
            .fetch_all(&mut db)
            .await
            .unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.1.as_str()).collect();
    for action in [
        "sign_in",
        "find_patient",
        "view_timeline",
        "order_check",
        "decision",
        "view_study",
        "sign_out",
    ] {
        assert!(actions.contains(&action), "{action} not audited: {audit:?}");
    }
    for (user, action, key, detail) in &audit {
        assert_eq!(user, DOCTOR);
        if ["find_patient", "view_timeline", "order_check", "decision"].contains(&action.as_str()) {
            assert_eq!(key.as_deref(), Some(patient_key(RID).as_str()), "{action}");
        }
        assert!(!detail.to_ascii_uppercase().contains(RID), "{detail}");
    }
    db.close().await.unwrap();

    // The node's statistics count the warning and the repeat.
    let stats = api_a
        .ok("GET", "/api/v1/recognition/statistics", None)
        .await;
    let rows = stats["rows"].as_array().unwrap();
    let sum = |field: &str| rows.iter().map(|r| r[field].as_i64().unwrap()).sum::<i64>();
    assert_eq!(sum("warnings"), 1, "{stats}");
    assert_eq!(sum("repeated"), 1, "{stats}");
    assert_eq!(sum("accepted"), 0, "{stats}");
    assert_eq!(rows[0]["item_code"], CT_CHEST_PLAIN);
    assert_eq!(rows[0]["repeated_by_reason"]["01"], 1);

    // Plain HTTP: the redirect without a session, the CSRF refusal, the
    // same answer for a wrong password and an unknown user, the cookie.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(format!("{base}/ui/patient")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let (status, session, set, _) = sign_in(&http, &base, DOCTOR, PASSWORD).await;
    assert_eq!(status, 303, "{set}");
    let session = session.expect("a session cookie");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/;"),
        "{set}"
    );
    assert!(set.contains("Max-Age=28800"), "{set}");
    assert!(!set.contains("Secure"), "{set}");
    let r = http
        .get(format!("{base}/ui/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csrf = csrf_field(&r.text().await.unwrap());
    for body in [
        form_body(&[("kind", "rid"), ("identifier", RID)]),
        form_body(&[
            ("csrf", "0".repeat(64).as_str()),
            ("kind", "rid"),
            ("identifier", RID),
        ]),
    ] {
        let r = http
            .post(format!("{base}/ui/patient"))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    for path in ["/ui/check", "/ui/decision", "/ui/logout"] {
        let r = http
            .post(format!("{base}{path}"))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    // With the token the same POST goes through (and keeps the ID out of
    // the redirect).
    let r = http
        .post(format!("{base}/ui/patient"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", &csrf),
            ("kind", "rid"),
            ("identifier", RID),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/patient");
    // Behind a TLS proxy the cookie is Secure.
    let r = http
        .get(format!("{base}/ui/login"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert!(set_cookie(&r, "huren_login_csrf").is_some());
    let login_set = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(login_set.contains("; Secure"), "{login_set}");
    // Wrong password and unknown user: the same page, the same status.
    let (status, session, _, wrong) = sign_in(&http, &base, DOCTOR, "not-the-password").await;
    assert_eq!((status, session), (401, None));
    let (status, session, _, unknown) =
        sign_in(&http, &base, "dr.nobody", "not-the-password").await;
    assert_eq!((status, session), (401, None));
    assert!(wrong.contains("用户名或密码错误。"));
    // The pages differ only in the user ID echoed and the form's token.
    let strip = |html: &str, user: &str| {
        let csrf = csrf_field(html);
        html.replace(&csrf, "").replace(user, "")
    };
    assert_eq!(strip(&wrong, DOCTOR), strip(&unknown, "dr.nobody"));

    // A node outside any region says so.
    let plain = support::spawn_node(backend).await;
    let r = http
        .get(format!("http://{}/ui/", plain.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("本节点未加入区域影像平台"));
    plain.stop().await;

    node_a.stop().await;
    node_b.stop().await;
    registry.stop().await;
}

/// Issue 17, "What must show" 3: a study classified `needs_confirmation`
/// at B gives no warning at A; B's radiologist confirms it on B's page
/// (chromium); A's check then warns citing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_on_the_holding_hospitals_page() {
    let backend = Backend::SqliteLocal;
    let PageRegion {
        registry,
        token_b,
        node_a,
        node_b,
        api_a,
        api_b,
    } = spawn_page_region(backend).await;
    let work = tempfile::tempdir().unwrap();
    // A chest CT whose BodyPartExamined says HEAD: needs confirmation.
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-confirm",
        &["--resident-id", RID, "--set", "BodyPartExamined=HEAD"],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    let as_of = huren::recognition::check::today_in_shanghai();
    let reported = (as_of - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    wait_until("study indexed at B", || {
        let (api_b, uid) = (api_b.clone(), uid.clone());
        async move {
            api_b
                .call("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
                .await
                .0
                == 200
        }
    })
    .await;
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final", "report_issued_date": reported})),
        )
        .await;
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    let reg_b = Api::new(&registry.url(), Some(&token_b));
    let record = |confirmed: bool| {
        let (reg_b, uid) = (reg_b.clone(), uid.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (status, r) = reg_b
                    .call(
                        "GET",
                        &format!("/v1/hospitals/{HOSPITAL_B}/records/{uid}"),
                        None,
                    )
                    .await;
                if status == 200
                    && r["record"]["qc_status"] == "passed"
                    && r["record"]["report_status"] == "final"
                    && (r["record"]["items"][0]["confirmed_by"] == "radiologist") == confirmed
                {
                    return r;
                }
                assert!(tokio::time::Instant::now() < deadline, "record: {r}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let before = record(false).await;
    assert_eq!(
        before["record"]["items"][0]["confidence"], "needs_confirmation",
        "{before}"
    );
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    api_a
        .ok(
            "POST",
            "/api/v1/consents",
            Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "method": "doctor_assisted", "recorded_by": "dr.li", "state": "granted",
            "expires_at": tomorrow})),
        )
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
                    "order": {"item_code": CT_CHEST_PLAIN}, "ordering_doctor": "dr.zhao",
                    "encounter": "outpatient", "as_of": as_of.format("%Y-%m-%d").to_string()})),
                )
                .await
        }
    };
    let unconfirmed = check().await;
    assert_eq!(unconfirmed["outcome"], "no_warn", "{unconfirmed}");
    assert_eq!(
        unconfirmed["not_counted"][0]["reason"],
        "needs_confirmation"
    );

    // B's radiologist, on B's page.
    huren::http::page::add_user(node_b.ingest.index(), "rad.sun", "孙医生", PASSWORD)
        .await
        .unwrap();
    let base = format!("http://{}", node_b.http_addr);
    let study = uid.clone();
    let lines = tokio::task::spawn_blocking(move || {
        let out = Command::new(support::env("HUREN_TEST_PYTHON"))
            .arg(repo_path("tests/support/confirm_page_test.py"))
            .args(["--base", &base, "--user", "rad.sun", "--study", &study])
            .env("HUREN_PAGE_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run confirm_page_test.py");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "confirm_page_test.py failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let classified = step(&lines, "classified");
    let item = &classified["items"][0];
    assert!(
        item["text"].as_str().unwrap().contains("待确认"),
        "{classified}"
    );
    assert!(
        item["text"].as_str().unwrap().contains("CT-0301-03"),
        "{classified}"
    );
    // The evidence with its values, and the doubt that made it unsure.
    assert!(
        item["evidence"]
            .to_string()
            .contains("StudyDescription\\tCT CHEST"),
        "{classified}"
    );
    assert!(
        item["text"]
            .as_str()
            .unwrap()
            .contains("body_part_examined_contradicts"),
        "{classified}"
    );
    assert_eq!(classified["checked"], json!(["CT-0301-03"]));
    assert!(
        step(&lines, "no_role")["status_text"]
            .as_str()
            .unwrap()
            .contains("请选择确认人角色"),
        "{lines:?}"
    );
    assert!(
        step(&lines, "confirmed")["confirmed"]
            .as_str()
            .unwrap()
            .contains("已由诊断医师确认"),
        "{lines:?}"
    );
    let after = record(true).await;
    assert!(
        after["record"]["record_version"].as_i64() > before["record"]["record_version"].as_i64()
    );
    assert_eq!(after["record"]["items"][0]["confidence"], "certain");
    assert!(!after.to_string().contains("rad.sun"), "{after}");
    let warn = check().await;
    assert_eq!(warn["outcome"], "warn", "{warn}");
    assert_eq!(warn["cited"]["study_instance_uid"], uid.as_str());
    assert_eq!(warn["cited"]["days_since_window_from"], 1);
    node_a.stop().await;
    node_b.stop().await;
}
