//! Full durability's one flush per acknowledgement, on the real binary:
//! kill -9 in the middle of eight senders loses no acknowledged instance
//! (both backend pairs), and the recovery at start removes index rows whose
//! blobs did not survive a crash, before any association is accepted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use huren::config::{Durability, NodeConfig, StorageConfig};

use crate::cli::{Process, sop_instance_uid_of, spawn_binary, verify};
use crate::support::{self, Backend};

/// Where a node process keeps its data, as flags and as the config the
/// test opens the same index and store with.
struct Setup {
    args: Vec<String>,
    config: NodeConfig,
}

impl Setup {
    /// `local_blobs` keeps blobs on local files even with PostgreSQL (the
    /// pair where the commit and the blob's flush run side by side).
    async fn new(work: &Path, backend: Backend, local_blobs: bool) -> Setup {
        let data = work.join("data");
        let mut config = NodeConfig::defaults_in(&data);
        config.durability = Durability::Full;
        let mut args = vec!["--data-dir".to_string(), data.display().to_string()];
        if backend == Backend::PostgresS3 {
            config.database_url = support::fresh_postgres_database().await;
            args.extend(["--database-url".into(), config.database_url.clone()]);
            if !local_blobs {
                config.storage = support::s3_storage(work);
                let StorageConfig::S3 {
                    bucket,
                    endpoint,
                    region,
                    prefix,
                    access_key_id,
                    secret_access_key_file,
                    ..
                } = &config.storage
                else {
                    unreachable!()
                };
                let toml = format!(
                    "backend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{}\"\nregion = \"{region}\"\n\
                     prefix = \"{prefix}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n\
                     allow_http = true\n",
                    endpoint.as_deref().unwrap(),
                    access_key_id.as_deref().unwrap(),
                    secret_access_key_file.as_ref().unwrap().display(),
                );
                let file = work.join("storage.toml");
                std::fs::write(&file, toml).unwrap();
                args.extend(["--storage-config".into(), file.display().to_string()]);
            }
        }
        Setup { args, config }
    }

    fn spawn(&self, work: &Path, extra: &[&str]) -> Process {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        spawn_binary(work, &args, &[])
    }

    fn verify(&self) -> (bool, String) {
        let extra: Vec<&str> = self.args[2..].iter().map(String::as_str).collect();
        verify(&self.config.data_dir, &extra)
    }
}

fn generate(dir: &Path, count: usize, seed: &str) -> Vec<PathBuf> {
    support::tool(&[
        "gen",
        &dir.display().to_string(),
        &count.to_string(),
        &support::unique(seed),
    ]);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Starts a pynetdicom sender that prints each acknowledged file; the
/// files it reports go to `acknowledged`, until its output ends.
fn start_sender(
    node: &Process,
    files: &[PathBuf],
    acknowledged: mpsc::Sender<PathBuf>,
) -> (std::process::Child, std::thread::JoinHandle<()>) {
    let mut sender = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/dicom_tool.py"))
        .args(["send-slow", "127.0.0.1", &node.dicom.port().to_string()])
        .args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = sender.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["status"] == 0 {
                let file = PathBuf::from(v["file"].as_str().unwrap());
                let _ = acknowledged.send(file);
            }
        }
    });
    (sender, reader)
}

async fn assert_all_stored(setup: &Setup, files: &[PathBuf]) {
    let ingest = huren::node::open_ingest(&setup.config).await.unwrap();
    for file in files {
        let uid = sop_instance_uid_of(&std::fs::read(file).unwrap());
        support::assert_stored(&ingest, file, &uid).await;
    }
    ingest.index().close().await;
}

fn kill_9(node: &mut Process) {
    node.child.kill().unwrap(); // SIGKILL
    node.child.wait().unwrap();
}

async fn eight_senders_killed_mid_run(backend: Backend) {
    let work = tempfile::tempdir().unwrap();
    let setup = Setup::new(work.path(), backend, false).await;
    let mut node = setup.spawn(work.path(), &[]);
    let (tx, rx) = mpsc::channel();
    let mut senders = Vec::new();
    for sender in 0..8 {
        let files = generate(&work.path().join(format!("s{sender}")), 150, "kill8");
        senders.push(start_sender(&node, &files, tx.clone()));
    }
    drop(tx);
    // Kill once a good part has been acknowledged, with every sender still
    // busy (8 × 150 to send).
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 300 {
        let file = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("senders make progress");
        acknowledged.push(file);
    }
    kill_9(&mut node);
    for (mut sender, reader) in senders {
        let _ = sender.kill();
        let _ = sender.wait();
        reader.join().unwrap();
    }
    // Acknowledgements read after the kill were sent before it.
    acknowledged.extend(rx.try_iter());
    assert!(acknowledged.len() < 1200, "the kill came mid-run");

    // Restarted on the same data: every acknowledged instance is there and
    // verifies; the store holds nothing the index does not know as damaged.
    let mut node = setup.spawn(work.path(), &[]);
    assert_all_stored(&setup, &acknowledged).await;
    let echo = support::echoscu(node.dicom, &["-aec", "HUREN"]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    kill_9(&mut node);
    let (ok, report) = setup.verify();
    assert!(ok, "huren verify after kill -9: {report}");
    assert!(
        report.contains("missing: 0") && report.contains("corrupt: 0"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_senders_killed_mid_run_sqlite_local() {
    eight_senders_killed_mid_run(Backend::SqliteLocal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_senders_killed_mid_run_postgres_garage() {
    eight_senders_killed_mid_run(Backend::PostgresS3).await;
}

/// A crash between the commit and the flush, played out behind the node's
/// back: after a kill -9, the blobs of some rows still in the journal are
/// removed, truncated or overwritten (what a power loss can do to writes
/// not yet flushed), and one intact blob sits in the collector's trash (a
/// pass that crashed before deciding on it). At the next start those rows are gone before any
/// association is accepted, the rest verify, and the files can be sent
/// again.
async fn recovery_removes_rows_without_intact_blobs(backend: Backend) {
    let work = tempfile::tempdir().unwrap();
    let setup = Setup::new(work.path(), backend, true).await;
    // No background flush during the test: the journal keeps every row.
    let mut node = setup.spawn(work.path(), &["--flush-interval-secs", "3600"]);
    let files = generate(&work.path().join("study"), 8, "recover");
    let stored = support::storescu(
        node.dicom,
        vec![],
        files.iter().map(|f| f.display().to_string()).collect(),
    )
    .await;
    assert!(stored.status.success(), "{}", support::text(&stored));
    kill_9(&mut node);

    let ingest = huren::node::open_ingest(&setup.config).await.unwrap();
    let index = ingest.index();
    let rows = index.unsynced_instances().await.unwrap();
    assert_eq!(rows.len(), 8, "every row since the last flush is journaled");
    let study_uid = index.all_instances().await.unwrap()[0]
        .study_instance_uid
        .clone();
    let blob_path = |i: usize| {
        let hex = rows[i].blob_hash.to_hex();
        setup
            .config
            .data_dir
            .join("blobs")
            .join(&hex[..2])
            .join(hex)
    };
    std::fs::remove_file(blob_path(0)).unwrap();
    let short = std::fs::read(blob_path(1)).unwrap();
    std::fs::write(blob_path(1), &short[..short.len() / 2]).unwrap();
    let mut flipped = std::fs::read(blob_path(2)).unwrap();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    std::fs::write(blob_path(2), &flipped).unwrap();
    // A collector pass that crashed after moving an intact blob to its
    // trash: the blob goes back before the rows are checked.
    let trashed = blob_path(3);
    let trash = setup
        .config
        .data_dir
        .join("blobs/gc-trash")
        .join(rows[3].blob_hash.to_hex());
    std::fs::create_dir_all(trash.parent().unwrap()).unwrap();
    std::fs::rename(&trashed, &trash).unwrap();
    let damaged: Vec<String> = rows[..3]
        .iter()
        .map(|r| r.sop_instance_uid.clone())
        .collect();
    ingest.index().close().await;

    let mut node = setup.spawn(work.path(), &["--flush-interval-secs", "3600"]);
    assert!(trashed.exists() && !trash.exists(), "trashed blob put back");
    let ingest = huren::node::open_ingest(&setup.config).await.unwrap();
    let index = ingest.index();
    assert_eq!(
        index.unsynced_high_water().await.unwrap(),
        None,
        "recovery forgot the journal after checking it"
    );
    let remaining = index.all_instances().await.unwrap();
    assert_eq!(remaining.len(), 5, "the three damaged rows are gone");
    assert!(
        remaining
            .iter()
            .all(|r| !damaged.contains(&r.sop_instance_uid))
    );
    let study = index.study(&study_uid).await.unwrap().expect("study kept");
    assert_eq!(study.number_of_study_related_instances, 5);
    let intact: Vec<PathBuf> = files
        .iter()
        .filter(|f| {
            let uid = sop_instance_uid_of(&std::fs::read(f).unwrap());
            !damaged.contains(&uid)
        })
        .cloned()
        .collect();
    assert_eq!(intact.len(), 5);
    for file in &intact {
        let uid = sop_instance_uid_of(&std::fs::read(file).unwrap());
        support::assert_stored(&ingest, file, &uid).await;
    }

    // Sent again, the three are stored whole.
    let again = support::storescu(
        node.dicom,
        vec![],
        files.iter().map(|f| f.display().to_string()).collect(),
    )
    .await;
    assert!(again.status.success(), "{}", support::text(&again));
    for file in &files {
        let uid = sop_instance_uid_of(&std::fs::read(file).unwrap());
        support::assert_stored(&ingest, file, &uid).await;
    }
    let study = index.study(&study_uid).await.unwrap().unwrap();
    assert_eq!(study.number_of_study_related_instances, 8);
    ingest.index().close().await;

    // A clean stop flushes and forgets the journal.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGTERM) };
    assert!(node.child.wait().unwrap().success());
    let ingest = huren::node::open_ingest(&setup.config).await.unwrap();
    assert_eq!(ingest.index().unsynced_high_water().await.unwrap(), None);
    ingest.index().close().await;
    let (ok, report) = setup.verify();
    assert!(ok, "{report}");
    assert!(
        report.contains("missing: 0") && report.contains("corrupt: 0"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_removes_rows_without_intact_blobs_sqlite_local() {
    recovery_removes_rows_without_intact_blobs(Backend::SqliteLocal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_removes_rows_without_intact_blobs_postgres_local() {
    recovery_removes_rows_without_intact_blobs(Backend::PostgresS3).await;
}

/// A flush seen in the node's system calls: when it started and ended.
#[derive(Debug)]
struct Flush {
    started: f64,
    ended: f64,
    syncfs: bool,
}

/// What the node did, read from `strace -f -ttt -T`: the flushes, the
/// links that publish blobs (with their end), and the P-DATA-TF PDUs it
/// sent (in a C-STORE session, the C-STORE-RSPs), in order.
#[derive(Debug, Default)]
struct Trace {
    flushes: Vec<Flush>,
    links: Vec<f64>,
    responses: Vec<f64>,
}

fn read_trace(text: &str) -> Trace {
    use std::collections::HashMap;
    let mut trace = Trace::default();
    // Calls that strace split over two lines: pid → (first line, start).
    let mut unfinished: HashMap<&str, (&str, f64)> = HashMap::new();
    for line in text.lines() {
        // "PID TIMESTAMP call(args) = result <duration>"
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let (call_line, result_line, started, ended) = if rest.starts_with("<... ") {
            let Some((first, start)) = unfinished.remove(pid) else {
                continue;
            };
            (first, rest, start, ts)
        } else if rest.ends_with("<unfinished ...>") {
            unfinished.insert(pid, (rest, ts));
            continue;
        } else {
            let duration: f64 = rest
                .rsplit_once('<')
                .and_then(|(_, d)| d.trim_end_matches('>').parse().ok())
                .unwrap_or(0.0);
            (rest, rest, ts, ts + duration)
        };
        let call = call_line.split('(').next().unwrap_or("");
        let ok = !result_line.contains(") = -1");
        // The last quoted argument: a link's or rename's new name.
        let target = call_line.split('"').rev().nth(1).unwrap_or("");
        match call {
            "syncfs" | "fsync" | "fdatasync" if ok => trace.flushes.push(Flush {
                started,
                ended,
                syncfs: call == "syncfs",
            }),
            // A blob put in place: an anonymous staging file linked, or a
            // named one renamed (never a name inside the staging area).
            "linkat" | "rename" | "renameat" | "renameat2"
                if ok && !target.contains("/.staging/") =>
            {
                trace.links.push(ended)
            }
            // The first byte of the PDU: 0x04 is P-DATA-TF.
            "sendto" if ok && call_line.contains("\"\\x04") => trace.responses.push(started),
            _ => {}
        }
    }
    trace
}

/// How many responses follow a flush that started after the blob each
/// acknowledges was linked into place (one sender, so the n-th response
/// acknowledges the n-th link) and ended before the response was sent.
fn covered_responses(trace: &Trace) -> usize {
    trace
        .responses
        .iter()
        .zip(&trace.links)
        .filter(|(sent, linked)| {
            trace
                .flushes
                .iter()
                .any(|f| f.started >= **linked && f.ended <= **sent)
        })
        .count()
}

/// Runs the node under strace, sends `files` with one storescu and returns
/// what the node did.
async fn traced_store(durability: &str, files: &[PathBuf]) -> Trace {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let trace_file = work.path().join("trace");
    let trace_arg = trace_file.display().to_string();
    let data_arg = data.display().to_string();
    let node = crate::cli::spawn_binary_via(
        &[
            "strace",
            "-f",
            "-qq",
            "-ttt",
            "-T",
            "-x",
            "-s",
            "1",
            "-e",
            "trace=syncfs,fsync,fdatasync,linkat,rename,renameat,renameat2,sendto",
            "-o",
            &trace_arg,
        ],
        work.path(),
        &[
            "--data-dir",
            &data_arg,
            "--durability",
            durability,
            // No periodic flush during the test: only acknowledgements
            // flush.
            "--flush-interval-secs",
            "3600",
        ],
        &[],
    );
    let output = support::storescu(
        node.dicom,
        vec![],
        files.iter().map(|f| f.display().to_string()).collect(),
    )
    .await;
    assert!(output.status.success(), "{}", support::text(&output));
    // strace passes a kill on to no one: the node is its child.
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", node.child.id())).unwrap();
    for pid in children.split_whitespace() {
        Command::new("kill").args(["-9", pid]).status().unwrap();
    }
    let mut node = node;
    node.child.wait().unwrap();
    read_trace(&std::fs::read_to_string(&trace_file).unwrap())
}

/// A kill -9 leaves the page cache intact, so the crash tests above would
/// pass with the flush deleted. The system calls tell the modes apart: in
/// `full` every C-STORE-RSP is sent after a syncfs that started once its
/// blob was linked into place (and, on SQLite, its row committed) and had
/// ended; in `relaxed` none is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_acknowledges_after_a_covering_flush_relaxed_does_not() {
    let work = tempfile::tempdir().unwrap();
    let files = generate(&work.path().join("in"), 12, "flushtrace");

    let full = traced_store("full", &files).await;
    assert_eq!(full.responses.len(), files.len(), "{full:?}");
    assert_eq!(full.links.len(), files.len(), "{full:?}");
    assert!(full.flushes.iter().any(|f| f.syncfs), "{full:?}");
    assert_eq!(covered_responses(&full), files.len(), "{full:?}");

    let relaxed = traced_store("relaxed", &files).await;
    assert_eq!(relaxed.responses.len(), files.len(), "{relaxed:?}");
    assert_eq!(relaxed.links.len(), files.len(), "{relaxed:?}");
    assert_eq!(covered_responses(&relaxed), 0, "{relaxed:?}");
}
