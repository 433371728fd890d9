//! TLS on every port, on the binary as a process: the DICOM TLS listener
//! (PS3.15 B.9) with client certificates and the certificate-to-AE
//! binding, driven by dcmtk and pynetdicom; HTTPS on the node and the
//! registry, driven by curl and openssl; the SIGHUP reload.
//!
//! The certificates are made per test with the openssl CLI, as an operator
//! would (docs/operations.md, "TLS on every port"). The storage backends
//! play no part in TLS: these tests run on the embedded defaults.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{self, text};

const HUREN: &str = env!("CARGO_BIN_EXE_huren");

/// A test PKI in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// CA `ca` with the node's server certificate (SAN 127.0.0.1 and
    /// localhost), three client certificates (`modality-a`, `modality-b`
    /// with SAN ws8.hospital.example, `workstation-c`), and a client
    /// certificate `modality-a` from another CA, `rogue-ca`,
    /// which the node does not trust. `ca2` with `server2`: the certificate
    /// a reload switches to.
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca", "huren test CA");
        pki.ca("rogue-ca", "rogue CA");
        pki.ca("ca2", "huren test CA 2");
        pki.leaf("server", "ca", "huren-node", true);
        pki.leaf("server2", "ca2", "huren-node-2", true);
        pki.leaf("client-a", "ca", "modality-a", false);
        pki.leaf("client-b", "ca", "modality-b", false);
        pki.leaf("client-c", "ca", "workstation-c", false);
        pki.leaf("rogue", "rogue-ca", "modality-a", false);
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }

    fn ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, cn: &str, server: bool) {
        self.openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        let ext = match (server, cn) {
            (true, _) => {
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            }
            (false, "modality-b") => {
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:ws8.hospital.example\n"
            }
            (false, _) => {
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
            }
        };
        std::fs::write(self.dir.path().join(format!("{name}.ext")), ext).unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

/// `huren node` or `huren registry` running as a process, with the
/// addresses it logged.
struct Process {
    child: Child,
    addrs: Vec<(String, SocketAddr)>,
    /// Everything it logged so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    _data: tempfile::TempDir,
}

impl Process {
    fn addr(&self, marker: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(m, _)| m == marker)
            .unwrap_or_else(|| panic!("no address logged after {marker:?}"))
            .1
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and waits until it has logged an address after each
/// marker.
fn spawn(args: &[String], markers: &[&str], data: tempfile::TempDir) -> Process {
    let mut child = Command::new(HUREN)
        .args(args)
        .env("HUREN_LOG", "info")
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
    let mut addrs = Vec::new();
    let mut log = String::new();
    while addrs.len() < markers.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("huren did not log its addresses {markers:?}; log so far:\n{log}")
            });
        log.push_str(&line);
        log.push('\n');
        for marker in markers {
            if let Some(addr) = line
                .split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok())
            {
                addrs.push((marker.to_string(), addr));
            }
        }
    }
    let log = std::sync::Arc::new(std::sync::Mutex::new(log));
    std::thread::spawn({
        let log = log.clone();
        move || {
            while let Ok(line) = rx.recv() {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    Process {
        child,
        addrs,
        log,
        _data: data,
    }
}

const DICOM: &str = "DICOM listening on ";
const DICOM_TLS: &str = "DICOM TLS listening on ";
const HTTP: &str = "HTTP listening on ";
const HTTP_PLAIN: &str = "loopback plain HTTP on ";

/// A node with every TLS listener: client certificates required, chained
/// to `ca`; the calling AE title CT1 bound to the certificate of
/// `modality-a` (by CN), WS8 to that of `modality-b` (by subjectAltName).
/// DICOMweb open, so that QIDO-RS can count what arrived.
fn node_config(pki: &Pki, data: &Path, extra: &str) -> PathBuf {
    let config = format!(
        r#"ae_title = "HUREN"
data_dir = "{data}"
dicom_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
dicom_tls_listen = "127.0.0.1:0"
{extra}
[dicomweb]
open = true

[server_tls]
certificate_file = "{cert}"
private_key_file = "{key}"
client_auth = "required"
client_ca_file = "{ca}"

[server_tls.ae_binding]
CT1 = "modality-a"
WS8 = "ws8.hospital.example"
"#,
        data = data.join("data").display(),
        cert = pki.path("server.pem"),
        key = pki.path("server.key"),
        ca = pki.path("ca.pem"),
    );
    let path = data.join("huren.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn spawn_tls_node(pki: &Pki) -> Process {
    let data = tempfile::tempdir().unwrap();
    let config = node_config(pki, data.path(), "http_plain_listen = \"127.0.0.1:0\"");
    spawn(
        &[
            "node".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[DICOM, DICOM_TLS, HTTP, HTTP_PLAIN],
        data,
    )
}

/// `curl -s` printing the status code; `Err` with curl's output when the
/// transfer itself failed (TLS refused, connection reset).
fn curl(args: &[&str]) -> Result<(u16, String), String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Err(text(&out));
    }
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap();
    Ok((code.trim().parse().unwrap(), body.to_string()))
}

/// Instances the node holds, counted through QIDO-RS over HTTPS.
fn instance_count(node: &Process, pki: &Pki) -> u64 {
    let url = format!("https://{}/dicom-web/studies", node.addr(HTTP));
    let (status, body) = curl(&["--cacert", &pki.path("ca.pem"), &url]).unwrap();
    if status == 204 {
        return 0;
    }
    assert_eq!(status, 200, "{body}");
    let studies: Vec<Value> = serde_json::from_str(&body).unwrap();
    studies
        .iter()
        .map(|s| s["00201208"]["Value"][0].as_u64().unwrap())
        .sum()
}

/// A dcmtk tool over TLS with the given key and certificate, trusting `ca`.
fn dcmtk_tls(tool: &str, pki: &Pki, client: &str, ca: &str, args: &[&str]) -> Output {
    Command::new(format!("/usr/bin/{tool}"))
        .env("TCP_NODELAY", "1")
        .args([
            "+tls",
            &pki.path(&format!("{client}.key")),
            &pki.path(&format!("{client}.pem")),
            "+cf",
            &pki.path(&format!("{ca}.pem")),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run /usr/bin/{tool} (Debian package dcmtk): {e}"))
}

fn host_port(addr: SocketAddr) -> [String; 2] {
    [addr.ip().to_string(), addr.port().to_string()]
}

/// Explicit VR Little Endian samples, which storescu sends as they are.
fn explicit_samples() -> Vec<support::Sample> {
    support::samples()
        .into_iter()
        .filter(|s| s.transfer_syntax_uid == "1.2.840.10008.1.2.1")
        .collect()
}

fn storescu_tls(
    pki: &Pki,
    node: &Process,
    client: &str,
    calling: &str,
    files: &[String],
) -> Output {
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let mut args = vec!["-aet", calling, "-aec", "HUREN", &host, &port];
    args.extend(files.iter().map(String::as_str));
    dcmtk_tls("storescu", pki, client, "ca", &args)
}

#[test]
fn dicom_tls_client_certificates_and_ae_binding() {
    let pki = Pki::new();
    let node = spawn_tls_node(&pki);
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let samples = explicit_samples();
    let files: Vec<String> = samples
        .iter()
        .map(|s| s.path.display().to_string())
        .collect();
    assert!(files.len() >= 4, "too few explicit VR samples");

    // The trusted certificate of modality-a, calling as CT1, the AE title
    // bound to it.
    let echo = dcmtk_tls(
        "echoscu",
        &pki,
        "client-a",
        "ca",
        &["-aet", "CT1", "-aec", "HUREN", &host, &port],
    );
    assert!(echo.status.success(), "{}", text(&echo));
    assert_eq!(instance_count(&node, &pki), 0);

    // A certificate from a CA the node does not trust: refused in the
    // handshake, nothing stored.
    let rogue = storescu_tls(&pki, &node, "rogue", "CT1", &files);
    assert!(!rogue.status.success(), "{}", text(&rogue));
    let rogue = storescu_tls(&pki, &node, "rogue", "OTHER", &files);
    assert!(!rogue.status.success(), "{}", text(&rogue));
    assert_eq!(instance_count(&node, &pki), 0);

    // A trusted certificate, but not the one CT1 is bound to:
    // A-ASSOCIATE-RJ, nothing stored.
    let mismatch = storescu_tls(&pki, &node, "client-b", "CT1", &files);
    assert!(!mismatch.status.success(), "{}", text(&mismatch));
    assert!(
        text(&mismatch).contains("Association Rejected"),
        "{}",
        text(&mismatch)
    );
    // The certificate bound to CT1 calling as another AE title.
    let borrowed = storescu_tls(&pki, &node, "client-a", "OTHER", &files);
    assert!(!borrowed.status.success(), "{}", text(&borrowed));
    assert!(
        text(&borrowed).contains("Association Rejected"),
        "{}",
        text(&borrowed)
    );
    // CT1 without TLS, on the plain port: no certificate, rejected.
    let [plain_host, plain_port] = host_port(node.addr(DICOM));
    let mut args = vec!["-aet", "CT1", "-aec", "HUREN", &plain_host, &plain_port];
    args.extend(files.iter().map(String::as_str));
    let plain = Command::new("/usr/bin/storescu")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!plain.status.success(), "{}", text(&plain));
    assert!(
        text(&plain).contains("Association Rejected"),
        "{}",
        text(&plain)
    );
    assert_eq!(instance_count(&node, &pki), 0);

    // A trusted certificate whose identity is not bound to any AE title
    // may call as an unbound one.
    let echo = |client: &str, calling: &str| {
        dcmtk_tls(
            "echoscu",
            &pki,
            client,
            "ca",
            &["-aet", calling, "-aec", "HUREN", &host, &port],
        )
    };
    let unbound = echo("client-c", "WS7");
    assert!(unbound.status.success(), "{}", text(&unbound));
    // A binding by subjectAltName (DNS name).
    let by_san = echo("client-b", "WS8");
    assert!(by_san.status.success(), "{}", text(&by_san));
    let borrowed = echo("client-b", "WS7");
    assert!(!borrowed.status.success(), "{}", text(&borrowed));

    // The right certificate for CT1: stored, and findable over TLS.
    let store = storescu_tls(&pki, &node, "client-a", "CT1", &files);
    assert!(store.status.success(), "{}", text(&store));
    assert_eq!(instance_count(&node, &pki), files.len() as u64);
    // The retrieve URLs the node returns over its own HTTPS say https.
    let url = format!("https://{}/dicom-web/studies", node.addr(HTTP));
    let (_, body) = curl(&["--cacert", &pki.path("ca.pem"), &url]).unwrap();
    let studies: Vec<Value> = serde_json::from_str(&body).unwrap();
    let retrieve_url = studies[0]["00081190"]["Value"][0].as_str().unwrap();
    assert!(retrieve_url.starts_with("https://"), "{retrieve_url}");
    // Over HTTP/2, as curl and browsers speak HTTPS: the URLs name the
    // address asked (`:authority`, no Host header), and the answer tells
    // the browser to keep to HTTPS.
    let (_, with_headers) =
        curl(&["--http2", "-D", "-", "--cacert", &pki.path("ca.pem"), &url]).unwrap();
    let (head, body) = with_headers.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/2 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{head}"
    );
    let studies: Vec<Value> = serde_json::from_str(body).unwrap();
    let retrieve_url = studies[0]["00081190"]["Value"][0].as_str().unwrap();
    assert!(
        retrieve_url.starts_with(&format!("https://{}/dicom-web/studies/", node.addr(HTTP))),
        "{retrieve_url}"
    );
    let study = &samples[0].study_instance_uid;
    let find = dcmtk_tls(
        "findscu",
        &pki,
        "client-a",
        "ca",
        &[
            "-v",
            "-S",
            "-aet",
            "CT1",
            "-aec",
            "HUREN",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            &format!("StudyInstanceUID={study}"),
            "-k",
            "NumberOfStudyRelatedInstances",
            &host,
            &port,
        ],
    );
    assert!(find.status.success(), "{}", text(&find));
    assert!(text(&find).contains(study.as_str()), "{}", text(&find));

    // The retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA, TLS 1.0 and
    // up) is outside BCP 195: refused.
    let aes = dcmtk_tls(
        "echoscu",
        &pki,
        "client-a",
        "ca",
        &["+pa", "-aet", "CT1", "-aec", "HUREN", &host, &port],
    );
    assert!(!aes.status.success(), "{}", text(&aes));
    // TLS 1.1 and 1.0 are refused; TLS 1.2 (and 1.3) are served. Security
    // level 0 lets OpenSSL 3 offer the old versions at all.
    for (version, served) in [
        ("-tls1", false),
        ("-tls1_1", false),
        ("-tls1_2", true),
        ("-tls1_3", true),
    ] {
        let out = Command::new("openssl")
            .args([
                "s_client",
                version,
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-connect",
                &format!("{host}:{port}"),
                "-CAfile",
                &pki.path("ca.pem"),
                "-cert",
                &pki.path("client-a.pem"),
                "-key",
                &pki.path("client-a.key"),
                "-verify_return_error",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let log = text(&out);
        let negotiated = log.contains("New, TLSv1.2, Cipher is ECDHE-")
            || log.contains("New, TLSv1.3, Cipher is TLS_");
        // A refusal comes from the node (an alert), not from OpenSSL
        // declining to offer the version.
        assert!(
            served || log.contains("alert"),
            "openssl s_client {version}:\n{log}"
        );
        assert_eq!(negotiated, served, "openssl s_client {version}:\n{log}");
    }
    assert_eq!(instance_count(&node, &pki), files.len() as u64);
}

#[test]
fn https_on_node_and_registry() {
    let pki = Pki::new();
    let node = spawn_tls_node(&pki);
    let ca = pki.path("ca.pem");

    let https = format!("https://{}/health", node.addr(HTTP));
    let (status, body) = curl(&["--cacert", &ca, &https]).unwrap();
    assert_eq!(status, 200, "{body}");
    // A client that does not trust the node's CA refuses it.
    assert!(curl(&[&https]).is_err());
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain_to_tls = curl(&[&format!("http://{}/health", node.addr(HTTP))]);
    assert!(plain_to_tls.is_err(), "{plain_to_tls:?}");
    // The loopback plain listener answers.
    let (status, _) = curl(&[&format!("http://{}/health", node.addr(HTTP_PLAIN))]).unwrap();
    assert_eq!(status, 200);
    drop(node);

    // Plain HTTP on a non-loopback address is refused at startup.
    let data = tempfile::tempdir().unwrap();
    let config = node_config(&pki, data.path(), "http_plain_listen = \"0.0.0.0:0\"");
    let out = Command::new(HUREN)
        .args(["node", "--config", &config.display().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("loopback"), "{}", text(&out));

    let registry_args = |data: &Path, plain: &str| -> Vec<String> {
        [
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--tls-certificate-file",
            &pki.path("server.pem"),
            "--tls-private-key-file",
            &pki.path("server.key"),
            "--plain-listen",
            plain,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let data = tempfile::tempdir().unwrap();
    let args = registry_args(data.path(), "127.0.0.1:0");
    let registry = spawn(
        &args,
        &[
            "registry HTTP listening on ",
            "registry loopback plain HTTP on ",
        ],
        data,
    );
    let https = format!(
        "https://{}/health",
        registry.addr("registry HTTP listening on ")
    );
    let (status, body) = curl(&["--cacert", &ca, &https]).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(curl(&[&https]).is_err());
    let plain_to_tls = curl(&[&format!(
        "http://{}/health",
        registry.addr("registry HTTP listening on ")
    )]);
    assert!(plain_to_tls.is_err(), "{plain_to_tls:?}");
    let plain = format!(
        "http://{}/health",
        registry.addr("registry loopback plain HTTP on ")
    );
    assert_eq!(curl(&[&plain]).unwrap().0, 200);
    drop(registry);

    let data = tempfile::tempdir().unwrap();
    let out = Command::new(HUREN)
        .args(registry_args(data.path(), "0.0.0.0:0"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("loopback"), "{}", text(&out));
}

/// Polls until `check` holds, failing after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tls_store.py on the node's DICOM TLS port as CT1: one association,
/// paused after its first C-STORE (asserted successful) until a line is
/// written to its stdin; its remaining JSON lines.
fn paused_sender(
    pki: &Pki,
    node: &Process,
    files: &[String],
) -> (Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let mut sender = Command::new(support::env("HUREN_TEST_PYTHON"))
        .arg(support::repo_path("tests/support/tls_store.py"))
        .args([
            host,
            port,
            pki.path("ca.pem"),
            pki.path("client-a.pem"),
            pki.path("client-a.key"),
            "CT1".into(),
        ])
        .args(files)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tls_store.py");
    let mut lines = BufReader::new(sender.stdout.take().unwrap()).lines();
    let first: Value =
        serde_json::from_str(&lines.next().expect("first C-STORE").unwrap()).unwrap();
    assert_eq!(first["status"], 0, "{first}");
    (sender, lines)
}

/// The association limit holds on the TLS listener: with one association
/// open, the next caller gets A-ASSOCIATE-RJ (transient, local limit
/// exceeded) inside TLS.
#[test]
fn tls_listener_keeps_the_association_limit() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let config = node_config(&pki, data.path(), "max_associations = 1");
    let node = spawn(
        &[
            "node".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[DICOM_TLS, HTTP],
        data,
    );
    let files: Vec<String> = explicit_samples()
        .iter()
        .take(2)
        .map(|s| s.path.display().to_string())
        .collect();
    let (mut sender, lines) = paused_sender(&pki, &node, &files);
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let args = ["-aet", "CT1", "-aec", "HUREN", &host, &port];
    let echo = dcmtk_tls("echoscu", &pki, "client-a", "ca", &args);
    let log = text(&echo);
    assert!(!echo.status.success(), "{log}");
    assert!(log.contains("Rejected Transient"), "{log}");
    assert!(log.contains("Reason: Local Limit Exceeded"), "{log}");

    writeln!(sender.stdin.take().unwrap(), "go").unwrap();
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(sender.wait().unwrap().success());
    assert_eq!(rest.last().unwrap()["released"], true, "{rest:?}");
    // The permit is back: the next association is served.
    wait_for(
        "the association limit to free up",
        Duration::from_secs(10),
        || {
            dcmtk_tls("echoscu", &pki, "client-a", "ca", &args)
                .status
                .success()
        },
    );
}

#[test]
fn sighup_reloads_certificates_and_keeps_associations() {
    let pki = Pki::new();
    let node = spawn_tls_node(&pki);
    let files: Vec<String> = explicit_samples()
        .iter()
        .map(|s| s.path.display().to_string())
        .collect();

    // An association over TLS that stores one instance, then pauses.
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let (mut sender, lines) = paused_sender(&pki, &node, &files);

    let https = format!("https://{}/health", node.addr(HTTP));
    let trusts_new = || curl(&["--cacert", &pki.path("ca2.pem"), &https]).is_ok();
    assert!(
        !trusts_new(),
        "the new certificate is served before the reload"
    );
    let echo_new = || {
        dcmtk_tls(
            "echoscu",
            &pki,
            "client-a",
            "ca2",
            &["-aet", "CT1", "-aec", "HUREN", &host, &port],
        )
        .status
        .success()
    };
    assert!(!echo_new());

    // Replace the files as an operator's renewal would (each by a rename),
    // then SIGHUP.
    for ext in ["pem", "key"] {
        let staged = pki.dir.path().join(format!("server.{ext}.new"));
        std::fs::copy(pki.dir.path().join(format!("server2.{ext}")), &staged).unwrap();
        std::fs::rename(&staged, pki.dir.path().join(format!("server.{ext}"))).unwrap();
    }
    node.signal("-HUP");
    wait_for(
        "HTTPS to serve the new certificate",
        Duration::from_secs(30),
        trusts_new,
    );
    assert!(
        echo_new(),
        "the DICOM TLS listener serves the new certificate"
    );
    // The old CA no longer verifies new connections.
    assert!(curl(&["--cacert", &pki.path("ca.pem"), &https]).is_err());

    // The association opened before the reload carries on.
    let mut stdin = sender.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    drop(stdin);
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = sender.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut sender.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "tls_store.py: {stderr}");
    assert_eq!(rest.len(), files.len(), "{rest:?}");
    for line in &rest[..files.len() - 1] {
        assert_eq!(line["status"], 0, "{line}");
    }
    assert_eq!(rest.last().unwrap()["released"], true);

    let url = format!("https://{}/dicom-web/studies", node.addr(HTTP));
    let (status, body) = curl(&["--cacert", &pki.path("ca2.pem"), &url]).unwrap();
    assert_eq!(status, 200, "{body}");
    let studies: Vec<Value> = serde_json::from_str(&body).unwrap();
    let stored: u64 = studies
        .iter()
        .map(|s| s["00201208"]["Value"][0].as_u64().unwrap())
        .sum();
    assert_eq!(stored, files.len() as u64);
}

/// A registry over HTTPS with a certificate from the region's CA: a node
/// whose `tls_ca_file` names that CA pulls the hospital directory; a node
/// without it refuses the registry's certificate.
#[test]
fn node_reaches_a_registry_over_https_with_the_configured_ca() {
    let pki = Pki::new();
    let registry_data = tempfile::tempdir().unwrap();
    let registry_dir = registry_data.path().display().to_string();
    let token_file = registry_data.path().join("h1.token");
    let out = Command::new(HUREN)
        .args(["registry", "hospital", "add", "--data-dir", &registry_dir])
        .args(["--id", "H1", "--name", "Hospital One", "--level", "3A"])
        .arg("--token-file")
        .arg(&token_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let registry = spawn(
        &[
            "registry".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            registry_dir,
            "--tls-certificate-file".into(),
            pki.path("server.pem"),
            "--tls-private-key-file".into(),
            pki.path("server.key"),
        ],
        &["registry HTTP listening on "],
        registry_data,
    );
    let registry_url = format!(
        "https://localhost:{}",
        registry.addr("registry HTTP listening on ").port()
    );

    let region_node = |ca: Option<&str>| {
        let data = tempfile::tempdir().unwrap();
        let secret = data.path().join("region-secret");
        std::fs::write(&secret, "region-secret-for-the-tls-tests-0001").unwrap();
        let ca = ca
            .map(|ca| format!("tls_ca_file = \"{ca}\"\n"))
            .unwrap_or_default();
        let config = format!(
            r#"data_dir = "{data}"
dicom_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
{ca}
[dicomweb]
open = true

[[dicomweb.tokens]]
name = "operator"
sha256 = "{operator}"
scopes = ["read", "write"]

[region]
registry_url = "{registry_url}"
hospital_id = "H1"
registry_token_file = "{token}"
region_secret_file = "{secret}"
directory_interval_secs = 0.2
"#,
            data = data.path().join("data").display(),
            token = token_file.display(),
            secret = secret.display(),
            operator = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                crate::support::NODE_API_TOKEN.as_bytes()
            )),
        );
        let path = data.path().join("huren.toml");
        std::fs::write(&path, config).unwrap();
        spawn(
            &["node".into(), "--config".into(), path.display().to_string()],
            &[HTTP],
            data,
        )
    };
    let publication = |node: &Process| -> Value {
        let url = format!("http://{}/api/v1/publication", node.addr(HTTP));
        let bearer = format!("Authorization: Bearer {}", crate::support::NODE_API_TOKEN);
        let (status, body) = curl(&["-H", &bearer, &url]).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };

    let trusting = region_node(Some(&pki.path("ca.pem")));
    wait_for(
        "the directory pulled over HTTPS",
        Duration::from_secs(30),
        || publication(&trusting)["hospitals_in_directory"] == 1,
    );

    let untrusting = region_node(None);
    wait_for(
        "the registry's certificate refused",
        Duration::from_secs(30),
        || {
            untrusting.log().lines().any(|l| {
                l.contains("cannot pull the hospital directory") && l.contains("UnknownIssuer")
            })
        },
    );
    assert_eq!(publication(&untrusting)["hospitals_in_directory"], 0);
}

/// `client_auth = "optional"`: a caller without a certificate is admitted
/// under an unbound AE title, but not under a bound one; a certificate that
/// does not chain to the CA still fails the handshake.
#[test]
fn optional_client_authentication() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let config = node_config(&pki, data.path(), "");
    let text_config = std::fs::read_to_string(&config)
        .unwrap()
        .replace("client_auth = \"required\"", "client_auth = \"optional\"");
    std::fs::write(&config, text_config).unwrap();
    let node = spawn(
        &[
            "node".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &[DICOM_TLS, HTTP],
        data,
    );
    let [host, port] = host_port(node.addr(DICOM_TLS));
    let anonymous = |calling: &str| {
        Command::new("/usr/bin/echoscu")
            .args(["+tla", "+cf", &pki.path("ca.pem")])
            .args(["-aet", calling, "-aec", "HUREN", &host, &port])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let ws = anonymous("WS7");
    assert!(ws.status.success(), "{}", text(&ws));
    let ct1 = anonymous("CT1");
    assert!(!ct1.status.success(), "{}", text(&ct1));
    assert!(
        text(&ct1).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&ct1)
    );
    let args = ["-aet", "WS7", "-aec", "HUREN", &host, &port];
    let rogue = dcmtk_tls("echoscu", &pki, "rogue", "ca", &args);
    assert!(!rogue.status.success(), "{}", text(&rogue));
    let trusted = dcmtk_tls(
        "echoscu",
        &pki,
        "client-a",
        "ca",
        &["-aet", "CT1", "-aec", "HUREN", &host, &port],
    );
    assert!(trusted.status.success(), "{}", text(&trusted));
}
