//! Federated registries across provinces (issue 18, docs/federation.md).
//!
//! Every server is a real `huren` process: two registries, each its own
//! province on its own PostgreSQL database, and a hospital node in each.
//! Every HTTP exchange (node to registry, registry to registry, node to
//! node) passes a recording hop, so the tests can search every byte that
//! crosses, headers and query strings included, for the patient's
//! identifier, name and birth date.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};
use sqlx::{Connection, Row};

use crate::metrics::{Process, delta, scrape, spawn, spawn_registry_with, store};
use crate::region::{
    ADMIN_TOKEN, Api, Contract, Exchange, RID, add_hospital, make_study, wait_record, wait_until,
};
use crate::support::{self, repo_path};

const HUREN: &str = env!("CARGO_BIN_EXE_huren");
/// A Shanghai hospital and a Suzhou (Jiangsu) one; made-up codes.
const HOSP_A: &str = "91310000425000001A";
const HOSP_B: &str = "91320500466000002B";
/// Each province keys its patients with its own secret.
const SECRET_A: &str = "region-secret-of-shanghai-0001";
const SECRET_B: &str = "region-secret-of-jiangsu-00001";
/// The federation's pseudonym secret: pilot hospitals' nodes only.
const FED_SECRET: &str = "federation-secret-for-the-tests-0001";
const FEDERATION: &str = "长三角互认试点";

// ------------------------------------------------------------------ hops

/// One HTTP exchange as it crossed a hop.
#[derive(Debug, Clone)]
struct Seen {
    /// Which link: "A→B", "B→A" (registry to registry), "node→A",
    /// "node→B" (node to its registry), "A→node B" (peer fetch).
    link: &'static str,
    method: String,
    /// Path and query string.
    uri: String,
    request_headers: Vec<(String, String)>,
    request_body: Bytes,
    status: u16,
    response_type: String,
    response_headers: Vec<(String, String)>,
    response_body: Bytes,
}

/// A recording forwarder whose target is set once the server behind it
/// has started (the registries name each other's hops in their
/// configuration before either runs); `delay_ms` holds every request back
/// (a slow member).
struct Hop {
    link: &'static str,
    target: OnceLock<String>,
    delay_ms: AtomicU64,
    seen: Arc<Mutex<Vec<Seen>>>,
    client: reqwest::Client,
}

async fn hop(link: &'static str, seen: Arc<Mutex<Vec<Seen>>>) -> (Arc<Hop>, String) {
    let hop = Arc::new(Hop {
        link,
        target: OnceLock::new(),
        delay_ms: AtomicU64::new(0),
        seen,
        client: reqwest::Client::new(),
    });
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(hop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hop, format!("http://{addr}"))
}

fn headers_of(h: &axum::http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn forward(State(hop): State<Arc<Hop>>, request: Request) -> Response {
    let delay = hop.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 256 << 20).await.unwrap();
    let uri = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let target = hop.target.get().expect("hop target set").clone();
    let mut rb = hop
        .client
        .request(parts.method.clone(), format!("{target}{uri}"))
        .body(body.clone());
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            rb = rb.header(k, v);
        }
    }
    let Ok(response) = rb.send().await else {
        return (axum::http::StatusCode::BAD_GATEWAY, "upstream down").into_response();
    };
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap_or_default();
    hop.seen.lock().unwrap().push(Seen {
        link: hop.link,
        method: parts.method.to_string(),
        uri,
        request_headers: headers_of(&parts.headers),
        request_body: body,
        status: status.as_u16(),
        response_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        response_headers: headers_of(&headers),
        response_body: bytes.clone(),
    });
    let mut out = (status, bytes).into_response();
    for (k, v) in &headers {
        if k != "content-length" && k != "transfer-encoding" {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}

// ------------------------------------------------------------------ set-up

fn huren_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(HUREN)
        .args(args)
        .env("HUREN_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A new signing key through the CLI; its public key.
fn keygen(path: &std::path::Path) -> String {
    let (ok, out) = huren_cli(&[
        "registry",
        "federation",
        "keygen",
        "--key-file",
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    out.trim().to_string()
}

struct Province {
    registry: Option<Process>,
    url: String,
    database_url: String,
    admin: Api,
}

struct Federation {
    dir: tempfile::TempDir,
    a: Province,
    b: Province,
    /// The hop in front of B that A's registry calls (and its delay).
    to_b: Arc<Hop>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Writes a federation configuration for `me` naming `other`.
#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &std::path::Path,
    me: &str,
    province: &str,
    key_file: &str,
    other: &str,
    other_province: &str,
    other_url: &str,
    other_key: &str,
    policy: &str,
) -> std::path::PathBuf {
    // "asking,nothing": the consent policy, then what a refusal says.
    let mut settings = policy.split(',');
    let policy = format!(
        "consent_policy = \"{}\"\nwithheld = \"{}\"",
        settings.next().unwrap(),
        settings.next().unwrap_or("count")
    );
    std::fs::copy(
        repo_path("deploy/recognition/jiangsu-example.toml"),
        dir.join("federation-list.toml"),
    )
    .unwrap();
    let path = dir.join(format!("federation-{me}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[federation]
name = "{FEDERATION}"
member_id = "{me}"
province = "{province}"
signing_key_file = "{key_file}"
recognition_list = "federation-list.toml"
{policy}
deadline_ms = 1000

[[member]]
id = "{other}"
province = "{other_province}"
url = "{other_url}"
public_key = "{other_key}"
"#
        ),
    )
    .unwrap();
    let (ok, out) = huren_cli(&["registry", "federation", "check", path.to_str().unwrap()]);
    assert!(ok, "{out}");
    path
}

async fn start_federation(policy: &str) -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let key_a = keygen(&dir.path().join("sh.key"));
    let key_b = keygen(&dir.path().join("js.key"));
    let (to_a, to_a_url) = hop("B→A", seen.clone()).await;
    let (to_b, to_b_url) = hop("A→B", seen.clone()).await;
    let conf_a = write_config(
        dir.path(),
        "sh",
        "上海市",
        "sh.key",
        "js",
        "江苏省",
        &to_b_url,
        &key_b,
        policy,
    );
    let conf_b = write_config(
        dir.path(),
        "js",
        "江苏省",
        "js.key",
        "sh",
        "上海市",
        &to_a_url,
        &key_a,
        policy,
    );
    let list = repo_path("deploy/recognition/jiangsu-example.toml");
    let mut provinces = Vec::new();
    for (name, conf) in [("a", &conf_a), ("b", &conf_b)] {
        let pdir = dir.path().join(name);
        std::fs::create_dir(&pdir).unwrap();
        let database_url = support::fresh_postgres_database().await;
        let process = spawn_registry_with(
            &pdir,
            &[
                "--database-url",
                &database_url,
                "--federation-config",
                conf.to_str().unwrap(),
                "--recognition-list",
                list.to_str().unwrap(),
            ],
        );
        let url = format!("http://{}", process.addrs[0]);
        provinces.push(Province {
            registry: Some(process),
            admin: Api::new(&url, Some(ADMIN_TOKEN)),
            url,
            database_url,
        });
    }
    let b = provinces.pop().unwrap();
    let a = provinces.pop().unwrap();
    to_a.target.set(a.url.clone()).unwrap();
    to_b.target.set(b.url.clone()).unwrap();
    Federation {
        dir,
        a,
        b,
        to_b,
        seen,
    }
}

/// A hospital node process: its registry behind a recording hop, and the
/// federation secret (a pilot hospital).
struct Node {
    _process: Process,
    dicom: std::net::SocketAddr,
    url: String,
    api: Api,
}

/// (Eight settings of one node, named at the call.)
#[allow(clippy::too_many_arguments)]
async fn spawn_node(
    dir: &std::path::Path,
    name: &str,
    registry_url: &str,
    link: &'static str,
    seen: &Arc<Mutex<Vec<Seen>>>,
    hospital_id: &str,
    token: &str,
    region_secret: &str,
) -> Node {
    let ndir = dir.join(name);
    std::fs::create_dir(&ndir).unwrap();
    let (to_registry, to_registry_url) = hop(link, seen.clone()).await;
    to_registry.target.set(registry_url.to_string()).unwrap();
    let write = |file: &str, content: &str| {
        let p = ndir.join(file);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    };
    let token_file = write("registry-token", token);
    let secret_file = write("region-secret", region_secret);
    let fed_file = write("federation-secret", FED_SECRET);
    let api_file = write("api-token", "operator-token-for-the-federation-test");
    let process = spawn(
        &ndir,
        &[
            "node",
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[
            ("HUREN_REGISTRY_URL", to_registry_url.as_str()),
            ("HUREN_HOSPITAL_ID", hospital_id),
            ("HUREN_REGISTRY_TOKEN_FILE", token_file.as_str()),
            ("HUREN_REGION_SECRET_FILE", secret_file.as_str()),
            ("HUREN_FEDERATION_SECRET_FILE", fed_file.as_str()),
            ("HUREN_OPERATOR_TOKEN_FILE", api_file.as_str()),
            ("HUREN_IDENTIFIER_ISSUERS", "RESIDENT_ID=RID"),
            ("HUREN_STUDY_QUIET_SECS", "0.3"),
            ("HUREN_PUBLISH_MAX_BACKOFF_SECS", "0.4"),
            ("HUREN_DIRECTORY_INTERVAL_SECS", "1"),
        ],
        &["DICOM listening on ", "HTTP listening on "],
    );
    let url = format!("http://{}", process.addrs[1]);
    let api = Api::new(&url, Some("operator-token-for-the-federation-test"));
    Node {
        dicom: process.addrs[0],
        url,
        api,
        _process: process,
    }
}

fn patient_key(secret: &str) -> String {
    use huren::patient_key::{Identifier, IdentifierType, RegionSecret};
    RegionSecret::from_secret(secret)
        .unwrap()
        .patient_key(&Identifier::parse(IdentifierType::ResidentId, RID).unwrap())
}

fn shanghai_today() -> chrono::NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive()
}

/// The order-time check at A for a plain chest CT.
async fn check_at(api: &Api) -> Value {
    api.ok(
        "POST",
        "/api/v1/recognition/check",
        Some(json!({
            "patient": {"identifier_type": "RID", "identifier": RID},
            "order": {"item_code": "CT-0301-01"}, "ordering_doctor": "dr.zhou",
            "encounter": "outpatient"})),
    )
    .await
}

/// Every table of a registry's database as text, one row a line.
async fn dump_tables(database_url: &str) -> String {
    let mut conn = sqlx::postgres::PgConnection::connect(database_url)
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert!(tables.iter().any(|t| t == "federation_identity"));
    let mut out = String::new();
    for t in tables {
        // Table names from the catalogue, not from input.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT row_to_json(t)::text FROM \"{t}\" t"
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for r in rows {
            out.push_str(&t);
            out.push(' ');
            out.push_str(&r.get::<String, _>(0));
            out.push('\n');
        }
    }
    out
}

fn audit_verifies(database_url: &str) -> String {
    let (ok, out) = huren_cli(&[
        "registry",
        "audit",
        "verify",
        "--database-url",
        database_url,
    ]);
    assert!(ok, "audit verify: {out}");
    out
}

async fn audit(admin: &Api) -> Vec<Value> {
    admin.ok("GET", "/v1/audit?limit=10000", None).await["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn exchanges(seen: &[Seen], links: &[&str]) -> Vec<Exchange> {
    seen.iter()
        .filter(|s| links.contains(&s.link))
        .map(|s| Exchange {
            method: s.method.clone(),
            path: s.uri.split('?').next().unwrap().to_string(),
            status: s.status,
            request_body: s.request_body.clone(),
            response_type: s.response_type.clone(),
            response_body: s.response_body.clone(),
            from_node: true,
        })
        .collect()
}

/// A pilot node in each province and a chest CT at B, reported three days
/// ago and QC-passed, published with the pseudonym beside Jiangsu's key;
/// A's node has pulled the list.
async fn two_nodes_and_a_study(fed: &Federation) -> (Node, Node, crate::region::MadeStudy) {
    let token_a = add_hospital(&fed.a.admin, HOSP_A, "三级甲等", None).await;
    // B's node is reached through a hop too: the fetch is recorded.
    let (to_node_b, to_node_b_url) = hop("A→node B", fed.seen.clone()).await;
    let token_b = add_hospital(
        &fed.b.admin,
        HOSP_B,
        "三级甲等",
        Some(&format!("{to_node_b_url}/dicom-web")),
    )
    .await;
    let node_a = spawn_node(
        fed.dir.path(),
        "node-a",
        &fed.a.url,
        "node→A",
        &fed.seen,
        HOSP_A,
        &token_a,
        SECRET_A,
    )
    .await;
    let node_b = spawn_node(
        fed.dir.path(),
        "node-b",
        &fed.b.url,
        "node→B",
        &fed.seen,
        HOSP_B,
        &token_b,
        SECRET_B,
    )
    .await;
    to_node_b.target.set(node_b.url.clone()).unwrap();

    // A chest CT at B, reported three days ago: published with the
    // pseudonym beside Jiangsu's patient key.
    let ct = make_study(
        fed.dir.path(),
        "p1-ct-chest-2024",
        "fed-ct",
        &["--resident-id", RID],
    );
    store(node_b.dicom, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    let report_date = shanghai_today() - chrono::Duration::days(3);
    node_b
        .api
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final",
                "report_issued_date": report_date.format("%Y-%m-%d").to_string()})),
        )
        .await;
    node_b
        .api
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    wait_until("the reported record at B", || {
        let admin = fed.b.admin.clone();
        let uid = uid.clone();
        async move {
            let r = wait_record(&admin, HOSP_B, &uid, 1).await;
            r["record"]["report_status"] == "final"
                && r["record"]["qc_status"] == "passed"
                && r["record"]["federation_pseudonym"].is_string()
        }
    })
    .await;
    wait_until("node A pulled the list", || {
        let api = node_a.api.clone();
        async move { api.call("GET", "/api/v1/recognition/list", None).await.0 == 200 }
    })
    .await;

    (node_a, node_b, ct)
}

// ------------------------------------------------------------------ tests

/// A study at a pilot hospital in Jiangsu; a doctor in Shanghai is warned
/// of it and opens it through their own node; count only before the
/// patient's consent in Jiangsu; nothing of the patient's identity crosses
/// a border or is stored by either registry; both audit chains verify and
/// name the other registry; every registry-to-registry body keeps proto/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_end_to_end() {
    let fed = start_federation("holding").await;
    let (node_a, _node_b, ct) = two_nodes_and_a_study(&fed).await;
    let uid = ct.study_instance_uid.clone();

    // Before the patient's consent in Jiangsu: A's own (none) and a count.
    let before = check_at(&node_a.api).await;
    assert_eq!(before["outcome"], "no_warn", "{before}");
    let member = &before["federation"]["members"][0];
    assert_eq!(member["member_id"], "js", "{before}");
    assert_eq!(member["status"], "reached", "{before}");
    assert_eq!(member["records"], 0, "{before}");
    assert_eq!(member["withheld_count"], 1, "{before}");

    // The patient consents, in Jiangsu, to Shanghai's hospitals seeing
    // Jiangsu's records of them (the health app, through the admin API).
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    // These two calls are checked against proto/ with the rest.
    let mut consent_calls = Vec::new();
    for (member, expected) in [("sh", 201), ("nobody", 404)] {
        let body = json!({"patient_key": patient_key(SECRET_B), "member_id": member,
            "method": "qr_code", "recorded_by": "health-app", "state": "granted",
            "expires_at": tomorrow});
        let (status, answer) = fed
            .b
            .admin
            .call("POST", "/v1/federation/consents", Some(body.clone()))
            .await;
        assert_eq!(status, expected, "member {member}: {answer}");
        consent_calls.push(Exchange {
            method: "POST".into(),
            path: "/v1/federation/consents".into(),
            status,
            request_body: serde_json::to_vec(&body).unwrap().into(),
            response_type: if status == 201 {
                "application/json".into()
            } else {
                "application/problem+json".into()
            },
            response_body: serde_json::to_vec(&answer).unwrap().into(),
            from_node: false,
        });
    }

    let warn = check_at(&node_a.api).await;
    assert_eq!(warn["outcome"], "warn", "{warn}");
    assert_eq!(warn["cited"]["hospital_id"], HOSP_B, "{warn}");
    assert_eq!(warn["cited"]["study_instance_uid"], uid.as_str());
    assert_eq!(warn["provinces"][&uid], "江苏省", "{warn}");
    let member = &warn["federation"]["members"][0];
    assert_eq!(member["status"], "reached");
    assert_eq!(member["records"], 1);
    assert_eq!(member["withheld_count"], 0);

    // The doctor accepts the prior; the decision goes to A's registry with
    // the region's statistics (and is searched for PHI with the rest).
    node_a
        .api
        .ok(
            "POST",
            "/api/v1/recognition/decisions",
            Some(
                json!({"check_id": warn["check_id"], "decision": "accepted", "doctor": "dr.zhou"}),
            ),
        )
        .await;
    wait_until("the decision reached A's registry", || {
        let seen = fed.seen.clone();
        async move {
            seen.lock().unwrap().iter().any(|s| {
                s.link == "node→A"
                    && s.uri == "/v1/recognition/events"
                    && s.status == 200
                    && String::from_utf8_lossy(&s.request_body).contains("\"accepted\"")
            })
        }
    })
    .await;

    // The doctor at A opens the images through A's node: A's registry
    // vouches for A to B's registry, which issues the grant; A fetches
    // from B's node and verifies against the content root B published.
    let fetched = node_a
        .api
        .ok(
            "POST",
            "/api/v1/peer/fetch",
            Some(json!({"hospital_id": HOSP_B, "study_instance_uid": uid,
                "purpose": "treatment", "user_id": "dr.zhou", "reference": warn["check_id"]})),
        )
        .await;
    assert_eq!(
        fetched["fetched"].as_i64().unwrap(),
        ct.files.len() as i64,
        "{fetched}"
    );
    // Held at A now, with the very content B published.
    let published = wait_record(&fed.b.admin, HOSP_B, &uid, 1).await;
    let local = node_a
        .api
        .ok("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    assert_eq!(
        local["content_root"], published["record"]["content_root"],
        "{local}"
    );

    // A registry that is not a member: a well-formed signature with a key
    // the federation does not list, under a member's name and its own.
    let stranger_dir = tempfile::tempdir().unwrap();
    keygen(&stranger_dir.path().join("x.key"));
    let x_conf = write_config(
        stranger_dir.path(),
        "sh",
        "上海市",
        "x.key",
        "js",
        "江苏省",
        &fed.b.url,
        &"0".repeat(64),
        "holding",
    );
    let mut stranger = huren::registry::federation::Federation::load(&x_conf).unwrap();
    let pseudonym = {
        use huren::patient_key::{FederationSecret, Identifier, IdentifierType};
        FederationSecret::from_secret(FED_SECRET)
            .unwrap()
            .pseudonym(&Identifier::parse(IdentifierType::ResidentId, RID).unwrap())
    };
    let body = serde_json::to_vec(&json!({"federation": FEDERATION, "pseudonym": pseudonym,
        "purpose": "treatment", "asking_hospital_id": HOSP_A, "user_id": "x",
        "asking_consent": true, "request_id": "x1"}))
    .unwrap();
    for name in ["sh", "rogue"] {
        stranger.member_id = name.into();
        let mut rb = reqwest::Client::new()
            .post(format!("{}/v1/federation/priors", fed.b.url))
            .header("content-type", "application/json")
            .body(body.clone());
        for (k, v) in stranger.sign("POST", "/v1/federation/priors", &body) {
            rb = rb.header(k, v);
        }
        let response = rb.send().await.unwrap();
        assert_eq!(response.status(), 403, "{name}");
        let text = response.text().await.unwrap();
        assert!(!text.contains(HOSP_B), "a refusal says nothing: {text}");
    }
    // A replay of a genuine request from A is refused too.
    let genuine = fed
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.link == "A→B" && s.uri == "/v1/federation/priors" && s.status == 200)
        .cloned()
        .expect("A asked B");
    let mut rb = reqwest::Client::new()
        .post(format!("{}/v1/federation/priors", fed.b.url))
        .body(genuine.request_body.clone());
    for (k, v) in &genuine.request_headers {
        if k != "host" && k != "content-length" {
            rb = rb.header(k, v);
        }
    }
    assert_eq!(rb.send().await.unwrap().status(), 403, "a replay");

    // Both audit trails: the queries and the grant with the other
    // registry's identity, the refusals with what they claimed.
    let trail_a = audit(&fed.a.admin).await;
    let trail_b = audit(&fed.b.admin).await;
    let has = |trail: &[Value], action: &str, actor: &str, outcome: &str, detail: &str| {
        trail.iter().any(|e| {
            e["action"] == action
                && e["actor"].as_str().unwrap().starts_with(actor)
                && e["outcome"] == outcome
                && e["detail"].as_str().unwrap().contains(detail)
        })
    };
    assert!(has(
        &trail_a,
        "federation_query",
        HOSP_A,
        "reached",
        "member js (江苏省)"
    ));
    assert!(has(&trail_a, "federation_grant", HOSP_A, "ok", "member js"));
    // Each fanned-out query is one commit at the asking registry: its own
    // priors_query entry and the member's federation_query entry are
    // appended together (consecutive, one timestamp), after the member
    // answered.
    let mut fanned_out = 0;
    for (i, e) in trail_a.iter().enumerate() {
        if e["action"] != "federation_query" {
            continue;
        }
        fanned_out += 1;
        let local = &trail_a[i - 1];
        assert_eq!(local["action"], "priors_query", "{local}");
        assert_eq!(local["actor"], HOSP_A, "{local}");
        assert_eq!(local["patient_key"], e["patient_key"], "{local}");
        assert_eq!(local["at"], e["at"], "one transaction: {local} {e}");
        assert_eq!(
            local["seq"].as_i64().unwrap() + 1,
            e["seq"].as_i64().unwrap()
        );
    }
    assert!(fanned_out >= 2, "{trail_a:?}");
    assert!(has(
        &trail_b,
        "federation_query",
        "registry:sh",
        "count_only",
        "from member sh"
    ));
    assert!(has(
        &trail_b,
        "federation_query",
        "registry:sh",
        "ok",
        HOSP_A
    ));
    assert!(has(&trail_b, "federation_grant", "registry:sh", "ok", &uid));
    assert!(has(&trail_b, "grant_verify", HOSP_B, "ok", HOSP_A));
    assert!(has(
        &trail_b,
        "refusal",
        "registry:sh",
        "forbidden",
        "does not verify"
    ));
    assert!(has(
        &trail_b,
        "refusal",
        "registry:rogue",
        "forbidden",
        "not a member"
    ));
    assert!(has(
        &trail_b,
        "refusal",
        "registry:sh",
        "forbidden",
        "replayed"
    ));
    for url in [&fed.a.database_url, &fed.b.database_url] {
        assert!(audit_verifies(url).contains("audit chain intact"));
    }

    // The PHI search: every byte that crossed any link (requests: line,
    // query string, headers, body; responses of the registries: headers
    // and body) and every table of both registries. The images a granted
    // fetch carries are the DICOM instances themselves: their bodies are
    // the one thing that holds the name, by design.
    let seen = fed.seen.lock().unwrap().clone();
    for link in ["A→B", "node→A", "node→B", "A→node B"] {
        assert!(seen.iter().any(|s| s.link == link), "no exchange on {link}");
    }
    // A one-character name component (三 of 张三) is searched as the
    // whole ideographic name: alone it is in every "三级甲等".
    let (single, mut phi): (Vec<String>, Vec<String>) =
        ct.phi.iter().cloned().partition(|p| p.chars().count() < 2);
    phi.push(single.concat());
    phi.push(RID.to_string());
    phi.push(RID.to_ascii_lowercase());
    phi.push(patient_key(SECRET_B));
    let mut corpus: Vec<(String, Vec<u8>)> = Vec::new();
    for s in &seen {
        let mut head = format!("{} {}\n", s.method, s.uri);
        for (k, v) in &s.request_headers {
            head.push_str(&format!("{k}: {v}\n"));
        }
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&s.request_body);
        for (k, v) in &s.response_headers {
            bytes.extend_from_slice(format!("{k}: {v}\n").as_bytes());
        }
        let dicom = s.link == "A→node B"
            && (s.response_type.contains("dicom") || s.response_type.starts_with("multipart"));
        if !dicom {
            bytes.extend_from_slice(&s.response_body);
        }
        corpus.push((format!("{} {} {}", s.link, s.method, s.uri), bytes));
    }
    corpus.push((
        "registry A tables".into(),
        dump_tables(&fed.a.database_url).await.into_bytes(),
    ));
    corpus.push((
        "registry B tables".into(),
        dump_tables(&fed.b.database_url).await.into_bytes(),
    ));
    for (what, bytes) in &corpus {
        let text = String::from_utf8_lossy(bytes);
        for p in &phi {
            // Jiangsu's patient key may stay in Jiangsu: it is in B's
            // tables and B's own links, never on the border or in A.
            let in_b = what.starts_with("registry B") || what.starts_with("node→B");
            if *p == patient_key(SECRET_B) && in_b {
                continue;
            }
            assert!(!text.contains(p.as_str()), "{p:?} in {what}");
        }
    }

    // proto/: every registry-to-registry exchange, and every node to
    // registry exchange, keeps the contract; the federation's operations
    // were all exercised. And the checker is no rubber stamp: a body that
    // breaks proto/ is rejected.
    let contract = Contract::load();
    let mut between = exchanges(&seen, &["A→B", "B→A"]);
    between.extend(consent_calls);
    contract.check_all(&between, &["federation"]);
    for e in exchanges(&seen, &["node→A", "node→B"]) {
        contract
            .check(&e)
            .unwrap_or_else(|err| panic!("contract: {err}"));
    }
    let mut broken = exchanges(&seen, &["A→B"])
        .into_iter()
        .find(|e| {
            e.path == "/v1/federation/priors"
                && e.status == 200
                && serde_json::from_slice::<Value>(&e.response_body).unwrap()["records"][0]
                    .is_object()
        })
        .unwrap();
    let valid = broken.clone();
    contract.check(&valid).unwrap();
    let mut answer: Value = serde_json::from_slice(&broken.response_body).unwrap();
    answer["records"][0]["record"]["patient_key"] = json!(RID);
    broken.response_body = serde_json::to_vec(&answer).unwrap().into();
    assert!(contract.check(&broken).is_err(), "a raw ID as patient_key");
    answer["withheld_count"] = json!(-1);
    answer["records"] = json!([]);
    broken.response_body = serde_json::to_vec(&answer).unwrap().into();
    assert!(contract.check(&broken).is_err(), "a negative count");
    let mut query: Value = serde_json::from_slice(&broken.request_body).unwrap();
    query["patient_name"] = json!("Zhang^San");
    broken.request_body = serde_json::to_vec(&query).unwrap().into();
    broken.response_body = valid.response_body.clone();
    assert!(
        contract.check(&broken).is_err(),
        "a field proto/ does not have"
    );
}

/// A member that is slow, then down: A's answer comes within the deadline
/// (1 s), with A's own records, the member marked `not_reached`, and the
/// audit and A's `/metrics` saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_slow_or_down_never_holds_the_answer() {
    let mut fed = start_federation("holding").await;
    let token_a = add_hospital(&fed.a.admin, HOSP_A, "三级甲等", None).await;
    let node_a = spawn_node(
        fed.dir.path(),
        "node-a",
        &fed.a.url,
        "node→A",
        &fed.seen,
        HOSP_A,
        &token_a,
        SECRET_A,
    )
    .await;
    wait_until("node A pulled the list", || {
        let api = node_a.api.clone();
        async move { api.call("GET", "/api/v1/recognition/list", None).await.0 == 200 }
    })
    .await;
    let a_http: std::net::SocketAddr = fed.a.url.trim_start_matches("http://").parse().unwrap();
    let js = [("member", "js")];
    let calls = "huren_registry_federation_member_duration_seconds_count";
    let waited = "huren_registry_federation_member_duration_seconds_sum";
    let not_reached = "huren_registry_federation_not_reached_total";
    let before = scrape(a_http).await;
    let reached = check_at(&node_a.api).await;
    assert_eq!(
        reached["federation"]["members"][0]["status"], "reached",
        "{reached}"
    );
    let after_reached = scrape(a_http).await;
    assert_eq!(delta(&before, &after_reached, calls, &js), 1.0);
    assert_eq!(delta(&before, &after_reached, not_reached, &js), 0.0);

    // Slow: B's answers are held back 5 s, past the deadline.
    fed.to_b.delay_ms.store(5000, Ordering::SeqCst);
    let started = Instant::now();
    let slow = check_at(&node_a.api).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    assert_eq!(slow["registry_reached"], true);
    let member = &slow["federation"]["members"][0];
    assert_eq!(member["status"], "not_reached", "{slow}");
    assert!(member["elapsed_ms"].as_i64().unwrap() < 1500, "{slow}");

    // Down: B's registry process killed.
    fed.to_b.delay_ms.store(0, Ordering::SeqCst);
    drop(fed.b.registry.take());
    let started = Instant::now();
    let down = check_at(&node_a.api).await;
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert_eq!(
        down["federation"]["members"][0]["status"], "not_reached",
        "{down}"
    );
    assert_eq!(down["outcome"], "no_warn");
    let after = scrape(a_http).await;
    assert_eq!(delta(&after_reached, &after, calls, &js), 2.0);
    assert_eq!(delta(&after_reached, &after, not_reached, &js), 2.0);
    assert!(
        delta(&after_reached, &after, waited, &js) >= 1.0,
        "the slow call waited the whole deadline"
    );

    let trail = audit(&fed.a.admin).await;
    let not_reached = trail
        .iter()
        .filter(|e| e["action"] == "federation_query" && e["outcome"] == "not_reached")
        .count();
    assert_eq!(not_reached, 2, "slow and down, each audited");
    assert!(audit_verifies(&fed.a.database_url).contains("audit chain intact"));
}

/// The asking province's consent, and nothing said without it: under
/// `asking`, Jiangsu shows its records when Shanghai's registry asserts the
/// patient's consent for the asking hospital, and with `withheld =
/// "nothing"` a query without it learns nothing, not even a count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_policy_asking_and_nothing_withheld() {
    let fed = start_federation("asking,nothing").await;
    let (node_a, _node_b, ct) = two_nodes_and_a_study(&fed).await;
    let uid = ct.study_instance_uid.clone();

    let without = check_at(&node_a.api).await;
    assert_eq!(without["outcome"], "no_warn", "{without}");
    let member = &without["federation"]["members"][0];
    assert_eq!(member["status"], "reached", "{without}");
    assert_eq!(member["records"], 0, "{without}");
    assert_eq!(member["withheld_count"], 0, "nothing said: {without}");
    assert_eq!(without["withheld_count"], 0, "{without}");

    // The patient's consent for A, recorded in Shanghai (A's node turns
    // the ID into Shanghai's key; Jiangsu never sees either).
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    node_a
        .api
        .ok(
            "POST",
            "/api/v1/consents",
            Some(
                json!({"patient": {"identifier_type": "RID", "identifier": RID},
                "method": "doctor_assisted", "recorded_by": "dr.zhou", "state": "granted",
                "expires_at": tomorrow}),
            ),
        )
        .await;
    let with = check_at(&node_a.api).await;
    assert_eq!(with["outcome"], "warn", "{with}");
    assert_eq!(with["cited"]["study_instance_uid"], uid.as_str());
    assert_eq!(with["provinces"][&uid], "江苏省");

    let trail_b = audit(&fed.b.admin).await;
    let outcomes: Vec<&str> = trail_b
        .iter()
        .filter(|e| e["action"] == "federation_query")
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["withheld", "ok"], "{trail_b:?}");
    assert!(
        trail_b
            .iter()
            .filter(|e| e["action"] == "federation_query")
            .all(|e| e["detail"].as_str().unwrap().contains("policy asking"))
    );
    for url in [&fed.a.database_url, &fed.b.database_url] {
        assert!(audit_verifies(url).contains("audit chain intact"));
    }
}
