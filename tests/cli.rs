//! The real binary: started with no configuration on port 0, killed with
//! SIGKILL mid-transfer, and `huren verify`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use huren::config::{Durability, NodeConfig};
use huren::types::BlobHash;

use crate::support::{self, Backend};

const HUREN: &str = env!("CARGO_BIN_EXE_huren");

/// A `huren node` process and the addresses it logged.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) dicom: std::net::SocketAddr,
    pub(crate) http: std::net::SocketAddr,
}

pub(crate) fn spawn_binary(cwd: &Path, args: &[&str], envs: &[(&str, &str)]) -> Process {
    spawn_binary_via(&[], cwd, args, envs)
}

/// [`spawn_binary`] under a wrapper command (`strace -f …`), which must run
/// its arguments as the program.
pub(crate) fn spawn_binary_via(
    wrapper: &[&str],
    cwd: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> Process {
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(HUREN);
            c
        }
        None => Command::new(HUREN),
    };
    let mut child = command
        .arg("node")
        .args([
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start huren");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut dicom, mut http) = (None, None);
    while dicom.is_none() || http.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("huren logs its listening addresses");
        let addr = |marker: &str| {
            line.split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
        };
        if let Some(a) = addr("DICOM listening on ") {
            dicom = Some(a);
        }
        if let Some(a) = addr("HTTP listening on ") {
            http = Some(a);
        }
    }
    // Keep draining the log so the node never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Process {
        child,
        dicom: dicom.unwrap(),
        http: http.unwrap(),
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub(crate) fn verify(data_dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(HUREN)
        .arg("verify")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap();
    (out.status.success(), support::text(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_on_embedded_defaults() {
    let cwd = tempfile::tempdir().unwrap();
    let mut node = spawn_binary(cwd.path(), &[], &[]);
    let echo = support::echoscu(node.dicom, &["-aec", "HUREN"]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    let health = http_get(node.http, "/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"ae_title\":\"HUREN\""), "{health}");
    let sample = &support::samples()[0];
    let stored =
        support::storescu(node.dicom, vec![], vec![sample.path.display().to_string()]).await;
    assert!(stored.status.success(), "{}", support::text(&stored));
    // The defaults put everything under ./huren-data.
    assert!(cwd.path().join("huren-data/index.sqlite").exists());
    assert!(cwd.path().join("huren-data/blobs").is_dir());
    // SIGTERM: a clean shutdown.
    unsafe { libc::kill(node.child.id() as i32, libc::SIGTERM) };
    let status = node.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_defaults() {
    let cwd = tempfile::tempdir().unwrap();
    let mut node = spawn_binary(
        cwd.path(),
        &[],
        &[
            ("HUREN_AE_TITLE", "ENVNODE"),
            ("HUREN_REQUIRE_CALLED_AE_TITLE", "true"),
            ("HUREN_DATA_DIR", "elsewhere"),
        ],
    );
    let right = support::echoscu(node.dicom, &["-aec", "ENVNODE"]).await;
    assert!(right.status.success(), "{}", support::text(&right));
    let wrong = support::echoscu(node.dicom, &["-aec", "HUREN"]).await;
    assert!(!wrong.status.success());
    assert!(cwd.path().join("elsewhere/index.sqlite").exists());
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}

/// The AE directory from the environment alone (`HUREN_REMOTE_AES`), as a
/// tester with only the binary and dcmtk would set it: movescu moves a
/// study to a storescp known by that variable, and to nowhere else (A801).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_destination_from_the_environment() {
    let cwd = tempfile::tempdir().unwrap();
    let received = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut scp = Command::new("/usr/bin/storescp")
        .args(["-aet", "ENVDEST", "-od"])
        .arg(received.path())
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // movescu calls as MOVESCU: listed too, since only AEs of the directory
    // may retrieve by default (issue 22).
    let directory = format!("ENVDEST@127.0.0.1:{port},MOVESCU@127.0.0.1:{port}");
    let mut node = spawn_binary(cwd.path(), &[], &[("HUREN_REMOTE_AES", &directory)]);
    let sample = &support::samples()[0];
    let stored = support::storescu(
        node.dicom,
        vec![support::storescu_option(&sample.transfer_syntax_uid).to_string()],
        vec![sample.path.display().to_string()],
    )
    .await;
    assert!(stored.status.success(), "{}", support::text(&stored));
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        tokio::task::yield_now().await;
    }
    let movescu = |destination: &str| {
        let output = Command::new("/usr/bin/movescu")
            .args(["-v", "-S", "-aec", "HUREN", "-aem", destination])
            .arg(node.dicom.ip().to_string())
            .arg(node.dicom.port().to_string())
            .args(["-k", "QueryRetrieveLevel=STUDY"])
            .arg("-k")
            .arg(format!("StudyInstanceUID={}", sample.study_instance_uid))
            .env("TCP_NODELAY", "1")
            .output()
            .unwrap();
        support::text(&output)
    };
    let log = movescu("ENVDEST");
    assert!(
        log.contains("Received Final Move Response (Success)"),
        "{log}"
    );
    assert!(std::fs::read_dir(received.path()).unwrap().count() >= 1);
    let log = movescu("UNKNOWN");
    assert!(log.contains("(Refused: MoveDestinationUnknown)"), "{log}");
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    scp.kill().unwrap();
    scp.wait().unwrap();
}

/// What the sender does once the node has been interrupted.
#[derive(PartialEq)]
enum Then {
    /// Stop it: a killed node never answers, and the sender would wait out
    /// its timeouts.
    StopSender,
    /// Let it report to its end: a node shutting down releases the
    /// association, which the sender sees at once.
    ReadToEnd,
}

/// Generates `count` instances under `work`, sends them one by one with
/// pynetdicom to `node`, and runs `interrupt` on the node once `after`
/// have been acknowledged. Returns the files the sender saw acknowledged
/// and how many there were to send.
async fn send_and_interrupt(
    work: &Path,
    node: &mut Process,
    (count, after): (usize, usize),
    interrupt: impl FnOnce(&mut Process),
    then: Then,
) -> (Vec<String>, usize) {
    let files_dir = work.join("files");
    support::tool_async(vec![
        "gen".into(),
        files_dir.display().to_string(),
        count.to_string(),
        support::unique("interrupt"),
    ])
    .await;
    let mut files: Vec<_> = std::fs::read_dir(&files_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut sender = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/dicom_tool.py"))
        .args(["send-slow", "127.0.0.1", &node.dicom.port().to_string()])
        .args(&files)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut acknowledged = Vec::new();
    let mut interrupt = Some(interrupt);
    let lines = BufReader::new(sender.stdout.take().unwrap()).lines();
    for line in lines.map_while(Result::ok) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["status"] == 0 {
            acknowledged.push(v["file"].as_str().unwrap().to_string());
        }
        if acknowledged.len() == after
            && let Some(interrupt) = interrupt.take()
        {
            interrupt(node);
            if then == Then::StopSender {
                let _ = sender.kill();
                break;
            }
        }
    }
    let _ = sender.wait();
    (acknowledged, files.len())
}

/// Acceptance 6: kill -9 mid-transfer; every acknowledged instance survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_instances_survive_kill_9() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data_arg = data.display().to_string();
    let mut node = spawn_binary(work.path(), &["--data-dir", &data_arg], &[]);
    let kill_9 = |node: &mut Process| {
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
    };
    let (acknowledged, _) =
        send_and_interrupt(work.path(), &mut node, (400, 120), kill_9, Then::StopSender).await;
    assert_eq!(acknowledged.len(), 120, "successes before the kill");

    // Restart on the same data and check every acknowledged instance.
    let node = spawn_binary(work.path(), &["--data-dir", &data_arg], &[]);
    let mut config = NodeConfig::defaults_in(&data);
    config.durability = Durability::Full;
    let ingest = huren::node::open_ingest(&config).await.unwrap();
    for file in &acknowledged {
        let bytes = std::fs::read(file).unwrap();
        let uid = sop_instance_uid_of(&bytes);
        support::assert_stored(&ingest, Path::new(file), &uid).await;
    }
    ingest.index().close().await;
    let mut child = node.child;
    child.kill().unwrap();
    child.wait().unwrap();
    let (ok, report) = verify(&data, &[]);
    assert!(ok, "huren verify after kill -9: {report}");
    assert!(
        report.contains("missing: 0") && report.contains("corrupt: 0"),
        "{report}"
    );
}

/// The SOP Instance UID in a file's meta group (what the test wrote).
pub(crate) fn sop_instance_uid_of(bytes: &[u8]) -> String {
    let meta = &bytes[132..support::data_set_bytes_offset(bytes)];
    let needle = [0x02u8, 0x00, 0x03, 0x00, b'U', b'I'];
    let at = meta.windows(6).position(|w| w == needle).unwrap();
    let len = u16::from_le_bytes([meta[at + 6], meta[at + 7]]) as usize;
    String::from_utf8_lossy(&meta[at + 8..at + 8 + len])
        .trim_end_matches('\0')
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_corrupt_missing_and_orphaned_blobs_and_reindexes() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let samples = support::samples();
    let files: Vec<_> = samples.iter().map(|s| s.path.clone()).collect();
    support::pynetdicom_send(&node, &files).await;
    let data = node.config.data_dir.clone();
    let rows = node.ingest.index().all_instances().await.unwrap();
    let _dir = node.stop().await;

    let (ok, report) = verify(&data, &[]);
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!("blobs verified: {}", samples.len())),
        "{report}"
    );

    let blob_path = |h: &BlobHash| {
        let hex = h.to_hex();
        data.join("blobs").join(&hex[..2]).join(&hex)
    };
    // Corrupt one blob, delete another, plant an orphan.
    let corrupt = blob_path(&rows[0].blob_hash);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&corrupt, &bytes).unwrap();
    let missing = blob_path(&rows[1].blob_hash);
    let missing_bytes = std::fs::read(&missing).unwrap();
    std::fs::remove_file(&missing).unwrap();
    let orphan_bytes = b"an object no index row names".to_vec();
    let orphan = blob_path(&BlobHash::from_hash(blake3::hash(&orphan_bytes)));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, &orphan_bytes).unwrap();

    let (ok, report) = verify(&data, &[]);
    assert!(!ok, "corrupt and missing blobs fail verification: {report}");
    assert!(report.contains("missing: 1"), "{report}");
    assert!(report.contains("corrupt: 1"), "{report}");
    assert!(report.contains("orphans: 1"), "{report}");

    // Repair: restore the two blobs, remove the orphan.
    bytes[last] ^= 0xFF;
    std::fs::write(&corrupt, &bytes).unwrap();
    std::fs::write(&missing, &missing_bytes).unwrap();
    let (ok, report) = verify(&data, &["--remove-orphans", "--orphan-grace-secs", "0"]);
    assert!(ok, "{report}");
    assert!(report.contains("removed 1"), "{report}");
    assert!(!orphan.exists());

    // Lose the index entirely; rebuild it from the blob store alone.
    for name in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
        let _ = std::fs::remove_file(data.join(name));
    }
    let (ok, report) = verify(&data, &["--reindex"]);
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!("blobs reindexed: {}", samples.len())),
        "{report}"
    );
    let config = NodeConfig::defaults_in(&data);
    let ingest = huren::node::open_ingest(&config).await.unwrap();
    for s in &samples {
        support::assert_stored(&ingest, &s.path, &s.sop_instance_uid).await;
        let study = ingest
            .index()
            .study(&s.study_instance_uid)
            .await
            .unwrap()
            .unwrap();
        assert!(study.number_of_study_related_instances > 0);
    }
    ingest.index().close().await;
}

/// SIGTERM mid-transfer: the node stops accepting, answers the C-STORE in
/// flight, releases the association and exits 0; every instance the sender
/// saw acknowledged is stored and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data_arg = data.display().to_string();
    let mut node = spawn_binary(work.path(), &["--data-dir", &data_arg], &[]);
    let sigterm = |node: &mut Process| {
        unsafe { libc::kill(node.child.id() as i32, libc::SIGTERM) };
    };
    // The sender sends each request as the last response arrives: at
    // SIGTERM the node takes no new association, but answers the requests
    // still coming on this one until the sender pauses or releases (or
    // 30 s pass), so every request is answered, with success. Releasing at
    // once failed the request already on its way at the sender, or reset
    // the connection under it.
    let (acknowledged, sent) =
        send_and_interrupt(work.path(), &mut node, (150, 20), sigterm, Then::ReadToEnd).await;
    let status = node.child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    assert_eq!(
        acknowledged.len(),
        sent,
        "requests on their way at SIGTERM went unanswered"
    );

    let config = NodeConfig::defaults_in(&data);
    let ingest = huren::node::open_ingest(&config).await.unwrap();
    for file in &acknowledged {
        let bytes = std::fs::read(file).unwrap();
        support::assert_stored(&ingest, Path::new(file), &sop_instance_uid_of(&bytes)).await;
    }
    ingest.index().close().await;
    let (ok, report) = verify(&data, &[]);
    assert!(ok, "{report}");
}

/// One node per data directory: a second node on it, or a restore into
/// it, is refused while the first runs, naming the holder; once the first
/// has stopped, the next starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_serves_one_node_at_a_time() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let data_arg = data.display().to_string();
    let mut first = spawn_binary(work.path(), &["--data-dir", &data_arg], &[]);
    let pid = first.child.id().to_string();
    let second = Command::new(HUREN)
        .args([
            "node",
            "--dicom-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--data-dir", &data_arg])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = support::text(&second);
    assert!(
        said.contains("is in use by another huren process") && said.contains(&pid),
        "{said}"
    );
    let backup = work.path().join("backup");
    let restore = Command::new(HUREN)
        .args(["restore", "--data-dir", &data_arg, "--force"])
        .arg(&backup)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!restore.status.success());
    assert!(
        support::text(&restore).contains("is in use by another huren process"),
        "{}",
        support::text(&restore)
    );
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    assert!(first.child.wait().unwrap().success());
    let mut again = spawn_binary(work.path(), &["--data-dir", &data_arg], &[]);
    unsafe { libc::kill(again.child.id() as i32, libc::SIGTERM) };
    assert!(again.child.wait().unwrap().success());
}
