//! Query/retrieve with real peers: dcmtk's findscu, movescu (to dcmtk's
//! storescp), getscu, and pynetdicom for C-CANCEL and storage commitment.
//! The query tests run on both backend pairs.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::{self, Backend, TestNode, on_both_backends};
use huren::config::RemoteAe;

/// One generated study of the query corpus (tests/support/qr_tool.py).
#[derive(Debug, Clone)]
struct CorpusStudy {
    key: String,
    study_instance_uid: String,
    series: Vec<(String, String, usize)>,
    files: Vec<PathBuf>,
}

fn corpus(dir: &Path) -> Vec<CorpusStudy> {
    support::python_tool("qr_tool.py", &["corpus", dir.to_str().unwrap()])
        .into_iter()
        .map(|v| CorpusStudy {
            key: v["key"].as_str().unwrap().to_string(),
            study_instance_uid: v["study_instance_uid"].as_str().unwrap().to_string(),
            series: v["series"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["series_instance_uid"].as_str().unwrap().to_string(),
                        s["modality"].as_str().unwrap().to_string(),
                        s["count"].as_u64().unwrap() as usize,
                    )
                })
                .collect(),
            files: v["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| PathBuf::from(f.as_str().unwrap()))
                .collect(),
        })
        .collect()
}

/// Generates the corpus and stores it with storescu.
async fn stored_corpus(node: &TestNode) -> (tempfile::TempDir, Vec<CorpusStudy>) {
    let dir = tempfile::tempdir().unwrap();
    let studies = corpus(dir.path());
    let files: Vec<String> = studies
        .iter()
        .flat_map(|s| s.files.iter().map(|f| f.display().to_string()))
        .collect();
    let output = support::storescu(node.dicom_addr, Vec::new(), files).await;
    assert!(output.status.success(), "{}", support::text(&output));
    (dir, studies)
}

/// The result of one findscu run: the responses' identifiers (decoded by
/// pydicom) and every DIMSE status it printed, the final one last.
struct Found {
    responses: Vec<BTreeMap<String, Value>>,
    statuses: Vec<u16>,
    log: String,
}

impl Found {
    fn final_status(&self) -> u16 {
        *self.statuses.last().expect("a final status")
    }

    fn values(&self, keyword: &str) -> BTreeSet<String> {
        self.responses
            .iter()
            .map(|r| {
                r.get(keyword)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }
}

/// Runs findscu (`-S` Study Root or `-P` Patient Root) with keys given as
/// raw bytes, so that a GB18030 value reaches the node as GB18030.
fn findscu(node: &TestNode, model: &str, keys: &[Vec<u8>]) -> Found {
    findscu_with(node, &[model], keys)
}

/// findscu with options of its own (the information model among them).
fn findscu_with(node: &TestNode, options: &[&str], keys: &[Vec<u8>]) -> Found {
    let out = tempfile::tempdir().unwrap();
    let mut args: Vec<OsString> = vec!["-d".into()];
    args.extend(options.iter().map(OsString::from));
    args.extend::<[OsString; 6]>([
        "-X".into(),
        "-od".into(),
        out.path().into(),
        "-aec".into(),
        "HUREN".into(),
        node.host().into(),
    ]);
    args.push(node.port().to_string().into());
    for k in keys {
        args.push("-k".into());
        args.push(OsString::from_vec(k.clone()));
    }
    let output = Command::new("/usr/bin/findscu")
        .args(&args)
        .env("TCP_NODELAY", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = support::text(&output);
    let statuses = log
        .lines()
        .filter_map(|l| l.split("DIMSE Status").nth(1))
        .filter_map(|rest| {
            let hex = rest.split("0x").nth(1)?;
            u16::from_str_radix(&hex[..4], 16).ok()
        })
        .collect();
    let responses = support::python_tool("qr_tool.py", &["dump", out.path().to_str().unwrap()])
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    Found {
        responses,
        statuses,
        log,
    }
}

fn k(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// `PatientName=<value>` with the value encoded in GB18030.
fn gb18030_key(keyword: &str, value: &str) -> Vec<u8> {
    let mut out = format!("{keyword}=").into_bytes();
    let python = support::env("HUREN_TEST_PYTHON");
    let encoded = Command::new(python)
        .args([
            "-c",
            "import sys; sys.stdout.buffer.write(sys.argv[1].encode('gb18030'))",
            value,
        ])
        .output()
        .unwrap();
    out.extend_from_slice(&encoded.stdout);
    out
}

on_both_backends!(
    c_find_matching_types,
    c_find_levels_and_counts,
    study_moved_and_fetched_byte_identical,
    storage_commitment_reports,
);

/// Table-driven: each matching type of PS3.4 C.2.2.2, on the study level.
async fn c_find_matching_types(backend: Backend) {
    let node = support::spawn_node(backend).await;
    let (_dir, studies) = stored_corpus(&node).await;
    let uid = |key: &str| {
        studies
            .iter()
            .find(|s| s.key == key)
            .unwrap()
            .study_instance_uid
            .clone()
    };
    let key_of: BTreeMap<String, String> = studies
        .iter()
        .map(|s| (s.study_instance_uid.clone(), s.key.clone()))
        .collect();
    // (case, keys, the studies expected)
    type Case<'a> = (&'a str, Vec<Vec<u8>>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        ("single value", vec![k("PatientID=QR-001")], &["S1", "S2"]),
        ("universal", vec![k("PatientID")], &["S1", "S2", "S3", "S4"]),
        (
            "wildcard *",
            vec![k("PatientID=QR-00*")],
            &["S1", "S2", "S3", "S4"],
        ),
        (
            "wildcard ?",
            vec![k("AccessionNumber=ACC?")],
            &["S1", "S2", "S3"],
        ),
        ("case-sensitive text", vec![k("AccessionNumber=acc1")], &[]),
        (
            "date range",
            vec![k("StudyDate=20240101-20240131")],
            &["S1", "S4"],
        ),
        (
            "open date range, from",
            vec![k("StudyDate=20240301-")],
            &["S2"],
        ),
        (
            "open date range, to",
            vec![k("StudyDate=-20231231")],
            &["S3"],
        ),
        ("single date", vec![k("StudyDate=20240106")], &["S4"]),
        ("time range", vec![k("StudyTime=0800-0900")], &["S1"]),
        (
            "time range to the minute",
            vec![k("StudyTime=2200-2300")],
            &["S4"],
        ),
        (
            "list of UIDs",
            vec![format!("StudyInstanceUID={}\\{}", uid("S1"), uid("S3")).into_bytes()],
            &["S1", "S3"],
        ),
        (
            "modalities in study",
            vec![k("ModalitiesInStudy=MR")],
            &["S2"],
        ),
        (
            "modalities in study, list",
            vec![k("ModalitiesInStudy=CT\\DX")],
            &["S1", "S3", "S4"],
        ),
        (
            "PN case-insensitive prefix",
            vec![k("PatientName=wang*")],
            &["S1", "S2"],
        ),
        (
            "PN component-wise",
            vec![k("PatientName=WANG^XIAO*")],
            &["S1", "S2"],
        ),
        (
            "PN family name only",
            vec![k("PatientName=o'brien")],
            &["S4"],
        ),
        ("PN given name only", vec![k("PatientName=^Na")], &["S3"]),
        (
            "PN ideographic, UTF-8 query",
            vec![k("SpecificCharacterSet=ISO_IR 192"), k("PatientName=王*")],
            &["S1", "S2"],
        ),
        (
            "PN ideographic, GB18030 query",
            vec![
                k("SpecificCharacterSet=GB18030"),
                gb18030_key("PatientName", "李^娜"),
            ],
            &["S3"],
        ),
        ("PN no match", vec![k("PatientName=Zhou*")], &[]),
        (
            "two keys",
            vec![k("PatientID=QR-001"), k("ModalitiesInStudy=CT")],
            &["S1"],
        ),
    ];
    for (name, keys, expected) in cases {
        let mut all = vec![k("QueryRetrieveLevel=STUDY"), k("StudyInstanceUID")];
        all.extend(keys);
        let found = findscu(&node, "-S", &all);
        assert_eq!(found.final_status(), 0x0000, "{name}: {}", found.log);
        let got: BTreeSet<String> = found
            .values("StudyInstanceUID")
            .iter()
            .map(|u| key_of.get(u).cloned().unwrap_or_else(|| u.clone()))
            .collect();
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, expected, "{name}");
        // Every Pending response, then Success.
        assert_eq!(found.statuses.len(), expected.len() + 1, "{name}");
    }

    // Names come back decoded as stored, in the character set the query
    // used: GB18030 in, GB18030 out.
    let found = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=STUDY"),
            k("SpecificCharacterSet=GB18030"),
            gb18030_key("PatientName", "李*"),
            k("StudyDescription"),
        ],
    );
    assert_eq!(found.responses.len(), 1, "{}", found.log);
    let r = &found.responses[0];
    assert_eq!(r["SpecificCharacterSet"], "GB18030");
    assert_eq!(r["PatientName"], "Li^Na=李^娜");
    assert_eq!(r["StudyDescription"], "胸部正位");
    assert_eq!(r["QueryRetrieveLevel"], "STUDY");
    assert_eq!(r["RetrieveAETitle"], node.config.ae_title.as_str());
    // A UTF-8 name asked for with the default character set comes back in
    // UTF-8, declared.
    let found = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=STUDY"),
            k("PatientID=QR-001"),
            k("PatientName"),
        ],
    );
    assert_eq!(found.responses.len(), 2);
    for r in &found.responses {
        assert_eq!(r["SpecificCharacterSet"], "ISO_IR 192");
        assert_eq!(r["PatientName"], "Wang^Xiaoming=王^小明");
    }
    node.stop().await;
}

/// Every level, with the computed counts, in both information models.
async fn c_find_levels_and_counts(backend: Backend) {
    let node = support::spawn_node(backend).await;
    let (_dir, studies) = stored_corpus(&node).await;
    let s1 = studies.iter().find(|s| s.key == "S1").unwrap();

    let patients = findscu(
        &node,
        "-P",
        &[
            k("QueryRetrieveLevel=PATIENT"),
            k("PatientID=QR-001"),
            k("PatientName"),
            k("PatientBirthDate"),
            k("NumberOfPatientRelatedStudies"),
            k("NumberOfPatientRelatedSeries"),
            k("NumberOfPatientRelatedInstances"),
        ],
    );
    assert_eq!(patients.final_status(), 0x0000, "{}", patients.log);
    assert_eq!(patients.responses.len(), 1);
    let p = &patients.responses[0];
    assert_eq!(p["NumberOfPatientRelatedStudies"], "2");
    assert_eq!(p["NumberOfPatientRelatedSeries"], "3");
    assert_eq!(p["NumberOfPatientRelatedInstances"], "7");
    assert_eq!(p["PatientBirthDate"], "19800101");

    let study = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=STUDY"),
            format!("StudyInstanceUID={}", s1.study_instance_uid).into_bytes(),
            k("ModalitiesInStudy"),
            k("SOPClassesInStudy"),
            k("NumberOfStudyRelatedSeries"),
            k("NumberOfStudyRelatedInstances"),
            k("InstanceAvailability"),
            // Not kept by the index: returned empty (PS3.4 C.2.2.1.1).
            k("InstitutionName"),
        ],
    );
    assert_eq!(study.responses.len(), 1, "{}", study.log);
    let r = &study.responses[0];
    assert_eq!(r["ModalitiesInStudy"], "CT");
    assert_eq!(r["SOPClassesInStudy"], "1.2.840.10008.5.1.4.1.1.2");
    assert_eq!(r["NumberOfStudyRelatedSeries"], "2");
    assert_eq!(r["NumberOfStudyRelatedInstances"], "5");
    assert_eq!(r["InstanceAvailability"], "ONLINE");
    assert_eq!(r["InstitutionName"], "");
    // A key the index does not know: Pending 0xFF01, not 0xFF00.
    assert_eq!(study.statuses[0], 0xFF01);

    // Sequence keys are returned as empty sequences (PS3.4 C.2.2.1.1), in
    // Implicit VR Little Endian too, where findscu gives them an undefined
    // length: an empty primitive value under VR SQ was left out of the
    // response there (and warned about per match).
    for syntax in ["-xi", "-xe"] {
        let sequences = findscu_with(
            &node,
            &["-S", syntax],
            &[
                k("QueryRetrieveLevel=STUDY"),
                format!("StudyInstanceUID={}", s1.study_instance_uid).into_bytes(),
                k("ProcedureCodeSequence"),
                k("ReferencedStudySequence"),
            ],
        );
        assert_eq!(sequences.responses.len(), 1, "{}", sequences.log);
        let r = &sequences.responses[0];
        assert_eq!(
            r["ProcedureCodeSequence"],
            serde_json::json!([]),
            "{syntax} {r:?}"
        );
        assert_eq!(
            r["ReferencedStudySequence"],
            serde_json::json!([]),
            "{syntax} {r:?}"
        );
        assert_eq!(sequences.statuses[0], 0xFF01, "{}", sequences.log);
    }

    // Patient Root, STUDY level under the patient.
    let studies_of_patient = findscu(
        &node,
        "-P",
        &[
            k("QueryRetrieveLevel=STUDY"),
            k("PatientID=QR-001"),
            k("StudyInstanceUID"),
        ],
    );
    assert_eq!(studies_of_patient.responses.len(), 2);
    assert_eq!(studies_of_patient.statuses[0], 0xFF00);

    let series = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=SERIES"),
            format!("StudyInstanceUID={}", s1.study_instance_uid).into_bytes(),
            k("SeriesInstanceUID"),
            k("Modality"),
            k("SeriesNumber"),
            k("NumberOfSeriesRelatedInstances"),
        ],
    );
    let got: BTreeSet<(String, String, String)> = series
        .responses
        .iter()
        .map(|r| {
            (
                r["SeriesInstanceUID"].as_str().unwrap().to_string(),
                r["Modality"].as_str().unwrap().to_string(),
                r["NumberOfSeriesRelatedInstances"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String, String)> = s1
        .series
        .iter()
        .map(|(uid, modality, count)| (uid.clone(), modality.clone(), count.to_string()))
        .collect();
    assert_eq!(got, expected);

    let (series_uid, _, count) = &s1.series[0];
    let images = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=IMAGE"),
            format!("StudyInstanceUID={}", s1.study_instance_uid).into_bytes(),
            format!("SeriesInstanceUID={series_uid}").into_bytes(),
            k("SOPInstanceUID"),
            k("SOPClassUID"),
            k("InstanceNumber=2"),
        ],
    );
    assert_eq!(images.final_status(), 0x0000);
    assert_eq!(images.responses.len(), 1, "InstanceNumber=2 of {count}");
    assert_eq!(images.responses[0]["InstanceNumber"], "2");
    let all_images = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=IMAGE"),
            format!("SeriesInstanceUID={series_uid}").into_bytes(),
            k("SOPInstanceUID"),
        ],
    );
    assert_eq!(all_images.responses.len(), *count);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_find_refusals_limit_and_cancel() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| c.max_query_matches = 2).await;
    let (_dir, _studies) = stored_corpus(&node).await;
    let cases: Vec<(&str, Vec<Vec<u8>>, u16, usize)> = vec![
        (
            "invalid date",
            vec![k("QueryRetrieveLevel=STUDY"), k("StudyDate=2024-13")],
            0xA900,
            0,
        ),
        ("no level", vec![k("PatientID=QR-001")], 0xA900, 0),
        (
            "PATIENT level in Study Root",
            vec![k("QueryRetrieveLevel=PATIENT"), k("PatientID")],
            0xA900,
            0,
        ),
        (
            "more matches than the maximum",
            vec![k("QueryRetrieveLevel=STUDY"), k("StudyInstanceUID")],
            0xA700,
            2,
        ),
    ];
    for (name, keys, status, matches) in cases {
        let found = findscu(&node, "-S", &keys);
        assert_eq!(found.final_status(), status, "{name}: {}", found.log);
        assert_eq!(found.responses.len(), matches, "{name}");
    }
    // C-FIND (Message ID 7) with a C-CANCEL-RQ for the given Message ID:
    // the statuses seen, and whether the association was still up.
    let find_cancel = |cancelled_id: &str| {
        let r = support::python_tool(
            "qr_tool.py",
            &[
                "find-cancel",
                &node.host(),
                &node.port().to_string(),
                cancelled_id,
            ],
        )
        .remove(0);
        let statuses: Vec<u64> = r["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        (statuses, r["established"] == true)
    };
    let (statuses, _) = find_cancel("7");
    // Cancelled before all nine instances matched.
    assert_eq!(statuses.last(), Some(&0xFE00), "{statuses:?}");
    assert!(statuses.len() < 10, "{statuses:?}");
    // A C-CANCEL-RQ for another Message ID cancels nothing: the C-FIND
    // ends as it would have, on an association still established.
    let (statuses, established) = find_cancel("99");
    let last = *statuses.last().unwrap();
    assert!(last != 0xFE00 && last != 0xFF00, "{statuses:?}");
    assert!(established, "{statuses:?}");
    // The node keeps serving.
    assert!(
        support::echoscu(node.dicom_addr, &[])
            .await
            .status
            .success()
    );
    node.stop().await;
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// dcmtk's storescp, writing what it receives bit-preserving.
pub struct StoreScp {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl StoreScp {
    pub fn start(ae_title: &str, accept_all: bool) -> StoreScp {
        Self::start_with(ae_title, accept_all, &[])
    }

    fn start_with(ae_title: &str, accept_all: bool, extra: &[&str]) -> StoreScp {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new("/usr/bin/storescp");
        cmd.args(extra);
        cmd.args(["-aet", ae_title, "+B", "-od"])
            .arg(dir.path())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if accept_all {
            cmd.arg("+xa");
        }
        cmd.arg(port.to_string());
        let child = cmd.spawn().unwrap();
        // Ready when it accepts connections.
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        StoreScp { child, port, dir }
    }

    pub fn received(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    pub fn remote_ae(&self, ae_title: &str) -> RemoteAe {
        RemoteAe {
            ae_title: ae_title.into(),
            host: "127.0.0.1".into(),
            port: self.port,
            tls: false,
            may_query: true,
            may_retrieve: true,
            move_destination: true,
        }
    }
}

impl Drop for StoreScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The data set bytes of each received file, by SOP Instance UID.
fn data_sets(files: &[PathBuf]) -> BTreeMap<String, Vec<u8>> {
    files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let ds = support::data_set_bytes(&bytes).to_vec();
            (sop_instance_uid_of(&bytes), ds)
        })
        .collect()
}

/// The Media Storage SOP Instance UID of a Part-10 file.
fn sop_instance_uid_of(part10: &[u8]) -> String {
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Never)
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .from_reader(&part10[128..])
        .unwrap();
    obj.meta()
        .media_storage_sop_instance_uid()
        .trim_end_matches('\0')
        .to_string()
}

/// Acceptance 2 of the issue: stored with storescu, found at every level,
/// moved with movescu to storescp, fetched with getscu, byte-identical.
async fn study_moved_and_fetched_byte_identical(backend: Backend) {
    let scp = StoreScp::start("DEST", false);
    let node = support::spawn_node_with(backend, |c| {
        c.remote_aes.push(scp.remote_ae("DEST"));
    })
    .await;
    let (_dir, studies) = stored_corpus(&node).await;
    let s1 = studies.iter().find(|s| s.key == "S1").unwrap();
    // What the node holds, data set bytes by SOP Instance UID: the
    // reference for byte identity (storescu re-encodes padding on the way
    // in, so the node's bytes, not the source files, are what must arrive).
    let mut stored = BTreeMap::new();
    for file in &s1.files {
        let uid = sop_instance_uid_of(&std::fs::read(file).unwrap());
        let row = node.versions(&uid).await.pop().unwrap();
        let blob = node.ingest.store().get(&row.blob_hash).await.unwrap();
        stored.insert(uid, support::data_set_bytes(&blob).to_vec());
    }
    assert_eq!(stored.len(), 5);

    let output = Command::new("/usr/bin/movescu")
        .args(["-v", "-S", "-aec", "HUREN", "-aem", "DEST"])
        .arg(node.host())
        .arg(node.port().to_string())
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .arg("-k")
        .arg(format!("StudyInstanceUID={}", s1.study_instance_uid))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let log = support::text(&output);
    assert!(output.status.success(), "{log}");
    assert!(
        log.contains("Received Final Move Response (Success)"),
        "{log}"
    );
    assert_eq!(log.matches("(Pending)").count(), 4, "{log}");
    let moved = data_sets(&scp.received());
    assert_eq!(moved, stored, "moved data sets are the stored bytes");

    let get_dir = tempfile::tempdir().unwrap();
    let output = Command::new("/usr/bin/getscu")
        .args(["-v", "-S", "+B", "-aec", "HUREN", "-od"])
        .arg(get_dir.path())
        .arg(node.host())
        .arg(node.port().to_string())
        .args(["-k", "QueryRetrieveLevel=SERIES"])
        .arg("-k")
        .arg(format!("StudyInstanceUID={}", s1.study_instance_uid))
        .arg("-k")
        .arg(format!("SeriesInstanceUID={}", s1.series[0].0))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let log = support::text(&output);
    assert!(output.status.success(), "{log}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(get_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let fetched = data_sets(&files);
    assert_eq!(fetched.len(), s1.series[0].2, "{log}");
    for (uid, bytes) in &fetched {
        assert_eq!(Some(bytes), stored.get(uid), "C-GET {uid}");
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_move_refusals_and_failed_sub_operations() {
    // A destination that accepts only uncompressed transfer syntaxes.
    let scp = StoreScp::start("PLAIN", false);
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.remote_aes.push(scp.remote_ae("PLAIN"));
        let mut not_destination = scp.remote_ae("WSONLY");
        not_destination.move_destination = false;
        c.remote_aes.push(not_destination);
    })
    .await;
    // The samples include JPEG baseline and JPEG 2000 instances: stored as
    // sent, they cannot go to PLAIN.
    let samples = support::samples();
    support::pynetdicom_send(
        &node,
        &samples.iter().map(|s| s.path.clone()).collect::<Vec<_>>(),
    )
    .await;
    let movescu = |dest: &str, keys: &[String]| {
        let mut cmd = Command::new("/usr/bin/movescu");
        cmd.args(["-d", "-S", "-aec", "HUREN", "-aem", dest])
            .arg(node.host())
            .arg(node.port().to_string())
            .env("TCP_NODELAY", "1");
        for key in keys {
            cmd.arg("-k").arg(key);
        }
        let output = cmd.output().unwrap();
        support::text(&output)
    };
    let statuses = |log: &str| -> Vec<u16> {
        log.lines()
            .filter_map(|l| l.split("DIMSE Status").nth(1))
            .filter_map(|rest| u16::from_str_radix(&rest.split("0x").nth(1)?[..4], 16).ok())
            .collect()
    };
    let study = samples
        .iter()
        .find(|s| s.transfer_syntax_uid == "1.2.840.10008.1.2.4.50")
        .expect("a JPEG baseline sample");
    let keys = vec![
        "QueryRetrieveLevel=STUDY".to_string(),
        format!("StudyInstanceUID={}", study.study_instance_uid),
    ];
    let log = movescu("NOWHERE", &keys);
    assert_eq!(statuses(&log).last(), Some(&0xA801), "{log}");
    let log = movescu("WSONLY", &keys);
    assert_eq!(statuses(&log).last(), Some(&0xA801), "{log}");
    let log = movescu("PLAIN", &["QueryRetrieveLevel=STUDY".to_string()]);
    assert_eq!(statuses(&log).last(), Some(&0xA900), "no unique key: {log}");

    // Every sample study to PLAIN: uncompressed instances arrive (converted
    // where PLAIN does not take the stored syntax, as with deflate), those
    // dicom-pixeldata decodes arrive decompressed, the rest fail and are
    // listed.
    // (JPEG extended 12-bit is not: jpeg-decoder reads 8-bit only; JPEG-LS
    // is with the `jpeg-ls` feature, CharLS, which the test command builds.)
    let mut decodable = vec![
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.5",
    ];
    if cfg!(feature = "jpeg-ls") {
        decodable.push("1.2.840.10008.1.2.4.80");
    }
    let uncompressed = [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.1.99",
    ];
    let studies: BTreeSet<&str> = samples
        .iter()
        .map(|s| s.study_instance_uid.as_str())
        .collect();
    for study in studies {
        let before: BTreeSet<String> = data_sets(&scp.received()).into_keys().collect();
        let log = movescu(
            "PLAIN",
            &[
                "QueryRetrieveLevel=STUDY".to_string(),
                format!("StudyInstanceUID={study}"),
            ],
        );
        let in_study: Vec<&support::Sample> = samples
            .iter()
            .filter(|s| s.study_instance_uid == study)
            .collect();
        let expected: BTreeSet<String> = in_study
            .iter()
            .filter(|s| {
                uncompressed.contains(&s.transfer_syntax_uid.as_str())
                    || decodable.contains(&s.transfer_syntax_uid.as_str())
            })
            .map(|s| s.sop_instance_uid.clone())
            .collect();
        let arrived: BTreeSet<String> = data_sets(&scp.received())
            .into_keys()
            .filter(|u| !before.contains(u))
            .collect();
        assert_eq!(arrived, expected, "study {study}: {log}");
        let status = *statuses(&log).last().unwrap();
        let want = if expected.len() == in_study.len() {
            0x0000
        } else if expected.is_empty() {
            0xA702
        } else {
            0xB000
        };
        assert_eq!(status, want, "study {study}: {log}");
    }
    // What arrived is uncompressed, with whole frames of pixel data.
    for file in scp.received() {
        let obj = dicom_object::open_file(&file).unwrap();
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        assert!(
            uncompressed[..3].contains(&ts.as_str()),
            "{} arrived as {ts}",
            file.display()
        );
        let int = |tag| obj.element(tag).unwrap().to_int::<usize>().unwrap();
        use dicom_dictionary_std::tags;
        let frames = obj
            .element_opt(tags::NUMBER_OF_FRAMES)
            .unwrap()
            .map(|e| e.to_int::<usize>().unwrap())
            .unwrap_or(1);
        let expected_len = int(tags::ROWS)
            * int(tags::COLUMNS)
            * int(tags::SAMPLES_PER_PIXEL)
            * int(tags::BITS_ALLOCATED)
            / 8
            * frames;
        let pixel_len = obj
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .len();
        assert!(
            pixel_len == expected_len || pixel_len == expected_len + 1,
            "{}: {pixel_len} bytes of pixel data, {expected_len} expected",
            file.display()
        );
    }
    node.stop().await;
}

async fn storage_commitment_reports(backend: Backend) {
    let listen_port = free_port();
    let node = support::spawn_node_with(backend, |c| {
        c.remote_aes.push(RemoteAe {
            ae_title: "MODALITY".into(),
            host: "127.0.0.1".into(),
            port: listen_port,
            tls: false,
            may_query: true,
            may_retrieve: true,
            move_destination: true,
        });
    })
    .await;
    let (_dir, studies) = stored_corpus(&node).await;
    let s4 = studies.iter().find(|s| s.key == "S4").unwrap();
    let uid = sop_instance_uid_of(&std::fs::read(&s4.files[0]).unwrap());
    let ct = "1.2.840.10008.5.1.4.1.1.2";
    let pairs = serde_json::to_string(&vec![
        vec![ct, uid.as_str()],
        vec![ct, "1.2.3.999.1"],
        vec!["1.2.840.10008.5.1.4.1.1.4", uid.as_str()],
    ])
    .unwrap();
    let report = &support::python_tool(
        "qr_tool.py",
        &["commit", &node.host(), &node.port().to_string(), &pairs],
    )[0];
    assert_eq!(report["action_status"], 0);
    assert_eq!(report["received"], true, "{report}");
    assert_eq!(report["transaction_uid"], report["sent_transaction_uid"]);
    assert_eq!(report["event_type"], 2);
    assert_eq!(report["committed"], serde_json::json!([uid]));
    assert_eq!(
        report["failed"],
        serde_json::json!([["1.2.3.999.1", 0x0112], [uid, 0x0119]])
    );
    // An empty Referenced SOP Sequence asks for nothing (PS3.4 J.3.2: one
    // or more items): refused as a missing one is, and no report follows.
    let empty = &support::python_tool(
        "qr_tool.py",
        &["commit", &node.host(), &node.port().to_string(), "[]"],
    )[0];
    assert_eq!(empty["action_status"], 0x0110, "{empty}");
    assert_eq!(empty["received"], false, "{empty}");

    // The SCU asks and releases at once, without waiting for the report:
    // the report comes on a new association to its address in the AE
    // directory, with the node as SCP.
    let listener = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/qr_tool.py"))
        .args(["receive-report", "MODALITY", &listen_port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_port(listen_port);
    request_commitment_and_release(&node, &uid).await;
    let output = tokio::task::spawn_blocking(move || listener.wait_with_output().unwrap())
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["received"], true, "{report}");
    assert_eq!(report["event_type"], 1);
    assert_eq!(report["committed"], serde_json::json!([uid]));
    assert_eq!(report["calling_ae_title"], node.config.ae_title.as_str());
    node.stop().await;
}

fn wait_for_port(port: u16) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("nothing listens on port {port}");
}

/// A modality that sends its N-ACTION and, without waiting for anything,
/// releases the association (dicom-ul as the SCU).
async fn request_commitment_and_release(node: &TestNode, sop_instance_uid: &str) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::{tags, uids};
    use dicom_object::InMemDicomObject;
    use dicom_ul::pdu::{PDataValue, PDataValueType};
    use dicom_ul::{ClientAssociationOptions, Pdu};

    let mut association = ClientAssociationOptions::new()
        .calling_ae_title("MODALITY")
        .called_ae_title("HUREN")
        .with_presentation_context(
            uids::STORAGE_COMMITMENT_PUSH_MODEL,
            vec![uids::EXPLICIT_VR_LITTLE_ENDIAN],
        )
        .establish_async(node.dicom_addr)
        .await
        .unwrap();
    let pcid = association.presentation_contexts()[0].id;
    let mut item = InMemDicomObject::new_empty();
    item.put(DataElement::new(
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
    ));
    item.put(DataElement::new(
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(sop_instance_uid),
    ));
    let mut request = InMemDicomObject::new_empty();
    request.put(DataElement::new(
        tags::TRANSACTION_UID,
        VR::UI,
        PrimitiveValue::from("2.25.1234567"),
    ));
    request.put(DataElement::new(
        tags::REFERENCED_SOP_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item]),
    ));
    let mut data = Vec::new();
    request
        .write_dataset_with_ts(
            &mut data,
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
    // N-ACTION-RQ command set, implicit VR little endian, in tag order.
    let mut command = Vec::new();
    let mut element = |group: u16, elem: u16, value: &[u8]| {
        command.extend_from_slice(&group.to_le_bytes());
        command.extend_from_slice(&elem.to_le_bytes());
        command.extend_from_slice(&(value.len() as u32).to_le_bytes());
        command.extend_from_slice(value);
    };
    let ui = |s: &str| {
        let mut v = s.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        v
    };
    element(0x0000, 0x0003, &ui(uids::STORAGE_COMMITMENT_PUSH_MODEL));
    element(0x0000, 0x0100, &0x0130u16.to_le_bytes());
    element(0x0000, 0x0110, &9u16.to_le_bytes());
    element(0x0000, 0x0800, &1u16.to_le_bytes());
    element(0x0000, 0x1001, &ui("1.2.840.10008.1.20.1.1"));
    element(0x0000, 0x1008, &1u16.to_le_bytes());
    let mut with_length = Vec::new();
    with_length.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    with_length.extend_from_slice(&(command.len() as u32).to_le_bytes());
    with_length.extend_from_slice(&command);
    for (value_type, bytes) in [
        (PDataValueType::Command, with_length),
        (PDataValueType::Data, data),
    ] {
        association
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pcid,
                    value_type,
                    is_last: true,
                    data: bytes,
                }],
            })
            .await
            .unwrap();
    }
    association.send(&Pdu::ReleaseRQ).await.unwrap();
    // Whatever the node sends before its A-RELEASE-RP (the N-ACTION-RSP,
    // the report) is read and not answered.
    loop {
        match association.receive().await.unwrap() {
            Pdu::ReleaseRP => break,
            Pdu::PData { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_is_never_sent_nor_committed() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let (_dir, studies) = stored_corpus(&node).await;
    let s3 = studies.iter().find(|s| s.key == "S3").unwrap();
    let uid = sop_instance_uid_of(&std::fs::read(&s3.files[0]).unwrap());
    let row = node.versions(&uid).await.pop().unwrap();
    // Flip a byte of the blob on disk.
    let path = node
        .config
        .data_dir
        .join("blobs")
        .join(huren::storage::BlobStore::key(&row.blob_hash).as_ref());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let pairs =
        serde_json::to_string(&vec![vec![row.sop_class_uid.as_str(), uid.as_str()]]).unwrap();
    let report = &support::python_tool(
        "qr_tool.py",
        &["commit", &node.host(), &node.port().to_string(), &pairs],
    )[0];
    assert_eq!(report["event_type"], 2, "{report}");
    assert_eq!(report["failed"], serde_json::json!([[uid, 0x0110]]));
    // C-GET of that study: the sub-operation fails before anything is
    // sent; the association stays usable.
    let get_dir = tempfile::tempdir().unwrap();
    let output = Command::new("/usr/bin/getscu")
        .args(["-d", "-S", "-aec", "HUREN", "-od"])
        .arg(get_dir.path())
        .arg(node.host())
        .arg(node.port().to_string())
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .arg("-k")
        .arg(format!("StudyInstanceUID={}", s3.study_instance_uid))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let log = support::text(&output);
    let last_status = log
        .lines()
        .filter_map(|l| l.split("DIMSE Status").nth(1))
        .filter_map(|rest| u16::from_str_radix(&rest.split("0x").nth(1)?[..4], 16).ok())
        .next_back();
    assert_eq!(last_status, Some(0xA702), "{log}");
    assert_eq!(std::fs::read_dir(get_dir.path()).unwrap().count(), 0);
    assert!(
        support::echoscu(node.dicom_addr, &[])
            .await
            .status
            .success()
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_retrieve_access_listed() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.query_retrieve_access = huren::config::QueryRetrieveAccess::Listed;
        c.remote_aes.push(RemoteAe {
            ae_title: "FINDSCU".into(),
            host: "127.0.0.1".into(),
            port: 1,
            tls: false,
            may_query: false,
            may_retrieve: false,
            move_destination: false,
        });
    })
    .await;
    let found = findscu(
        &node,
        "-S",
        &[k("QueryRetrieveLevel=STUDY"), k("StudyInstanceUID")],
    );
    assert_eq!(found.final_status(), 0x0124, "{}", found.log);
    node.stop().await;
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with
/// openssl; returns (ca.pem, server key, server cert).
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            support::text(&output)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=huren test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.key"),
        dir.join("server.pem"),
    )
}

/// C-MOVE to a destination the AE directory marks `tls`: the association
/// is DICOM TLS, the destination's certificate verified against the
/// configured CA; a destination whose certificate does not chain to it gets
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_move_over_dicom_tls() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, key, cert) = test_pki(pki.path());
    let tls_args = [
        "+tls",
        key.to_str().unwrap(),
        cert.to_str().unwrap(),
        "--ignore-peer-cert",
    ];
    let scp = StoreScp::start_with("TLSDEST", false, &tls_args);
    // The same destination, but the node trusts another CA.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = test_pki(other.path());
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        let mut tls = scp.remote_ae("TLSDEST");
        tls.tls = true;
        c.remote_aes.push(tls);
        c.tls_ca_file = Some(ca.clone());
    })
    .await;
    let (_dir, studies) = stored_corpus(&node).await;
    let s1 = studies.iter().find(|s| s.key == "S1").unwrap();
    let movescu = |node: &TestNode| {
        let output = Command::new("/usr/bin/movescu")
            .args(["-v", "-S", "-aec", "HUREN", "-aem", "TLSDEST"])
            .arg(node.host())
            .arg(node.port().to_string())
            .args(["-k", "QueryRetrieveLevel=STUDY"])
            .arg("-k")
            .arg(format!("StudyInstanceUID={}", s1.study_instance_uid))
            .env("TCP_NODELAY", "1")
            .output()
            .unwrap();
        support::text(&output)
    };
    let log = movescu(&node);
    assert!(
        log.contains("Received Final Move Response (Success)"),
        "{log}"
    );
    assert_eq!(scp.received().len(), 5);
    let dir = node.stop().await;

    let mut config = support::test_config(Backend::SqliteLocal, dir.path()).await;
    let mut tls = scp.remote_ae("TLSDEST");
    tls.tls = true;
    config.remote_aes.push(tls);
    config.tls_ca_file = Some(other_ca);
    let node = support::start_node(config, dir).await;
    let log = movescu(&node);
    assert!(!log.contains("(Success)"), "{log}");
    assert_eq!(
        scp.received().len(),
        5,
        "nothing sent to an unverified peer"
    );
    node.stop().await;
}

/// One data element, explicit VR little endian, padded to even length.
fn explicit_le(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend(group.to_le_bytes());
    out.extend(element.to_le_bytes());
    out.extend(vr);
    out.extend((v.len() as u16).to_le_bytes());
    out.extend(v);
    out
}

/// Names written with ISO 2022 code extensions (`\ISO 2022 IR 58`, the
/// GB2312 form of PS3.5 Annex K that Chinese archives still send) are
/// indexed, matched and answered as their characters: C-FIND finds `王*`,
/// and C-FIND, QIDO-RS and WADO-RS metadata give 王^小东, not the escapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iso_2022_ir_58_names_are_read_as_their_characters() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let (instance, study, series) = (
        "1.2.826.0.1.3680043.10.1011.58.3",
        "1.2.826.0.1.3680043.10.1011.58.1",
        "1.2.826.0.1.3680043.10.1011.58.2",
    );
    // PS3.5 K.2's bytes: Wang^XiaoDong=王^小东, G1 designated to GB 2312
    // before each ideographic component.
    let name = b"Wang^XiaoDong=\x1b$)A\xcd\xf5^\x1b$)A\xd0\xa1\xb6\xab";
    // 胸部CT.
    let description = b"\x1b$)A\xd0\xd8\xb2\xbfCT";
    let file = secondary_capture(
        instance,
        "IR58-001",
        study,
        series,
        &[
            ((0x0008, 0x0005), b"CS", b"\\ISO 2022 IR 58"),
            ((0x0008, 0x0020), b"DA", b"20240105"),
            ((0x0008, 0x1030), b"LO", description),
            ((0x0010, 0x0010), b"PN", name),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ir58.dcm");
    std::fs::write(&path, &file).unwrap();
    store_files(&node, &[&path]).await;

    let found = findscu(
        &node,
        "-S",
        &[
            k("QueryRetrieveLevel=STUDY"),
            k("SpecificCharacterSet=ISO_IR 192"),
            k("PatientName=王*"),
            k("StudyDescription"),
            k("StudyInstanceUID"),
        ],
    );
    assert_eq!(found.final_status(), 0x0000, "{}", found.log);
    assert_eq!(found.responses.len(), 1, "{}", found.log);
    let r = &found.responses[0];
    assert_eq!(r["StudyInstanceUID"], study);
    assert_eq!(r["SpecificCharacterSet"], "ISO_IR 192");
    assert_eq!(r["PatientName"], "Wang^XiaoDong=王^小东");
    assert_eq!(r["StudyDescription"], "胸部CT");

    let http = node.http_addr;
    let get = |path: String| async move {
        let response = reqwest::Client::new()
            .get(format!("http://{http}/dicom-web{path}"))
            .bearer_auth(support::NODE_API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json::<Value>().await.unwrap()
    };
    let studies = get("/studies?PatientID=IR58-001".into()).await;
    assert_eq!(
        studies[0]["00100010"]["Value"][0]["Ideographic"], "王^小东",
        "{studies}"
    );
    let metadata = get(format!("/studies/{study}/metadata")).await;
    assert_eq!(
        metadata[0]["00100010"]["Value"][0],
        serde_json::json!({"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东"}),
        "{metadata}"
    );
    assert_eq!(metadata[0]["00081030"]["Value"][0], "胸部CT", "{metadata}");
    // PS3.18 F.2.5: the empty first value of Specific Character Set is null.
    assert_eq!(
        metadata[0]["00080005"]["Value"],
        serde_json::json!([null, "ISO 2022 IR 58"]),
        "{metadata}"
    );
    node.stop().await;
}

/// A data element to write: (group, element), VR, value bytes as sent.
type Element<'a> = ((u16, u16), &'a [u8; 2], &'a [u8]);

/// A Secondary Capture instance as Part-10 bytes, written here: the given
/// patient, study and series, and `extra` elements.
fn secondary_capture(
    instance: &str,
    patient_id: &str,
    study: &str,
    series: &str,
    extra: &[Element],
) -> Vec<u8> {
    let class = "1.2.840.10008.5.1.4.1.1.7";
    let uid = |s: &str| huren::types::Uid::parse(s).unwrap();
    let mut file =
        huren::part10::file_meta_prefix(&uid(class), &uid(instance), &uid("1.2.840.10008.1.2.1"));
    let mut elements: Vec<Element> = vec![
        ((0x0008, 0x0016), b"UI", class.as_bytes()),
        ((0x0008, 0x0018), b"UI", instance.as_bytes()),
        ((0x0008, 0x0060), b"CS", b"OT"),
        ((0x0010, 0x0020), b"LO", patient_id.as_bytes()),
        ((0x0020, 0x000D), b"UI", study.as_bytes()),
        ((0x0020, 0x000E), b"UI", series.as_bytes()),
    ];
    elements.extend_from_slice(extra);
    elements.sort_by_key(|(tag, _, _)| *tag);
    for ((group, element), vr, value) in elements {
        file.extend(explicit_le(group, element, vr, value));
    }
    file
}

/// Stores the files with storescu; every one must succeed.
async fn store_files(node: &TestNode, files: &[&Path]) {
    let files = files.iter().map(|f| f.display().to_string()).collect();
    let output = support::storescu(node.dicom_addr, Vec::new(), files).await;
    assert!(output.status.success(), "{}", support::text(&output));
}

on_both_backends!(an_instance_sent_again_elsewhere_leaves_no_empty_study);

/// The same SOP Instance UID sent again in another patient's study (a
/// correction at the modality): the new version is current there, and the
/// first study, now without a current instance, is found at no level.
async fn an_instance_sent_again_elsewhere_leaves_no_empty_study(backend: Backend) {
    let node = support::spawn_node(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let instance = "1.2.826.0.1.3680043.10.1011.77.9";
    let (first, second) = (dir.path().join("first.dcm"), dir.path().join("second.dcm"));
    std::fs::write(
        &first,
        secondary_capture(
            instance,
            "MOVED-A",
            "1.2.826.0.1.3680043.10.1011.77.1",
            "1.2.826.0.1.3680043.10.1011.77.2",
            &[],
        ),
    )
    .unwrap();
    std::fs::write(
        &second,
        secondary_capture(
            instance,
            "MOVED-B",
            "1.2.826.0.1.3680043.10.1011.77.3",
            "1.2.826.0.1.3680043.10.1011.77.4",
            &[],
        ),
    )
    .unwrap();
    // One association each, in this order.
    store_files(&node, &[&first]).await;
    store_files(&node, &[&second]).await;
    for (level, model) in [
        ("PATIENT", "-P"),
        ("STUDY", "-S"),
        ("SERIES", "-S"),
        ("IMAGE", "-S"),
    ] {
        for (patient, expected) in [("MOVED-A", 0), ("MOVED-B", 1)] {
            let mut keys = vec![
                format!("QueryRetrieveLevel={level}").into_bytes(),
                format!("PatientID={patient}").into_bytes(),
            ];
            if level != "PATIENT" {
                keys.push(k("StudyInstanceUID"));
            }
            if level == "SERIES" || level == "IMAGE" {
                keys.push(k("SeriesInstanceUID"));
            }
            if level == "IMAGE" {
                keys.push(k("SOPInstanceUID"));
            }
            let found = findscu(&node, model, &keys);
            assert_eq!(
                found.final_status(),
                0x0000,
                "{level} {patient}: {}",
                found.log
            );
            assert_eq!(
                found.responses.len(),
                expected,
                "{level} {patient}: {:?}",
                found.responses
            );
        }
    }
    node.stop().await;
}

/// A C-GET cancelled after its first sub-operation ends with Cancel
/// (FE00) and says how many sub-operations the cancel left undone
/// (Number of Remaining Sub-operations, PS3.4 C.4.3.3), with the others
/// counted: together they are the study's instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_c_get_reports_what_it_left_undone() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let dir = tempfile::tempdir().unwrap();
    let (study, series) = (
        "1.2.826.0.1.3680043.10.1011.88.1",
        "1.2.826.0.1.3680043.10.1011.88.2",
    );
    let total = 60;
    let files: Vec<PathBuf> = (1..=total)
        .map(|n| {
            let path = dir.path().join(format!("{n}.dcm"));
            let instance = format!("1.2.826.0.1.3680043.10.1011.88.3.{n}");
            std::fs::write(
                &path,
                secondary_capture(&instance, "GET-CANCEL", study, series, &[]),
            )
            .unwrap();
            path
        })
        .collect();
    store_files(
        &node,
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )
    .await;
    let r = &support::python_tool(
        "qr_tool.py",
        &["get-cancel", &node.host(), &node.port().to_string(), study],
    )[0];
    assert_eq!(r["status"], 0xFE00, "{r}");
    let count = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    assert!(count("remaining") > 0, "{r}");
    assert_eq!(
        count("remaining") + count("completed") + count("failed") + count("warning"),
        total,
        "{r}"
    );
    assert_eq!(r["stored"].as_u64(), Some(count("completed")), "{r}");
    node.stop().await;
}

/// An instance of 75 MB, sent back as stored by C-GET to an SCU with a
/// 16 KiB maximum PDU (dcmtk's and Orthanc's default): dicom-ul's P-DATA
/// writer answered with `Ok(0)` wherever the streamed pieces filled a PDU
/// exactly, and the sub-operation failed ("write zero byte into writer")
/// for every instance past about 64 MiB. Now the instance arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_instance_is_retrieved_at_a_small_maximum_pdu() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let dir = tempfile::tempdir().unwrap();
    let (instance, study, series) = (
        "1.2.826.0.1.3680043.10.1011.75.3",
        "1.2.826.0.1.3680043.10.1011.75.1",
        "1.2.826.0.1.3680043.10.1011.75.2",
    );
    let (rows, columns, frames) = (3072u16, 3072u16, 8usize);
    let mut file = secondary_capture(
        instance,
        "LARGE-PDU",
        study,
        series,
        &[
            ((0x0028, 0x0002), b"US", &1u16.to_le_bytes()),
            ((0x0028, 0x0004), b"CS", b"MONOCHROME2"),
            ((0x0028, 0x0008), b"IS", b"8"),
            ((0x0028, 0x0010), b"US", &rows.to_le_bytes()),
            ((0x0028, 0x0011), b"US", &columns.to_le_bytes()),
            ((0x0028, 0x0100), b"US", &8u16.to_le_bytes()),
            ((0x0028, 0x0101), b"US", &8u16.to_le_bytes()),
            ((0x0028, 0x0102), b"US", &7u16.to_le_bytes()),
            ((0x0028, 0x0103), b"US", &0u16.to_le_bytes()),
        ],
    );
    let pixels: Vec<u8> = (0..rows as usize * columns as usize * frames)
        .map(|i| (i % 251) as u8)
        .collect();
    // Pixel Data, OB, with the long length form explicit_le does not write.
    file.extend([0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    file.extend((pixels.len() as u32).to_le_bytes());
    file.extend(&pixels);
    let path = dir.path().join("large.dcm");
    std::fs::write(&path, &file).unwrap();
    store_files(&node, &[&path]).await;
    let stored = {
        let row = node.versions(instance).await.pop().unwrap();
        let blob = node.ingest.store().get(&row.blob_hash).await.unwrap();
        support::data_set_bytes(&blob).to_vec()
    };
    assert!(stored.len() > 75_000_000);

    let get_dir = tempfile::tempdir().unwrap();
    let output = Command::new("/usr/bin/getscu")
        .args(["-v", "-S", "+B", "-pdu", "16384", "-aec", "HUREN"])
        .arg("-od")
        .arg(get_dir.path())
        .arg(node.host())
        .arg(node.port().to_string())
        .args(["-k", "QueryRetrieveLevel=STUDY"])
        .arg("-k")
        .arg(format!("StudyInstanceUID={study}"))
        .env("TCP_NODELAY", "1")
        .output()
        .unwrap();
    let log = support::text(&output);
    assert!(output.status.success(), "{log}");
    let files: Vec<PathBuf> = std::fs::read_dir(get_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let fetched = data_sets(&files);
    assert_eq!(fetched.len(), 1, "{log}");
    assert!(
        fetched.get(instance) == Some(&stored),
        "not the stored bytes: {log}"
    );
    node.stop().await;
}
