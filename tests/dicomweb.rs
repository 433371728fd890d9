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

on_both_backends!(stow_rs_then_qido_and_findscu);

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

#[allow(dead_code)]
fn paths(samples: &[&support::Sample]) -> Vec<PathBuf> {
    samples.iter().map(|s| s.path.clone()).collect()
}
