//! The viewer on the node (issue 19), in a real browser: a registry,
//! hospital A and hospital B; a chest CT at B (two series), reported and
//! QC-passed; the patient's consent for A. Node A keeps DICOMweb closed
//! (tokens only, as a hospital runs it) and serves OHIF under /viewer
//! (installed by deploy/install-viewer.sh, which scripts/test.sh runs).
//!
//! - Without a session, the viewer at A loads, its DICOMweb requests get
//!   401, and nothing is fetched from B.
//! - A doctor signs in at A, gets the warning citing B's study, clicks
//!   查看影像: A fetches the study from B series by series (the page shows
//!   the progress), the viewer opens at A and draws it; the timeline and
//!   the warning card then show a thumbnail per series.
//! - The session's cookie reads only what the session opened, and never
//!   writes; B down is said as such on the page.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::page::{add_named_hospital, csrf_field, form_body, sign_in};
use crate::region::{
    ADMIN_TOKEN, Api, RID, make_study, region_config, spawn_region_node, spawn_registry, store,
    wait_until,
};
use crate::support::{self, Backend, repo_path};

const HOSPITAL_A: &str = "HOSPA0000000000001";
const HOSPITAL_B: &str = "HOSPB0000000000002";
const NAME_B: &str = "南京市第二医院（测试）";
const DOCTOR: &str = "dr.zhou";
const PASSWORD: &str = "correct-horse-battery";
/// 胸部CT平扫 in deploy/recognition/jiangsu-example.toml.
const CT_CHEST_PLAIN: &str = "CT-0301-01";

fn run_viewer_test(args: &[&str], screenshots: Option<String>) -> Vec<Value> {
    let mut cmd = Command::new(support::env("HUREN_TEST_PYTHON"));
    cmd.arg(repo_path("tests/support/viewer_test.py"))
        .args(args)
        .env("HUREN_PAGE_PASSWORD", PASSWORD)
        .stdin(Stdio::null());
    match screenshots {
        Some(dir) => cmd.env("HUREN_SCREENSHOTS", dir),
        None => cmd.env_remove("HUREN_SCREENSHOTS"),
    };
    let out = cmd.output().expect("run viewer_test.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "viewer_test.py failed:\n{stdout}\n{}",
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

async fn entries(api: &Api, action: &str) -> Vec<Value> {
    api.ok("GET", "/api/v1/peer/audit", None).await["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

support::on_both_backends!(the_doctor_opens_a_regional_prior_in_the_viewer);

/// The patient's priors asked at A through its API, as the page would:
/// A learns from the answer that B holds the study.
async fn ask_priors(api_a: &Api) {
    api_a
        .ok(
            "POST",
            "/api/v1/priors",
            Some(
                json!({"patient": {"identifier_type": "RID", "identifier": RID},
                "purpose": "treatment", "user_id": "dr.li"}),
            ),
        )
        .await;
}

/// The region of these tests: a registry, B holding a chest CT (two
/// series, 12 images, reported, QC-passed) and a head CT of the patient,
/// A with DICOMweb behind tokens, the viewer installed, the patient's
/// consent for A, and a doctor's account at A. `peer_bandwidth` is A's cap
/// on its fetches from B (0: none). `tag` seeds the studies' UIDs: tests
/// run in one process, where a node's fetch progress is kept by hospital
/// and Study Instance UID, so each test needs studies of its own.
struct Scene {
    registry: crate::region::TestRegistry,
    node_a: support::TestNode,
    node_b: support::TestNode,
    api_a: Api,
    api_b: Api,
    reg_b: Api,
    uid: String,
    head_uid: String,
    base: String,
    _work: tempfile::TempDir,
}

async fn region_with_a_prior(backend: Backend, peer_bandwidth: u64, tag: &str) -> Scene {
    let viewer_dir = support::env("HUREN_TEST_VIEWER_DIR");
    let registry = spawn_registry(backend).await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let token_a =
        add_named_hospital(&admin, HOSPITAL_A, "江苏省人民医院（测试）", "三级甲等").await;
    let token_b = add_named_hospital(&admin, HOSPITAL_B, NAME_B, "二级甲等").await;
    let list =
        std::fs::read_to_string(repo_path("deploy/recognition/jiangsu-example.toml")).unwrap();
    let (status, body) = admin.call_text("PUT", "/v1/recognition-list", &list).await;
    assert_eq!(status, 200, "{body}");
    let node_b = spawn_region_node(backend, &registry.url(), HOSPITAL_B, &token_b).await;
    admin
        .ok(
            "PATCH",
            &format!("/v1/hospitals/{HOSPITAL_B}"),
            Some(json!({"dicomweb_base_url": format!("http://{}/dicom-web", node_b.http_addr)})),
        )
        .await;
    // A as a hospital runs it: DICOMweb behind tokens (not open), the
    // viewer installed.
    let (url, dir) = (registry.url(), viewer_dir.clone());
    let node_a = support::spawn_node_with(backend, move |c| {
        let mut region = region_config(&url, HOSPITAL_A, &token_a);
        region.peer_bandwidth = peer_bandwidth;
        c.region = Some(region);
        c.viewer_dir = Some(dir.into());
        // Each backend's run draws the viewer one way: `auto` on SQLite,
        // which finds this browser's WebGL to be software (SwiftShader, the
        // flags of tests/support/viewer_test.py) and so draws on the CPU;
        // WebGL, insisted on, on PostgreSQL.
        c.viewer_rendering = if backend == Backend::SqliteLocal {
            huren::config::ViewerRendering::Auto
        } else {
            huren::config::ViewerRendering::Webgl
        };
    })
    .await;
    assert!(!node_a.config.dicomweb.open);
    let api = |node: &support::TestNode| {
        Api::new(
            &format!("http://{}", node.http_addr),
            Some(support::NODE_API_TOKEN),
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

    // A chest CT at B (a plain and an enhanced series), reported, QC passed.
    let work = tempfile::tempdir().unwrap();
    // Seeds of their own per backend: both variants run in one process,
    // and a node's fetch progress is kept per process by Study Instance UID.
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        &format!("ct-viewer-{tag}"),
        &["--resident-id", RID],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    // A second study of the patient at B, for when B is down (the end).
    let head = make_study(
        work.path(),
        "p1-ct-head-2019",
        &format!("ct-viewer-head-{tag}"),
        &["--resident-id", RID],
    );
    store(&node_b, &head.files).await;
    let head_uid = head.study_instance_uid.clone();
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
        let (reg_b, uid) = (reg_b.clone(), uid.clone());
        async move {
            let (status, r) = reg_b
                .call(
                    "GET",
                    &format!("/v1/hospitals/{HOSPITAL_B}/records/{uid}"),
                    None,
                )
                .await;
            status == 200
                && r["record"]["qc_status"] == "passed"
                && r["record"]["report_status"] == "final"
                && r["record"]["items"]
                    .as_array()
                    .is_some_and(|i| !i.is_empty())
        }
    })
    .await;
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
    huren::http::page::add_user(node_a.ingest.index(), DOCTOR, "周医生", PASSWORD)
        .await
        .unwrap();
    let base = format!("http://{}", node_a.http_addr);
    Scene {
        registry,
        node_a,
        node_b,
        api_a,
        api_b,
        reg_b,
        uid,
        head_uid,
        base,
        _work: work,
    }
}

/// A DICOMweb client (any: here a plain HTTP client with A's token) reads
/// a prior at A while A is still fetching it from B over a slow link: its
/// searches and metadata are answered (B's, naming A's URLs), and an
/// instance it asks for is served from A, verified, long before the study
/// is all here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dicomweb_client_reads_a_prior_while_it_arrives() {
    // 8 kB/s: the 12 images (320 kB) take some 40 s to arrive. The scene
    // is kept whole: its nodes and registry live as long as it does.
    let scene = region_with_a_prior(Backend::SqliteLocal, 8_000, "dicomweb-client").await;
    let (api_a, api_b) = (scene.api_a.clone(), scene.api_b.clone());
    let (uid, base) = (scene.uid.clone(), scene.base.clone());
    let http = reqwest::Client::new();
    let get = |url: String, accept: &'static str| {
        let http = http.clone();
        async move {
            http.get(url)
                .bearer_auth(support::NODE_API_TOKEN)
                .header("accept", accept)
                .send()
                .await
                .unwrap()
        }
    };
    // Before any fetch A holds nothing of the study.
    let r = get(
        format!("{base}/dicom-web/studies/{uid}/instances"),
        "application/dicom+json",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap().trim(), "[]");
    // A learns that B holds it (a priors answer), and fetches it in the
    // background, as a retrieve of a workstation would have it fetched.
    ask_priors(&api_a).await;
    let mut fetch = tokio::spawn({
        let (api_a, uid) = (api_a.clone(), uid.clone());
        async move {
            api_a
                .call(
                    "POST",
                    "/api/v1/peer/fetch",
                    Some(json!({"hospital_id": HOSPITAL_B, "study_instance_uid": uid,
                                "purpose": "treatment", "user_id": DOCTOR})),
                )
                .await
        }
    });
    let held_at_a = || {
        let (api_a, uid) = (api_a.clone(), uid.clone());
        async move {
            let (status, m) = api_a
                .call("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
                .await;
            match status {
                404 => Vec::new(),
                200 => m["instances"].as_array().unwrap().clone(),
                s => panic!("A's manifest: {s} {m}"),
            }
        }
    };
    // Once A has B's manifest, A answers for the whole study.
    let instances: Vec<Value> = {
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while found.len() < 12 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "A never answered for all 12"
            );
            assert!(!fetch.is_finished(), "{:?}", (&mut fetch).await);
            let r = get(
                format!("{base}/dicom-web/studies/{uid}/instances"),
                "application/dicom+json",
            )
            .await;
            if r.status() == 200 {
                found = r.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        found
    };
    assert!(
        held_at_a().await.len() < 12,
        "the study arrived before it was searched: the link is not slow"
    );
    let series_of = |i: &Value| i["0020000E"]["Value"][0].as_str().unwrap().to_string();
    let sop_of = |i: &Value| i["00080018"]["Value"][0].as_str().unwrap().to_string();
    let series = series_of(instances.last().unwrap());
    // The series' metadata: every image, its bulk data at A.
    let r = get(
        format!("{base}/dicom-web/studies/{uid}/series/{series}/metadata"),
        "application/dicom+json",
    )
    .await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    let metadata: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        metadata.len(),
        instances.iter().filter(|i| series_of(i) == series).count()
    );
    for m in &metadata {
        let uri = m["7FE00010"]["BulkDataURI"].as_str().unwrap();
        assert!(
            uri.starts_with(&format!("{base}/dicom-web/studies/{uid}/series/{series}/")),
            "{uri}"
        );
    }
    // An image of the series the stream brings last: its frame, from A,
    // while most of the study is still on its way.
    let last = metadata.last().unwrap()["00080018"]["Value"][0]
        .as_str()
        .unwrap()
        .to_string();
    let r = get(
        format!("{base}/dicom-web/studies/{uid}/series/{series}/instances/{last}/frames/1"),
        "multipart/related; type=\"application/octet-stream\"; transfer-syntax=*",
    )
    .await;
    assert_eq!(r.status(), 200);
    let frame = r.bytes().await.unwrap();
    assert!(frame.len() > 1000, "{}", frame.len());
    let here = held_at_a().await;
    assert!(
        here.len() < 12,
        "served only once the whole study was here ({} of 12)",
        here.len()
    );
    // It was served from A's own copy, verified against B's manifest.
    let (_, at_b) = api_b
        .call("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    let hash_at = |list: &[Value]| {
        list.iter()
            .find(|i| i["sop_instance_uid"] == last)
            .map(|i| i["blob_hash"].clone())
    };
    assert!(hash_at(&here).is_some(), "{last} not at A");
    assert_eq!(
        hash_at(&here),
        hash_at(at_b["instances"].as_array().unwrap())
    );
    // The fetch completes: every instance, once.
    let (status, report) = fetch.await.unwrap();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["instances"], 12, "{report}");
    assert_eq!(report["fetched"], 12, "{report}");
    assert_eq!(held_at_a().await.len(), 12);
    assert!(instances.iter().all(|i| !sop_of(i).is_empty()));
}

async fn the_doctor_opens_a_regional_prior_in_the_viewer(backend: Backend) {
    // On SQLite, A's link to B is slow (8 kB/s, `peer_bandwidth`): the
    // study (12 small CT images, 320 kB) takes some 40 s to arrive, and the
    // viewer must draw it long before that (issue 19: a prior is shown as
    // it arrives).
    let slow_link = backend == Backend::SqliteLocal;
    let Scene {
        registry,
        node_a,
        node_b,
        api_a,
        api_b,
        reg_b,
        uid,
        head_uid,
        base,
        _work,
    } = region_with_a_prior(
        backend,
        if slow_link { 8_000 } else { 0 },
        &format!("{backend:?}"),
    )
    .await;

    // 1. No session: the viewer loads, its DICOMweb requests are refused,
    //    nothing is fetched from B. (A knows B holds the study only after a
    //    priors answer; the API's priors query tells it, as the page would.)
    ask_priors(&api_a).await;
    let lines = {
        let (base, uid) = (base.clone(), uid.clone());
        tokio::task::spawn_blocking(move || {
            run_viewer_test(&["anonymous", "--base", &base, "--study", &uid], None)
        })
        .await
        .unwrap()
    };
    let anonymous = step(&lines, "anonymous");
    assert_eq!(
        anonymous["qido_root"],
        format!("{base}/dicom-web"),
        "{anonymous:#}"
    );
    let requests = anonymous["requests"].as_array().unwrap();
    assert!(!requests.is_empty(), "{anonymous:#}");
    for r in requests {
        assert_eq!(r["status"], 401, "{anonymous:#}");
    }
    assert!(entries(&api_b, "served").await.is_empty());
    assert!(entries(&api_a, "fetched").await.is_empty());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .get(format!("{base}/dicom-web/studies/{uid}/series"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(entries(&api_a, "fetched").await.is_empty());

    // 2. The doctor, in the browser: warning → 查看影像 → the viewer draws.
    let screenshots = std::env::var("HUREN_SCREENSHOTS")
        .ok()
        .filter(|_| backend == Backend::SqliteLocal);
    let lines = {
        let (base, uid) = (base.clone(), uid.clone());
        tokio::task::spawn_blocking(move || {
            run_viewer_test(
                &[
                    "doctor",
                    "--base",
                    &base,
                    "--study",
                    &uid,
                    "--user",
                    DOCTOR,
                    "--rid",
                    RID,
                    "--item",
                    CT_CHEST_PLAIN,
                ],
                screenshots,
            )
        })
        .await
        .unwrap()
    };
    let warning = step(&lines, "warning");
    assert_eq!(warning["warning"], true, "{warning:#}");
    assert_eq!(
        warning["href"],
        format!("/ui/studies/{uid}/images"),
        "{warning:#}"
    );
    // Before the fetch: no thumbnails yet, and the card says when they come.
    assert_eq!(warning["thumbs_before"], 0);
    assert_eq!(warning["no_thumbs"], 1);
    let opened = step(&lines, "opened");
    let opened_url = opened["url"].as_str().unwrap();
    // The viewer itself (the fetch was done before the page looked), or
    // the page framing it under the fetch's progress.
    assert!(
        opened_url.ends_with(&format!("/viewer/viewer?StudyInstanceUIDs={uid}"))
            || (opened["framed"] == true
                && opened_url.ends_with(&format!("/ui/studies/{uid}/images"))),
        "{lines:#?}"
    );
    // Whether the browser saw the progress page depends on time: a fetch
    // done before the page's own redirect comes back goes straight to the
    // viewer (two HTTP redirects, no page drawn). That the study came from
    // B, through the grant, is asserted below from both nodes' audit.
    if opened["through_progress_page"] != true {
        eprintln!("the fetch finished before the progress page was drawn: {opened:#}");
    }
    let drawn = step(&lines, "drawn");
    assert!(drawn["seconds"].is_number(), "not drawn: {lines:#?}");
    assert!(drawn["levels"].as_u64().unwrap() > 16, "{drawn:#}");
    // On the CPU on SQLite (`auto`, which named the renderer software),
    // with WebGL on PostgreSQL (node A's `viewer_rendering`, set per
    // backend so both are drawn).
    assert_eq!(
        drawn["cpu_rendering"],
        json!(backend == Backend::SqliteLocal),
        "{drawn:#}"
    );
    assert_eq!(
        drawn["webgl_found"],
        if backend == Backend::SqliteLocal {
            json!("software")
        } else {
            json!(null)
        },
        "{drawn:#}"
    );
    if slow_link {
        // Over the slow link the viewer opened at once, framed under the
        // progress, and drew an image while the study was still arriving.
        assert_eq!(opened["framed"], true, "{lines:#?}");
        let (here, total) = (
            drawn["here_at_draw"]
                .as_u64()
                .expect("strip read at the draw"),
            drawn["total"].as_u64().unwrap(),
        );
        assert!(here < total, "drawn only once all had arrived: {drawn:#}");
        assert_eq!(step(&lines, "arrived")["state"], "done", "{lines:#?}");
    }
    // The viewer's own series thumbnails: rendered at the node, one per
    // series, each served.
    let viewer_thumbs = step(&lines, "viewer_thumbs");
    let statuses = viewer_thumbs["statuses"].as_array().unwrap();
    assert!(statuses.len() >= 2, "{viewer_thumbs:#}");
    assert!(statuses.iter().all(|s| s == 200), "{viewer_thumbs:#}");
    let dicomweb = step(&lines, "dicomweb");
    assert!(dicomweb["count"].as_u64().unwrap() > 0, "{dicomweb:#}");
    // Refused: only OHIF's look for the patient's other studies (a search
    // by Patient ID, no study named), which a session may not do.
    for r in dicomweb["refused"].as_array().unwrap() {
        let url = r["url"].as_str().unwrap();
        assert_eq!(r["status"], 401, "{dicomweb:#}");
        assert!(
            url.contains("/dicom-web/studies?") && !url.contains("StudyInstanceUID"),
            "{dicomweb:#}"
        );
    }
    assert!(
        dicomweb["statuses"]
            .as_array()
            .unwrap()
            .contains(&json!(200)),
        "{dicomweb:#}"
    );
    // The viewer read its frames one at a time, each as the whole payload
    // (single part: app-config.js's acceptHeader), none as multipart.
    assert_eq!(
        dicomweb["frame_types"],
        json!(["application/octet-stream"]),
        "{dicomweb:#}"
    );
    // Every file the viewer asked for is served under /viewer/.
    assert_eq!(dicomweb["missing"], json!([]), "{dicomweb:#}");
    assert_eq!(dicomweb["methods"], json!(["GET"]), "{dicomweb:#}");
    let thumbs = step(&lines, "timeline_thumbs");
    assert_eq!(thumbs["count"], 2, "one per series: {thumbs:#}");
    assert_eq!(thumbs["loaded"], 2, "{thumbs:#}");
    assert_eq!(thumbs["lazy"], json!(["lazy", "lazy"]), "{thumbs:#}");
    assert_eq!(step(&lines, "warning_thumbs")["count"], 2, "{lines:#?}");

    // The viewer's DICOMweb requests are audited as the doctor's.
    let audit_log = std::fs::read_to_string(node_a.config.data_dir.join("audit.log")).unwrap();
    assert!(
        audit_log.contains(&format!("session:{DOCTOR}")),
        "no audit message names the doctor's session"
    );
    // The fetch went through the grant, consent and audit as any fetch.
    let fetched = entries(&api_a, "fetched").await;
    assert_eq!(fetched.len(), 1, "{fetched:#?}");
    assert_eq!(fetched[0]["user_id"], DOCTOR);
    assert_eq!(fetched[0]["purpose"], "treatment");
    assert_eq!(entries(&api_b, "served").await.len(), 1);

    // 3. The cookie, over plain HTTP: reads the study its session opened,
    //    nothing else, and never writes.
    let (status, session, _, _) = sign_in(&http, &base, DOCTOR, PASSWORD).await;
    assert_eq!(status, 303);
    let session = session.unwrap();
    let get = |path: String| {
        let (http, session) = (http.clone(), session.clone());
        async move {
            http.get(path)
                .header("cookie", session)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A new session has opened nothing yet.
    assert_eq!(
        get(format!("{base}/dicom-web/studies/{uid}/series")).await,
        401
    );
    let r = http
        .get(format!("{base}/ui/studies/{uid}/images"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        format!("/viewer/viewer?StudyInstanceUIDs={uid}")
    );
    assert_eq!(
        get(format!("{base}/dicom-web/studies/{uid}/series")).await,
        200
    );
    assert_eq!(
        get(format!("{base}/dicom-web/studies?StudyInstanceUID={uid}")).await,
        200
    );
    // A series still arriving is not shown (caught mid-fetch: a loopback
    // fetch is too fast to catch, so its progress is set as it would be).
    let series_json = |path: String| {
        let (http, session) = (http.clone(), session.clone());
        async move {
            let r = http
                .get(path)
                .header("cookie", session)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Vec<Value>>().await.unwrap()
        }
    };
    let all = series_json(format!("{base}/dicom-web/studies/{uid}/series")).await;
    let series_uids: Vec<String> = all
        .iter()
        .map(|s| s["0020000E"]["Value"][0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(series_uids.len(), 2, "{all:?}");
    huren::peer::record_progress_for_tests(
        HOSPITAL_A,
        &uid,
        HOSPITAL_B,
        huren::peer::FetchState::Running,
        &[(&series_uids[0], 6, 6), (&series_uids[1], 6, 3)],
    );
    let shown = series_json(format!("{base}/dicom-web/studies/{uid}/series")).await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    // The page's study view lists what QIDO-RS shows: not the series still
    // arriving (nor one a failed fetch left incomplete).
    let series_cards = || {
        let (http, session, url) = (
            http.clone(),
            session.clone(),
            format!("{base}/ui/studies/{uid}"),
        );
        async move {
            let r = http
                .get(url)
                .header("cookie", session)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text()
                .await
                .unwrap()
                .matches("class=\"card series\"")
                .count()
        }
    };
    assert_eq!(series_cards().await, 1);
    assert_eq!(shown[0]["0020000E"]["Value"][0], series_uids[0].as_str());
    let instances = series_json(format!("{base}/dicom-web/studies/{uid}/instances")).await;
    assert_eq!(instances.len(), 6);
    assert_eq!(
        get(format!(
            "{base}/dicom-web/studies/{uid}/series/{}/metadata",
            series_uids[1]
        ))
        .await,
        404
    );
    huren::peer::record_progress_for_tests(
        HOSPITAL_A,
        &uid,
        HOSPITAL_B,
        huren::peer::FetchState::Done,
        &[(&series_uids[0], 6, 6), (&series_uids[1], 6, 6)],
    );
    let shown = series_json(format!("{base}/dicom-web/studies/{uid}/series")).await;
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(series_cards().await, 2);
    // A copy fetched from B: the page says whose exam it is, not this
    // node's report, QC or publication state (it never publishes a copy).
    let page_text = |path: String| {
        let (http, session) = (http.clone(), session.clone());
        async move {
            let r = http.get(path).header("cookie", session).send().await;
            r.unwrap().text().await.unwrap()
        }
    };
    let study_page = page_text(format!("{base}/ui/studies/{uid}")).await;
    assert!(study_page.contains("id=\"regional-copy\""), "{study_page}");
    assert!(study_page.contains(NAME_B), "{study_page}");
    // No search across the archive, no other study.
    assert_eq!(get(format!("{base}/dicom-web/studies")).await, 401);
    assert_eq!(
        get(format!("{base}/dicom-web/studies?PatientID=*")).await,
        401
    );
    assert_eq!(
        get(format!("{base}/dicom-web/studies/1.2.3/series")).await,
        401
    );
    // The opened study's key given again, for another study or for all
    // (by keyword, by tag in either case, percent-encoded): no one study,
    // so no session read; and a search with an attribute twice is 400 even
    // with the operator's token (the second would replace the first).
    for extra in [
        "StudyInstanceUID=",
        "StudyInstanceUID=*",
        "0020000D=1.2.3",
        "0020000d=",
        "Study%49nstanceUID=",
    ] {
        for resource in ["studies", "series", "instances"] {
            let url = format!("{base}/dicom-web/{resource}?StudyInstanceUID={uid}&{extra}");
            assert_eq!(get(url.clone()).await, 401, "{url}");
            let r = http
                .get(&url)
                .bearer_auth(support::NODE_API_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{url}");
        }
    }
    // No write with the cookie: STOW-RS needs a token.
    let r = http
        .post(format!("{base}/dicom-web/studies"))
        .header("cookie", &session)
        .header(
            "content-type",
            "multipart/related; type=\"application/dicom\"; boundary=x",
        )
        .body("--x--")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The cookie now goes to the whole origin (the viewer's requests).
    let page = page_text(format!("{base}/ui/")).await;
    let csrf = csrf_field(&page);
    let r = http
        .post(format!("{base}/ui/logout"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[("csrf", &csrf)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // Signed out: the cookie reads nothing any more.
    assert_eq!(
        get(format!("{base}/dicom-web/studies/{uid}/series")).await,
        401
    );

    // The viewer's files: deep links get index.html, the config is
    // generated, nothing escapes the directory.
    let r = http
        .get(format!("{base}/viewer/viewer?StudyInstanceUIDs={uid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("window.PUBLIC_URL=\"/viewer/\"")
    );
    let config = http
        .get(format!("{base}/viewer/app-config.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(config.contains("routerBasename: \"/viewer\""), "{config}");
    assert!(config.contains("\"/dicom-web\""), "{config}");
    for path in [
        "/viewer/../Cargo.toml",
        "/viewer/%2e%2e/Cargo.toml",
        "/viewer/.huren-viewer",
    ] {
        let status = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status == 404 || status == 400, "{path}: {status}");
    }

    // 4. B down: the page says so, and why.
    wait_until("B's second record at the registry", || {
        let (reg_b, uid) = (reg_b.clone(), head_uid.clone());
        async move {
            reg_b
                .call(
                    "GET",
                    &format!("/v1/hospitals/{HOSPITAL_B}/records/{uid}"),
                    None,
                )
                .await
                .0
                == 200
        }
    })
    .await;
    node_b.stop().await;
    let (_, session, _, _) = sign_in(&http, &base, DOCTOR, PASSWORD).await;
    let session = session.unwrap();
    let page = http
        .get(format!("{base}/ui/"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let r = http
        .post(format!("{base}/ui/patient"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("csrf", &csrf_field(&page)),
            ("kind", "rid"),
            ("identifier", RID),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // The timeline asks the registry, which tells A who holds the study.
    let timeline = http
        .get(format!("{base}/ui/patient"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(timeline.contains(&head_uid), "{timeline}");
    let failed = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let r = http
                .get(format!("{base}/ui/studies/{head_uid}/images"))
                .header("cookie", &session)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            if body.contains("id=\"images-failed\"") {
                break (status, body);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no failure page: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(failed.0, 502);
    assert!(failed.1.contains("data-kind=\"peer_down\""), "{}", failed.1);
    assert!(
        failed.1.contains("持有该检查的医院节点无法访问"),
        "{}",
        failed.1
    );
    assert!(failed.1.contains(NAME_B), "{}", failed.1);
    assert!(failed.1.contains("?retry=1"), "{}", failed.1);
    // The timeline says so too, on the prior's row.
    let timeline = http
        .get(format!("{base}/ui/patient"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = timeline
        .split("<tr class=\"prior\"")
        .find(|r| r.contains(&head_uid))
        .unwrap();
    assert!(
        row.contains("class=\"alert error fetch-failed\" data-kind=\"peer_down\""),
        "{row}"
    );
    let failures = entries(&api_a, "fetch_failed").await;
    assert!(
        failures.is_empty()
            || failures
                .iter()
                .all(|e| e["study_instance_uid"] == head_uid.as_str()),
        "{failures:#?}"
    );

    node_a.stop().await;
    registry.stop().await;
}
