//! The retrieve interop matrix (issue 21), on the real binary: every
//! transfer syntax of sample-dicom/ retrieved by C-MOVE to dcmtk's storescp
//! configured each way a workstation may be, to pynetdicom SCPs that accept
//! one transfer syntax each, to Orthanc, and by C-GET with getscu configured
//! each way. For each destination: the final status is exact, every
//! instance the node can produce in a syntax the destination accepts
//! arrives (and no other), in a syntax it accepts, and decodes (pydicom with
//! pylibjpeg) to the pixels of what was stored; where nothing was converted
//! the data set bytes are the stored ones.
//!
//! One node per backend and one process per destination serve the whole
//! matrix; the 33 sample instances are small, so a backend's matrix takes
//! well under a minute.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::cli::spawn_binary;
use crate::support::{self, Backend, on_both_backends};

const E: &str = "1.2.840.10008.1.2.1";
const I: &str = "1.2.840.10008.1.2";
const B: &str = "1.2.840.10008.1.2.2";
const D: &str = "1.2.840.10008.1.2.1.99";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";
const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";
const RLE: &str = "1.2.840.10008.1.2.5";

/// The syntaxes of sample-dicom/, in the column order of the results table.
const SAMPLE_SYNTAXES: [&str; 9] = [
    E,
    I,
    B,
    D,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LS,
    RLE,
];
const UNCOMPRESSED: [&str; 4] = [E, I, B, D];

/// What the node can convert to an uncompressed syntax: every uncompressed
/// one, and what dicom-pixeldata decodes (JPEG baseline and lossless, RLE,
/// JPEG-LS when built with the `jpeg-ls` feature (CharLS), as the test
/// command does; not 12-bit JPEG extended: jpeg-decoder reads 8-bit only).
fn convertible(stored: &str) -> bool {
    UNCOMPRESSED.contains(&stored)
        || [JPEG_BASELINE, JPEG_LOSSLESS, RLE].contains(&stored)
        || (cfg!(feature = "jpeg-ls") && stored == JPEG_LS)
}

fn short(ts: &str) -> &'static str {
    match ts {
        E => "ELE",
        I => "ILE",
        B => "EBE",
        D => "Deflate",
        JPEG_BASELINE => "JPEG-B",
        JPEG_EXTENDED => "JPEG-E",
        JPEG_LOSSLESS => "JPEG-LL",
        JPEG_LS => "JPEG-LS",
        RLE => "RLE",
        _ => "other",
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str) {
    for _ in 0..1000 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{what} does not listen on port {port}");
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node under test, killed when the test ends before stopping it.
struct NodeProcess(crate::cli::Process);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.child.try_wait() {
            let _ = self.0.child.kill();
            let _ = self.0.child.wait();
        }
    }
}

/// How a destination is reached and where what it receives ends up.
enum Receiver {
    /// Files written by the destination into this directory.
    Dir(PathBuf),
    /// Orthanc's REST API.
    Orthanc(String),
}

/// A C-MOVE destination and the transfer syntaxes it accepts.
struct Destination {
    label: String,
    ae_title: String,
    port: u16,
    accepts: Vec<&'static str>,
    receiver: Receiver,
}

/// dcmtk 3.6.7's storescp preference options and what each accepts
/// (storescp --help; `+xa` accepts every syntax it knows, the others the
/// uncompressed ones plus the one preferred).
fn storescp_configs() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("", vec![E, B, I]),
        ("+xa", SAMPLE_SYNTAXES.to_vec()),
        ("+xe", vec![E, B, I]),
        ("+xb", vec![B, E, I]),
        ("+xi", vec![I]),
        ("+xs", vec![JPEG_LOSSLESS, E, B, I]),
        ("+xt", vec![JPEG_LS, E, B, I]),
        ("+xr", vec![RLE, E, B, I]),
        ("+xd", vec![D, E, B, I]),
    ]
}

fn start_storescp(option: &str, n: usize, root: &Path) -> (Killed, Destination) {
    let dir = root.join(format!("storescp{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let ae_title = format!("STORESCP{n}");
    let mut cmd = Command::new("/usr/bin/storescp");
    // +B: the data set as received, bit-preserving (deflated still deflated).
    cmd.args(["-aet", &ae_title, "+B", "-od"])
        .arg(&dir)
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !option.is_empty() {
        cmd.arg(option);
    }
    cmd.arg(port.to_string());
    let child = Killed(cmd.spawn().expect("run /usr/bin/storescp (Debian dcmtk)"));
    wait_for_port(port, "storescp");
    let accepts = storescp_configs()
        .into_iter()
        .find(|(o, _)| *o == option)
        .unwrap()
        .1;
    let label = format!(
        "storescp {}",
        if option.is_empty() {
            "(default)"
        } else {
            option
        }
    );
    (
        child,
        Destination {
            label,
            ae_title,
            port,
            accepts,
            receiver: Receiver::Dir(dir),
        },
    )
}

/// One pynetdicom process serving one Storage SCP per sample syntax.
fn start_pynetdicom_scps(root: &Path) -> (Killed, Vec<Destination>) {
    let mut child = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/interop_tool.py"))
        .arg("scps")
        .arg(root.join("pynetdicom"))
        .args(SAMPLE_SYNTAXES)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run interop_tool.py scps");
    let stdout = child.stdout.take().unwrap();
    let mut destinations = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["ready"] == true {
            break;
        }
        let ts = SAMPLE_SYNTAXES
            .iter()
            .find(|t| **t == v["ts"].as_str().unwrap())
            .unwrap();
        let n = destinations.len();
        destinations.push(Destination {
            label: format!("pynetdicom, {} only", short(ts)),
            ae_title: format!("PYSCP{n}"),
            port: v["port"].as_u64().unwrap() as u16,
            accepts: vec![*ts],
            receiver: Receiver::Dir(PathBuf::from(v["dir"].as_str().unwrap())),
        });
    }
    assert_eq!(destinations.len(), SAMPLE_SYNTAXES.len(), "pynetdicom SCPs");
    (Killed(child), destinations)
}

/// Orthanc (Debian's package, its own process and configuration on loopback
/// ports, never the system service), accepting every transfer syntax, as
/// its defaults do.
fn start_orthanc(root: &Path) -> (Killed, Destination) {
    let dir = root.join("orthanc");
    std::fs::create_dir_all(&dir).unwrap();
    let (dicom_port, http_port) = (free_port(), free_port());
    let config = serde_json::json!({
        "Name": "huren-interop",
        "StorageDirectory": dir.join("storage"),
        "IndexDirectory": dir.join("index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": false,
        "AuthenticationEnabled": false,
        "DicomCheckCalledAet": false,
        "DicomAlwaysAllowStore": true,
        "StorageCompression": false,
        "Plugins": [],
        "ConcurrentJobs": 1,
        "TcpNoDelay": true,
    });
    let file = dir.join("orthanc.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let child = Command::new("/usr/sbin/Orthanc")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .expect("run /usr/sbin/Orthanc (Debian package orthanc)");
    let child = Killed(child);
    wait_for_port(http_port, "Orthanc's HTTP server");
    wait_for_port(dicom_port, "Orthanc's DICOM server");
    (
        child,
        Destination {
            label: "Orthanc 1.10 (defaults)".into(),
            ae_title: "ORTHANC".into(),
            port: dicom_port,
            accepts: SAMPLE_SYNTAXES.to_vec(),
            receiver: Receiver::Orthanc(format!("http://127.0.0.1:{http_port}")),
        },
    )
}

/// The files a destination holds now.
fn received_files(receiver: &Receiver, scratch: &Path) -> Vec<PathBuf> {
    match receiver {
        Receiver::Dir(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        }
        Receiver::Orthanc(url) => {
            let out = scratch.join(support::unique("orthanc-files"));
            support::python_tool(
                "interop_tool.py",
                &["orthanc-files", url, &out.display().to_string()],
            )
            .iter()
            .map(|v| PathBuf::from(v["file"].as_str().unwrap()))
            .collect()
        }
    }
}

/// The DIMSE statuses of a dcmtk SCU's `-d` log, in order; the last is the
/// final response.
fn statuses(log: &str) -> Vec<u16> {
    log.lines()
        .filter_map(|l| l.split("DIMSE Status").nth(1))
        .filter_map(|rest| u16::from_str_radix(&rest.split("0x").nth(1)?[..4], 16).ok())
        .collect()
}

/// The sub-operation counts of the last response in a dcmtk `-d` log.
fn last_count(log: &str, what: &str) -> Option<u32> {
    log.lines()
        .rev()
        .find_map(|l| l.split(what).nth(1))
        .and_then(|rest| {
            rest.trim_start_matches([' ', ':'])
                .split_whitespace()
                .next()
        })
        .and_then(|n| n.parse().ok())
}

/// The final response's Completed and Failed counts (no warnings: every
/// destination here answers 0000 to what it takes).
fn assert_counts(label: &str, samples: &[support::Sample], accepts: &[&str], log: &str) {
    let sendable_count = samples
        .iter()
        .filter(|s| sendable(&s.transfer_syntax_uid, accepts))
        .count() as u32;
    assert_eq!(
        last_count(log, "Completed Suboperations"),
        Some(sendable_count),
        "{label}\n{log}"
    );
    assert_eq!(
        last_count(log, "Failed Suboperations"),
        Some(samples.len() as u32 - sendable_count),
        "{label}\n{log}"
    );
    assert_eq!(
        last_count(log, "Warning Suboperations"),
        Some(0),
        "{label}\n{log}"
    );
}

/// What one destination got.
#[derive(Debug)]
struct Outcome {
    label: String,
    /// Stored syntax → (arrived as, or `None` for a failed sub-operation).
    cells: BTreeMap<&'static str, BTreeSet<Option<String>>>,
}

/// What the node must deliver to a destination that accepts `accepts`:
/// an instance goes as stored when the destination accepts that syntax,
/// else converted when the node can convert it to an uncompressed syntax
/// the destination accepts; else its sub-operation fails.
fn sendable(stored: &str, accepts: &[&str]) -> bool {
    accepts.contains(&stored)
        || (convertible(stored) && accepts.iter().any(|a| UNCOMPRESSED.contains(a)))
}

fn expected_status(samples: &[support::Sample], accepts: &[&str]) -> u16 {
    let n = samples
        .iter()
        .filter(|s| sendable(&s.transfer_syntax_uid, accepts))
        .count();
    if n == samples.len() {
        0x0000
    } else if n == 0 {
        0xA702
    } else {
        0xB000
    }
}

/// Checks what arrived against what was stored; returns the outcome cells.
fn check_arrivals(
    label: &str,
    accepts: &[&str],
    samples: &[support::Sample],
    files: &[PathBuf],
    log: &str,
    compare_bytes: bool,
) -> Outcome {
    let by_uid: BTreeMap<&str, &support::Sample> = samples
        .iter()
        .map(|s| (s.sop_instance_uid.as_str(), s))
        .collect();
    let pairs: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let uid = sop_instance_uid_of(f);
            let sample = by_uid
                .get(uid.as_str())
                .unwrap_or_else(|| panic!("{label}: unexpected instance {uid}"));
            (f.display().to_string(), sample.path.display().to_string())
        })
        .collect();
    let compared = compare(&pairs);
    let arrived: BTreeMap<String, &Value> = compared
        .iter()
        .map(|v| (v["sop_instance_uid"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(
        arrived.len(),
        files.len(),
        "{label}: an instance arrived twice"
    );
    let mut cells: BTreeMap<&'static str, BTreeSet<Option<String>>> = BTreeMap::new();
    for sample in samples {
        let stored = SAMPLE_SYNTAXES
            .iter()
            .find(|t| **t == sample.transfer_syntax_uid)
            .unwrap();
        let want = sendable(stored, accepts);
        let got = arrived.get(&sample.sop_instance_uid);
        assert_eq!(
            got.is_some(),
            want,
            "{label}: {} stored as {} {} (accepts {accepts:?})\n{log}",
            sample.path.display(),
            short(stored),
            if want { "did not arrive" } else { "arrived" },
        );
        let cell = cells.entry(stored).or_default();
        let Some(v) = got else {
            cell.insert(None);
            continue;
        };
        let ts = v["ts"].as_str().unwrap();
        assert!(
            accepts.contains(&ts),
            "{label}: {} arrived as {ts}, not accepted",
            sample.path.display()
        );
        // A syntax the destination accepts is used as is, except explicit
        // VR little endian, which goes on the context of all uncompressed
        // syntaxes where the destination picks (storescp +xa, +xd pick
        // deflate).
        if accepts.contains(stored) && *stored != E {
            assert_eq!(ts, *stored, "{label}: {} converted", sample.path.display());
        }
        assert_eq!(v["error"], Value::Null, "{label}: {v}");
        // A lossy JPEG the node decodes (jpeg-decoder) may differ from
        // pydicom's decoder (libjpeg) by a rounding step: ISO 10918-2 lets
        // IDCTs differ. Everything else must decode to the same pixels.
        let tolerance = if ts != *stored && *stored == JPEG_BASELINE {
            2
        } else {
            0
        };
        let diff = v["max_diff"].as_i64();
        assert!(
            diff.is_some_and(|d| d <= tolerance),
            "{label}: pixels differ: {v}"
        );
        if compare_bytes && ts == *stored {
            assert_eq!(
                v["bytes_equal"], true,
                "{label}: data set bytes differ: {v}"
            );
        }
        cell.insert(Some(ts.to_string()));
    }
    Outcome {
        label: label.to_string(),
        cells,
    }
}

fn sop_instance_uid_of(file: &Path) -> String {
    let obj = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    obj.meta()
        .media_storage_sop_instance_uid()
        .trim_end_matches('\0')
        .to_string()
}

fn compare(pairs: &[(String, String)]) -> Vec<Value> {
    let mut child = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/interop_tool.py"))
        .arg("compare")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(pairs).unwrap())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "interop_tool.py compare: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The results table of docs/conformance.md: a row per destination, a
/// column per stored syntax; `=` as stored, a syntax name when converted,
/// `✗` a failed sub-operation.
fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::from("| destination |");
    for ts in SAMPLE_SYNTAXES {
        out.push_str(&format!(" {} |", short(ts)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(SAMPLE_SYNTAXES.len()));
    out.push('\n');
    for o in outcomes {
        out.push_str(&format!("| {} |", o.label));
        for ts in SAMPLE_SYNTAXES {
            let cell: Vec<String> = o
                .cells
                .get(ts)
                .into_iter()
                .flatten()
                .map(|c| match c {
                    None => "✗".to_string(),
                    Some(a) if a == ts => "=".to_string(),
                    Some(a) => short(a).to_string(),
                })
                .collect();
            out.push_str(&format!(" {} |", cell.join(", ")));
        }
        out.push('\n');
    }
    out
}

/// The node's arguments for a backend: PostgreSQL and Garage, or the
/// embedded defaults.
async fn backend_args(work: &Path, backend: Backend) -> Vec<String> {
    let data = work.join("data");
    let mut args = vec!["--data-dir".to_string(), data.display().to_string()];
    if backend == Backend::PostgresS3 {
        args.extend([
            "--database-url".into(),
            support::fresh_postgres_database().await,
        ]);
        let huren::config::StorageConfig::S3 {
            bucket,
            endpoint,
            region,
            prefix,
            access_key_id,
            secret_access_key_file,
            ..
        } = support::s3_storage(work)
        else {
            unreachable!()
        };
        let toml = format!(
            "backend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{}\"\nregion = \"{region}\"\n\
             prefix = \"{prefix}\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n\
             allow_http = true\n",
            endpoint.unwrap(),
            access_key_id.unwrap(),
            secret_access_key_file.unwrap().display(),
        );
        let file = work.join("storage.toml");
        std::fs::write(&file, toml).unwrap();
        args.extend(["--storage-config".into(), file.display().to_string()]);
    }
    args
}

on_both_backends!(retrieve_matrix);

async fn retrieve_matrix(backend: Backend) {
    let work = tempfile::tempdir().unwrap();
    let root = work.path();
    let samples = support::samples();
    let study_uids: BTreeSet<&str> = samples
        .iter()
        .map(|s| s.study_instance_uid.as_str())
        .collect();
    let study_list = study_uids.iter().copied().collect::<Vec<_>>().join("\\");

    // The destinations first: the node's AE directory names them all.
    let mut processes = Vec::new();
    let mut destinations = Vec::new();
    for (n, (option, _)) in storescp_configs().into_iter().enumerate() {
        let (child, d) = start_storescp(option, n, root);
        processes.push(child);
        destinations.push(d);
    }
    let (child, pynetdicom) = start_pynetdicom_scps(root);
    processes.push(child);
    destinations.extend(pynetdicom);
    let (child, orthanc) = start_orthanc(root);
    processes.push(child);
    destinations.push(orthanc);

    let remote_aes = destinations
        .iter()
        .map(|d| format!("{}@127.0.0.1:{}", d.ae_title, d.port))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = backend_args(root, backend).await;
    args.extend(["--remote-aes".into(), remote_aes]);
    // movescu and getscu call as MOVESCU and GETSCU, in no AE directory.
    args.extend(["--query-retrieve-access".into(), "any".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Killed if an assertion fails first: a failing run leaves no node.
    let mut node = NodeProcess(spawn_binary(root, &args, &[]));
    let node = &mut node.0;
    let node_host = node.dicom.ip().to_string();
    let node_port = node.dicom.port().to_string();

    // Stored as the samples are encoded: pynetdicom proposes each file's
    // own transfer syntax.
    let mut send = vec!["send".to_string(), node_host.clone(), node_port.clone()];
    send.extend(samples.iter().map(|s| s.path.display().to_string()));
    for line in support::tool_async(send).await {
        assert_eq!(line["status"], 0, "{line}");
    }

    let mut outcomes = Vec::new();
    for d in &destinations {
        let output = tokio::task::spawn_blocking({
            let (host, port, dest) = (node_host.clone(), node_port.clone(), d.ae_title.clone());
            let list = study_list.clone();
            move || {
                Command::new("/usr/bin/movescu")
                    .args(["-d", "-S", "-aec", "HUREN", "-aem", &dest])
                    .args([&host, &port])
                    .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
                    .arg(format!("StudyInstanceUID={list}"))
                    .env("TCP_NODELAY", "1")
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let log = support::text(&output);
        let want = expected_status(&samples, &d.accepts);
        assert_eq!(
            statuses(&log).last(),
            Some(&want),
            "{}: final C-MOVE status\n{log}",
            d.label
        );
        assert_counts(&d.label, &samples, &d.accepts, &log);
        let files = received_files(&d.receiver, root);
        // Orthanc keeps what it received but writes its own file meta.
        let compare_bytes = matches!(d.receiver, Receiver::Dir(_));
        outcomes.push(check_arrivals(
            &d.label,
            &d.accepts,
            &samples,
            &files,
            &log,
            compare_bytes,
        ));
    }

    // C-GET: getscu proposes one storage context per SOP class, with the
    // SCP role, listing its preferred syntax first and then the native
    // ones. The node accepts on it the first native syntax of that list
    // (src/dicom/acceptance.rs): a native instance goes as stored, a
    // compressed one it can decode is decoded; only what it can neither
    // send as stored nor decode fails (and would have failed in the
    // compressed syntax too, for every native instance of the study).
    let getscu = [
        ("", E),
        ("+xe", E),
        ("+xb", B),
        // getscu 3.6.7's +xi ("accept implicit VR little endian TS only")
        // proposes Explicit VR Little Endian alone on its storage contexts
        // (seen in its -d log): a dcmtk quirk, measured as is.
        ("+xi", E),
        ("+xd", D),
        ("+xs", E),
        ("+xy", E),
        ("+xx", E),
        ("+xt", E),
        ("+xr", E),
    ];
    for (option, accepted) in getscu {
        let label = format!(
            "getscu {}",
            if option.is_empty() {
                "(default)"
            } else {
                option
            }
        );
        let dir = root.join(support::unique("getscu"));
        std::fs::create_dir_all(&dir).unwrap();
        let output = tokio::task::spawn_blocking({
            let (host, port, dir) = (node_host.clone(), node_port.clone(), dir.clone());
            let list = study_list.clone();
            move || {
                let mut cmd = Command::new("/usr/bin/getscu");
                cmd.args(["-d", "-S", "+B", "-aec", "HUREN", "-od"])
                    .arg(&dir);
                if !option.is_empty() {
                    cmd.arg(option);
                }
                cmd.args([&host, &port])
                    .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
                    .arg(format!("StudyInstanceUID={list}"))
                    .env("TCP_NODELAY", "1")
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let log = support::text(&output);
        let accepts = [accepted];
        let want = expected_status(&samples, &accepts);
        assert_eq!(
            statuses(&log).last(),
            Some(&want),
            "{label}: final C-GET status\n{log}"
        );
        assert_counts(&label, &samples, &accepts, &log);
        let files = received_files(&Receiver::Dir(dir), root);
        outcomes.push(check_arrivals(
            &label, &accepts, &samples, &files, &log, true,
        ));
    }

    eprintln!(
        "retrieve matrix ({backend:?}), rows: destination, columns: stored transfer syntax\n{}",
        table(&outcomes)
    );
    unsafe { libc::kill(node.child.id() as i32, libc::SIGTERM) };
    let status = node.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    drop(processes);
}

/// A regional prior retrieved through the local node (the subset of the
/// matrix the peer test runs): C-GET of `study` from the node with getscu
/// `option`, every instance of `originals` (the files stored at the holding
/// node) arriving in `syntax`, with the same decoded pixels.
pub(crate) fn get_regional_prior(
    host: &str,
    port: u16,
    study: &str,
    option: &str,
    originals: &[String],
    syntax: &str,
    scratch: &Path,
) {
    let dir = scratch.join(support::unique("getscu-regional"));
    std::fs::create_dir_all(&dir).unwrap();
    let output = Command::new("/usr/bin/getscu")
        .args(["-d", "-S", "-aec", "HUREN", "-od"])
        .arg(&dir)
        .arg(option)
        .args([host, &port.to_string()])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={study}"))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let log = support::text(&output);
    assert!(output.status.success(), "getscu {option}: {log}");
    assert_eq!(statuses(&log).last(), Some(&0), "getscu {option}: {log}");
    let by_uid: BTreeMap<String, &String> = originals
        .iter()
        .map(|f| (sop_instance_uid_of(Path::new(f)), f))
        .collect();
    let received = received_files(&Receiver::Dir(dir), scratch);
    assert_eq!(received.len(), originals.len(), "getscu {option}: {log}");
    let pairs: Vec<(String, String)> = received
        .iter()
        .map(|f| {
            let original = by_uid
                .get(&sop_instance_uid_of(f))
                .unwrap_or_else(|| panic!("getscu {option}: unexpected {}", f.display()));
            (f.display().to_string(), original.to_string())
        })
        .collect();
    for v in compare(&pairs) {
        assert_eq!(v["ts"], syntax, "getscu {option}: {v}");
        assert_eq!(v["error"], Value::Null, "getscu {option}: {v}");
        assert_eq!(v["max_diff"], 0, "getscu {option}: pixels differ: {v}");
    }
}
