//! Shared test harness: a whole node per test on port 0 with its own
//! database and blob store, on either backend pair; the real peers (dcmtk,
//! pynetdicom) driven as subprocesses.
//!
//! Backends come from the environment `scripts/test.sh` prepares. A missing
//! variable fails the test with a message saying so: no backend is ever
//! skipped silently.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use huren::config::{Durability, NodeConfig, StorageConfig};
use huren::ingest::Ingest;
use huren::node::Node;
use huren::part10;
use serde_json::Value;
use sqlx::Connection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded defaults: SQLite index, local file system blobs.
    SqliteLocal,
    /// The production pair: PostgreSQL index, S3 (Garage) blobs.
    PostgresS3,
}

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite through scripts/test.sh, which starts PostgreSQL, Garage and the Python peers")
    })
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test of this run (or an earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// A fresh, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres_database() -> String {
    let admin = env("HUREN_TEST_PG_URL");
    let name = unique("huren_test");
    let mut conn = sqlx::postgres::PgConnection::connect(&admin)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').expect("database URL has a path").0;
    format!("{base}/{name}")
}

/// The test Garage bucket under a fresh prefix; the secret is written to a
/// file in `dir`, as an operator would.
pub fn s3_storage(dir: &Path) -> StorageConfig {
    let secret_file = dir.join("s3-secret");
    std::fs::write(&secret_file, env("HUREN_TEST_S3_SECRET_ACCESS_KEY")).unwrap();
    StorageConfig::S3 {
        bucket: env("HUREN_TEST_S3_BUCKET"),
        endpoint: Some(env("HUREN_TEST_S3_ENDPOINT")),
        region: env("HUREN_TEST_S3_REGION"),
        prefix: unique("test"),
        access_key_id: Some(env("HUREN_TEST_S3_ACCESS_KEY_ID")),
        secret_access_key_file: Some(secret_file),
        allow_http: true,
    }
}

pub struct TestNode {
    pub dicom_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    pub ingest: Ingest,
    pub config: NodeConfig,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    node: Option<Node>,
}

impl TestNode {
    pub fn port(&self) -> u16 {
        self.dicom_addr.port()
    }

    pub fn host(&self) -> String {
        self.dicom_addr.ip().to_string()
    }

    /// The indexed study, which must exist.
    pub async fn study(&self, study_instance_uid: &str) -> huren::index::StudyRow {
        self.ingest
            .index()
            .study(study_instance_uid)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("study {study_instance_uid} not indexed"))
    }

    /// Every indexed version of a SOP Instance UID, oldest first.
    pub async fn versions(&self, sop_instance_uid: &str) -> Vec<huren::index::InstanceRow> {
        self.ingest
            .index()
            .instance_versions(sop_instance_uid)
            .await
            .unwrap()
    }

    /// Stops accepting, lets associations finish, closes the index.
    /// Returns the node's directory, which lives as long as the caller
    /// keeps it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(node) = self.node.take() {
            node.wait().await;
        }
        self.dir
    }
}

/// The configuration a test node starts from: a fresh data directory, the
/// backend pair, full durability.
/// The bearer token of the nodes `test_config` makes, read and write.
pub const NODE_API_TOKEN: &str = "node-api-token-for-the-tests-0001";

pub async fn test_config(backend: Backend, dir: &Path) -> NodeConfig {
    let mut config = NodeConfig::defaults_in(dir.join("data"));
    config.dicom_listen = "127.0.0.1:0".parse().unwrap();
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    config.durability = Durability::Full;
    // The suite's clients query and retrieve under many calling AE titles
    // (findscu's FINDSCU, pynetdicom's, getscu's) that no test lists in an
    // AE directory; the embedded default (`listed`, issue 22) is tested on
    // the real binary in security_node.rs and query_retrieve.rs.
    config.query_retrieve_access = huren::config::QueryRetrieveAccess::Any;
    // The operator's token: the JSON API is never open (issue 22), so the
    // tests reach it as an operator would.
    config.dicomweb.tokens = vec![huren::config::TokenConfig {
        name: "test-operator".into(),
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            NODE_API_TOKEN.as_bytes(),
        )),
        scopes: vec![huren::config::Scope::Read, huren::config::Scope::Write],
    }];
    match backend {
        Backend::SqliteLocal => {}
        Backend::PostgresS3 => {
            config.database_url = fresh_postgres_database().await;
            config.storage = s3_storage(dir);
        }
    }
    config
}

pub async fn spawn_node(backend: Backend) -> TestNode {
    spawn_node_with(backend, |_| {}).await
}

pub async fn spawn_node_with(backend: Backend, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(backend, dir.path()).await;
    tweak(&mut config);
    start_node(config, dir).await
}

pub async fn start_node(config: NodeConfig, dir: tempfile::TempDir) -> TestNode {
    let dicom = TcpListener::bind(config.dicom_listen).await.unwrap();
    let http = TcpListener::bind(config.http_listen).await.unwrap();
    let shutdown = CancellationToken::new();
    let node = Node::start(&config, dicom, http, shutdown.clone())
        .await
        .expect("node starts");
    TestNode {
        dicom_addr: node.dicom_addr,
        http_addr: node.http_addr,
        ingest: node.ingest.clone(),
        config,
        dir,
        shutdown,
        node: Some(node),
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs each test of a module once per backend pair: a test `name(backend)`
/// becomes `name::sqlite_local` and `name::postgres_s3`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite_local() {
                    super::$name(crate::support::Backend::SqliteLocal).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_s3() {
                    super::$name(crate::support::Backend::PostgresS3).await
                }
            }
        )*
    };
}
pub(crate) use on_both_backends;

/// Runs tests/support/dicom_tool.py (pynetdicom/pydicom) and returns its
/// JSON lines. Fails the test when the tool fails.
pub fn tool(args: &[&str]) -> Vec<Value> {
    python_tool("dicom_tool.py", args)
}

/// Runs a Python tool of tests/support and returns its JSON lines.
pub fn python_tool(script: &str, args: &[&str]) -> Vec<Value> {
    python_tool_env(script, args, &[])
}

/// [`python_tool`] with environment variables (a tool's options that most
/// callers leave at their defaults: the calling AE title, a note's patient).
pub fn python_tool_env(script: &str, args: &[&str], envs: &[(&str, &str)]) -> Vec<Value> {
    let output = Command::new(env("HUREN_TEST_PYTHON"))
        .arg(repo_path(&format!("tests/support/{script}")))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run dicom_tool.py");
    assert!(
        output.status.success(),
        "{script} {:?} failed: {}\n{}",
        args.first(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Async wrapper so a subprocess does not block the node's runtime.
pub async fn tool_async(args: Vec<String>) -> Vec<Value> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tool(&args)
    })
    .await
    .unwrap()
}

/// The storescu option that proposes a transfer syntax (dcmtk 3.6.7):
/// storescu proposes one compressed transfer syntax per run.
pub fn storescu_option(transfer_syntax_uid: &str) -> &'static str {
    match transfer_syntax_uid {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.1" => "-xe",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        other => panic!("no storescu option for {other}"),
    }
}

/// Runs Debian's storescu (by full path: PATH may hold same-named shims).
/// TCP_NODELAY=1: Debian's dcmtk otherwise waits ~40 ms per message.
pub async fn storescu(
    addr: std::net::SocketAddr,
    options: Vec<String>,
    files: Vec<String>,
) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/storescu")
            .env("TCP_NODELAY", "1")
            .args(["-aet", "STORESCU", "-aec", "HUREN"])
            .args(&options)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .args(&files)
            .stdin(Stdio::null())
            .output()
            .expect("run /usr/bin/storescu (Debian package dcmtk)")
    })
    .await
    .unwrap()
}

pub async fn echoscu(addr: std::net::SocketAddr, extra: &[&str]) -> Output {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/echoscu")
            .env("TCP_NODELAY", "1")
            .args(&extra)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run /usr/bin/echoscu (Debian package dcmtk)")
    })
    .await
    .unwrap()
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub study_instance_uid: String,
    pub transfer_syntax_uid: String,
}

/// The committed sample studies, from sample-dicom/manifest.json.
pub fn samples() -> Vec<Sample> {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(repo_path("sample-dicom/manifest.json"))
            .expect("sample-dicom/manifest.json"),
    )
    .unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Sample {
            path: repo_path(&format!("sample-dicom/{}", f["path"].as_str().unwrap())),
            sop_instance_uid: f["sop_instance_uid"].as_str().unwrap().into(),
            sop_class_uid: f["sop_class_uid"].as_str().unwrap().into(),
            study_instance_uid: f["study_instance_uid"].as_str().unwrap().into(),
            transfer_syntax_uid: f["transfer_syntax_uid"].as_str().unwrap().into(),
        })
        .collect()
}

/// The data set bytes of a Part-10 file: everything after its meta group.
pub fn data_set_bytes(part10_bytes: &[u8]) -> &[u8] {
    let meta_len = part10::file_meta_len(part10_bytes).expect("a Part-10 object");
    &part10_bytes[meta_len..]
}

/// Asserts that the instance in `file` is indexed under `sop_instance_uid`
/// and that one of its versions' blob (i) reads back with a verified BLAKE3
/// key, (ii) hashes to its key afresh, and (iii) holds exactly the file's
/// data set bytes behind the node's own file meta.
pub async fn assert_stored(ingest: &Ingest, file: &Path, sop_instance_uid: &str) {
    let versions = ingest
        .index()
        .instance_versions(sop_instance_uid)
        .await
        .unwrap();
    assert!(
        !versions.is_empty(),
        "{} ({sop_instance_uid}) not in the index",
        file.display()
    );
    let original = std::fs::read(file).unwrap();
    let expected = comparable_data_set(&original);
    let mut matched = false;
    for version in &versions {
        let blob = ingest
            .store()
            .get(&version.blob_hash)
            .await
            .expect("blob reads and verifies");
        assert_eq!(
            blake3::hash(&blob).to_hex().to_string(),
            version.blob_hash.to_hex(),
            "fresh hash of the stored bytes"
        );
        assert_eq!(blob.len() as u64, version.blob_size);
        if comparable_data_set(&blob) == expected {
            matched = true;
        }
    }
    assert!(
        matched,
        "no stored version of {} holds its data set bytes",
        file.display()
    );
}

/// Runs the pynetdicom sender on files, asserting every status is 0x0000.
pub async fn pynetdicom_send(node: &TestNode, files: &[PathBuf]) {
    // One association per 100 files keeps under the 128 presentation
    // contexts a single association may negotiate.
    for chunk in files.chunks(100) {
        let mut args = vec!["send".to_string(), node.host(), node.port().to_string()];
        args.extend(chunk.iter().map(|p| p.display().to_string()));
        let lines = tool_async(args).await;
        assert_eq!(lines.len(), chunk.len());
        for line in lines {
            assert_eq!(line["status"], 0, "{line}");
        }
    }
}

/// Where the data set starts in a Part-10 file.
pub fn data_set_bytes_offset(part10_bytes: &[u8]) -> usize {
    part10::file_meta_len(part10_bytes).expect("a Part-10 object")
}

/// The data set bytes, inflated when the transfer syntax is deflated: an
/// SCU may deflate again on the way (storescu does), so only the inflated
/// bytes must match.
pub fn comparable_data_set(part10_bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let data_set = data_set_bytes(part10_bytes);
    let meta = &part10_bytes[..data_set_bytes_offset(part10_bytes)];
    let deflated = meta.windows(22).any(|w| w == b"1.2.840.10008.1.2.1.99");
    if !deflated {
        return data_set.to_vec();
    }
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(data_set)
        .read_to_end(&mut out)
        .expect("a valid deflate stream");
    out
}
