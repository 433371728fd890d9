//! The region: a registry and hospital nodes publishing to it, consent,
//! audit, and the contract in proto/.
//!
//! Every exchange with the registry and with the nodes' JSON API goes
//! through a recording proxy; at the end of the main test each one is
//! checked against proto/huren.openapi.json (route, status, request and
//! response bodies), every operation of the contract must have been
//! exercised, and no request a node sent may contain the patient's raw ID,
//! name or birth date.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use huren::config::{NodeConfig, RegionConfig};
use huren::patient_key::{Identifier, IdentifierType, RegionSecret};
use huren::registry::RegistryArgs;
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::{self, Backend, TestNode, python_tool, repo_path, storescu};

pub const SECRET: &str = "region-secret-for-the-test-suite-0001";
/// A valid resident ID number of the sample patient HUR-100001 (Zhang San,
/// born 1958-04-12, male): a node publishes no study whose PatientBirthDate
/// or PatientSex contradicts the number.
pub const RID: &str = "110105195804120012";
pub const ADMIN_TOKEN: &str = "admin-token-for-the-test-suite-0001";

// ------------------------------------------------------------------ registry

pub struct TestRegistry {
    pub addr: SocketAddr,
    pub database_url: String,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestRegistry {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn args(dir: &Path, database_url: &str) -> RegistryArgs {
        let token_file = dir.join("admin-token");
        std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
        RegistryArgs {
            data_dir: Some(dir.to_path_buf()),
            database_url: Some(database_url.to_string()),
            admin_token_file: Some(token_file),
            ..RegistryArgs::default()
        }
    }

    async fn start_on(addr: SocketAddr, dir: tempfile::TempDir, database_url: String) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let args = Self::args(dir.path(), &database_url);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { huren::registry::run(listener, &args, shutdown).await }
        });
        let r = TestRegistry {
            addr,
            database_url,
            dir,
            shutdown,
            task: Some(task),
        };
        wait_until("registry healthy", || async {
            reqwest::get(format!("{}/health", r.url()))
                .await
                .is_ok_and(|resp| resp.status() == 200)
        })
        .await;
        r
    }

    /// Stops serving; returns what a restart needs.
    pub async fn stop(mut self) -> (SocketAddr, tempfile::TempDir, String) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        (self.addr, self.dir, self.database_url)
    }
}

pub async fn registry_database(backend: Backend, dir: &Path) -> String {
    match backend {
        Backend::SqliteLocal => format!("sqlite://{}", dir.join("registry.sqlite").display()),
        Backend::PostgresS3 => support::fresh_postgres_database().await,
    }
}

pub async fn spawn_registry(backend: Backend) -> TestRegistry {
    let dir = tempfile::tempdir().unwrap();
    let url = registry_database(backend, dir.path()).await;
    TestRegistry::start_on("127.0.0.1:0".parse().unwrap(), dir, url).await
}

/// Polls `check` until it holds (every 50 ms, at most 60 s): readiness,
/// not a fixed sleep.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ recording proxy

#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub request_body: Bytes,
    pub response_type: String,
    pub response_body: Bytes,
    /// Whether a node sent it (the registry proxy) or the test (node API).
    pub from_node: bool,
}

#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Exchange>>>);

impl Recorder {
    pub fn all(&self) -> Vec<Exchange> {
        self.0.lock().unwrap().clone()
    }
}

struct Proxy {
    target: String,
    recorder: Recorder,
    client: reqwest::Client,
    /// Requests that carry no X-Test header come from a node.
    node_side: bool,
}

/// A forwarding proxy in front of `target` that records every exchange.
pub async fn start_proxy(target: String, recorder: Recorder, node_side: bool) -> String {
    let proxy = Arc::new(Proxy {
        target,
        recorder,
        client: reqwest::Client::new(),
        node_side,
    });
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn forward(State(p): State<Arc<Proxy>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut rb = p
        .client
        .request(
            parts.method.clone(),
            format!("{}{path_and_query}", p.target),
        )
        .body(body.clone());
    let from_test = parts.headers.contains_key("x-test");
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" && k != "x-test" {
            rb = rb.header(k, v);
        }
    }
    let Ok(response) = rb.send().await else {
        return (axum::http::StatusCode::BAD_GATEWAY, "upstream down").into_response();
    };
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap_or_default();
    p.recorder.0.lock().unwrap().push(Exchange {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        status: status.as_u16(),
        request_body: body,
        response_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        response_body: bytes.clone(),
        from_node: p.node_side && !from_test,
    });
    let mut out = (status, bytes).into_response();
    for (k, v) in &headers {
        if k != "content-length" && k != "transfer-encoding" {
            out.headers_mut().insert(k, v.clone());
        }
    }
    out
}

// ------------------------------------------------------------------ contract

pub struct Contract {
    doc: Value,
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl Contract {
    pub fn load() -> Contract {
        let text = std::fs::read_to_string(repo_path("proto/huren.openapi.json")).unwrap();
        let doc: Value = serde_json::from_str(&text).expect("proto/huren.openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        Contract {
            doc,
            validators: Mutex::new(HashMap::new()),
        }
    }

    /// A validator for a schema of the document: the whole document is the
    /// root resource (so `#/components/schemas/...` resolves), with the
    /// schema's keywords on top; OpenAPI's own keys are unknown keywords to
    /// JSON Schema and ignored.
    fn validator(&self, schema: &Value) -> Arc<jsonschema::Validator> {
        let key = schema.to_string();
        let mut cache = self.validators.lock().unwrap();
        cache
            .entry(key)
            .or_insert_with(|| {
                let mut root = self.doc.clone();
                let obj = root.as_object_mut().unwrap();
                obj.insert(
                    "$schema".into(),
                    json!("https://json-schema.org/draft/2020-12/schema"),
                );
                for (k, v) in schema.as_object().unwrap() {
                    obj.insert(k.clone(), v.clone());
                }
                Arc::new(jsonschema::validator_for(&root).expect("schema compiles"))
            })
            .clone()
    }

    pub fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let v = self.validator(schema);
        let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The path template and operation of a request.
    pub fn operation(&self, method: &str, path: &str) -> Option<(String, &Value)> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        for (template, item) in self.doc["paths"].as_object().unwrap() {
            let t: Vec<&str> = template.split('/').collect();
            if t.len() == segments.len()
                && t.iter().zip(&segments).all(|(a, b)| {
                    (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b
                })
                && let Some(op) = item.get(method.to_ascii_lowercase())
            {
                return Some((template.clone(), op));
            }
        }
        None
    }

    pub fn check(&self, ex: &Exchange) -> Result<String, String> {
        let (template, op) = self
            .operation(&ex.method, &ex.path)
            .ok_or_else(|| format!("{} {} is not in the contract", ex.method, ex.path))?;
        if !ex.request_body.is_empty() {
            let content = &op["requestBody"]["content"];
            if content.is_null() {
                return Err(format!(
                    "{} {template}: a body the contract does not take",
                    ex.method
                ));
            }
            let schema = content["application/json"]["schema"].clone();
            // A request the server refused may be malformed on purpose; a
            // body of another media type (the TOML list) is text.
            if ex.status < 400 && !schema.is_null() {
                let body: Value = serde_json::from_slice(&ex.request_body)
                    .map_err(|e| format!("{} {template}: request is not JSON: {e}", ex.method))?;
                self.validate(&schema, &body)
                    .map_err(|e| format!("{} {template} request: {e}\n{body}", ex.method))?;
            }
        }
        let response = &op["responses"][ex.status.to_string()];
        if response.is_null() {
            return Err(format!(
                "{} {template}: status {} is not in the contract",
                ex.method, ex.status
            ));
        }
        match response.get("content") {
            None => {
                if !ex.response_body.is_empty() {
                    return Err(format!(
                        "{} {template} {}: unexpected body",
                        ex.method, ex.status
                    ));
                }
            }
            Some(content) => {
                let media = &content[&ex.response_type];
                if media.is_null() {
                    return Err(format!(
                        "{} {template} {}: content type {:?} is not in the contract",
                        ex.method, ex.status, ex.response_type
                    ));
                }
                if ex.response_type == "application/json"
                    || ex.response_type == "application/problem+json"
                {
                    let body: Value = serde_json::from_slice(&ex.response_body).map_err(|e| {
                        format!("{} {template}: response is not JSON: {e}", ex.method)
                    })?;
                    self.validate(&media["schema"], &body).map_err(|e| {
                        format!(
                            "{} {template} {} response: {e}\n{body}",
                            ex.method, ex.status
                        )
                    })?;
                }
            }
        }
        Ok(format!("{} {template}", ex.method.to_ascii_lowercase()))
    }

    /// The operations of the document with one of `tags`, as "method
    /// template".
    pub fn operations(&self, tags: &[&str]) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for (template, item) in self.doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let tagged = op["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| tags.contains(&t.as_str().unwrap_or(""))));
                if tagged {
                    all.insert(format!("{method} {template}"));
                }
            }
        }
        all
    }

    /// Checks every exchange, and that every operation of `tags` was
    /// exercised with a success.
    pub fn check_all(&self, exchanges: &[Exchange], tags: &[&str]) {
        let mut exercised = BTreeSet::new();
        for e in exchanges {
            let op = self
                .check(e)
                .unwrap_or_else(|err| panic!("contract: {err}"));
            if e.status < 300 || e.status == 304 {
                exercised.insert(op);
            }
        }
        // /health is asked outside the proxies.
        exercised.insert("get /health".into());
        let missing: Vec<_> = self
            .operations(tags)
            .difference(&exercised)
            .cloned()
            .collect();
        assert!(
            missing.is_empty(),
            "operations never exercised: {missing:?}"
        );
    }
}

// ------------------------------------------------------------------ helpers

pub fn region_config(registry_url: &str, hospital_id: &str, token: &str) -> RegionConfig {
    RegionConfig {
        registry_url: registry_url.to_string(),
        hospital_id: hospital_id.to_string(),
        registry_token: token.to_string(),
        region_secret: RegionSecret::from_secret(SECRET).unwrap(),
        identifier_issuers: vec![("RESIDENT_ID".into(), IdentifierType::ResidentId)],
        study_quiet_time: Duration::from_millis(300),
        publish_batch_size: 500,
        publish_max_backoff: Duration::from_millis(400),
        directory_interval: Duration::from_secs(1),
        recognition_list_file: None,
        cfind_regional_priors: false,
        ohif_url: None,
        peer_parallel: 4,
        peer_bandwidth: 0,
        peer_cache_budget_bytes: 1 << 30,
        prefetch_priors: false,
        federation_secret: None,
    }
}

pub async fn spawn_region_node(
    backend: Backend,
    registry_url: &str,
    hospital_id: &str,
    token: &str,
) -> TestNode {
    let (url, h, t) = (
        registry_url.to_string(),
        hospital_id.to_string(),
        token.to_string(),
    );
    support::spawn_node_with(backend, move |c: &mut NodeConfig| {
        c.dicomweb.open = true;
        c.region = Some(region_config(&url, &h, &t));
    })
    .await
}

pub fn patient_key(number: &str) -> String {
    RegionSecret::from_secret(SECRET)
        .unwrap()
        .patient_key(&Identifier::parse(IdentifierType::ResidentId, number).unwrap())
}

pub struct MadeStudy {
    pub study_instance_uid: String,
    pub files: Vec<String>,
    pub phi: Vec<String>,
}

/// A copy of a sample study with fresh UIDs (see region_study.py).
pub fn make_study(dir: &Path, sample: &str, seed: &str, extra: &[&str]) -> MadeStudy {
    let out = dir.join(seed);
    let mut args = vec![
        repo_path(&format!("sample-dicom/{sample}"))
            .display()
            .to_string(),
        out.display().to_string(),
        seed.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = python_tool("region_study.py", &args).remove(0);
    let name = line["patient_name"].as_str().unwrap().to_string();
    let mut phi: Vec<String> = vec![
        line["patient_id"].as_str().unwrap().to_string(),
        line["patient_birth_date"].as_str().unwrap().to_string(),
    ];
    // Each component of each group of the name (Zhang, San, 张, 三).
    phi.extend(
        name.split(['^', '='])
            .filter(|p| !p.is_empty())
            .map(str::to_string),
    );
    MadeStudy {
        study_instance_uid: line["study_instance_uid"].as_str().unwrap().to_string(),
        files: line["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect(),
        phi,
    }
}

/// Stores with dcmtk's storescu, one run per transfer syntax: storescu
/// proposes one transfer syntax per SOP Class in a run, and the sample
/// studies mix syntaxes across series (-R: propose the files' own).
pub async fn store(node: &TestNode, files: &[String]) {
    let mut by_syntax: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut args = vec!["--syntax"];
    args.extend(files.iter().map(String::as_str));
    for line in python_tool("region_study.py", &args) {
        by_syntax
            .entry(line["transfer_syntax_uid"].as_str().unwrap().to_string())
            .or_default()
            .push(line["file"].as_str().unwrap().to_string());
    }
    for (ts, group) in by_syntax {
        let out = storescu(
            node.dicom_addr,
            vec!["-R".into(), support::storescu_option(&ts).into()],
            group,
        )
        .await;
        assert!(
            out.status.success(),
            "storescu failed: {}",
            support::text(&out)
        );
    }
}

/// A JSON client for the registry or a node's API (through a proxy).
#[derive(Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Api {
        Api {
            base: base.to_string(),
            token: token.map(str::to_string),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("x-test", "1")
            .header("x-huren-user", "dr.li");
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A request with a text body (the recognition list is TOML).
    pub async fn call_text(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("x-test", "1")
            .header("content-type", "application/toml")
            .body(body.to_string());
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }
}

pub async fn add_hospital(admin: &Api, id: &str, level: &str, node_url: Option<&str>) -> String {
    let (status, v) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(json!({
                "hospital_id": id, "name": format!("医院 {id}"), "level": level,
                "groups": ["南京市医联体"], "dicomweb_base_url": node_url,
            })),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

pub async fn record_at(registry: &Api, hospital: &str, uid: &str) -> Option<Value> {
    let (status, v) = registry
        .call(
            "GET",
            &format!("/v1/hospitals/{hospital}/records/{uid}"),
            None,
        )
        .await;
    (status == 200).then_some(v)
}

/// Waits until the registry holds `uid` of `hospital` at `version` or later.
pub async fn wait_record(registry: &Api, hospital: &str, uid: &str, version: i64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = record_at(registry, hospital, uid).await;
        if let Some(r) = r.filter(|r| r["record"]["record_version"].as_i64() >= Some(version)) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for record {uid} v{version} at the registry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the registry holds a version of `uid` with all of its
/// `instances`: on a loaded machine the quiet time can pass between two
/// storescu runs of one study, and a first version hold one series.
pub async fn wait_complete_record(
    registry: &Api,
    hospital: &str,
    uid: &str,
    instances: i64,
) -> Value {
    let mut version = 1;
    loop {
        let rec = wait_record(registry, hospital, uid, version).await;
        if rec["record"]["number_of_instances"] == instances {
            return rec;
        }
        version = rec["record"]["record_version"].as_i64().unwrap() + 1;
    }
}

/// Waits until the node has evaluated every change of a study.
pub async fn wait_evaluated(node: &TestNode, uid: &str) {
    wait_evaluated_at(&node.config.database_url, uid).await;
}

/// [`wait_evaluated`] for a node's index at `database_url`.
pub async fn wait_evaluated_at(database_url: &str, uid: &str) {
    // A node in this process installs them; a node process does not.
    sqlx::any::install_default_drivers();
    let url = database_url.to_string();
    let uid = uid.to_string();
    wait_until("study evaluated", || {
        let (url, uid) = (url.clone(), uid.clone());
        async move {
            let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
            let row: Option<(i64, i64)> = sqlx::query_as(
                "SELECT changes, evaluated_changes FROM study_publication WHERE study_instance_uid = $1",
            )
            .bind(&uid)
            .fetch_optional(&mut conn)
            .await
            .unwrap();
            row.is_some_and(|(c, e)| c == e)
        }
    })
    .await;
}

fn huren(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_huren"))
        .args(args)
        .env("HUREN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn audit_entries(admin: &Api) -> Vec<Value> {
    let v = admin.ok("GET", "/v1/audit?limit=10000", None).await;
    v["entries"].as_array().unwrap().clone()
}

// ------------------------------------------------------------------ tests

support::on_both_backends!(region_end_to_end);

/// A registry and two hospital nodes: publication, priors under every
/// consent state, break-the-glass, refusal of another hospital's
/// publication, re-publication rules, local-only studies, retraction, the
/// audit chain, the PHI rule and the contract.
async fn region_end_to_end(backend: Backend) {
    let contract = Contract::load();
    let recorder = Recorder::default();
    let registry = spawn_registry(backend).await;
    let reg_url = start_proxy(registry.url(), recorder.clone(), true).await;
    let admin = Api::new(&reg_url, Some(ADMIN_TOKEN));
    let work = tempfile::tempdir().unwrap();

    // Hospitals through the admin API.
    let token_a = add_hospital(&admin, "HOSPA0000000000001", "三级甲等", None).await;
    let token_b = add_hospital(&admin, "HOSPB0000000000002", "二级甲等", None).await;
    let (status, _) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(json!({"hospital_id": "HOSPA0000000000001", "name": "x", "level": "一级"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(json!({"hospital_id": "bad id", "name": "x", "level": "一级"})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(json!({"hospital_id": "X", "name": "x", "level": "四级"})),
        )
        .await;
    assert_eq!(status, 400);

    let node_b = spawn_region_node(backend, &reg_url, "HOSPB0000000000002", &token_b).await;
    let node_a = spawn_region_node(backend, &reg_url, "HOSPA0000000000001", &token_a).await;
    let updated = admin
        .ok(
            "PATCH",
            "/v1/hospitals/HOSPB0000000000002",
            Some(json!({"dicomweb_base_url": format!("http://{}/dicom-web", node_b.http_addr)})),
        )
        .await;
    assert!(updated.get("token").is_none());
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
    let reg_a = Api::new(&reg_url, Some(&token_a));
    let reg_b = Api::new(&reg_url, Some(&token_b));

    // The directory reaches the nodes (conditional GETs afterwards).
    wait_until("directory pulled by node A", || {
        let api_a = api_a.clone();
        async move {
            let s = api_a.ok("GET", "/api/v1/publication", None).await;
            s["hospitals_in_directory"] == 2
        }
    })
    .await;
    let directory = reg_a.ok("GET", "/v1/hospitals", None).await;
    assert_eq!(directory["hospitals"][1]["level"], "二级甲等");
    assert!(directory.to_string().find("token").is_none());

    // A CT chest at B, the resident ID in OtherPatientIDsSequence.
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-b",
        &["--resident-id", RID],
    );
    store(&node_b, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    // The whole study: on a loaded machine a first version may hold the
    // series of the first storescu run only; versions below count from it.
    let rec = wait_complete_record(&reg_b, "HOSPB0000000000002", &uid, 12).await;
    let r = &rec["record"];
    let v0 = r["record_version"].as_i64().unwrap();
    assert_eq!(rec["hospital_id"], "HOSPB0000000000002");
    assert_eq!(rec["retracted"], false);
    assert_eq!(r["patient_key"], patient_key(RID));
    assert_eq!(r["modalities"], json!(["CT"]));
    assert_eq!(r["body_parts"], json!(["CHEST"]));
    assert_eq!(r["study_date"], "2024-03-14");
    assert_eq!(r["number_of_series"], 2);
    assert_eq!(r["number_of_instances"], 12);
    assert_eq!(r["qc_status"], "pending");
    assert_eq!(r["report_status"], "none");
    assert_eq!(r["images_available"], true);
    assert_eq!(r["items"], json!([]));
    let manifest = api_b
        .ok("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    assert_eq!(manifest["content_root"], r["content_root"]);
    assert_eq!(manifest["instances"].as_array().unwrap().len(), 12);
    let bytes: i64 = manifest["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["size"].as_i64().unwrap())
        .sum();
    assert_eq!(r["bytes"], bytes);
    // Another hospital cannot read the record directly.
    let (status, _) = reg_a
        .call(
            "GET",
            &format!("/v1/hospitals/HOSPB0000000000002/records/{uid}"),
            None,
        )
        .await;
    assert_eq!(status, 403);

    let patient = json!({"identifier_type": "RID", "identifier": RID.to_lowercase()});
    let priors = |purpose: &'static str| {
        let api_a = api_a.clone();
        let patient = patient.clone();
        async move {
            api_a
                .ok(
                    "POST",
                    "/api/v1/priors",
                    Some(json!({"patient": patient, "purpose": purpose, "user_id": "dr.li",
                        "encounter": if purpose == "emergency" { "emergency" } else { "outpatient" }})),
                )
                .await
        }
    };
    // No consent: a count, never the records.
    let p = priors("treatment").await;
    assert_eq!(p["access"], "none");
    assert_eq!(p["records"], json!([]));
    assert_eq!(p["withheld_count"], 1);
    assert_eq!(p["consent_state"], Value::Null);

    // Consent granted through node A: the records.
    let tomorrow =
        humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(86400))
            .to_string();
    let consent = api_a
        .ok(
            "POST",
            "/api/v1/consents",
            Some(
                json!({"patient": patient, "method": "doctor_assisted", "recorded_by": "dr.li",
                        "state": "granted", "expires_at": tomorrow}),
            ),
        )
        .await;
    assert_eq!(consent["state"], "granted");
    assert_eq!(consent["hospital_id"], "HOSPA0000000000001");
    let p = priors("treatment").await;
    assert_eq!(p["access"], "consent");
    assert_eq!(p["withheld_count"], 0);
    assert_eq!(p["records"].as_array().unwrap().len(), 1);
    assert_eq!(
        p["records"][0]["record"]["study_instance_uid"],
        uid.as_str()
    );
    assert_eq!(p["records"][0]["hospital_id"], "HOSPB0000000000002");
    let listed = reg_a
        .ok(
            "GET",
            &format!("/v1/consents?patient_key={}", patient_key(RID)),
            None,
        )
        .await;
    assert_eq!(listed["consents"].as_array().unwrap().len(), 1);
    // B does not see A's consents.
    let listed = reg_b
        .ok(
            "GET",
            &format!("/v1/consents?patient_key={}", patient_key(RID)),
            None,
        )
        .await;
    assert_eq!(listed["consents"], json!([]));

    // Revoked: counts only again; B cannot touch A's consent.
    let id = consent["consent_id"].as_str().unwrap();
    let (status, _) = reg_b
        .call(
            "POST",
            &format!("/v1/consents/{id}/state"),
            Some(json!({"state": "revoked", "recorded_by": "x"})),
        )
        .await;
    assert_eq!(status, 404);
    let revoked = reg_a
        .ok(
            "POST",
            &format!("/v1/consents/{id}/state"),
            Some(json!({"state": "revoked", "recorded_by": "health-app"})),
        )
        .await;
    assert_eq!(revoked["state"], "revoked");
    let (status, _) = reg_a
        .call(
            "POST",
            &format!("/v1/consents/{id}/state"),
            Some(json!({"state": "granted", "recorded_by": "x"})),
        )
        .await;
    assert_eq!(status, 400);
    let p = priors("treatment").await;
    assert_eq!(
        (p["access"].as_str(), p["consent_state"].as_str()),
        (Some("none"), Some("revoked"))
    );
    assert_eq!(p["records"], json!([]));
    assert_eq!(p["withheld_count"], 1);

    // A consent with an expiry already past is refused (issue 17 §3).
    let past = humantime::format_rfc3339(std::time::SystemTime::now() - Duration::from_secs(60))
        .to_string();
    let (status, _) = reg_a
        .call(
            "POST",
            "/v1/consents",
            Some(
                json!({"patient_key": patient_key(RID), "hospital_id": "HOSPA0000000000001",
            "method": "doctor_assisted", "recorded_by": "desk-3", "state": "granted", "expires_at": past}),
            ),
        )
        .await;
    assert_eq!(status, 400);
    // Expired (a granted consent whose expiry has passed, aged in the
    // database: no sleeping), then pending: counts only.
    let expired = reg_a
        .ok(
            "POST",
            "/v1/consents",
            Some(
                json!({"patient_key": patient_key(RID), "hospital_id": "HOSPA0000000000001",
            "method": "doctor_assisted", "recorded_by": "desk-3", "state": "granted", "expires_at": tomorrow}),
            ),
        )
        .await;
    let mut conn = sqlx::AnyConnection::connect(&registry.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE consent SET expires_at = $1 WHERE consent_id = $2")
        .bind(huren::registry::db::normalise_time(&past).unwrap())
        .bind(expired["consent_id"].as_str().unwrap())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let listed = reg_a
        .ok(
            "GET",
            &format!("/v1/consents?patient_key={}", patient_key(RID)),
            None,
        )
        .await;
    assert!(
        listed["consents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["consent_id"] == expired["consent_id"] && c["state"] == "expired")
    );
    let p = priors("treatment").await;
    assert_eq!(
        (p["access"].as_str(), p["consent_state"].as_str()),
        (Some("none"), Some("expired"))
    );
    assert_eq!(p["withheld_count"], 1);
    let pending = reg_a
        .ok("POST", "/v1/consents", Some(json!({"patient_key": patient_key(RID), "hospital_id": "HOSPA0000000000001",
            "method": "qr_code", "recorded_by": "health-app", "state": "pending", "expires_at": tomorrow})))
        .await;
    let p = priors("treatment").await;
    assert_eq!(
        (p["access"].as_str(), p["consent_state"].as_str()),
        (Some("none"), Some("pending"))
    );
    // A consent for another hospital is refused.
    let (status, _) = reg_a
        .call(
            "POST",
            "/v1/consents",
            Some(
                json!({"patient_key": patient_key(RID), "hospital_id": "HOSPB0000000000002",
            "method": "qr_code", "recorded_by": "x", "state": "granted", "expires_at": tomorrow}),
            ),
        )
        .await;
    assert_eq!(status, 403);

    // Break-the-glass: the records, flagged.
    let p = priors("emergency").await;
    assert_eq!(p["access"], "break_the_glass");
    assert_eq!(p["records"].as_array().unwrap().len(), 1);

    // Confirming the pending consent grants access.
    reg_a
        .ok(
            "POST",
            &format!(
                "/v1/consents/{}/state",
                pending["consent_id"].as_str().unwrap()
            ),
            Some(json!({"state": "granted", "recorded_by": "health-app"})),
        )
        .await;
    assert_eq!(priors("treatment").await["access"], "consent");

    // Publishing for another hospital: 403, audited.
    let forged = json!({"records": [r.clone()], "retractions": []});
    let (status, problem) = reg_a
        .call(
            "POST",
            "/v1/hospitals/HOSPB0000000000002/records",
            Some(forged),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(problem["status"], 403);
    let (status, _) = Api::new(&reg_url, Some("HOSPA0000000000001.wrong"))
        .call("GET", "/v1/hospitals", None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = reg_a.call("GET", "/v1/audit", None).await;
    assert_eq!(status, 403);
    let (status, _) = reg_a
        .call(
            "POST",
            "/v1/priors/query",
            Some(json!({"patient_key": "not-a-key", "purpose": "treatment", "user_id": "u"})),
        )
        .await;
    assert_eq!(status, 400);

    // A report issued at B re-publishes (version 2), QC passed (3).
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final", "report_issued_date": "2024-03-15"})),
        )
        .await;
    let rec = wait_record(&reg_b, "HOSPB0000000000002", &uid, v0 + 1).await;
    assert_eq!(rec["record"]["report_status"], "final");
    assert_eq!(rec["record"]["report_issued_date"], "2024-03-15");
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    let rec = wait_record(&reg_b, "HOSPB0000000000002", &uid, v0 + 2).await;
    assert_eq!(rec["record"]["qc_status"], "passed");
    // The same QC again: evaluated, nothing new published.
    api_b
        .ok(
            "PUT",
            &format!("/api/v1/studies/{uid}/qc"),
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    wait_evaluated(&node_b, &uid).await;
    let status = api_b.ok("GET", "/api/v1/publication", None).await;
    assert_eq!(status["backlog"], 0);
    assert_eq!(
        record_at(&reg_b, "HOSPB0000000000002", &uid).await.unwrap()["record"]["record_version"],
        v0 + 2
    );
    let (code, _) = api_b
        .call(
            "PUT",
            &format!("/api/v1/studies/{uid}/report"),
            Some(json!({"report_status": "final"})),
        )
        .await;
    assert_eq!(code, 400);
    let (code, _) = api_b
        .call(
            "PUT",
            "/api/v1/studies/1.2.3.999/qc",
            Some(json!({"qc_status": "passed"})),
        )
        .await;
    assert_eq!(code, 404);

    // A new instance after stability: version 4, a new content root.
    let more = make_study(
        work.path(),
        "p1-ct-head-2019",
        "ct-b-more",
        &["--resident-id", RID, "--study-uid", &uid, "--limit", "1"],
    );
    store(&node_b, &more.files).await;
    let rec4 = wait_record(&reg_b, "HOSPB0000000000002", &uid, v0 + 3).await;
    assert_eq!(rec4["record"]["number_of_instances"], 13);
    assert_ne!(
        rec4["record"]["content_root"],
        rec["record"]["content_root"]
    );
    assert_eq!(rec4["record"]["qc_status"], "passed");

    // Studies without a valid identifier stay local, counted with the reason.
    let bad = "110105194912310021"; // check digit wrong
    let none = make_study(work.path(), "p2-mr-knee-2025", "mr-b", &[]);
    let wrong = make_study(
        work.path(),
        "p3-dx-chest-2023",
        "dx-b",
        &["--resident-id", bad],
    );
    // Another person's study under the number: its header's birth date is
    // not the one the resident ID number encodes.
    let someone_else = make_study(
        work.path(),
        "p3-dx-chest-2025",
        "dx-b-someone-else",
        &["--resident-id", RID, "--set", "PatientBirthDate=19920815"],
    );
    store(&node_b, &none.files).await;
    store(&node_b, &wrong.files).await;
    store(&node_b, &someone_else.files).await;
    wait_until("local-only studies counted", || {
        let api_b = api_b.clone();
        async move {
            let s = api_b.ok("GET", "/api/v1/publication", None).await;
            s["local_only"]["no_identifier"] == 1
                && s["local_only"]["check_digit"] == 1
                && s["local_only"]["demographics_mismatch"] == 1
        }
    })
    .await;
    assert!(
        record_at(
            &reg_b,
            "HOSPB0000000000002",
            &someone_else.study_instance_uid
        )
        .await
        .is_none(),
        "a study whose birth date contradicts the number is never published under it"
    );
    let listed = api_b
        .ok("GET", "/api/v1/publication/local-only", None)
        .await;
    assert_eq!(listed["studies"].as_array().unwrap().len(), 3);
    // A study whose series carry two StudyDates (re-opened weeks later) is
    // published as old as its oldest images, whichever instance came last.
    let mut two_dates = vec![
        "--resident-id".to_string(),
        RID.to_string(),
        "--set".to_string(),
        "StudyDate=20241203".to_string(),
    ];
    for i in 0..6 {
        two_dates.push("--set".to_string());
        two_dates.push(format!("StudyDate@{i}=20241020"));
    }
    let two_dates: Vec<&str> = two_dates.iter().map(String::as_str).collect();
    let reopened = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-b-two-dates",
        &two_dates,
    );
    store(&node_b, &reopened.files).await;
    let record = wait_record(
        &reg_b,
        "HOSPB0000000000002",
        &reopened.study_instance_uid,
        1,
    )
    .await;
    assert_eq!(record["record"]["study_date"], "2024-10-20", "{record}");
    assert!(
        record_at(&reg_b, "HOSPB0000000000002", &none.study_instance_uid)
            .await
            .is_none()
    );
    // The hospital's MPI maps the patient: the study is published.
    let (code, refused) = api_b
        .call("POST", "/api/v1/patient-identifiers",
            Some(json!({"patient_id": "HUR-100002", "issuer_of_patient_id": "HUREN-GENERAL", "identifier_type": "RID", "identifier": bad})))
        .await;
    assert_eq!(code, 400);
    assert!(!refused.to_string().contains(bad));
    let mapped = api_b
        .ok("POST", "/api/v1/patient-identifiers",
            Some(json!({"patient_id": "HUR-100002", "issuer_of_patient_id": "HUREN-GENERAL", "identifier_type": "RID", "identifier": "440524198509230025"})))
        .await;
    assert_eq!(mapped["studies"], 1);
    let knee = wait_record(&reg_b, "HOSPB0000000000002", &none.study_instance_uid, 1).await;
    assert_eq!(
        knee["record"]["patient_key"],
        patient_key("440524198509230025")
    );
    assert_eq!(knee["record"]["modalities"], json!(["MR"]));

    // Retraction: the record is marked, priors no longer show it.
    let (code, _) = api_b
        .call(
            "POST",
            &format!("/api/v1/studies/{}/retraction", none.study_instance_uid),
            None,
        )
        .await;
    assert_eq!(code, 202);
    wait_until("retraction applied", || {
        let reg_b = reg_b.clone();
        let uid = none.study_instance_uid.clone();
        async move {
            record_at(&reg_b, "HOSPB0000000000002", &uid)
                .await
                .is_some_and(|r| r["retracted"] == true)
        }
    })
    .await;
    let (code, _) = api_b
        .call(
            "POST",
            &format!("/api/v1/studies/{}/retraction", none.study_instance_uid),
            None,
        )
        .await;
    assert_eq!(code, 404);

    // The audit trail: break-the-glass flagged with the user, refusals kept.
    let audit = audit_entries(&admin).await;
    let find = |action: &str, outcome: &str| {
        audit
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == outcome)
            .count()
    };
    assert!(find("priors_query", "break_the_glass") >= 1);
    assert!(find("priors_query", "count_only") >= 4);
    assert!(find("publish", "denied") == 1);
    assert!(find("hospital_add", "ok") == 2);
    assert!(find("consent_change", "revoked") == 1);
    let btg = audit
        .iter()
        .find(|e| e["outcome"] == "break_the_glass")
        .unwrap();
    assert_eq!(btg["user_id"], "dr.li");
    assert_eq!(btg["actor"], "HOSPA0000000000001");
    assert_eq!(btg["purpose"], "emergency");
    assert_eq!(btg["records_returned"], 1);
    assert_eq!(btg["patient_key"], patient_key(RID));
    let (code, text) = admin.call("GET", "/v1/audit?format=csv", None).await;
    assert_eq!(code, 200);
    assert!(text.as_str().unwrap().starts_with("seq,at,actor,"));
    let (code, text) = admin
        .call("GET", "/v1/audit?format=jsonl&limit=3", None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(text.as_str().unwrap().lines().count(), 3);

    // The chain verifies; a changed row and a deleted row are found.
    let (code, out) = huren(&[
        "registry",
        "audit",
        "verify",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact"), "{out}");
    let mut conn = sqlx::AnyConnection::connect(&registry.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET records_returned = 9 WHERE seq = 5")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, out) = huren(&[
        "registry",
        "audit",
        "verify",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("entry 5"), "{out}");
    sqlx::query("UPDATE audit SET records_returned = 0 WHERE seq = 5")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, out) = huren(&[
        "registry",
        "audit",
        "verify",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 0, "{out}");
    sqlx::query("DELETE FROM audit WHERE seq = 7")
        .execute(&mut conn)
        .await
        .unwrap();
    let (code, out) = huren(&[
        "registry",
        "audit",
        "verify",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("entry 7"), "{out}");
    let (code, out) = huren(&[
        "registry",
        "audit",
        "export",
        "--format",
        "csv",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().count() > 20);
    drop(conn);

    // PHI: nothing a node sent carries the raw ID, the name or the birth date.
    let exchanges = recorder.all();
    let from_nodes: Vec<&Exchange> = exchanges.iter().filter(|e| e.from_node).collect();
    assert!(from_nodes.iter().any(|e| e.path.ends_with("/records")));
    let mut forbidden: Vec<String> = ct.phi.clone();
    forbidden.extend(none.phi.clone());
    forbidden.extend([
        RID.to_string(),
        RID.to_lowercase(),
        "440524198509230025".into(),
        bad.into(),
    ]);
    for e in &from_nodes {
        let body = String::from_utf8_lossy(&e.request_body);
        for f in &forbidden {
            assert!(
                f.len() < 2 || !body.contains(f.as_str()),
                "{} {} sent {f:?}",
                e.method,
                e.path
            );
        }
    }

    // The contract: every exchange conforms, every operation of the
    // registry and the node's API was exercised (the recognition
    // operations are exercised by tests/recognition.rs).
    contract.check_all(&exchanges, &["registry", "registry-admin", "node"]);

    node_a.stop().await;
    node_b.stop().await;
    registry.stop().await;
}

/// The registry down while studies arrive: the outbox keeps them, the
/// status says so, and every record arrives exactly once after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outage_loses_nothing() {
    let registry = spawn_registry(Backend::SqliteLocal).await;
    // Hospitals through the CLI, as an operator on the registry host does.
    let token_file = registry.dir.path().join("hosp-b.token");
    let (code, out) = huren(&[
        "registry",
        "hospital",
        "add",
        "--database-url",
        &registry.database_url,
        "--id",
        "HOSPB0000000000002",
        "--name",
        "县人民医院",
        "--level",
        "2A",
        "--group",
        "县域医共体",
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let (code, out) = huren(&[
        "registry",
        "hospital",
        "list",
        "--database-url",
        &registry.database_url,
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("二级甲等") && out.contains("县域医共体"),
        "{out}"
    );
    let (code, out) = huren(&[
        "registry",
        "hospital",
        "add",
        "--database-url",
        &registry.database_url,
        "--id",
        "X1",
        "--name",
        "x",
        "--level",
        "五级",
    ]);
    assert_eq!(code, 2, "{out}");

    let url = registry.url();
    let (addr, dir, db) = registry.stop().await;
    let node = spawn_region_node(Backend::SqliteLocal, &url, "HOSPB0000000000002", &token).await;
    let api = Api::new(
        &format!("http://{}", node.http_addr),
        Some(crate::support::NODE_API_TOKEN),
    );
    let work = tempfile::tempdir().unwrap();
    let mut uids = Vec::new();
    for (i, sample) in ["p1-ct-chest-2024", "p1-ct-head-2019", "p3-dx-chest-2025"]
        .iter()
        .enumerate()
    {
        let s = make_study(
            work.path(),
            sample,
            &format!("outage-{i}"),
            &["--resident-id", RID],
        );
        store(&node, &s.files).await;
        uids.push(s.study_instance_uid);
    }
    wait_until("backlog of 3 with an error", || {
        let api = api.clone();
        async move {
            let s = api.ok("GET", "/api/v1/publication", None).await;
            s["backlog"] == 3 && s["last_error"].is_string() && s["last_success_at"].is_null()
        }
    })
    .await;

    let registry = TestRegistry::start_on(addr, dir, db).await;
    let reg = Api::new(&registry.url(), Some(&token));
    for uid in &uids {
        let r = wait_record(&reg, "HOSPB0000000000002", uid, 1).await;
        assert_eq!(r["record"]["record_version"], 1);
    }
    wait_until("backlog drained", || {
        let api = api.clone();
        async move { api.ok("GET", "/api/v1/publication", None).await["backlog"] == 0 }
    })
    .await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let audit = audit_entries(&admin).await;
    for uid in &uids {
        let n = audit
            .iter()
            .filter(|e| {
                e["action"] == "publish" && e["detail"].as_str().unwrap().contains(uid.as_str())
            })
            .count();
        assert_eq!(n, 1, "study {uid} published {n} times");
    }
    node.stop().await;
    registry.stop().await;
}

/// A `huren registry` process on `database_url` (killed when dropped), and
/// its URL.
pub(crate) fn registry_process(
    dir: &Path,
    database_url: &str,
) -> (crate::metrics::Process, String) {
    let p = crate::metrics::spawn_registry_with(dir, &["--database-url", database_url]);
    let url = format!("http://{}", p.addrs[0]);
    (p, url)
}

/// Two registry processes on one PostgreSQL serve one region: publications
/// through both land, and the audit chain stays one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_on_one_postgres() {
    let db = support::fresh_postgres_database().await;
    let (dir_one, dir_two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (process_one, url_one) = registry_process(dir_one.path(), &db);
    let (process_two, url_two) = registry_process(dir_two.path(), &db);
    let admin = Api::new(&url_one, Some(ADMIN_TOKEN));
    let token = add_hospital(&admin, "HOSPC0000000000003", "三级", None).await;
    let key = patient_key(RID);
    fn fake_record(key: &str, i: usize) -> Value {
        json!({
            "study_instance_uid": format!("1.2.826.0.1.3680043.8.498.77.{i}"), "record_version": 1,
            "patient_key": key, "items": [], "modalities": ["CT"], "body_parts": ["CHEST"],
            "contrast": "none", "laterality": [], "view_positions": [], "study_date": "2025-01-02",
            "study_time": null, "report_status": "none", "report_issued_date": null, "qc_status": "passed",
            "images_available": true, "number_of_series": 1, "number_of_instances": 1, "bytes": 1000,
            "content_root": "0".repeat(64),
        })
    }
    let mut tasks = Vec::new();
    for (n, base) in [url_one.clone(), url_two.clone()].into_iter().enumerate() {
        let api = Api::new(&base, Some(&token));
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..10 {
                let records: Vec<Value> = (0..20)
                    .map(|i| fake_record(&key, n * 1000 + batch * 20 + i))
                    .collect();
                let v = api
                    .ok(
                        "POST",
                        "/v1/hospitals/HOSPC0000000000003/records",
                        Some(json!({"records": records})),
                    )
                    .await;
                assert!(
                    v["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .all(|r| r["outcome"] == "applied")
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // One request with two versions of a new study and a replay of a
    // published one: the newer version applies, the rest are unchanged.
    let mut v2 = fake_record(&key, 5000);
    v2["record_version"] = json!(2);
    let v = Api::new(&url_one, Some(&token))
        .ok(
            "POST",
            "/v1/hospitals/HOSPC0000000000003/records",
            Some(json!({"records": [fake_record(&key, 5000), v2, fake_record(&key, 0)]})),
        )
        .await;
    let outcomes: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["unchanged", "applied", "unchanged"]);
    let p = Api::new(&url_two, Some(&token))
        .ok("POST", "/v1/priors/query", Some(json!({"patient_key": key, "purpose": "treatment", "user_id": "u", "page_size": 150})))
        .await;
    assert_eq!(p["records"].as_array().unwrap().len(), 150);
    let next = p["next_page_token"].as_str().unwrap().to_string();
    let p2 = Api::new(&url_one, Some(&token))
        .ok("POST", "/v1/priors/query", Some(json!({"patient_key": key, "purpose": "treatment", "user_id": "u", "page_size": 1000, "page_token": next})))
        .await;
    assert_eq!(p2["records"].as_array().unwrap().len(), 251);
    assert!(p2["next_page_token"].is_null());
    let (code, out) = huren(&["registry", "audit", "verify", "--database-url", &db]);
    assert_eq!(code, 0, "{out}");
    // 1 hospital_add + 400 + 3 publications + 2 queries.
    assert!(out.contains("406 entries"), "{out}");
    drop((process_one, process_two));
}

/// Two node processes on one PostgreSQL index and one S3 bucket: each
/// study is published once, whichever process evaluates it. Every server
/// is a `huren` process of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_processes_publish_each_study_once() {
    let dir = tempfile::tempdir().unwrap();
    let registry_db = format!("sqlite://{}", dir.path().join("registry.sqlite").display());
    let (registry, registry_url) = registry_process(dir.path(), &registry_db);
    let admin = Api::new(&registry_url, Some(ADMIN_TOKEN));
    let token = add_hospital(&admin, "HOSPD0000000000004", "三级甲等", None).await;
    // What both processes share: the index and the bucket (under a fresh
    // prefix), as an operator configures them.
    let index_db = support::fresh_postgres_database().await;
    let write = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    };
    let s3_secret = write(
        "s3-secret",
        &support::env("HUREN_TEST_S3_SECRET_ACCESS_KEY"),
    );
    let storage = write(
        "storage.toml",
        &format!(
            "backend = \"s3\"\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             prefix = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{s3_secret}\"\n\
             allow_http = true\n",
            support::env("HUREN_TEST_S3_BUCKET"),
            support::env("HUREN_TEST_S3_ENDPOINT"),
            support::env("HUREN_TEST_S3_REGION"),
            support::unique("two-nodes"),
            support::env("HUREN_TEST_S3_ACCESS_KEY_ID"),
        ),
    );
    let token_file = write("registry-token", &token);
    let secret_file = write("region-secret", SECRET);
    let api_token = "operator-token-of-the-two-node-test";
    let api_file = write("api-token", api_token);
    let mut nodes = Vec::new();
    for name in ["first", "second"] {
        let cwd = dir.path().join(name);
        std::fs::create_dir(&cwd).unwrap();
        nodes.push(crate::metrics::spawn(
            &cwd,
            &[
                "node",
                "--dicom-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ],
            &[
                ("HUREN_DATABASE_URL", index_db.as_str()),
                ("HUREN_STORAGE_CONFIG", storage.as_str()),
                ("HUREN_REGISTRY_URL", registry_url.as_str()),
                ("HUREN_HOSPITAL_ID", "HOSPD0000000000004"),
                ("HUREN_REGISTRY_TOKEN_FILE", token_file.as_str()),
                ("HUREN_REGION_SECRET_FILE", secret_file.as_str()),
                ("HUREN_OPERATOR_TOKEN_FILE", api_file.as_str()),
                ("HUREN_IDENTIFIER_ISSUERS", "RESIDENT_ID=RID"),
                ("HUREN_STUDY_QUIET_SECS", "0.3"),
                ("HUREN_PUBLISH_MAX_BACKOFF_SECS", "0.4"),
            ],
            &["DICOM listening on ", "HTTP listening on "],
        ));
    }
    let work = tempfile::tempdir().unwrap();
    let mut uids = Vec::new();
    for (i, sample) in [
        "p1-ct-chest-2024",
        "p2-mr-knee-2025",
        "p3-dx-chest-2023",
        "p3-dx-chest-2025",
    ]
    .iter()
    .enumerate()
    {
        let s = make_study(
            work.path(),
            sample,
            &format!("two-{i}"),
            &["--resident-id", RID],
        );
        // Alternate the receiving process.
        crate::metrics::store(nodes[i % 2].addrs[0], &s.files).await;
        uids.push(s.study_instance_uid);
    }
    for uid in &uids {
        wait_record(&admin, "HOSPD0000000000004", uid, 1).await;
    }
    // Give both processes' workers a chance to (wrongly) publish again:
    // wait until every study's row is evaluated and both outboxes drained.
    for uid in &uids {
        wait_evaluated_at(&index_db, uid).await;
    }
    for node in &nodes {
        let api = Api::new(&format!("http://{}", node.addrs[1]), Some(api_token));
        wait_until("outbox drained", || {
            let api = api.clone();
            async move { api.ok("GET", "/api/v1/publication", None).await["backlog"] == 0 }
        })
        .await;
    }
    let audit = audit_entries(&admin).await;
    for uid in &uids {
        let sends: Vec<_> = audit
            .iter()
            .filter(|e| {
                e["action"] == "publish" && e["detail"].as_str().unwrap().contains(uid.as_str())
            })
            .collect();
        assert_eq!(sends.len(), 1, "study {uid}: {sends:?}");
        assert_eq!(sends[0]["outcome"], "applied");
    }
    drop(nodes);
    drop(registry);
}
