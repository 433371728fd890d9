//! DICOMweb against a spawned node: the Python `dicomweb-client` for the
//! normal paths (tests/support/dicomweb_client.py), raw HTTP (reqwest) for
//! bad inputs, tokens and CORS. QIDO-RS runs on both backend pairs.

use std::path::PathBuf;

use huren::config::{Scope, TokenConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{self, Backend, TestNode};

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

on_both_backends!(
    stow_rs_then_qido_and_findscu,
    qido_rs_finds_what_c_store_stored,
    wado_rs_retrieves_byte_identical,
    large_instance_through_stow_and_wado,
);

const MULTIPART_DICOM: &str = "multipart/related; type=\"application/dicom\"; boundary=XyZ";

/// A node with DICOMweb open (no token).
async fn spawn_open(backend: Backend) -> TestNode {
    support::spawn_node_with(backend, |c| c.dicomweb.open = true).await
}

fn base(node: &TestNode) -> String {
    format!("http://{}/dicom-web", node.http_addr)
}

/// Runs tests/support/dicomweb_client.py against the node.
async fn dwc(node: &TestNode, token: Option<&str>, args: &[&str]) -> Vec<Value> {
    let mut all = vec![base(node)];
    if let Some(t) = token {
        all.push("--token".into());
        all.push(t.into());
    }
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(support::env("HUREN_TEST_PYTHON"))
            .arg(support::repo_path("tests/support/dicomweb_client.py"))
            .args(&all)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run dicomweb_client.py");
        assert!(
            output.status.success(),
            "dicomweb_client.py {:?} failed: {}\n{}",
            &all[1..],
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    })
    .await
    .unwrap()
}

/// A multipart/related body with boundary `XyZ` around the given parts.
fn multipart(parts: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n");
        body.extend_from_slice(part);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    body
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_stow(node: &TestNode, path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = client()
        .post(format!("{}{path}", base(node)))
        .header("Content-Type", MULTIPART_DICOM)
        .header("Accept", "application/dicom+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn failure_reasons(body: &Value) -> Vec<u64> {
    body["00081198"]["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["00081197"]["Value"][0].as_u64().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

fn referenced(body: &Value) -> Vec<String> {
    body["00081199"]["Value"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["00081155"]["Value"][0].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// STOW-RS by dicomweb-client; the instances are found by QIDO-RS
/// (dicomweb-client) and by dcmtk's findscu, byte for byte in the store.
async fn stow_rs_then_qido_and_findscu(backend: Backend) {
    let node = spawn_open(backend).await;
    let samples = support::samples();
    let study = samples[0].study_instance_uid.clone();
    let files: Vec<&support::Sample> = samples
        .iter()
        .filter(|s| s.study_instance_uid == study)
        .collect();
    let paths: Vec<String> = files.iter().map(|s| s.path.display().to_string()).collect();
    let mut args = vec!["store", "--study", &study];
    args.extend(paths.iter().map(String::as_str));
    let result = dwc(&node, None, &args).await;
    let stored = referenced(&result[0]);
    assert_eq!(stored.len(), files.len(), "{}", result[0]);
    assert!(result[0].get("00081198").is_none(), "{}", result[0]);
    let url = result[0]["00081199"]["Value"][0]["00081190"]["Value"][0]
        .as_str()
        .unwrap();
    // The URL is built from the Host header (dicomweb-client sends its
    // host without the port).
    assert!(
        url.contains(&format!("/dicom-web/studies/{study}/series/")),
        "{url}"
    );
    for s in &files {
        support::assert_stored(&node.ingest, &s.path, &s.sop_instance_uid).await;
    }
    let row = node.study(&study).await;
    assert_eq!(row.number_of_study_related_instances, files.len() as i64);

    // QIDO-RS (dicomweb-client) finds it, with the PN groups.
    let found = dwc(
        &node,
        None,
        &["search", "studies", &format!("StudyInstanceUID={study}")],
    )
    .await;
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0]["00100010"]["Value"][0],
        serde_json::json!({"Alphabetic": "Zhang^San", "Ideographic": "张^三"})
    );
    assert_eq!(found[0]["00201208"]["Value"][0], files.len());

    // dcmtk's findscu finds it too (C-FIND over the same index).
    let output = findscu(
        &node,
        &[
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={study}"),
            "-k",
            "PatientID",
        ],
    )
    .await;
    let text = support::text(&output);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains(&study),
        "findscu did not return the study: {text}"
    );
    assert!(text.contains("HUR-100001"), "{text}");
    node.stop().await;
}

/// dcmtk's findscu (Study Root) against the node, verbose: the responses'
/// identifiers are in its log.
async fn findscu(node: &TestNode, keys: &[&str]) -> std::process::Output {
    let keys: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    let (host, port) = (node.host(), node.port().to_string());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/findscu")
            .env("TCP_NODELAY", "1")
            .args(["-v", "-S", "-aet", "FINDSCU", "-aec", "HUREN"])
            .args(&keys)
            .arg(host)
            .arg(port)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run /usr/bin/findscu (Debian package dcmtk)")
    })
    .await
    .unwrap()
}

/// Stores every sample by C-STORE (pynetdicom).
async fn c_store_samples(node: &TestNode) -> Vec<support::Sample> {
    let samples = support::samples();
    let files: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    support::pynetdicom_send(node, &files).await;
    samples
}

fn uids(results: &[Value], key: &str) -> Vec<String> {
    let mut out: Vec<String> = results
        .iter()
        .map(|r| r[key]["Value"][0].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

/// QIDO-RS through dicomweb-client over what C-STORE stored: matching
/// (same matcher as C-FIND), includefield, limit/offset, fuzzy matching,
/// the retrieve URLs; bad parameters are 400.
async fn qido_rs_finds_what_c_store_stored(backend: Backend) {
    let node = spawn_open(backend).await;
    let samples = c_store_samples(&node).await;
    let mut studies: Vec<String> = samples
        .iter()
        .map(|s| s.study_instance_uid.clone())
        .collect();
    studies.sort();
    studies.dedup();

    let all = dwc(&node, None, &["search", "studies"]).await;
    assert_eq!(uids(&all, "0020000D"), studies);
    // Over HTTP/2 (h2c here, as browsers and curl speak on HTTPS), where
    // the host comes as `:authority`, not `Host`: the retrieve URLs still
    // name the node's address and port, not `localhost`.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(format!("{}/studies", base(&node)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let over_h2: Vec<Value> = r.json().await.unwrap();
    assert_eq!(uids(&over_h2, "0020000D"), studies);
    for r in &over_h2 {
        let url = r["00081190"]["Value"][0].as_str().unwrap();
        assert!(
            url.starts_with(&format!("{}/studies/", base(&node))),
            "{url}"
        );
    }
    for r in &all {
        let url = r["00081190"]["Value"][0].as_str().unwrap();
        assert!(
            url.ends_with(&format!(
                "/dicom-web/studies/{}",
                r["0020000D"]["Value"][0].as_str().unwrap()
            )),
            "{url}"
        );
        assert_eq!(r["00080061"]["vr"], "CS");
        assert_eq!(r["00201206"]["vr"], "IS");
    }

    let ct = &samples[0];
    let zhang = all
        .iter()
        .filter(|r| r["00100020"]["Value"][0] == "HUR-100001")
        .count();
    assert!(zhang >= 1);
    let cases: Vec<(Vec<&str>, usize)> = vec![
        (vec!["PatientID=HUR-100001"], zhang),
        (vec!["PatientName=Zhang*"], zhang),
        (vec!["PatientName=zhang^san"], zhang),
        (
            vec!["StudyDate=20240101-20241231"],
            all.iter()
                .filter(|r| {
                    r["00080020"]["Value"][0]
                        .as_str()
                        .is_some_and(|d| d.starts_with("2024"))
                })
                .count(),
        ),
        (
            vec!["ModalitiesInStudy=CT"],
            all.iter()
                .filter(|r| {
                    r["00080061"]["Value"]
                        .as_array()
                        .is_some_and(|m| m.contains(&Value::from("CT")))
                })
                .count(),
        ),
        (vec!["PatientID=NOBODY"], 0),
        (vec!["limit=2"], 2.min(studies.len())),
        (vec!["limit=2", "offset=1"], 2.min(studies.len() - 1)),
        (vec!["offset=100"], 0),
    ];
    for (params, expected) in cases {
        let mut args = vec!["search", "studies"];
        args.extend(params.iter().copied());
        let found = dwc(&node, None, &args).await;
        assert_eq!(found.len(), expected, "{params:?}: {found:?}");
    }
    // Fuzzy matching: a name component given as a prefix.
    let found = dwc(
        &node,
        None,
        &["search", "studies", "--fuzzy", "PatientName=zha"],
    )
    .await;
    assert_eq!(found.len(), zhang);
    let found = dwc(&node, None, &["search", "studies", "PatientName=zha"]).await;
    assert_eq!(found.len(), 0);

    // A key the index does not keep matches nothing, so every study comes
    // back; the answer's Warning names the ignored key. A search whose keys
    // are all matched carries none.
    for (query, ignored) in [
        ("PatientID=HUR-100001&00991001=1", Some("00991001")),
        ("PatientID=HUR-100001&PatientAge=030Y", Some("PatientAge")),
        ("PatientID=HUR-100001", None),
    ] {
        let response = client()
            .get(format!("{}/studies?{query}", base(&node)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{query}");
        let warning = response
            .headers()
            .get("warning")
            .map(|w| w.to_str().unwrap().to_string());
        match ignored {
            Some(key) => {
                let w = warning.unwrap_or_else(|| panic!("{query}: no Warning"));
                assert!(w.starts_with("299 ") && w.contains(key), "{query}: {w}");
            }
            None => assert_eq!(warning, None, "{query}"),
        }
    }

    // includefield=all returns every attribute the index keeps.
    let found = dwc(
        &node,
        None,
        &[
            "search",
            "studies",
            "PatientID=HUR-100001",
            "includefield=all",
        ],
    )
    .await;
    assert!(
        found[0].get("00081030").is_some(),
        "StudyDescription: {}",
        found[0]
    );
    // A requested attribute the index does not keep comes back empty.
    let found = dwc(
        &node,
        None,
        &[
            "search",
            "studies",
            "PatientID=HUR-100001",
            "includefield=PatientAge",
        ],
    )
    .await;
    assert_eq!(found[0]["00101010"], serde_json::json!({"vr": "AS"}));

    // Series and instances, within a study and across studies.
    let series = dwc(
        &node,
        None,
        &["search", "series", "--study", &ct.study_instance_uid],
    )
    .await;
    let expected_series: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.study_instance_uid == ct.study_instance_uid)
        .map(|s| s.path.parent().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(series.len(), expected_series.len());
    let instances = dwc(
        &node,
        None,
        &["search", "instances", "--study", &ct.study_instance_uid],
    )
    .await;
    let mut expected: Vec<String> = samples
        .iter()
        .filter(|s| s.study_instance_uid == ct.study_instance_uid)
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    expected.sort();
    assert_eq!(uids(&instances, "00080018"), expected);
    let one_series = series[0]["0020000E"]["Value"][0].as_str().unwrap();
    let in_series = dwc(
        &node,
        None,
        &[
            "search",
            "instances",
            "--study",
            &ct.study_instance_uid,
            "--series",
            one_series,
        ],
    )
    .await;
    assert!(!in_series.is_empty() && in_series.len() < instances.len());
    let everywhere = dwc(
        &node,
        None,
        &[
            "search",
            "instances",
            &format!("SOPInstanceUID={}", ct.sop_instance_uid),
        ],
    )
    .await;
    assert_eq!(everywhere.len(), 1);
    let url = everywhere[0]["00081190"]["Value"][0].as_str().unwrap();
    assert!(
        url.ends_with(&format!("/instances/{}", ct.sop_instance_uid)),
        "{url}"
    );
    let modality = dwc(&node, None, &["search", "series", "Modality=MR"]).await;
    assert!(modality.iter().all(|s| s["00080060"]["Value"][0] == "MR"));

    // Bad parameters: 400; XML only: 406.
    for query in [
        "NoSuchAttribute=1",
        "limit=x",
        "StudyDate=yesterday",
        "fuzzymatching=maybe",
    ] {
        let response = client()
            .get(format!("{}/studies?{query}", base(&node)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{query}");
    }
    let response = client()
        .get(format!("{}/studies", base(&node)))
        .header("Accept", "application/dicom+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 406);
    node.stop().await;
}

/// The parts of a multipart/related response, with their Content-Type.
async fn multipart_parts(response: reqwest::Response) -> Vec<(String, Vec<u8>)> {
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("multipart/related"),
        "{content_type}"
    );
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let mut multipart = multer::Multipart::new(response.bytes_stream(), boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.unwrap() {
        let ct = field
            .content_type()
            .map(|m| m.to_string())
            .unwrap_or_default();
        parts.push((ct, field.bytes().await.unwrap().to_vec()));
    }
    parts
}

/// A WADO-RS retrieve of `path` as stored (`transfer-syntax=*`): 200, and
/// its parts.
async fn retrieve_as_stored(node: &TestNode, path: &str) -> Vec<(String, Vec<u8>)> {
    let response = client()
        .get(format!("{}{path}", base(node)))
        .header(
            "Accept",
            "multipart/related; type=\"application/dicom\"; transfer-syntax=*",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{path}");
    multipart_parts(response).await
}

/// WADO-RS over what C-STORE stored: dicomweb-client retrieves each study
/// (attributes and Pixel Data equal to the files sent), raw requests get
/// each instance byte-identical to the stored blob; metadata, bulk data,
/// frames, rendered and thumbnail; 404/406/400.
async fn wado_rs_retrieves_byte_identical(backend: Backend) {
    let node = spawn_open(backend).await;
    let samples = c_store_samples(&node).await;
    let mut studies: Vec<&str> = samples
        .iter()
        .map(|s| s.study_instance_uid.as_str())
        .collect();
    studies.sort();
    studies.dedup();
    for study in &studies {
        let files: Vec<String> = samples
            .iter()
            .filter(|s| s.study_instance_uid == *study)
            .map(|s| s.path.display().to_string())
            .collect();
        // As stored (transfer-syntax=*): every attribute and Pixel Data
        // equal to the files sent.
        let mut args = vec!["retrieve-study", "--as-stored", study];
        args.extend(files.iter().map(String::as_str));
        let got = dwc(&node, None, &args).await;
        assert_eq!(got.len(), files.len(), "{study}");
        for r in &got {
            assert_eq!(r["known"], true, "{r}");
            assert_eq!(r["differences"], serde_json::json!([]), "{r}");
            assert_eq!(r["pixel_data_equal"], true, "{r}");
        }
        // The client's default (no transfer-syntax): Explicit VR Little
        // Endian (PS3.18's default) wherever the node can convert, the
        // same pixels; JPEG 2000 and JPEG-LS stay as stored.
        let mut args = vec!["retrieve-study", study];
        args.extend(files.iter().map(String::as_str));
        let got = dwc(&node, None, &args).await;
        assert_eq!(got.len(), files.len(), "{study}");
        for r in &got {
            let original = r["original_transfer_syntax_uid"].as_str().unwrap();
            let expected = if huren::transcode::can_convert(original, "1.2.840.10008.1.2.1") {
                "1.2.840.10008.1.2.1"
            } else {
                original
            };
            assert_eq!(r["transfer_syntax_uid"], expected, "{r}");
            assert_eq!(r["differences"], serde_json::json!([]), "{r}");
            if expected == original {
                assert_eq!(r["pixel_data_equal"], true, "{r}");
            } else {
                // Lossless syntaxes decode to the same pixels; JPEG
                // baseline decoders may differ by a rounding step.
                let tolerance = if original == "1.2.840.10008.1.2.4.50" {
                    2
                } else {
                    0
                };
                let diff = r["pixel_max_diff"].as_i64();
                assert!(diff.is_some_and(|d| (0..=tolerance).contains(&d)), "{r}");
            }
        }

        // Byte-identical: each part is the stored blob, whose data set is
        // the file's as sent.
        let parts = retrieve_as_stored(&node, &format!("/studies/{study}")).await;
        assert_eq!(parts.len(), files.len());
        for (ct, bytes) in &parts {
            assert!(ct.starts_with("application/dicom"), "{ct}");
            let meta = dicom_object::meta::FileMetaTable::from_reader(&bytes[128..]).unwrap();
            let sop = meta.media_storage_sop_instance_uid().trim_end_matches('\0');
            let sample = samples.iter().find(|s| s.sop_instance_uid == sop).unwrap();
            let row = node.versions(sop).await.pop().unwrap();
            let blob = node.ingest.store().get(&row.blob_hash).await.unwrap();
            assert_eq!(&blob[..], &bytes[..], "{sop}: not the stored blob");
            let original = std::fs::read(&sample.path).unwrap();
            assert_eq!(
                support::comparable_data_set(bytes),
                support::comparable_data_set(&original)
            );
        }

        // Metadata: every inline attribute as in the file, bulk data as URIs.
        let mut args = vec!["metadata", study];
        args.extend(files.iter().map(String::as_str));
        let got = dwc(&node, None, &args).await;
        assert_eq!(got.len(), files.len());
        for r in &got {
            assert_eq!(r["known"], true, "{r}");
            assert_eq!(r["differences"], serde_json::json!([]), "{r}");
        }
    }

    // Frames, bulk data and rendering, per transfer syntax.
    let by_ts = |ts: &str| {
        samples
            .iter()
            .find(|s| s.transfer_syntax_uid == ts)
            .unwrap()
            .clone()
    };

    // One instance asked for as a single-part application/dicom (what
    // Microsoft's and Google's DICOMweb clients send): the stored blob as
    // the body with `transfer-syntax=*`, Explicit VR Little Endian by
    // default; a study asked for so is 406.
    let jpeg = by_ts("1.2.840.10008.1.2.4.50");
    let row = node.versions(&jpeg.sop_instance_uid).await.pop().unwrap();
    let instance_path = format!(
        "{}/studies/{}/series/{}/instances/{}",
        base(&node),
        row.study_instance_uid,
        row.series_instance_uid,
        row.sop_instance_uid
    );
    let stored = node.ingest.store().get(&row.blob_hash).await.unwrap();
    let single = |accept: &'static str, path: String| async move {
        let r = client()
            .get(path)
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), ct, r.bytes().await.unwrap())
    };
    let (status, ct, body) = single(
        "application/dicom; transfer-syntax=*",
        instance_path.clone(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        ct.as_deref(),
        Some("application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50")
    );
    assert_eq!(&body[..], &stored[..], "not the stored blob");
    let (status, ct, body) = single("application/dicom", instance_path).await;
    assert_eq!(status, 200);
    assert_eq!(
        ct.as_deref(),
        Some("application/dicom; transfer-syntax=1.2.840.10008.1.2.1")
    );
    let converted = dicom_object::from_reader(&body[128..]).unwrap();
    assert_eq!(
        converted.meta().transfer_syntax().trim_end_matches('\0'),
        "1.2.840.10008.1.2.1"
    );
    let (status, _, _) = single(
        "application/dicom",
        format!("{}/studies/{}", base(&node), jpeg.study_instance_uid),
    )
    .await;
    assert_eq!(status, 406);
    for ts in [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.5",
    ] {
        let s = by_ts(ts);
        let got = dwc(&node, None, &["frames", &s.path.display().to_string(), "1"]).await;
        assert_eq!(got[0]["equal"], true, "{ts}: {}", got[0]);
    }
    for ts in ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"] {
        let s = by_ts(ts);
        let path = s.path.display().to_string();
        let png = dwc(&node, None, &["rendered", &path, "image/png"]).await;
        assert_eq!(png[0]["magic"], "89504e47", "{ts}");
        let jpeg = dwc(&node, None, &["rendered", &path, "image/jpeg"]).await;
        assert!(
            jpeg[0]["magic"].as_str().unwrap().starts_with("ffd8"),
            "{ts}"
        );
    }
    // Compressed frames as octets "as stored" (what OHIF asks for).
    let jpeg = by_ts("1.2.840.10008.1.2.4.50");
    let jpeg_row = node.versions(&jpeg.sop_instance_uid).await.pop().unwrap();
    let response = client()
        .get(format!(
            "{}/studies/{}/series/{}/instances/{}/frames/1",
            base(&node),
            jpeg_row.study_instance_uid,
            jpeg_row.series_instance_uid,
            jpeg.sop_instance_uid
        ))
        .header(
            "Accept",
            "multipart/related; type=application/octet-stream; transfer-syntax=*",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let parts = multipart_parts(response).await;
    assert_eq!(
        parts[0].0,
        "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50"
    );
    assert_eq!(&parts[0].1[..2], &[0xFF, 0xD8], "a JPEG stream");
    // One frame may come as a single part payload (PS3.18 8.6), the frame
    // itself with no multipart framing: as octets "as stored", or in its
    // own media type. Without transfer-syntax=*, octets would need the
    // frame decompressed: not acceptable.
    let jpeg_frame_url = format!(
        "{}/studies/{}/series/{}/instances/{}/frames/1",
        base(&node),
        jpeg_row.study_instance_uid,
        jpeg_row.series_instance_uid,
        jpeg.sop_instance_uid
    );
    for (accept, content_type) in [
        (
            "application/octet-stream; transfer-syntax=*",
            Some("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50"),
        ),
        (
            "image/jpeg",
            Some("image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"),
        ),
        ("application/octet-stream", None),
    ] {
        let response = client()
            .get(&jpeg_frame_url)
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        let Some(content_type) = content_type else {
            assert_eq!(response.status().as_u16(), 406, "{accept}");
            continue;
        };
        assert_eq!(response.status().as_u16(), 200, "{accept}");
        assert_eq!(response.headers()["content-type"], content_type, "{accept}");
        assert!(
            response.bytes().await.unwrap() == parts[0].1,
            "{accept}: not the frame as stored"
        );
    }

    let ct = by_ts("1.2.840.10008.1.2.1");
    let bytes = std::fs::read(&ct.path).unwrap();
    let obj = dicom_object::OpenFileOptions::new()
        .from_reader(&bytes[128..])
        .unwrap();
    let series = obj
        .element(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let instance_url = format!(
        "{}/studies/{}/series/{series}/instances/{}",
        base(&node),
        ct.study_instance_uid,
        ct.sop_instance_uid
    );
    let pixel_data = obj
        .element(dicom_dictionary_std::tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec();
    let response = client()
        .get(format!("{instance_url}/bulkdata/7FE00010"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let parts = multipart_parts(response).await;
    assert_eq!(parts[0].1, pixel_data);
    // The one frame of a single-frame instance, as the whole payload: as
    // bulk data and as frame 1.
    for resource in ["bulkdata/7FE00010", "frames/1"] {
        let response = client()
            .get(format!("{instance_url}/{resource}"))
            .header("Accept", "application/octet-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{resource}");
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream",
            "{resource}"
        );
        assert!(
            response.bytes().await.unwrap() == pixel_data,
            "{resource}: not the pixel data"
        );
    }
    // The instance's own first window (40/400) is applied by default; a
    // window parameter replaces it.
    let mut rendered = Vec::new();
    for query in [
        "",
        "?window=40,400",
        "?window=-600,1500",
        "?window=-600,1500,SIGMOID",
    ] {
        let response = client()
            .get(format!("{instance_url}/rendered{query}"))
            .header("Accept", "image/png")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{query}");
        rendered.push(response.bytes().await.unwrap());
    }
    assert!(
        rendered[0] == rendered[1],
        "default rendering is not the instance's window"
    );
    assert!(rendered[1] != rendered[2], "window parameter ignored");
    assert!(rendered[2] != rendered[3], "window function ignored");
    let response = client()
        .get(format!("{instance_url}/thumbnail?viewport=32,32"))
        .header("Accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let png = response.bytes().await.unwrap();
    // PNG IHDR width and height.
    assert_eq!(&png[16..24], &[0, 0, 0, 32, 0, 0, 0, 32]);
    // The accept query parameter (PS3.18 §8.3.3.1) stands in for the
    // header a hyperlink cannot set: a PNG, where JPEG is the default.
    let response = client()
        .get(format!(
            "{instance_url}/thumbnail?viewport=32,32&accept=image/png"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert!(response.bytes().await.unwrap().starts_with(b"\x89PNG"));

    // Errors.
    let cases: Vec<(String, &str, u16)> = vec![
        (format!("{}/studies/1.2.3.4.5.6.7", base(&node)), "*/*", 404),
        (format!("{}/studies/not-a-uid", base(&node)), "*/*", 400),
        (
            format!("{}/studies/{}", base(&node), ct.study_instance_uid),
            "multipart/related; type=\"application/dicom\"; transfer-syntax=1.2.840.10008.1.2.4.90",
            406,
        ),
        (
            format!("{}/studies/{}", base(&node), ct.study_instance_uid),
            "application/zip",
            406,
        ),
        (
            format!("{}/studies/{}/metadata", base(&node), ct.study_instance_uid),
            "application/dicom+xml",
            406,
        ),
        (format!("{instance_url}/frames/99"), "*/*", 404),
        (format!("{instance_url}/frames/0"), "*/*", 400),
        (
            format!("{instance_url}/frames/1"),
            "multipart/related; type=\"image/jpeg\"",
            406,
        ),
        (format!("{instance_url}/rendered"), "image/gif", 406),
        // q=0: not acceptable (RFC 9110 §12.4.2).
        (format!("{instance_url}/rendered"), "image/png;q=0", 406),
        (
            format!("{}/studies/{}/metadata", base(&node), ct.study_instance_uid),
            "application/dicom+json; q=0",
            406,
        ),
        (
            format!("{instance_url}/rendered?window=1"),
            "image/png",
            400,
        ),
    ];
    for (url, accept, expected) in cases {
        let response = client()
            .get(&url)
            .header("Accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{url} {accept}");
    }
    node.stop().await;
}

/// Bad STOW-RS inputs: each gets its documented status or failure reason,
/// and nothing is stored for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stow_rs_bad_inputs() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.dicomweb.open = true;
        c.dicomweb.max_request_bytes = 200_000;
    })
    .await;
    let samples = support::samples();
    let good = &samples[0];
    let good_bytes = std::fs::read(&good.path).unwrap();
    let other_study = samples
        .iter()
        .find(|s| s.study_instance_uid != good.study_instance_uid)
        .unwrap();
    let other_bytes = std::fs::read(&other_study.path).unwrap();

    // A part that is not DICOM at all: 409, FailureReason C000.
    let (status, body) = post_stow(&node, "/studies", multipart(&[b"hello, not DICOM"])).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(failure_reasons(&body), vec![0xC000]);

    // A part announcing a 4 GB file meta group: C000, not buffered.
    let mut huge_meta = good_bytes.clone();
    huge_meta[140..144].copy_from_slice(&u32::MAX.to_le_bytes());
    let (status, body) = post_stow(&node, "/studies", multipart(&[&huge_meta])).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(failure_reasons(&body), vec![0xC000]);

    // A truncated part (cut in the middle of its pixel data): C000.
    let cut = &good_bytes[..good_bytes.len() - 1000];
    let (status, body) = post_stow(&node, "/studies", multipart(&[cut])).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(failure_reasons(&body), vec![0xC000]);
    assert!(node.versions(&good.sop_instance_uid).await.is_empty());

    // A part of another study than the URL's, beside a good one: 202, the
    // good one stored, the other refused with A900 and not stored.
    let path = format!("/studies/{}", good.study_instance_uid);
    let (status, body) = post_stow(&node, &path, multipart(&[&other_bytes, &good_bytes])).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(failure_reasons(&body), vec![0xA900]);
    assert_eq!(
        body["00081198"]["Value"][0]["00081155"]["Value"][0],
        other_study.sop_instance_uid.as_str()
    );
    assert_eq!(referenced(&body), vec![good.sop_instance_uid.clone()]);
    assert!(
        node.versions(&other_study.sop_instance_uid)
            .await
            .is_empty()
    );
    assert_eq!(node.versions(&good.sop_instance_uid).await.len(), 1);

    // An oversized request (Content-Length over the limit): 413 before
    // anything is read.
    let big = vec![b'x'; 300_000];
    let (status, _) = post_stow(&node, "/studies", multipart(&[&other_bytes, &big])).await;
    assert_eq!(status, 413);
    // The same without a Content-Length (chunked): 413 when the limit is
    // crossed; the part in flight is abandoned.
    let mut body = multipart(&[&big]);
    body.splice(
        0..0,
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n"
            .iter()
            .copied(),
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = client()
        .post(format!("{}/studies", base(&node)))
        .header("Content-Type", MULTIPART_DICOM)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert!(
        node.versions(&other_study.sop_instance_uid)
            .await
            .is_empty()
    );

    // A malformed request: 400 (no boundary, broken framing), 415 (not
    // multipart/related of application/dicom), 406 (XML response only).
    let cases: &[(&str, &str, &[u8], u16)] = &[
        (
            "multipart/related; type=\"application/dicom\"",
            "application/dicom+json",
            b"--XyZ--",
            400,
        ),
        (
            MULTIPART_DICOM,
            "application/dicom+json",
            b"no delimiter here at all",
            400,
        ),
        (
            "application/dicom",
            "application/dicom+json",
            &good_bytes,
            415,
        ),
        (
            "multipart/related; type=\"application/dicom+xml\"; boundary=XyZ",
            "application/dicom+json",
            b"--XyZ--",
            415,
        ),
        (MULTIPART_DICOM, "application/dicom+xml", b"--XyZ--", 406),
    ];
    for (content_type, accept, body, expected) in cases {
        let response = client()
            .post(format!("{}/studies", base(&node)))
            .header("Content-Type", *content_type)
            .header("Accept", *accept)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status().as_u16(),
            *expected,
            "{content_type} / {accept}"
        );
    }
    assert_eq!(
        node.ingest.index().count_current_instances().await.unwrap(),
        1
    );
    assert_eq!(node.ingest.store().staged_file_count().unwrap(), 0);
    node.stop().await;
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Tokens: 401 without or with an unknown token, 403 without the scope,
/// through with it; dicomweb-client with a token; CORS preflight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_and_cors() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.dicomweb.tokens = vec![
            TokenConfig {
                name: "viewer".into(),
                sha256: sha256_hex("viewer-secret"),
                scopes: vec![Scope::Read],
            },
            TokenConfig {
                name: "gateway".into(),
                sha256: sha256_hex("gateway-secret"),
                scopes: vec![Scope::Read, Scope::Write],
            },
        ];
        c.dicomweb.cors_allowed_origins = vec!["https://viewer.example.org".into()];
    })
    .await;
    let sample = &support::samples()[0];
    let bytes = std::fs::read(&sample.path).unwrap();
    let studies = format!("{}/studies", base(&node));
    let cases: &[(&str, Option<&str>, u16)] = &[
        ("GET", None, 401),
        ("GET", Some("wrong-secret"), 401),
        ("POST", Some("viewer-secret"), 403),
        ("POST", Some("gateway-secret"), 200),
        ("GET", Some("viewer-secret"), 200),
    ];
    for (method, token, expected) in cases {
        let mut request = match *method {
            "GET" => client().get(&studies),
            _ => client()
                .post(&studies)
                .header("Content-Type", MULTIPART_DICOM)
                .body(multipart(&[&bytes])),
        };
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), *expected, "{method} {token:?}");
        if *expected == 401 {
            assert!(response.headers().contains_key("www-authenticate"));
        }
    }
    // dicomweb-client with the read token finds what the gateway stored.
    let found = dwc(&node, Some("viewer-secret"), &["search", "studies"]).await;
    assert_eq!(found.len(), 1);

    // A browser's preflight carries no token and is answered.
    let response = client()
        .request(reqwest::Method::OPTIONS, &studies)
        .header("Origin", "https://viewer.example.org")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://viewer.example.org"
    );
    let response = client()
        .get(&studies)
        .bearer_auth("viewer-secret")
        .header("Origin", "https://elsewhere.example.org")
        .send()
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
    node.stop().await;
}

/// An instance over the blob store's in-memory limit (8 MiB): STOW-RS with
/// a chunked body streamed from the file, then WADO-RS from the verified
/// file path: the instance byte for byte, its metadata, one frame.
async fn large_instance_through_stow_and_wado(backend: Backend) {
    use futures::StreamExt;
    let node = spawn_open(backend).await;
    let big = node.dir.path().join("big.dcm");
    let made =
        support::tool_async(vec!["big".into(), big.display().to_string(), "12".into()]).await;
    let uid = made[0]["sop_instance_uid"].as_str().unwrap().to_string();
    let file = tokio::fs::File::open(&big).await.unwrap();
    let head = bytes::Bytes::from_static(b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n");
    let tail = bytes::Bytes::from_static(b"\r\n--XyZ--\r\n");
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) })
        .chain(tokio_util::io::ReaderStream::new(file))
        .chain(futures::stream::once(async move { Ok(tail) }));
    let response = client()
        .post(format!("{}/studies", base(&node)))
        .header("Content-Type", MULTIPART_DICOM)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(referenced(&body), vec![uid.clone()]);
    support::assert_stored(&node.ingest, &big, &uid).await;

    let row = node.versions(&uid).await.pop().unwrap();
    let url = format!(
        "{}/studies/{}/series/{}/instances/{uid}",
        base(&node),
        row.study_instance_uid,
        row.series_instance_uid
    );
    let parts = multipart_parts(client().get(&url).send().await.unwrap()).await;
    assert_eq!(parts.len(), 1);
    let blob = node.ingest.store().get(&row.blob_hash).await.unwrap();
    assert!(
        parts[0].1 == blob[..],
        "WADO-RS bytes are not the stored blob"
    );

    let meta: Value = serde_json::from_slice(
        &client()
            .get(format!("{url}/metadata"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let frames = meta[0]["00280008"]["Value"][0].as_u64().unwrap();
    assert!(frames > 2);
    assert_eq!(
        meta[0]["7FE00010"]["BulkDataURI"],
        format!("{url}/bulkdata/7FE00010")
    );
    let parts = multipart_parts(
        client()
            .get(format!("{url}/frames/2"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let pattern: Vec<u8> = (0..=255u8).collect::<Vec<u8>>().repeat(512 * 512 * 2 / 256);
    assert!(parts[0].1 == pattern, "frame 2 is not the frame written");
    assert_eq!(parts[0].0, "application/octet-stream");
    // A single part payload holds one frame, never two (PS3.18 8.6); nor
    // is the Pixel Data of several frames one item.
    for (resource, expected) in [
        ("frames/2", 200),
        ("frames/1,2", 406),
        ("bulkdata/7FE00010", 406),
    ] {
        let response = client()
            .get(format!("{url}/{resource}"))
            .header("Accept", "application/octet-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{resource}");
        if expected == 200 {
            assert!(response.bytes().await.unwrap() == pattern, "{resource}");
        }
    }
    // One frame of it rendered (only that frame is read).
    let response = client()
        .get(format!("{url}/frames/2/rendered"))
        .header("Accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(&response.bytes().await.unwrap()[..4], b"\x89PNG");
    let response = client()
        .get(format!("{url}/frames/{}/rendered", frames + 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    node.stop().await;
}

/// A corrupt blob is never served: a 500 whose body says nothing of the
/// node's insides (the first instance of a retrieval is verified before the
/// response starts; a later one would cut the multipart body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_gives_a_generic_500() {
    let node = spawn_open(Backend::SqliteLocal).await;
    let sample = support::samples()
        .into_iter()
        .find(|s| s.transfer_syntax_uid == "1.2.840.10008.1.2.1")
        .unwrap();
    support::pynetdicom_send(&node, std::slice::from_ref(&sample.path)).await;
    let row = node.versions(&sample.sop_instance_uid).await.pop().unwrap();
    let path = node
        .config
        .data_dir
        .join("blobs")
        .join(huren::storage::BlobStore::key(&row.blob_hash).as_ref());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&path, &bytes).unwrap();

    let url = format!(
        "{}/studies/{}/series/{}/instances/{}",
        base(&node),
        row.study_instance_uid,
        row.series_instance_uid,
        row.sop_instance_uid
    );
    for resource in ["", "/frames/1", "/rendered", "/metadata"] {
        let response = client()
            .get(format!("{url}{resource}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 500, "{resource}");
        let body = response.text().await.unwrap();
        assert_eq!(body, r#"{"error":"internal error"}"#, "{resource}");
    }
    node.stop().await;
}

/// dicomweb-client's `store_instances` of data sets built in memory: pydicom
/// writes them without preamble and `DICM` (and Orthanc and dcmtk take
/// them); the node stores each as a proper Part-10 file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stow_rs_takes_data_sets_built_in_memory() {
    let node = spawn_open(Backend::SqliteLocal).await;
    let lines = dwc(&node, None, &["store-memory", "2"]).await;
    let response = &lines[0];
    assert!(
        response.get("00081198").is_none(),
        "failed parts: {response}"
    );
    assert_eq!(
        response["00081199"]["Value"].as_array().unwrap().len(),
        2,
        "{response}"
    );
    for uid in lines[1]["sop_instance_uids"].as_array().unwrap() {
        let row = node
            .versions(uid.as_str().unwrap())
            .await
            .pop()
            .expect("stored");
        let blob = node.ingest.store().get(&row.blob_hash).await.unwrap();
        assert_eq!(&blob[128..132], b"DICM", "stored as Part-10");
        assert_eq!(row.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
    }
}

/// WADO-RS with each `transfer-syntax` value a client may name (PS3.18
/// 8.7.3.5): every sample syntax, JPEG 2000 and HTJ2K, for an instance of
/// each stored syntax. The answer is exactly that syntax (the part's
/// Content-Type and its file meta say so, and its pixels decode to the
/// stored ones) when the node holds it so or can convert to it; else 406.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wado_rs_each_named_transfer_syntax_or_406() {
    let node = spawn_open(Backend::SqliteLocal).await;
    let samples = c_store_samples(&node).await;
    let mut one_per_syntax: Vec<&support::Sample> = Vec::new();
    for s in &samples {
        if !one_per_syntax
            .iter()
            .any(|o| o.transfer_syntax_uid == s.transfer_syntax_uid)
        {
            one_per_syntax.push(s);
        }
    }
    assert_eq!(one_per_syntax.len(), 9);
    let mut named: Vec<&str> = one_per_syntax
        .iter()
        .map(|s| s.transfer_syntax_uid.as_str())
        .collect();
    named.extend(["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201"]);
    let dir = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    let (mut served, mut refused) = (0, 0);
    for sample in &one_per_syntax {
        let url = format!(
            "{}/studies/{}/series/{}/instances/{}",
            base(&node),
            sample.study_instance_uid,
            series_of(sample),
            sample.sop_instance_uid
        );
        for ts in &named {
            let response = client()
                .get(&url)
                .header(
                    "Accept",
                    format!("multipart/related; type=\"application/dicom\"; transfer-syntax={ts}"),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let convertible = huren::transcode::can_convert(&sample.transfer_syntax_uid, ts);
            let what = format!(
                "{} stored as {}, asked {ts}",
                sample.path.display(),
                sample.transfer_syntax_uid
            );
            if !convertible {
                assert_eq!(status, 406, "{what}");
                refused += 1;
                continue;
            }
            assert_eq!(status, 200, "{what}");
            served += 1;
            let parts = multipart_parts(response).await;
            assert_eq!(parts.len(), 1, "{what}");
            let (ct, bytes) = &parts[0];
            assert_eq!(
                ct,
                &format!("application/dicom; transfer-syntax={ts}"),
                "{what}"
            );
            let meta = dicom_object::meta::FileMetaTable::from_reader(&bytes[128..]).unwrap();
            assert_eq!(meta.transfer_syntax().trim_end_matches('\0'), *ts, "{what}");
            let file = dir.path().join(format!("{served}.dcm"));
            std::fs::write(&file, bytes).unwrap();
            pairs.push((
                file.display().to_string(),
                sample.path.display().to_string(),
            ));
        }
    }
    // The 4 uncompressed targets for the convertible stored syntaxes (all
    // but 12-bit JPEG extended, and JPEG-LS without the `jpeg-ls`
    // feature), and each of the 5 compressed ones as itself.
    let convertible = if cfg!(feature = "jpeg-ls") { 8 } else { 7 };
    assert_eq!(
        (served, refused),
        (convertible * 4 + 5, 99 - convertible * 4 - 5)
    );
    let compared = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(support::env("HUREN_TEST_PYTHON"))
            .arg(support::repo_path("tests/support/interop_tool.py"))
            .arg("compare")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&pairs).unwrap())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(compared.len(), served);
    for v in &compared {
        assert_eq!(v["error"], Value::Null, "{v}");
        // JPEG baseline decoded by the node (jpeg-decoder) and by pydicom
        // (libjpeg) may differ by a rounding step; lossless must not.
        let tolerance =
            if v["ts"] != v["original_ts"] && v["original_ts"] == "1.2.840.10008.1.2.4.50" {
                2
            } else {
                0
            };
        let diff = v["max_diff"].as_i64();
        assert!(diff.is_some_and(|d| d <= tolerance), "pixels differ: {v}");
        if v["ts"] == v["original_ts"] {
            assert_eq!(v["bytes_equal"], true, "{v}");
        }
    }
    node.stop().await;
}

/// The Series Instance UID of a sample, from the manifest.
fn series_of(sample: &support::Sample) -> String {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(support::repo_path("sample-dicom/manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["sop_instance_uid"] == sample.sop_instance_uid.as_str())
        .unwrap()["series_instance_uid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A series retrieve answers in Instance Number order whatever order the
/// instances arrived in: a viewer or another hospital's node streaming the
/// series gets the first slice first, and a series' "middle instance"
/// (the page's thumbnail) is its middle slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_series_is_retrieved_in_instance_number_order() {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;

    let node = spawn_open(Backend::SqliteLocal).await;
    let sample = support::samples()
        .into_iter()
        .find(|s| {
            s.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
                && s.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        })
        .expect("a CT sample in Explicit VR Little Endian");
    let (study, series) = (
        "1.2.826.0.1.3680043.10.1.71",
        "1.2.826.0.1.3680043.10.1.71.1",
    );
    // Sent in this order, one STOW-RS each: rows land in arrival order.
    let numbers = [5, 3, 1, 4, 2];
    for n in numbers {
        let mut obj = dicom_object::open_file(&sample.path).unwrap();
        let sop = format!("{series}.{n}");
        for (tag, value) in [
            (tags::STUDY_INSTANCE_UID, study.to_string()),
            (tags::SERIES_INSTANCE_UID, series.to_string()),
            (tags::SOP_INSTANCE_UID, sop.clone()),
        ] {
            obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value)));
        }
        obj.put(DataElement::new(
            tags::INSTANCE_NUMBER,
            VR::IS,
            PrimitiveValue::from(n.to_string()),
        ));
        obj.meta_mut().media_storage_sop_instance_uid = sop;
        obj.meta_mut().update_information_group_length();
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).unwrap();
        let (status, body) = post_stow(&node, "/studies", multipart(&[&bytes])).await;
        assert_eq!(status, 200, "{body}");
    }
    let order: Vec<i64> = retrieve_as_stored(&node, &format!("/studies/{study}/series/{series}"))
        .await
        .iter()
        .map(|(_, bytes)| {
            let obj = dicom_object::from_reader(&bytes[128..]).unwrap();
            obj.element(tags::INSTANCE_NUMBER)
                .unwrap()
                .to_int::<i64>()
                .unwrap()
        })
        .collect();
    assert_eq!(order, [1, 2, 3, 4, 5]);
}
