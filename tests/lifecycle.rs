//! Deletion, IOCM rejection notes, retention, the collector, backup and
//! restore (src/lifecycle.rs, src/gc.rs, src/backup.rs), on nodes driven by
//! real clients: storescu, findscu, getscu, curl (QIDO-RS, WADO-RS, the JSON
//! API), rejection notes built with pydicom, and the `huren` binary itself
//! for `delete`, `gc`, `backup`, `restore` and `verify`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use huren::config::{NodeConfig, Scope, StorageConfig, TokenConfig};
use serde_json::Value;
use sha2::Digest;

use crate::support::{self, Backend, TestNode, on_both_backends};

const HUREN: &str = env!("CARGO_BIN_EXE_huren");
const TOKEN: &str = "lifecycle-admin-token";
const TOKEN_NAME: &str = "pacs-admin";

/// A UID root of its own per call, so that runs never collide on a shared
/// PostgreSQL or bucket.
pub(crate) fn uid_root() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "1.2.826.0.1.3680043.10.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

fn with_token(config: &mut NodeConfig) {
    config.dicomweb.tokens.push(TokenConfig {
        name: TOKEN_NAME.into(),
        sha256: hex::encode(sha2::Sha256::digest(TOKEN.as_bytes())),
        scopes: vec![Scope::Read, Scope::Write],
    });
    // The senders of this file's rejection notes: dcmtk's storescu and
    // pynetdicom under their default AE titles.
    config.rejection_note_ae_titles = Some(vec!["STORESCU".into(), "PYNETDICOM".into()]);
}

pub(crate) struct Generated {
    pub(crate) file: PathBuf,
    pub(crate) series: String,
    pub(crate) sop: String,
}

pub(crate) fn gen_study(
    dir: &Path,
    study: &str,
    series: u32,
    per_series: u32,
    date: &str,
) -> Vec<Generated> {
    let out = dir.join(study);
    support::python_tool(
        "lifecycle_tool.py",
        &[
            "study",
            out.to_str().unwrap(),
            study,
            &series.to_string(),
            &per_series.to_string(),
            date,
            "LIFECYCLE",
        ],
    )
    .into_iter()
    .map(|l| Generated {
        file: PathBuf::from(l["file"].as_str().unwrap()),
        series: l["series"].as_str().unwrap().into(),
        sop: l["sop"].as_str().unwrap().into(),
    })
    .collect()
}

/// A rejection note for `instances` of `study`; returns its file.
pub(crate) fn rejection_note(
    dir: &Path,
    code: &str,
    study: &str,
    instances: &[&Generated],
) -> PathBuf {
    let path = dir.join(format!("kos-{}.dcm", uid_root()));
    let mut args = vec![
        "kos".to_string(),
        path.display().to_string(),
        code.into(),
        study.into(),
    ];
    args.extend(instances.iter().map(|g| format!("{}:{}", g.series, g.sop)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    support::python_tool("lifecycle_tool.py", &args);
    path
}

async fn store(node: &TestNode, files: &[&Generated]) {
    let output = support::storescu(
        node.dicom_addr,
        vec![],
        files.iter().map(|g| g.file.display().to_string()).collect(),
    )
    .await;
    assert!(
        output.status.success(),
        "storescu: {}",
        support::text(&output)
    );
}

/// curl against the node's HTTP port with the admin token; (status, body).
async fn curl(node: &TestNode, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("http://{}{path}", node.http_addr);
    let method = method.to_string();
    let body = body.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-X", &method, "-w", "\n%{http_code}"])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")]);
        if let Some(body) = &body {
            cmd.args(["-H", "Content-Type: application/json", "--data", body]);
        }
        let out = cmd.arg(&url).output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap();
        (status.trim().parse().unwrap(), body.to_string())
    })
    .await
    .unwrap()
}

/// The SOP Instance UIDs QIDO-RS lists for a study.
async fn qido_instances(node: &TestNode, study: &str) -> BTreeSet<String> {
    let (status, body) = curl(
        node,
        "GET",
        &format!("/dicom-web/studies/{study}/instances"),
        None,
    )
    .await;
    if status == 204 || body.trim().is_empty() {
        return BTreeSet::new();
    }
    assert_eq!(status, 200, "QIDO-RS: {body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|i| i["00080018"]["Value"][0].as_str().unwrap().to_string())
        .collect()
}

/// NumberOfStudyRelatedInstances by a study-level C-FIND (findscu); `None`
/// when the study does not match.
async fn findscu_count(node: &TestNode, study: &str) -> Option<u64> {
    let addr = node.dicom_addr;
    let study = study.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/findscu")
            .env("TCP_NODELAY", "1")
            .args(["-S", "-aec", "HUREN"])
            .args(["-k", "QueryRetrieveLevel=STUDY"])
            .args(["-k", &format!("StudyInstanceUID={study}")])
            .args(["-k", "NumberOfStudyRelatedInstances"])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = support::text(&out);
    assert!(out.status.success(), "findscu: {text}");
    text.lines()
        .find(|l| l.contains("(0020,1208)"))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|v| v.split(']').next())
        .map(|v| v.trim().parse().unwrap())
}

/// How many instances a study-level C-GET (getscu) brings.
async fn getscu_count(node: &TestNode, study: &str) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let addr = node.dicom_addr;
    let study = study.to_string();
    let od = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/getscu")
            .env("TCP_NODELAY", "1")
            .args(["-S", "-aec", "HUREN", "-od"])
            .arg(&od)
            .args(["-k", "QueryRetrieveLevel=STUDY"])
            .args(["-k", &format!("StudyInstanceUID={study}")])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = out;
    std::fs::read_dir(dir.path()).unwrap().count()
}

/// The node's configuration as `huren` CLI flags (a storage file for S3).
fn cli_flags(config: &NodeConfig, dir: &Path) -> Vec<String> {
    let mut flags = vec![
        "--data-dir".to_string(),
        config.data_dir.display().to_string(),
        "--database-url".into(),
        config.database_url.clone(),
    ];
    if let StorageConfig::S3 {
        bucket,
        endpoint,
        region,
        prefix,
        access_key_id,
        secret_access_key_file,
        allow_http,
    } = &config.storage
    {
        let file = dir.join(format!("storage-{}.toml", uid_root()));
        std::fs::write(
            &file,
            format!(
                "backend = \"s3\"\nbucket = {bucket:?}\nendpoint = {:?}\nregion = {region:?}\n\
                 prefix = {prefix:?}\naccess_key_id = {:?}\nsecret_access_key_file = {:?}\n\
                 allow_http = {allow_http}\n",
                endpoint.clone().unwrap(),
                access_key_id.clone().unwrap(),
                secret_access_key_file
                    .clone()
                    .unwrap()
                    .display()
                    .to_string(),
            ),
        )
        .unwrap();
        flags.push("--storage-config".into());
        flags.push(file.display().to_string());
    }
    flags
}

/// Runs `huren COMMAND FLAGS... ARGS...`; (success, output).
async fn huren(command: &str, flags: &[String], args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(HUREN);
    cmd.arg(command).args(flags).args(args).stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (out.status.success(), support::text(&out))
}

/// Polls until `check` holds, or fails the test after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Statuses pynetdicom reports for each file, in order.
async fn pynetdicom_statuses(node: &TestNode, files: &[&Path]) -> Vec<i64> {
    let mut args = vec!["send".to_string(), node.host(), node.port().to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    support::tool_async(args)
        .await
        .iter()
        .map(|l| l["status"].as_i64().expect("a status"))
        .collect()
}

on_both_backends!(
    deletion_by_api_cli_and_rejection_note,
    collector_never_removes_a_blob_an_ingest_refers_to,
    backup_during_ingest_and_restore
);

async fn deletion_by_api_cli_and_rejection_note(backend: Backend) {
    let node = support::spawn_node_with(backend, with_token).await;
    let work = tempfile::tempdir().unwrap();
    let study = uid_root();
    let files = gen_study(work.path(), &study, 3, 3, "20250301");
    let all: Vec<&Generated> = files.iter().collect();
    store(&node, &all).await;
    assert_eq!(qido_instances(&node, &study).await.len(), 9);
    assert_eq!(findscu_count(&node, &study).await, Some(9));

    // 1. One instance through the JSON API, with the token's name recorded.
    let gone = &files[0];
    let (status, body) = curl(
        &node,
        "DELETE",
        &format!("/api/v1/instances/{}", gone.sop),
        Some(r#"{"reason":"wrong laterality marker"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let outcome: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["instances_removed"], 1);
    assert_eq!(outcome["studies_changed"][0], study.as_str());
    // Without a reason: refused, nothing removed.
    let (status, _) = curl(
        &node,
        "DELETE",
        &format!("/api/v1/instances/{}", files[1].sop),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let listed = qido_instances(&node, &study).await;
    assert_eq!(listed.len(), 8);
    assert!(!listed.contains(&gone.sop));
    assert_eq!(findscu_count(&node, &study).await, Some(8));
    assert_eq!(getscu_count(&node, &study).await, 8);
    let (status, _) = curl(
        &node,
        "GET",
        &format!(
            "/dicom-web/studies/{study}/series/{}/instances/{}",
            gone.series, gone.sop
        ),
        None,
    )
    .await;
    assert_eq!(status, 404, "WADO-RS of a deleted instance");

    // 2. A rejection note (quality) by C-STORE: the instance goes, and the
    // same instance sent again is refused with 0124.
    let rejected = &files[1];
    let note = rejection_note(
        work.path(),
        huren::lifecycle::REJECTED_FOR_QUALITY_REASONS,
        &study,
        &[rejected],
    );
    let output = support::storescu(node.dicom_addr, vec![], vec![note.display().to_string()]).await;
    assert!(output.status.success(), "{}", support::text(&output));
    let listed = qido_instances(&node, &study).await;
    assert_eq!(listed.len(), 7, "the note itself is not indexed");
    assert!(!listed.contains(&rejected.sop));
    assert_eq!(
        pynetdicom_statuses(&node, &[&rejected.file]).await,
        vec![0x0124],
        "a rejected instance sent again stays rejected (IOCM)"
    );
    assert!(!qido_instances(&node, &study).await.contains(&rejected.sop));
    // The instance deleted by the operator may come back: sent on purpose.
    assert_eq!(pynetdicom_statuses(&node, &[&gone.file]).await, vec![0]);
    assert!(qido_instances(&node, &study).await.contains(&gone.sop));
    // Its series has just been written again, so the index takes the
    // rejected instance's next attempt on its direct path, where the INSERT
    // itself asks whether a rejection note bars it: refused there too.
    assert_eq!(gone.series, rejected.series);
    assert_eq!(
        pynetdicom_statuses(&node, &[&rejected.file]).await,
        vec![0x0124],
        "still rejected once its series is known to the index writer again"
    );
    assert!(!qido_instances(&node, &study).await.contains(&rejected.sop));

    // 3. "Data Retention Policy Expired" removes without barring a resend.
    let expired = &files[2];
    let note = rejection_note(
        work.path(),
        huren::lifecycle::DATA_RETENTION_POLICY_EXPIRED,
        &study,
        &[expired],
    );
    assert_eq!(pynetdicom_statuses(&node, &[&note]).await, vec![0]);
    assert!(!qido_instances(&node, &study).await.contains(&expired.sop));
    assert_eq!(pynetdicom_statuses(&node, &[&expired.file]).await, vec![0]);
    assert!(qido_instances(&node, &study).await.contains(&expired.sop));

    // 4. A series with the CLI, on the node's configuration.
    let flags = cli_flags(&node.config, work.path());
    let series = files[3].series.clone();
    let (ok, text) = huren(
        "delete",
        &flags,
        &["--series", &series, "--reason", "duplicate series"],
    )
    .await;
    assert!(ok, "{text}");
    assert!(text.contains("instances removed: 3"), "{text}");
    let listed = qido_instances(&node, &study).await;
    assert_eq!(listed.len(), 5);
    assert!(
        files
            .iter()
            .filter(|g| g.series == series)
            .all(|g| !listed.contains(&g.sop))
    );
    assert_eq!(findscu_count(&node, &study).await, Some(5));

    // 5. The whole study: gone from C-FIND, QIDO-RS and C-GET; again: 404.
    let (status, body) = curl(
        &node,
        "DELETE",
        &format!("/api/v1/studies/{study}"),
        Some(r#"{"reason":"wrong patient","reason_code":"113038"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let outcome: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(outcome["studies_removed"][0], study.as_str());
    assert_eq!(findscu_count(&node, &study).await, None);
    assert!(qido_instances(&node, &study).await.is_empty());
    assert_eq!(getscu_count(&node, &study).await, 0);
    let (status, _) = curl(
        &node,
        "DELETE",
        &format!("/api/v1/studies/{study}"),
        Some(r#"{"reason":"again"}"#),
    )
    .await;
    assert_eq!(status, 404);

    // The record: who, why, which.
    let (status, body) = curl(
        &node,
        "GET",
        &format!("/api/v1/deletions?study={study}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let records: Vec<Value> = serde_json::from_str(&body).unwrap();
    let find = |sop: &str, source: &str| {
        records
            .iter()
            .find(|r| r["sop_instance_uid"] == sop && r["source"] == source)
            .unwrap_or_else(|| panic!("no {source} record of {sop}: {body}"))
            .clone()
    };
    // Deleted twice (sent again in between): both recorded.
    let r = records
        .iter()
        .find(|r| {
            r["sop_instance_uid"] == gone.sop.as_str() && r["reason"] == "wrong laterality marker"
        })
        .unwrap_or_else(|| panic!("the first deletion of {} is recorded: {body}", gone.sop));
    assert_eq!(r["actor"], TOKEN_NAME);
    assert_eq!(r["source"], "operator");
    assert_eq!(find(&gone.sop, "operator")["reason"], "wrong patient");
    let r = find(&rejected.sop, "rejection_note");
    assert_eq!(r["reason_code"], "113001");
    assert_eq!(r["actor"], "STORESCU");
    assert!(r["rejection_note_uid"].is_string());
    let r = find(&files[4].sop, "operator");
    assert!(r["actor"].as_str().unwrap().starts_with("cli"), "{r}");
    assert_eq!(r["reason"], "duplicate series");
    assert_eq!(find(&files[8].sop, "operator")["reason_code"], "113038");

    // What remains verifies; the orphaned blobs go with the collector.
    let (ok, text) = huren("gc", &flags, &["--grace-secs", "0"]).await;
    assert!(ok, "{text}");
    assert!(text.contains("removed: 9"), "{text}");
    let (ok, text) = huren("verify", &flags, &[]).await;
    assert!(ok, "{text}");
    assert!(text.contains("orphans: 0"), "{text}");
    node.stop().await;
}

/// A study whose Study Date is older than the retention period goes by
/// itself, recorded as 113039; a recent one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_studies() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |config| {
        with_token(config);
        config.retention_days = Some(365);
        config.gc_interval = Some(Duration::from_secs(1));
        config.gc_grace = Duration::from_secs(3600);
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let old = uid_root();
    let old_files = gen_study(work.path(), &old, 1, 2, "20100101");
    let today =
        humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].replace('-', "");
    let recent = uid_root();
    let recent_files = gen_study(work.path(), &recent, 1, 2, &today);
    store(
        &node,
        &old_files.iter().chain(&recent_files).collect::<Vec<_>>(),
    )
    .await;
    eventually(
        30,
        "the old study removed by the retention policy",
        || async { findscu_count(&node, &old).await.is_none() },
    )
    .await;
    assert_eq!(findscu_count(&node, &recent).await, Some(2));
    let (_, body) = curl(
        &node,
        "GET",
        &format!("/api/v1/deletions?study={old}"),
        None,
    )
    .await;
    let records: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(records.len(), 2, "{body}");
    for r in &records {
        assert_eq!(r["source"], "retention");
        assert_eq!(r["reason_code"], "113039");
    }
    node.stop().await;
}

/// The collector against ingest: the same instances (identical bytes, so
/// the same blobs) sent again and again by storescu while deletions and
/// collector passes (`huren gc`, another process) run in a loop. Afterwards
/// every instance of the last, acknowledged round is present and every
/// indexed blob verifies.
async fn collector_never_removes_a_blob_an_ingest_refers_to(backend: Backend) {
    let node = support::spawn_node_with(backend, with_token).await;
    let work = tempfile::tempdir().unwrap();
    let study = uid_root();
    let files = gen_study(work.path(), &study, 2, 40, "20250301");
    let flags = cli_flags(&node.config, work.path());
    let run_for = Duration::from_secs(30);
    let started = Instant::now();
    let node = std::sync::Arc::new(node);

    let sender = {
        let node = node.clone();
        let paths: Vec<String> = files.iter().map(|g| g.file.display().to_string()).collect();
        tokio::spawn(async move {
            let mut rounds = 0u32;
            while started.elapsed() < run_for {
                let out = support::storescu(node.dicom_addr, vec![], paths.clone()).await;
                assert!(out.status.success(), "storescu: {}", support::text(&out));
                rounds += 1;
                // Now and then a pause longer than the collector's grace,
                // so that deleted instances' blobs age into candidates and
                // the next round races the collector for them.
                if rounds.is_multiple_of(2) {
                    tokio::time::sleep(Duration::from_millis(3500)).await;
                }
            }
            rounds
        })
    };
    let deleter = {
        let node = node.clone();
        let sops: Vec<String> = files.iter().map(|g| g.sop.clone()).collect();
        tokio::spawn(async move {
            let mut deleted = 0u64;
            let mut i = 0usize;
            while started.elapsed() < run_for {
                let sop = &sops[i % sops.len()];
                let (status, _) = curl(
                    &node,
                    "DELETE",
                    &format!("/api/v1/instances/{sop}"),
                    Some(r#"{"reason":"race test"}"#),
                )
                .await;
                // 503: the index was busy past its timeout (the collector, a
                // separate process, and ingest hold SQLite's write lock in
                // turn); the node says so and nothing is changed: the next
                // round asks again.
                assert!(
                    status == 200 || status == 404 || status == 503,
                    "DELETE: {status}"
                );
                if status == 200 {
                    deleted += 1;
                }
                i += 7;
                if i.is_multiple_of(5) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            deleted
        })
    };
    let collector = {
        let flags = flags.clone();
        tokio::spawn(async move {
            let mut removed = 0u64;
            while started.elapsed() < run_for {
                let (ok, text) = huren("gc", &flags, &["--grace-secs", "2"]).await;
                assert!(ok, "huren gc: {text}");
                removed += text
                    .split("removed: ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            removed
        })
    };
    let rounds = sender.await.unwrap();
    let deleted = deleter.await.unwrap();
    let removed = collector.await.unwrap();
    assert!(
        rounds >= 2 && deleted > 20,
        "rounds {rounds}, deletions {deleted}"
    );
    assert!(removed > 0, "the collector removed blobs during the race");

    // Whatever rows the race left must all have their blobs.
    let (ok, text) = huren("verify", &flags, &[]).await;
    assert!(ok, "verify after the race: {text}");
    assert!(text.contains("missing: 0"), "{text}");
    // One last acknowledged round: every instance present and verifying.
    let paths: Vec<String> = files.iter().map(|g| g.file.display().to_string()).collect();
    let out = support::storescu(node.dicom_addr, vec![], paths).await;
    assert!(out.status.success(), "{}", support::text(&out));
    for g in &files {
        support::assert_stored(&node.ingest, &g.file, &g.sop).await;
    }
    assert_eq!(qido_instances(&node, &study).await.len(), files.len());
    let (ok, text) = huren("verify", &flags, &[]).await;
    assert!(ok, "{text}");
}

async fn backup_during_ingest_and_restore(backend: Backend) {
    let work = tempfile::tempdir().unwrap();
    let node = support::spawn_node_with(backend, with_token).await;
    let flags = cli_flags(&node.config, work.path());
    let backup_dir = work.path().join("backup");
    let before = gen_study(work.path(), &uid_root(), 2, 20, "20250301");
    let during = gen_study(work.path(), &uid_root(), 4, 25, "20250302");
    let after = gen_study(work.path(), &uid_root(), 1, 10, "20250303");
    store(&node, &before.iter().collect::<Vec<_>>()).await;

    // storescu keeps storing while the backup runs.
    let ingest_running = {
        let addr = node.dicom_addr;
        let paths: Vec<String> = during
            .iter()
            .map(|g| g.file.display().to_string())
            .collect();
        tokio::spawn(async move {
            for chunk in paths.chunks(10) {
                let out = support::storescu(addr, vec![], chunk.to_vec()).await;
                assert!(out.status.success(), "{}", support::text(&out));
            }
        })
    };
    let (ok, text) = huren("backup", &flags, &[backup_dir.to_str().unwrap()]).await;
    assert!(ok, "backup: {text}");
    ingest_running.await.unwrap();
    let first_manifest: BTreeSet<String> = std::fs::read_to_string(backup_dir.join("manifest.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert!(first_manifest.len() >= before.len());

    // The node's data is lost: a new data dir (and, on PostgreSQL + S3, a
    // new empty database and bucket prefix).
    let old_config = node.config.clone();
    let old_dir = node.stop().await;
    drop(old_dir);
    let restored_dir = tempfile::tempdir().unwrap();
    let mut config = support::test_config(backend, restored_dir.path()).await;
    with_token(&mut config);
    assert_ne!(config.data_dir, old_config.data_dir);
    let restored_flags = cli_flags(&config, work.path());
    let (ok, text) = huren("restore", &restored_flags, &[backup_dir.to_str().unwrap()]).await;
    assert!(ok, "restore: {text}");
    let (ok, text) = huren("verify", &restored_flags, &[]).await;
    assert!(ok, "verify after restore: {text}");
    assert!(
        text.contains("missing: 0") && text.contains("corrupt: 0"),
        "{text}"
    );

    let node = support::start_node(config, restored_dir).await;
    for g in &before {
        support::assert_stored(&node.ingest, &g.file, &g.sop).await;
    }
    let study = node.versions(&before[0].sop).await[0]
        .study_instance_uid
        .clone();
    assert_eq!(getscu_count(&node, &study).await, before.len());
    assert_eq!(qido_instances(&node, &study).await.len(), before.len());

    // More instances, then a second backup into the same DIR: only the
    // blobs it lacks are copied.
    store(&node, &during.iter().chain(&after).collect::<Vec<_>>()).await;
    let flags = cli_flags(&node.config, work.path());
    let (ok, text) = huren("backup", &flags, &[backup_dir.to_str().unwrap()]).await;
    assert!(ok, "second backup: {text}");
    let total = before.len() + during.len() + after.len();
    let expected_new = total - first_manifest.len();
    assert!(
        text.contains(&format!("{total} blobs, {expected_new} copied")),
        "expected {expected_new} of {total} copied: {text}"
    );
    node.stop().await;
}

/// In a region: deleting an instance re-publishes the study's record with
/// what remains; deleting the rest retracts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_in_a_region_republishes_then_retracts() {
    use crate::region::{
        ADMIN_TOKEN, Api, RID, add_hospital, make_study, record_at, spawn_region_node,
        spawn_registry, wait_record, wait_until,
    };
    const HOSPITAL: &str = "HOSPB0000000000002";
    let registry = spawn_registry(Backend::SqliteLocal).await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let token = add_hospital(&admin, HOSPITAL, "二级甲等", None).await;
    let node = spawn_region_node(Backend::SqliteLocal, &registry.url(), HOSPITAL, &token).await;
    let api = Api::new(
        &format!("http://{}", node.http_addr),
        Some(crate::support::NODE_API_TOKEN),
    );
    let reg = Api::new(&registry.url(), Some(&token));
    let work = tempfile::tempdir().unwrap();
    let ct = make_study(
        work.path(),
        "p1-ct-chest-2024",
        "del-b",
        &["--resident-id", RID],
    );
    crate::region::store(&node, &ct.files).await;
    let uid = ct.study_instance_uid.clone();
    let rec = crate::region::wait_complete_record(&reg, HOSPITAL, &uid, 12).await;
    let version = rec["record"]["record_version"].as_i64().unwrap();

    let manifest = api
        .ok("GET", &format!("/api/v1/studies/{uid}/manifest"), None)
        .await;
    let sop = manifest["instances"][0]["sop_instance_uid"]
        .as_str()
        .unwrap()
        .to_string();
    let outcome = api
        .ok(
            "DELETE",
            &format!("/api/v1/instances/{sop}"),
            Some(serde_json::json!({"reason": "artefact"})),
        )
        .await;
    assert_eq!(outcome["instances_removed"], 1);
    let rec = wait_record(&reg, HOSPITAL, &uid, version + 1).await;
    assert_eq!(rec["record"]["number_of_instances"], 11);
    assert_eq!(rec["retracted"], false);

    let outcome = api
        .ok(
            "DELETE",
            &format!("/api/v1/studies/{uid}"),
            Some(serde_json::json!({"reason": "wrong patient", "reason_code": "113038"})),
        )
        .await;
    assert_eq!(outcome["studies_removed"][0], uid.as_str());
    wait_until("the registry's record retracted", || {
        let reg = reg.clone();
        let uid = uid.clone();
        async move {
            record_at(&reg, HOSPITAL, &uid)
                .await
                .is_some_and(|r| r["retracted"] == true)
        }
    })
    .await;
    node.stop().await;
    registry.stop().await;
}

/// An audit log that cannot take a record (here /dev/full, where every
/// write fails as on a full disk): a deletion is refused and rolled back,
/// never done unaudited, and the node says it is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_the_audit_log_cannot_take_is_not_done() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        with_token(c);
        c.audit_log = Some("/dev/full".into());
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let study = uid_root();
    let files = gen_study(work.path(), &study, 1, 2, "20250301");
    let all: Vec<&Generated> = files.iter().collect();
    store(&node, &all).await;
    assert_eq!(qido_instances(&node, &study).await.len(), 2);
    let (status, body) = curl(
        &node,
        "DELETE",
        &format!("/api/v1/instances/{}", files[0].sop),
        Some(r#"{"reason":"wrong laterality marker"}"#),
    )
    .await;
    // 503, its cause in the node's log only (as every 503 of the API).
    assert_eq!(status, 503, "{body}");
    assert_eq!(qido_instances(&node, &study).await.len(), 2);
    let ready = reqwest::get(format!("http://{}/ready", node.http_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert!(
        ready["reasons"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("audit log not writable")),
        "{ready}"
    );
    node.stop().await;
}
