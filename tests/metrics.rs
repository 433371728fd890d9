//! Monitoring: `/metrics`, `/health` and `/ready` on the node and the
//! registry, and the Grafana dashboard and alert rules in deploy/.
//!
//! The counting tests run the real binary as its own process: the metrics
//! recorder is per process, and the in-process nodes of the other tests
//! would add to the counts. Every page is read with prometheus_client's
//! parser and linted with `promtool check metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::region::{ADMIN_TOKEN, Api, RID, SECRET, add_hospital, make_study, patient_key};
use crate::support::{self, Backend, on_both_backends, repo_path};

const HUREN: &str = env!("CARGO_BIN_EXE_huren");

/// A `huren` process, killed when dropped, and the addresses it logged.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) addrs: Vec<SocketAddr>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `huren ARGS` in `cwd` and reads its log until each marker has
/// been followed by an address.
pub(crate) fn spawn(cwd: &Path, args: &[&str], envs: &[(&str, &str)], markers: &[&str]) -> Process {
    let mut child = Command::new(HUREN)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start huren");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs: Vec<Option<SocketAddr>> = vec![None; markers.len()];
    while addrs.iter().any(Option::is_none) {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("huren logs its listening addresses");
        for (marker, addr) in markers.iter().zip(addrs.iter_mut()) {
            if let Some(a) = line
                .split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
            {
                *addr = Some(a);
            }
        }
    }
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Process {
        child,
        addrs: addrs.into_iter().map(Option::unwrap).collect(),
    }
}

fn spawn_node(cwd: &Path) -> Process {
    spawn(
        cwd,
        &[
            "node",
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[
            ("HUREN_DICOMWEB_OPEN", "true"),
            ("HUREN_REQUIRE_CALLED_AE_TITLE", "true"),
        ],
        &["DICOM listening on ", "HTTP listening on "],
    )
}

pub(crate) fn spawn_registry(dir: &Path) -> Process {
    spawn_registry_with(dir, &[])
}

/// A registry process with extra arguments.
pub(crate) fn spawn_registry_with(dir: &Path, extra: &[&str]) -> Process {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let data_dir = dir.join("registry");
    let mut args = vec![
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    spawn(dir, &args, &[], &["registry HTTP listening on "])
}

/// One sample of a scraped page.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a page in the Prometheus text format, as
/// prometheus_client parses it; the page must also pass promtool's lint.
fn parse(text: &str) -> Vec<Sample> {
    let mut promtool = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let linted = promtool.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool check metrics: {}\n{text}",
        support::text(&linted)
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    support::python_tool("prometheus_text.py", &[file.path().to_str().unwrap()])
        .into_iter()
        .map(|v| Sample {
            name: v["name"].as_str().unwrap().to_string(),
            labels: v["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect(),
            value: v["value"].as_f64().unwrap(),
        })
        .collect()
}

pub(crate) async fn scrape(http: SocketAddr) -> Vec<Sample> {
    let response = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    tokio::task::spawn_blocking(move || parse(&text))
        .await
        .unwrap()
}

/// The sum of the samples named `name` whose labels include `labels`.
pub(crate) fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

pub(crate) fn delta(
    before: &[Sample],
    after: &[Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

fn findscu(dicom: SocketAddr, study_instance_uid: &str) -> std::process::Output {
    Command::new("/usr/bin/findscu")
        .env("TCP_NODELAY", "1")
        .args(["-S", "-aet", "FINDSCU", "-aec", "HUREN"])
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .args(["-k", &format!("StudyInstanceUID={study_instance_uid}")])
        .arg(dicom.ip().to_string())
        .arg(dicom.port().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("run /usr/bin/findscu (Debian package dcmtk)")
}

/// The blob sizes the node's index records, summed; `sender`: only the
/// instances that calling AE title sent (None: those sent without one,
/// STOW-RS).
async fn indexed_bytes(cwd: &Path, sender: Option<&str>) -> i64 {
    use sqlx::Connection;
    let url = format!(
        "sqlite://{}?mode=ro",
        cwd.join("huren-data/index.sqlite").display()
    );
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(blob_size), 0) FROM instance WHERE calling_ae_title IS $1",
    )
    .bind(sender)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_counts_what_it_did() {
    let cwd = tempfile::tempdir().unwrap();
    let node = spawn_node(cwd.path());
    let (dicom, http) = (node.addrs[0], node.addrs[1]);
    let samples = support::samples();
    let study = samples[0].study_instance_uid.clone();
    let files: Vec<String> = samples
        .iter()
        .filter(|s| s.study_instance_uid == study)
        .take(4)
        .map(|s| s.path.display().to_string())
        .collect();
    let n = files.len() as f64;
    assert!(n >= 2.0, "the first sample study has several instances");

    let before = scrape(http).await;
    assert_eq!(value(&before, "huren_ready", &[]), 1.0);
    assert_eq!(value(&before, "huren_dicom_associations_open", &[]), 0.0);

    let stored = support::storescu(dicom, vec![], files.clone()).await;
    assert!(stored.status.success(), "{}", support::text(&stored));
    // A called AE title that is not the node's: A-ASSOCIATE-RJ.
    let refused = support::echoscu(dicom, &["-aec", "NOT-HUREN"]).await;
    assert!(!refused.status.success(), "{}", support::text(&refused));
    let found = tokio::task::spawn_blocking({
        let study = study.clone();
        move || findscu(dicom, &study)
    })
    .await
    .unwrap();
    assert!(found.status.success(), "{}", support::text(&found));

    let http_client = reqwest::Client::new();
    let qido: Value = http_client
        .get(format!("http://{http}/dicom-web/studies/{study}/instances"))
        .header("accept", "application/dicom+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &qido.as_array().expect("a QIDO-RS result array")[0];
    let series = first["0020000E"]["Value"][0].as_str().unwrap();
    let instance = first["00080018"]["Value"][0].as_str().unwrap();
    let wado = http_client
        .get(format!(
            "http://{http}/dicom-web/studies/{study}/series/{series}/instances/{instance}"
        ))
        .header(
            "accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(wado.status(), 200);
    assert!(!wado.bytes().await.unwrap().is_empty());
    // STOW-RS by dicomweb-client, of an instance of another study.
    let other = samples
        .iter()
        .find(|s| s.study_instance_uid != study)
        .unwrap()
        .path
        .display()
        .to_string();
    let url = format!("http://{http}/dicom-web");
    tokio::task::spawn_blocking(move || {
        support::python_tool("dicomweb_client.py", &[&url, "store", &other])
    })
    .await
    .unwrap();

    // The association gauge drops when the node has finished with the
    // released association, just after the peer has gone.
    let mut after = scrape(http).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while value(&after, "huren_dicom_associations_open", &[]) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "associations stay open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(http).await;
    }

    let stored_instances = [("source", "c_store"), ("durability", "full")];
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_instances_stored_total",
            &[
                stored_instances[0],
                stored_instances[1],
                ("outcome", "stored")
            ]
        ),
        n
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_instances_stored_total",
            &[("source", "stow"), ("outcome", "stored")]
        ),
        1.0
    );
    assert_eq!(
        delta(&before, &after, "huren_instances_stored_total", &[]),
        n + 1.0,
        "no other source or outcome moved"
    );
    let stow_bytes = indexed_bytes(cwd.path(), None).await;
    assert!(stow_bytes > 0);
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_stored_bytes_total",
            &[("source", "stow"), ("durability", "full")]
        ),
        stow_bytes as f64
    );
    let bytes = indexed_bytes(cwd.path(), Some("STORESCU")).await;
    assert!(bytes > 0);
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_stored_bytes_total",
            &stored_instances
        ),
        bytes as f64,
        "bytes stored are the blob sizes the index records"
    );
    let count = |operation: &str| {
        delta(
            &before,
            &after,
            "huren_dimse_request_duration_seconds_count",
            &[("operation", operation)],
        )
    };
    assert_eq!(count("C-STORE"), n);
    assert_eq!(count("C-FIND"), 1.0);
    assert_eq!(count("C-MOVE"), 0.0);
    assert_eq!(count("C-GET"), 0.0);
    // Every observation falls in the +Inf bucket.
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_dimse_request_duration_seconds_bucket",
            &[("operation", "C-STORE"), ("le", "+Inf")]
        ),
        n
    );
    let web = |service: &str| {
        delta(
            &before,
            &after,
            "huren_dicomweb_request_duration_seconds_count",
            &[("service", service)],
        )
    };
    assert_eq!(web("QIDO-RS"), 1.0);
    assert_eq!(web("WADO-RS"), 1.0);
    assert_eq!(web("STOW-RS"), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_dicom_associations_refused_total",
            &[("reason", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_dicom_associations_refused_total",
            &[]
        ),
        1.0
    );
    assert_eq!(value(&after, "huren_storage_errors_total", &[]), 0.0);

    // The same instances again: acknowledged as duplicates, no new bytes.
    let again = support::storescu(dicom, vec![], files).await;
    assert!(again.status.success(), "{}", support::text(&again));
    let last = scrape(http).await;
    assert_eq!(
        delta(
            &after,
            &last,
            "huren_instances_stored_total",
            &[("outcome", "duplicate")]
        ),
        n
    );
    assert_eq!(delta(&after, &last, "huren_stored_bytes_total", &[]), 0.0);
    assert_eq!(indexed_bytes(cwd.path(), Some("STORESCU")).await, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_counts_publications_priors_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let registry = spawn_registry(dir.path());
    let base = format!("http://{}", registry.addrs[0]);
    let before = scrape(registry.addrs[0]).await;
    assert_eq!(value(&before, "huren_ready", &[]), 1.0);

    let admin = Api::new(&base, Some(ADMIN_TOKEN));
    let token = add_hospital(&admin, "HOSPM0000000000001", "三级", None).await;
    let hospital = Api::new(&base, Some(&token));
    let key = patient_key(RID);
    let record = |i: usize| {
        serde_json::json!({
            "study_instance_uid": format!("1.2.826.0.1.3680043.8.498.91.{i}"), "record_version": 1,
            "patient_key": key, "items": [], "modalities": ["CT"], "body_parts": ["CHEST"],
            "contrast": "none", "laterality": [], "view_positions": [], "study_date": "2025-01-02",
            "study_time": null, "report_status": "none", "report_issued_date": null, "qc_status": "passed",
            "images_available": true, "number_of_series": 1, "number_of_instances": 1, "bytes": 1000,
            "content_root": "0".repeat(64),
        })
    };
    let path = "/v1/hospitals/HOSPM0000000000001/records";
    hospital
        .ok(
            "POST",
            path,
            Some(serde_json::json!({"records": [record(1), record(2), record(3)]})),
        )
        .await;
    // A replay: unchanged.
    hospital
        .ok(
            "POST",
            path,
            Some(serde_json::json!({"records": [record(1)]})),
        )
        .await;
    let priors = hospital
        .ok(
            "POST",
            "/v1/priors/query",
            Some(
                serde_json::json!({"patient_key": key, "purpose": "treatment", "user_id": "dr.li"}),
            ),
        )
        .await;
    assert_eq!(priors["records"].as_array().unwrap().len(), 3, "{priors}");

    let after = scrape(registry.addrs[0]).await;
    let published = |outcome: &str| {
        delta(
            &before,
            &after,
            "huren_registry_records_published_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(published("applied"), 3.0);
    assert_eq!(published("unchanged"), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "huren_registry_priors_query_duration_seconds_count",
            &[]
        ),
        1.0
    );
    // Every entry of the audit chain was counted, under its action.
    let page = admin.ok("GET", "/v1/audit", None).await;
    let mut by_action: BTreeMap<String, f64> = BTreeMap::new();
    for e in page["entries"].as_array().unwrap() {
        *by_action
            .entry(e["action"].as_str().unwrap().to_string())
            .or_default() += 1.0;
    }
    for action in ["hospital_add", "publish", "priors_query"] {
        assert!(by_action.contains_key(action), "{by_action:?}");
    }
    for (action, n) in &by_action {
        assert_eq!(
            value(
                &after,
                "huren_registry_audit_entries_total",
                &[("action", action)]
            ),
            *n,
            "audit entries of action {action}"
        );
    }
    assert_eq!(
        value(&after, "huren_registry_audit_entries_total", &[]),
        by_action.values().sum::<f64>()
    );
}

/// Stores files with storescu, one run per transfer syntax (storescu
/// proposes one per SOP Class in a run; `-R`: the files' own).
pub(crate) async fn store(dicom: SocketAddr, files: &[String]) {
    let mut by_syntax: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut args = vec!["--syntax"];
    args.extend(files.iter().map(String::as_str));
    for line in support::python_tool("region_study.py", &args) {
        by_syntax
            .entry(line["transfer_syntax_uid"].as_str().unwrap().to_string())
            .or_default()
            .push(line["file"].as_str().unwrap().to_string());
    }
    for (ts, group) in by_syntax {
        let options = vec!["-R".into(), support::storescu_option(&ts).into()];
        let out = support::storescu(dicom, options, group).await;
        assert!(out.status.success(), "{}", support::text(&out));
    }
}

/// Scrapes until `done` holds (every 100 ms, at most 60 s).
async fn scrape_until(
    http: SocketAddr,
    what: &str,
    done: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let samples = scrape(http).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_metrics_follow_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = spawn_registry(dir.path());
    let registry_http = registry.addrs[0];
    let admin = Api::new(&format!("http://{registry_http}"), Some(ADMIN_TOKEN));
    let token = add_hospital(&admin, "HOSPM0000000000003", "三级", None).await;
    let token_file = dir.path().join("registry-token");
    std::fs::write(&token_file, &token).unwrap();
    let secret_file = dir.path().join("region-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let registry_url = format!("http://{registry_http}");
    let node = spawn(
        &node_dir,
        &[
            "node",
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[
            ("HUREN_REGISTRY_URL", registry_url.as_str()),
            ("HUREN_HOSPITAL_ID", "HOSPM0000000000003"),
            ("HUREN_REGISTRY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("HUREN_REGION_SECRET_FILE", secret_file.to_str().unwrap()),
            ("HUREN_IDENTIFIER_ISSUERS", "RESIDENT_ID=RID"),
            ("HUREN_STUDY_QUIET_SECS", "0.3"),
            ("HUREN_PUBLISH_MAX_BACKOFF_SECS", "0.4"),
        ],
        &["DICOM listening on ", "HTTP listening on "],
    );
    let (dicom, http) = (node.addrs[0], node.addrs[1]);
    let before = scrape(http).await;
    assert_eq!(value(&before, "huren_publish_backlog", &[]), 0.0);
    assert_eq!(
        value(&before, "huren_publish_last_success_timestamp_seconds", &[]),
        0.0,
        "nothing published yet"
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();

    let work = tempfile::tempdir().unwrap();
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-m",
        &["--resident-id", RID],
    );
    store(dicom, &ct.files).await;
    let published = scrape_until(http, "the study is published", |s| {
        value(s, "huren_publish_last_success_timestamp_seconds", &[]) > 0.0
            && value(s, "huren_publish_backlog", &[]) == 0.0
    })
    .await;
    let last = value(
        &published,
        "huren_publish_last_success_timestamp_seconds",
        &[],
    );
    assert!(last >= started.floor(), "{last} < {started}");
    assert_eq!(value(&published, "huren_publish_dead", &[]), 0.0);
    let at_registry = scrape(registry_http).await;
    assert_eq!(
        value(
            &at_registry,
            "huren_registry_records_published_total",
            &[("outcome", "applied")]
        ),
        1.0
    );

    // The registry goes away: the next study waits in the outbox, every
    // attempt fails, and the last success stays where it was.
    drop(registry);
    let failures = value(&published, "huren_publish_failures_total", &[]);
    let more = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "ct-m2",
        &["--resident-id", RID],
    );
    store(dicom, &more.files).await;
    let stalled = scrape_until(http, "the study waits in the outbox", |s| {
        value(s, "huren_publish_backlog", &[]) >= 1.0
            && value(s, "huren_publish_failures_total", &[]) > failures
    })
    .await;
    assert_eq!(
        value(
            &stalled,
            "huren_publish_last_success_timestamp_seconds",
            &[]
        ),
        last
    );
}

on_both_backends!(readiness_follows_database_and_blob_store);

async fn readiness_follows_database_and_blob_store(backend: Backend) {
    let node = support::spawn_node(backend).await;
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        let url = format!("http://{}{path}", node.http_addr);
        async move {
            let response = http.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/health").await.0, 200);
    let (status, ready) = get("/ready").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    let expected = match backend {
        Backend::SqliteLocal => {
            // The local blob root goes away (an unmounted volume).
            std::fs::remove_dir_all(node.config.data_dir.join("blobs")).unwrap();
            "blob store unreachable"
        }
        Backend::PostgresS3 => {
            use sqlx::Connection;
            let name = node.config.database_url.rsplit('/').next().unwrap();
            let mut admin =
                sqlx::postgres::PgConnection::connect(&support::env("HUREN_TEST_PG_URL"))
                    .await
                    .unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {name} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
            "database unreachable"
        }
    };
    let (status, body) = get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["reasons"], serde_json::json!([expected]));
    // Liveness does not depend on them: restarting would not help.
    let (status, body) = get("/health").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    node.stop().await;
}

/// Every metric a dashboard or alert expression names (PromQL identifiers
/// outside label matchers, strings and ranges that are not functions,
/// aggregations or keywords).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const WORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "inf",
        "nan",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            if chars[*i] == '"' || chars[*i] == '\'' {
                let q = chars[*i];
                *i += 1;
                while *i < chars.len() && chars[*i] != q {
                    if chars[*i] == '\\' {
                        *i += 1;
                    }
                    *i += 1;
                }
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => {
                i += 1;
                skip_to(&mut i, '}')
            }
            '[' => {
                i += 1;
                skip_to(&mut i, ']')
            }
            '"' | '\'' | '`' => {
                i += 1;
                skip_to(&mut i, c)
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = j < chars.len() && chars[j] == '(';
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&word.as_str())
                    && call
                {
                    // A label list, not an expression.
                    i = j + 1;
                    skip_to(&mut i, ')');
                } else if !call && !WORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_names_are_found() {
    let cases: &[(&str, &[&str])] = &[
        ("up{job=\"huren-node\"} == 0", &["up"]),
        (
            "histogram_quantile(0.95, sum by (le, operation) (rate(huren_dimse_request_duration_seconds_bucket{instance=~\"$node\"}[5m])))",
            &["huren_dimse_request_duration_seconds_bucket"],
        ),
        (
            "huren_publish_backlog > 0 and (time() - huren_publish_last_success_timestamp_seconds) > 3600",
            &[
                "huren_publish_backlog",
                "huren_publish_last_success_timestamp_seconds",
            ],
        ),
        (
            "time() - huren_verify_last_run_timestamp_seconds > 8 * 86400",
            &["huren_verify_last_run_timestamp_seconds"],
        ),
        (
            "sum without (instance) (a) / on (job) group_left b offset 5m",
            &["a", "b"],
        ),
    ];
    for (expr, expected) in cases {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(metric_names(expr), expected, "{expr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_exported_metrics() {
    // What a node, a registry and a scrub actually export.
    let dir = tempfile::tempdir().unwrap();
    let node = spawn_node(dir.path());
    // A registry in a federation (one member), which also exports the
    // fan-out's series for its members.
    let fdir = dir.path().join("federation");
    std::fs::create_dir(&fdir).unwrap();
    let keygen = |name: &str| {
        let out = Command::new(HUREN)
            .args(["registry", "federation", "keygen", "--key-file"])
            .arg(fdir.join(name))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    keygen("self.key");
    let other = keygen("other.key");
    std::fs::copy(
        repo_path("deploy/recognition/jiangsu-example.toml"),
        fdir.join("list.toml"),
    )
    .unwrap();
    std::fs::write(
        fdir.join("federation.toml"),
        format!(
            "[federation]\nname = \"m\"\nmember_id = \"self\"\nprovince = \"P\"\n\
             signing_key_file = \"self.key\"\nrecognition_list = \"list.toml\"\n\n\
             [[member]]\nid = \"other\"\nprovince = \"Q\"\nurl = \"http://127.0.0.1:1\"\n\
             public_key = \"{other}\"\n"
        ),
    )
    .unwrap();
    let config = fdir.join("federation.toml");
    let registry = spawn_registry_with(
        dir.path(),
        &["--federation-config", config.to_str().unwrap()],
    );
    let admin = Api::new(&format!("http://{}", registry.addrs[0]), Some(ADMIN_TOKEN));
    // An audit entry: its series exists once there is an action to label.
    add_hospital(&admin, "HOSPM0000000000002", "二级", None).await;
    let textfile = dir.path().join("huren-verify.prom");
    let verify = Command::new(HUREN)
        .args(["verify", "--data-dir"])
        .arg(dir.path().join("verify-data"))
        .arg("--metrics-file")
        .arg(&textfile)
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", support::text(&verify));
    let scrub = std::fs::read_to_string(&textfile).unwrap();
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for samples in [
        scrape(node.addrs[1]).await,
        scrape(registry.addrs[0]).await,
        tokio::task::spawn_blocking(move || parse(&scrub))
            .await
            .unwrap(),
    ] {
        exported.extend(samples.into_iter().map(|s| s.name));
    }
    assert!(
        exported.contains("huren_verify_blobs_total"),
        "{exported:?}"
    );
    assert!(exported.contains("huren_verify_last_run_timestamp_seconds"));
    // Prometheus' own, per target.
    exported.insert("up".into());

    // The dashboard: every panel's query and the template variables.
    let dashboard: Value = serde_json::from_slice(
        &std::fs::read(repo_path("deploy/grafana/huren-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut dashboard_names = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            dashboard_names.extend(names);
        }
    }
    assert!(exprs >= 20, "{exprs} queries");
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            // Grafana's label_values(METRIC{...}, label).
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(m, _)| m)
                .unwrap_or_else(|| panic!("template query {q}"));
            dashboard_names.extend(metric_names(inner));
        }
    }
    let unknown: Vec<_> = dashboard_names.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard names metrics nothing exports: {unknown:?}"
    );
    // …and shows every metric there is.
    for metric in huren::metrics::ALL {
        assert!(
            dashboard_names.iter().any(|n| n.starts_with(metric)),
            "no dashboard panel shows {metric}"
        );
    }

    // The alert rules: valid for Prometheus, and about exported metrics.
    let rules = repo_path("deploy/prometheus/huren-alerts.yml");
    let checked = Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", support::text(&checked));
    let config = Command::new("/usr/bin/promtool")
        .args(["check", "config"])
        .arg(repo_path("deploy/prometheus/prometheus.yml"))
        .output()
        .unwrap();
    assert!(config.status.success(), "{}", support::text(&config));
    let mut alerted = BTreeSet::new();
    for rule in support::python_tool("prometheus_text.py", &["rules", rules.to_str().unwrap()]) {
        let expr = rule["expr"].as_str().unwrap();
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{rule}");
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "alert {} names metrics nothing exports: {unknown:?}",
            rule["rule"]
        );
        alerted.extend(names);
    }
    // The rules the operations guide promises.
    for metric in [
        "huren_publish_backlog",
        "huren_publish_last_success_timestamp_seconds",
        "huren_storage_errors_total",
        "huren_verify_blobs_total",
        "huren_ready",
        "up",
    ] {
        assert!(alerted.contains(metric), "no alert on {metric}");
    }
}
