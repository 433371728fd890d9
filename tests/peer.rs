//! Peer retrieval with three processes' worth of servers (a registry, node
//! A, node B; real stores): consent refused, break-the-glass flagged in all
//! three audit trails, byte-identical WADO-RS at A, nothing fetched twice, a
//! C-MOVE at A that fetches a regional prior on demand, an interrupted fetch
//! resumed, a tampered study refused, and the cache budget.

use std::process::Command;
use std::time::Duration;

use huren::config::{Scope, TokenConfig};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::query_retrieve::StoreScp;
use crate::region::{
    ADMIN_TOKEN, Api, Contract, RID, Recorder, make_study, region_config, spawn_registry,
    start_proxy, store, wait_record, wait_until,
};
use crate::support::{self, Backend};

const HOSP_A: &str = "HOSPA0000000000001";
const HOSP_B: &str = "HOSPB0000000000002";
const B_API_TOKEN: &str = "node-b-api-token-for-the-tests-0001";

/// B's DICOMweb as A reaches it: passed through, or, while `cut` is set, a
/// study's WADO-RS stream broken after `budget` bytes and single instances
/// refused. The interrupted fetch below is then interrupted at a known
/// point, whatever the timing of the two nodes.
#[derive(Clone)]
struct CuttingProxy {
    target: String,
    client: reqwest::Client,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    budget: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// While set, a manifest is answered with an endless body (a broken or
    /// hostile node), and the bytes sent are counted.
    flood: std::sync::Arc<std::sync::atomic::AtomicBool>,
    flooded: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CuttingProxy {
    async fn start(target: String) -> (CuttingProxy, String) {
        let proxy = CuttingProxy {
            target,
            client: reqwest::Client::new(),
            cut: Default::default(),
            budget: Default::default(),
            flood: Default::default(),
            flooded: Default::default(),
        };
        let app = axum::Router::new()
            .fallback(cut_forward)
            .with_state(proxy.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (proxy, format!("http://{addr}"))
    }

    fn set_cut(&self, budget: Option<u64>) {
        use std::sync::atomic::Ordering::SeqCst;
        self.budget.store(budget.unwrap_or(u64::MAX), SeqCst);
        self.cut.store(budget.is_some(), SeqCst);
    }
}

async fn cut_forward(
    axum::extract::State(p): axum::extract::State<CuttingProxy>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    use std::sync::atomic::Ordering::SeqCst;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    if p.flood.load(SeqCst) && path.ends_with("/manifest") {
        let flooded = p.flooded.clone();
        let endless = futures::stream::repeat_with(move || {
            flooded.fetch_add(1 << 20, SeqCst);
            Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 1 << 20]))
        });
        return axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(endless))
            .unwrap();
    }
    let retrieve = path.starts_with("/dicom-web/studies/");
    let instance = path.contains("/instances/");
    let cut = p.cut.load(SeqCst) && retrieve;
    if cut && instance {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "cut").into_response();
    }
    let mut rb = p
        .client
        .request(parts.method.clone(), format!("{}{path}", p.target))
        .body(body);
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            rb = rb.header(k, v);
        }
    }
    let Ok(upstream) = rb.send().await else {
        return (axum::http::StatusCode::BAD_GATEWAY, "upstream down").into_response();
    };
    let mut response = axum::response::Response::builder().status(upstream.status());
    for (k, v) in upstream.headers() {
        if k != "content-length" && k != "transfer-encoding" {
            response = response.header(k, v);
        }
    }
    let left = if cut { p.budget.load(SeqCst) } else { u64::MAX };
    // Chunks pass until the budget is spent; then an error, which makes
    // the server drop the connection mid-body.
    let stream = futures::stream::unfold(
        (upstream.bytes_stream(), left, false),
        |(mut upstream, left, broken)| async move {
            if broken {
                return None;
            }
            match upstream.next().await? {
                Ok(chunk) if (chunk.len() as u64) < left => {
                    let left = left - chunk.len() as u64;
                    Some((Ok(chunk), (upstream, left, false)))
                }
                Ok(_) if left == 0 => {
                    Some((Err(std::io::Error::other("cut")), (upstream, 0, true)))
                }
                Ok(chunk) => Some((Ok(chunk.slice(..left as usize)), (upstream, 0, false))),
                Err(e) => Some((Err(std::io::Error::other(e)), (upstream, 0, true))),
            }
        },
    );
    response
        .body(axum::body::Body::from_stream(stream))
        .unwrap()
}

/// The parts of a multipart/related answer.
async fn parts(response: reqwest::Response) -> Vec<Vec<u8>> {
    let ct = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    let boundary = ct
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mut m = multer::Multipart::new(response.bytes_stream(), boundary);
    let mut out = Vec::new();
    while let Some(f) = m.next_field().await.unwrap() {
        out.push(f.bytes().await.unwrap().to_vec());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_fetch_end_to_end() {
    let registry = spawn_registry(Backend::SqliteLocal).await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let mut tokens = Vec::new();
    for (id, level) in [(HOSP_A, "三级甲等"), (HOSP_B, "二级甲等")] {
        let v = admin
            .ok(
                "POST",
                "/v1/hospitals",
                Some(json!({"hospital_id": id, "name": format!("医院{id}"), "level": level})),
            )
            .await;
        tokens.push(v["token"].as_str().unwrap().to_string());
    }
    let (token_a, token_b) = (tokens[0].clone(), tokens[1].clone());
    // Both nodes reach the registry, and the test reaches A's API, through
    // recording proxies: the exchanges are checked against proto/.
    let recorder = Recorder::default();
    let url = start_proxy(registry.url(), recorder.clone(), true).await;
    // B's DICOMweb and API are closed: a token of its own systems, or a
    // registry grant.
    let node_b = support::spawn_node_with(Backend::SqliteLocal, {
        let (url, token_b) = (url.clone(), token_b.clone());
        move |c| {
            c.dicomweb.open = false;
            c.dicomweb.tokens = vec![TokenConfig {
                name: "b-systems".into(),
                sha256: hex::encode(Sha256::digest(B_API_TOKEN.as_bytes())),
                scopes: vec![Scope::Read, Scope::Write],
            }];
            c.region = Some(region_config(&url, HOSP_B, &token_b));
        }
    })
    .await;
    let (b_proxy, b_proxy_url) = CuttingProxy::start(format!("http://{}", node_b.http_addr)).await;
    admin
        .ok(
            "PATCH",
            &format!("/v1/hospitals/{HOSP_B}"),
            Some(json!({"dicomweb_base_url": format!("{b_proxy_url}/dicom-web")})),
        )
        .await;
    let scp = StoreScp::start("DEST", true);
    let node_a = support::spawn_node_with(Backend::SqliteLocal, {
        let (url, token_a) = (url.clone(), token_a.clone());
        let dest = scp.remote_ae("DEST");
        move |c| {
            c.dicomweb.open = true;
            c.remote_aes = vec![dest];
            let mut region = region_config(&url, HOSP_A, &token_a);
            region.peer_parallel = 2;
            // Room for about one sample study: the older cache goes.
            region.peer_cache_budget_bytes = 400_000;
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
    let api_b = Api::new(&format!("http://{}", node_b.http_addr), Some(B_API_TOKEN));
    // A started after B's URL was set: its first directory has it.
    wait_until("A knows B's node", || {
        let api_a = api_a.clone();
        async move {
            let s = api_a.ok("GET", "/api/v1/publication", None).await;
            s["hospitals_in_directory"] == 2 && s["directory_version"].is_string()
        }
    })
    .await;

    // A CT study at B.
    let work = tempfile::tempdir().unwrap();
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "peer-ct",
        &["--resident-id", RID],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    let reg_b = Api::new(&url, Some(&token_b));
    let published = crate::region::wait_complete_record(&reg_b, HOSP_B, &uid, 12).await;

    // No consent: the registry refuses the grant; B refuses a request
    // without one.
    let fetch = |uid: String, purpose: &'static str| {
        let api_a = api_a.clone();
        async move {
            api_a
                .call(
                    "POST",
                    "/api/v1/peer/fetch",
                    Some(json!({
                    "hospital_id": HOSP_B, "study_instance_uid": uid, "purpose": purpose,
                    "encounter": if purpose == "emergency" { "emergency" } else { "outpatient" },
                    "user_id": "dr.sun", "reference": "check-123"})),
                )
                .await
        }
    };
    let (code, refused) = fetch(uid.clone(), "treatment").await;
    assert_eq!(code, 403, "{refused}");
    assert!(
        refused["detail"].as_str().unwrap().contains("consent"),
        "{refused}"
    );
    let plain = reqwest::get(format!(
        "http://{}/dicom-web/studies/{uid}",
        node_b.http_addr
    ))
    .await
    .unwrap();
    assert_eq!(plain.status(), 401);
    let (code, _) = Api::new(&format!("http://{}", node_b.http_addr), Some("hg.forged"))
        .call("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    assert_eq!(code, 401);

    // A manifest that never ends (B broken or hostile): A stops reading at
    // its cap, fails the fetch and audits it; nothing is fetched.
    b_proxy
        .flood
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, failed) = fetch(uid.clone(), "emergency").await;
    b_proxy
        .flood
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(code, 502, "{failed}");
    assert!(
        failed["detail"]
            .as_str()
            .unwrap()
            .contains("manifest: larger than 64 MiB"),
        "{failed}"
    );
    let flooded = b_proxy.flooded.load(std::sync::atomic::Ordering::SeqCst);
    assert!(flooded < 200 << 20, "A read on: {flooded} bytes sent");
    let a_audit = api_a.ok("GET", "/api/v1/peer/audit", None).await;
    assert!(
        a_audit["entries"].as_array().unwrap().iter().any(|e| {
            e["action"] == "fetch_failed"
                && e["study_instance_uid"] == uid.as_str()
                && e["detail"].as_str().unwrap().contains("manifest")
        }),
        "{a_audit:#}"
    );

    // Break-the-glass: fetched, verified, flagged in all three trails.
    let (code, report) = fetch(uid.clone(), "emergency").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["instances"], 12);
    assert_eq!(report["fetched"], 12);
    assert_eq!(report["already_present"], 0);
    let (_, again) = fetch(uid.clone(), "emergency").await;
    assert_eq!(
        (again["fetched"].as_i64(), again["already_present"].as_i64()),
        (Some(0), Some(12))
    );
    let audit = admin.ok("GET", "/v1/audit?limit=10000", None).await["entries"]
        .as_array()
        .unwrap()
        .clone();
    let issued: Vec<&Value> = audit
        .iter()
        .filter(|e| e["action"] == "grant_issue")
        .collect();
    assert_eq!(issued[0]["outcome"], "denied");
    assert_eq!(issued[1]["outcome"], "break_the_glass");
    assert!(
        issued[1]["detail"].as_str().unwrap().contains("check-123"),
        "{:?}",
        issued[1]
    );
    assert_eq!(issued[1]["user_id"], "dr.sun");
    assert!(audit.iter().any(|e| e["action"] == "grant_verify"
        && e["outcome"] == "break_the_glass"
        && e["actor"] == HOSP_B));
    let a_audit = api_a.ok("GET", "/api/v1/peer/audit", None).await;
    assert!(
        a_audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "fetched"
                && e["purpose"] == "emergency"
                && e["peer_hospital_id"] == HOSP_B)
    );
    let b_audit = api_b.ok("GET", "/api/v1/peer/audit", None).await;
    assert!(
        b_audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "served"
                && e["purpose"] == "emergency"
                && e["peer_hospital_id"] == HOSP_A)
    );

    // WADO-RS at A with transfer-syntax=*: the bytes B stored.
    let manifest = api_b
        .ok("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    assert_eq!(
        manifest["content_root"],
        published["record"]["content_root"]
    );
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/dicom-web/studies/{uid}",
            node_a.http_addr
        ))
        .header(
            "accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut at_a: Vec<String> = parts(response)
        .await
        .iter()
        .map(|p| blake3::hash(p).to_hex().to_string())
        .collect();
    at_a.sort();
    let mut at_b: Vec<String> = manifest["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["blob_hash"].as_str().unwrap().to_string())
        .collect();
    at_b.sort();
    assert_eq!(at_a, at_b);
    for hash in &at_b {
        let h = huren::types::BlobHash::parse(hash).unwrap();
        assert_eq!(
            node_a.ingest.store().get(&h).await.unwrap(),
            node_b.ingest.store().get(&h).await.unwrap()
        );
    }

    // Consent, then a C-MOVE at A of a regional prior A does not hold: A
    // fetches it from B and sends it on.
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    api_a
        .ok("POST", "/api/v1/consents", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "method": "doctor_assisted", "recorded_by": "dr.sun", "state": "granted", "expires_at": tomorrow})))
        .await;
    let head = make_study(
        work.path(),
        "p1-ct-head-2019",
        "peer-head",
        &["--resident-id", RID],
    );
    store(&node_b, &head.files).await;
    wait_record(&reg_b, HOSP_B, &head.study_instance_uid, 1).await;
    let priors = api_a
        .ok("POST", "/api/v1/priors", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID}, "purpose": "treatment", "user_id": "dr.sun"})))
        .await;
    assert_eq!(priors["records"].as_array().unwrap().len(), 2);
    let output = Command::new("/usr/bin/movescu")
        .args(["-v", "-S", "-aec", "HUREN", "-aem", "DEST"])
        .arg(node_a.host())
        .arg(node_a.port().to_string())
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .arg("-k")
        .arg(format!("StudyInstanceUID={}", head.study_instance_uid))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", support::text(&output));
    assert_eq!(scp.received().len(), 10, "{}", support::text(&output));
    // The same prior by C-GET, as workstations configured to prefer
    // another syntax ask for it (a subset of tests/interop.rs's matrix):
    // implicit and big endian as stored at B arrive converted, with the
    // same pixels.
    for (option, syntax) in [
        ("+xs", "1.2.840.10008.1.2.1"),
        ("+xb", "1.2.840.10008.1.2.2"),
        ("+xi", "1.2.840.10008.1.2.1"),
    ] {
        crate::interop::get_regional_prior(
            &node_a.host(),
            node_a.port(),
            &head.study_instance_uid,
            option,
            &head.files,
            syntax,
            work.path(),
        );
    }
    // The cache budget: the CT (older) was evicted, the head study stays;
    // a study of A's own is never a candidate.
    let own = make_study(
        work.path(),
        "p3-dx-chest-2025",
        "peer-own",
        &["--resident-id", RID],
    );
    store(&node_a, &own.files).await;
    let gone = node_a.ingest.index().study(&uid).await.unwrap();
    assert!(gone.is_none(), "the older cached study was not evicted");
    assert!(
        node_a
            .ingest
            .index()
            .study(&head.study_instance_uid)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        node_a
            .ingest
            .index()
            .study(&own.study_instance_uid)
            .await
            .unwrap()
            .is_some()
    );
    let h = huren::types::BlobHash::parse(&at_b[0]).unwrap();
    assert!(
        node_a.ingest.store().get(&h).await.is_err(),
        "an evicted blob stays"
    );

    // A tampered study at B (one instance's index row pointing at another
    // instance's blob: B serves verified but wrong content): A refuses it.
    let b_db = node_b.config.database_url.clone();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&b_db)
        .await
        .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.sop_instance_uid, i.blob_hash FROM instance i JOIN series se ON se.series_key = i.series_key \
         JOIN study st ON st.study_key = se.study_key WHERE st.study_instance_uid = $1 ORDER BY i.sop_instance_uid",
    )
    .bind(&uid)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    sqlx::query("UPDATE instance SET blob_hash = $1 WHERE sop_instance_uid = $2")
        .bind(&rows[1].1)
        .bind(&rows[0].0)
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, integrity) = fetch(uid.clone(), "treatment").await;
    assert_eq!(code, 502, "{integrity}");
    assert!(
        integrity["detail"].as_str().unwrap().contains("integrity"),
        "{integrity}"
    );
    assert!(
        node_a.ingest.index().study(&uid).await.unwrap().is_none(),
        "nothing tampered stored"
    );
    let a_audit = api_a.ok("GET", "/api/v1/peer/audit", None).await;
    assert!(
        a_audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "integrity_error")
    );
    // Repaired at B: the fetch succeeds again.
    sqlx::query("UPDATE instance SET blob_hash = $1 WHERE sop_instance_uid = $2")
        .bind(&rows[0].1)
        .bind(&rows[0].0)
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);

    // Interrupted: B's study stream breaks halfway through and B stops;
    // then B comes back, and the second fetch takes only what the first
    // did not.
    let knee = make_study(
        work.path(),
        "p2-mr-knee-2025",
        "peer-knee",
        &["--resident-id", RID],
    );
    store(&node_b, &knee.files).await;
    wait_record(&reg_b, HOSP_B, &knee.study_instance_uid, 1).await;
    let knee_bytes: u64 = knee
        .files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    b_proxy.set_cut(Some(knee_bytes / 2));
    let (code, first) = fetch(knee.study_instance_uid.clone(), "treatment").await;
    let a_index = node_a.ingest.index().clone();
    let knee_uid = knee.study_instance_uid.clone();
    let stored_first = a_index
        .study(&knee_uid)
        .await
        .unwrap()
        .map_or(0, |s| s.number_of_study_related_instances);
    assert!(
        stored_first > 0 && stored_first < 8,
        "the first fetch was interrupted after some, not all, instances: {stored_first} stored; {code} {first}"
    );
    let mut b_config = node_b.config.clone();
    b_config.dicom_listen = node_b.dicom_addr;
    b_config.http_listen = node_b.http_addr;
    let b_dir = node_b.stop().await;
    let node_b = support::start_node(b_config, b_dir).await;
    b_proxy.set_cut(None);
    let (code2, second) = fetch(knee.study_instance_uid.clone(), "treatment").await;
    assert_eq!(code2, 200, "{second}");
    assert_eq!(second["instances"], 8);
    assert_eq!(
        second["already_present"].as_i64(),
        Some(stored_first),
        "first: {code} {first}"
    );
    assert_eq!(second["fetched"].as_i64(), Some(8 - stored_first));

    // WADO-RS at A of a regional prior A does not hold: fetched, then served.
    let dx = make_study(
        work.path(),
        "p3-dx-chest-2023",
        "peer-dx",
        &["--resident-id", RID],
    );
    store(&node_b, &dx.files).await;
    wait_record(&reg_b, HOSP_B, &dx.study_instance_uid, 1).await;
    api_a
        .ok("POST", "/api/v1/priors", Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID}, "purpose": "treatment", "user_id": "dr.sun"})))
        .await;
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/dicom-web/studies/{}",
            node_a.http_addr, dx.study_instance_uid
        ))
        .header(
            "accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = parts(response).await;
    let dx_manifest = api_b
        .ok(
            "GET",
            &format!("/api/v1/studies/{}/manifest", dx.study_instance_uid),
            None,
        )
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        blake3::hash(&got[0]).to_hex().to_string(),
        dx_manifest["instances"][0]["blob_hash"].as_str().unwrap()
    );

    Contract::load().check_all(&recorder.all(), &["peer"]);
    node_a.stop().await;
    node_b.stop().await;
    registry.stop().await;
}
