//! DICOM audit messages (PS3.15 A.5) as a hospital's auditors receive them:
//! a node driven by real clients (dcmtk's storescu, findscu, movescu to
//! storescp, echoscu from an unknown AE; HTTP for QIDO-RS, WADO-RS and the
//! doctor's page) writes its audit log; every message must validate
//! against the standard's schema (tests/support/audit-message.rnc) with
//! jing, and say who did what to which patient. A syslog collector over
//! TLS (rustls in the test) receives the same messages as RFC 5424 in
//! RFC 5425 octet-counted frames, including those queued while it was
//! down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex as _;
use sha2::Digest;

use crate::query_retrieve::StoreScp;
use crate::region::{ADMIN_TOKEN, Api, spawn_region_node, spawn_registry, wait_until};
use crate::support::{self, Backend, repo_path};

const TOKEN: &str = "audit-test-read-token-0123456789";
const WRITE_TOKEN: &str = "audit-test-write-token-012345678";
const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

support::on_both_backends!(dicom_and_dicomweb_are_audited);

// ------------------------------------------------------------------ XML

/// An element of a parsed message: enough of a tree to ask questions.
#[derive(Debug, Clone, Default)]
pub struct Element {
    pub name: String,
    pub attrs: BTreeMap<String, String>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> &str {
        self.attrs.get(name).map(String::as_str).unwrap_or("")
    }

    pub fn all(&self, name: &str) -> Vec<&Element> {
        self.children.iter().filter(|c| c.name == name).collect()
    }

    pub fn one(&self, name: &str) -> &Element {
        let all = self.all(name);
        assert_eq!(all.len(), 1, "one {name} in {self:#?}");
        all[0]
    }

    pub fn event_id(&self) -> &str {
        self.one("EventIdentification")
            .one("EventID")
            .attr("csd-code")
    }

    pub fn outcome(&self) -> &str {
        self.one("EventIdentification")
            .attr("EventOutcomeIndicator")
    }

    pub fn action(&self) -> &str {
        self.one("EventIdentification").attr("EventActionCode")
    }

    pub fn event_types(&self) -> Vec<&str> {
        self.one("EventIdentification")
            .all("EventTypeCode")
            .iter()
            .map(|e| e.attr("csd-code"))
            .collect()
    }

    /// The active participant with this UserID.
    pub fn participant(&self, user_id: &str) -> &Element {
        self.all("ActiveParticipant")
            .into_iter()
            .find(|p| p.attr("UserID") == user_id)
            .unwrap_or_else(|| panic!("no participant {user_id} in {self:#?}"))
    }

    /// The participant objects of this ParticipantObjectTypeCodeRole.
    pub fn objects(&self, role: &str) -> Vec<&Element> {
        self.all("ParticipantObjectIdentification")
            .into_iter()
            .filter(|o| o.attr("ParticipantObjectTypeCodeRole") == role)
            .collect()
    }
}

pub fn parse(xml: &str) -> Element {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Element> = vec![Element::default()];
    let open = |e: &quick_xml::events::BytesStart| Element {
        name: String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
        attrs: e
            .attributes()
            .map(|a| {
                let a = a.unwrap();
                (
                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                    a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .unwrap()
                        .into_owned(),
                )
            })
            .collect(),
        ..Element::default()
    };
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) => stack.push(open(&e)),
            Event::Empty(e) => {
                let el = open(&e);
                stack.last_mut().unwrap().children.push(el);
            }
            Event::End(_) => {
                let el = stack.pop().unwrap();
                stack.last_mut().unwrap().children.push(el);
            }
            Event::Text(t) => stack.last_mut().unwrap().text += &t.decode().unwrap(),
            Event::GeneralRef(r) => {
                let name = r.decode().unwrap();
                let c = match name.as_ref() {
                    "lt" => "<".to_string(),
                    "gt" => ">".to_string(),
                    "amp" => "&".to_string(),
                    "quot" => "\"".to_string(),
                    "apos" => "'".to_string(),
                    other => panic!("entity {other} in {xml}"),
                };
                stack.last_mut().unwrap().text += &c;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut root = stack.pop().unwrap();
    assert_eq!(root.children.len(), 1, "one root element: {xml}");
    root.children.pop().unwrap()
}

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap_or_else(|e| panic!("base64 {text:?}: {e}"))
}

// ------------------------------------------------------------------ log

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The messages of the log, parsed.
fn messages(path: &Path) -> Vec<Element> {
    lines(path).iter().map(|l| parse(l)).collect()
}

/// Waits until the log has a message `pick` accepts; returns it.
async fn expect(path: &Path, what: &str, pick: impl Fn(&Element) -> bool) -> Element {
    let mut found = None;
    wait_until(what, || {
        let hit = messages(path).into_iter().find(|m| pick(m));
        let done = hit.is_some();
        found = hit;
        async move { done }
    })
    .await;
    found.unwrap()
}

/// Validates every line as its own document with jing against the
/// standard's schema.
pub fn validate_all(lines: &[String]) {
    assert!(!lines.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = lines
        .iter()
        .enumerate()
        .map(|(n, l)| {
            let f = dir.path().join(format!("{n:04}.xml"));
            std::fs::write(&f, l).unwrap();
            f
        })
        .collect();
    let out = Command::new("jing")
        .arg("-c")
        .arg(repo_path("tests/support/audit-message.rnc"))
        .args(&files)
        .stdin(Stdio::null())
        .output()
        .expect("run jing (Debian package jing; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "messages not valid against PS3.15 A.5.1:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The schema check must be able to fail.
#[test]
fn jing_rejects_an_invalid_message() {
    let bad = "<AuditMessage><EventIdentification EventActionCode=\"X\" \
               EventDateTime=\"yesterday\" EventOutcomeIndicator=\"0\"/></AuditMessage>";
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.xml");
    std::fs::write(&f, bad).unwrap();
    let out = Command::new("jing")
        .arg("-c")
        .arg(repo_path("tests/support/audit-message.rnc"))
        .arg(&f)
        .output()
        .expect("run jing");
    assert!(!out.status.success());
}

// ------------------------------------------------------------------ DICOM + DICOMweb

fn dcmtk(tool: &str, args: &[String]) -> String {
    let out = Command::new(format!("/usr/bin/{tool}"))
        .args(args)
        .env("TCP_NODELAY", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    support::text(&out)
}

async fn dicom_and_dicomweb_are_audited(backend: Backend) {
    let scp = StoreScp::start("DEST", false);
    let token_sha = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
    let node = support::spawn_node_with(backend, |c| {
        c.remote_aes.push(scp.remote_ae("DEST"));
        c.allowed_calling_ae_titles = ["STORESCU", "FINDSCU", "MOVESCU"]
            .iter()
            .map(|a| huren::config::AllowedPeer::parse(a).unwrap())
            .collect();
        c.dicomweb.tokens.push(huren::config::TokenConfig {
            name: "viewer".into(),
            sha256: token_sha,
            scopes: vec![huren::config::Scope::Read],
        });
        c.dicomweb.tokens.push(huren::config::TokenConfig {
            name: "modality".into(),
            sha256: hex::encode(sha2::Sha256::digest(WRITE_TOKEN.as_bytes())),
            scopes: vec![huren::config::Scope::Read, huren::config::Scope::Write],
        });
    })
    .await;
    let log = node.config.data_dir.join("audit.log");
    let started = expect(&log, "Application Start", |m| {
        m.event_id() == "110100" && m.event_types() == ["110120"]
    })
    .await;
    assert_eq!(started.action(), "E");
    assert_eq!(
        started.participant("HUREN").attr("AlternativeUserID"),
        "AETITLES=HUREN"
    );

    // C-STORE: one association, one study → one Instances Transferred.
    let samples: Vec<_> = support::samples()
        .into_iter()
        .filter(|s| {
            s.path.to_string_lossy().contains("p1-ct-chest-2024")
                && s.transfer_syntax_uid == "1.2.840.10008.1.2.1"
        })
        .collect();
    let study = samples[0].study_instance_uid.clone();
    let files: Vec<String> = samples
        .iter()
        .map(|s| s.path.display().to_string())
        .collect();
    let out = support::storescu(node.dicom_addr, vec![], files.clone()).await;
    assert!(out.status.success(), "{}", support::text(&out));
    let stored = expect(
        &log,
        "Instances Transferred for the C-STORE association",
        |m| m.event_id() == "110104" && m.action() == "C",
    )
    .await;
    let received: Vec<Element> = messages(&log)
        .into_iter()
        .filter(|m| m.event_id() == "110104")
        .collect();
    assert_eq!(
        received.len(),
        1,
        "one message per association: {received:#?}"
    );
    assert_eq!(stored.outcome(), "0");
    let caller = stored.participant("STORESCU");
    assert_eq!(caller.attr("UserIsRequestor"), "true");
    assert_eq!(caller.attr("AlternativeUserID"), "AETITLES=STORESCU");
    assert_eq!(caller.attr("NetworkAccessPointID"), "127.0.0.1");
    assert_eq!(caller.one("RoleIDCode").attr("csd-code"), "110153");
    assert_eq!(
        stored
            .participant("HUREN")
            .one("RoleIDCode")
            .attr("csd-code"),
        "110152"
    );
    let studies = stored.objects("3");
    assert_eq!(studies.len(), 1);
    assert_eq!(studies[0].attr("ParticipantObjectID"), study);
    let classes = studies[0]
        .one("ParticipantObjectDescription")
        .all("SOPClass");
    let counted: u64 = classes
        .iter()
        .map(|c| c.attr("NumberOfInstances").parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted as usize, samples.len());
    assert!(
        classes
            .iter()
            .any(|c| c.attr("UID") == samples[0].sop_class_uid)
    );
    let patient = stored.objects("1");
    assert_eq!(patient[0].attr("ParticipantObjectID"), "HUR-100001");
    assert_eq!(
        patient[0].one("ParticipantObjectName").text,
        "Zhang^San=张^三"
    );

    // C-FIND: Query with the identifier as sent.
    let out = dcmtk(
        "findscu",
        &[
            "-S".into(),
            "-aec".into(),
            "HUREN".into(),
            node.host(),
            node.port().to_string(),
            "-k".into(),
            "QueryRetrieveLevel=STUDY".into(),
            "-k".into(),
            "PatientID=HUR-100001".into(),
            "-k".into(),
            "StudyInstanceUID".into(),
        ],
    );
    let query = expect(&log, "Query for the C-FIND", |m| {
        m.event_id() == "110112"
            && !m.objects("3").is_empty()
            && m.objects("3")[0].attr("ParticipantObjectID") == STUDY_ROOT_FIND
    })
    .await;
    assert_eq!(query.outcome(), "0", "{out}");
    assert_eq!(query.participant("FINDSCU").attr("UserIsRequestor"), "true");
    let sop = query.objects("3")[0];
    let ts = sop
        .all("ParticipantObjectDetail")
        .into_iter()
        .find(|d| d.attr("type") == "TransferSyntax")
        .map(|d| String::from_utf8(b64(d.attr("value"))).unwrap())
        .expect("TransferSyntax detail");
    let identifier = b64(&sop.one("ParticipantObjectQuery").text);
    let decoded = dicom_object::InMemDicomObject::read_dataset_with_ts(
        identifier.as_slice(),
        dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(ts.trim_end_matches('\0'))
            .expect("a known transfer syntax"),
    )
    .unwrap();
    let text = |tag| {
        decoded
            .element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(text(tags::PATIENT_ID), "HUR-100001");
    assert_eq!(text(tags::QUERY_RETRIEVE_LEVEL), "STUDY");

    // C-MOVE: Begin Transferring, then Instances Transferred.
    let out = dcmtk(
        "movescu",
        &[
            "-S".into(),
            "-aec".into(),
            "HUREN".into(),
            "-aem".into(),
            "DEST".into(),
            node.host(),
            node.port().to_string(),
            "-k".into(),
            "QueryRetrieveLevel=STUDY".into(),
            "-k".into(),
            format!("StudyInstanceUID={study}"),
        ],
    );
    let begin = expect(&log, "Begin Transferring for the C-MOVE", |m| {
        m.event_id() == "110102"
    })
    .await;
    let moved = expect(&log, "Instances Transferred for the C-MOVE", |m| {
        m.event_id() == "110104" && m.action() == "R"
    })
    .await;
    assert_eq!(moved.outcome(), "0", "{out}");
    for m in [&begin, &moved] {
        assert_eq!(
            m.participant("DEST").one("RoleIDCode").attr("csd-code"),
            "110152"
        );
        assert_eq!(
            m.participant("HUREN").one("RoleIDCode").attr("csd-code"),
            "110153"
        );
        assert_eq!(m.participant("MOVESCU").attr("UserIsRequestor"), "true");
        assert_eq!(m.objects("3")[0].attr("ParticipantObjectID"), study);
        assert_eq!(m.objects("1")[0].attr("ParticipantObjectID"), "HUR-100001");
    }
    assert_eq!(scp.received().len(), samples.len());

    // QIDO-RS and WADO-RS with the viewer's token; one request without.
    let http = reqwest::Client::new();
    let base = format!("http://{}/dicom-web", node.http_addr);
    let r = http
        .get(format!("{base}/studies?PatientID=HUR-100001"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let qido = expect(&log, "Query for QIDO-RS", |m| {
        m.event_id() == "110112"
            && m.objects("3")
                .first()
                .is_some_and(|o| o.attr("ParticipantObjectID") == "/dicom-web/studies")
    })
    .await;
    assert_eq!(
        b64(&qido.objects("3")[0].one("ParticipantObjectQuery").text),
        b"PatientID=HUR-100001"
    );
    assert_eq!(
        qido.participant("token:viewer").attr("UserIsRequestor"),
        "true"
    );
    let r = http
        .get(format!("{base}/studies/{study}"))
        .bearer_auth(TOKEN)
        .header("accept", "multipart/related; type=\"application/dicom\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let wado = expect(&log, "Instances Transferred for WADO-RS", |m| {
        m.event_id() == "110104"
            && m.all("ActiveParticipant")
                .iter()
                .any(|p| p.attr("UserID") == "token:viewer")
    })
    .await;
    assert_eq!(wado.action(), "R");
    assert_eq!(wado.objects("3")[0].attr("ParticipantObjectID"), study);
    assert_eq!(
        wado.objects("1")[0].attr("ParticipantObjectID"),
        "HUR-100001"
    );
    let r = http
        .get(format!("{base}/studies"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let alert = expect(&log, "Security Alert for the bad token", |m| {
        m.event_id() == "110113"
            && m.event_types() == ["110126"]
            && m.objects("13")
                .first()
                .is_some_and(|o| o.attr("ParticipantObjectID") == "/dicom-web/studies")
    })
    .await;
    assert_eq!(alert.outcome(), "4");
    assert_eq!(
        alert.participant("anonymous").attr("UserIsRequestor"),
        "false"
    );

    // STOW-RS: the viewer's token may not store (403, Security Alert); the
    // modality's stores another patient's instance (Instances Transferred).
    let knee = support::samples()
        .into_iter()
        .find(|s| s.path.to_string_lossy().contains("p2-mr-knee-2025"))
        .unwrap();
    let mut body = b"--audit\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend(std::fs::read(&knee.path).unwrap());
    body.extend(b"\r\n--audit--\r\n");
    let stow = |token: &'static str| {
        http.post(format!("{base}/studies"))
            .bearer_auth(token)
            .header(
                "content-type",
                "multipart/related; type=\"application/dicom\"; boundary=audit",
            )
            .body(body.clone())
            .send()
    };
    assert_eq!(stow(TOKEN).await.unwrap().status(), 403);
    let restricted = expect(&log, "Security Alert for the missing scope", |m| {
        m.event_id() == "110113" && m.event_types() == ["110132"]
    })
    .await;
    assert_eq!(
        restricted
            .participant("token:viewer")
            .attr("UserIsRequestor"),
        "false"
    );
    assert_eq!(stow(WRITE_TOKEN).await.unwrap().status(), 200);
    let stowed = expect(&log, "Instances Transferred for STOW-RS", |m| {
        m.event_id() == "110104"
            && m.all("ActiveParticipant")
                .iter()
                .any(|p| p.attr("UserID") == "token:modality")
    })
    .await;
    assert_eq!(stowed.action(), "C");
    assert_eq!(
        stowed.objects("1")[0].attr("ParticipantObjectID"),
        "HUR-100002"
    );
    assert_eq!(
        stowed.objects("3")[0].attr("ParticipantObjectID"),
        knee.study_instance_uid
    );

    // An AE title the node does not know: A-ASSOCIATE-RJ and a Security Alert.
    let out = support::echoscu(node.dicom_addr, &["-aet", "INTRUDER", "-aec", "HUREN"]).await;
    assert!(!out.status.success());
    let refused = expect(&log, "Security Alert for the refused association", |m| {
        m.event_id() == "110113"
            && m.all("ActiveParticipant")
                .iter()
                .any(|p| p.attr("UserID") == "INTRUDER")
    })
    .await;
    assert_eq!(refused.outcome(), "4");
    assert_eq!(refused.event_types(), ["110126"]);
    let subject = refused.objects("13")[0];
    assert_eq!(subject.attr("ParticipantObjectID"), "127.0.0.1");
    let description = subject
        .all("ParticipantObjectDetail")
        .into_iter()
        .find(|d| d.attr("type") == "Alert Description")
        .map(|d| String::from_utf8(b64(d.attr("value"))).unwrap())
        .unwrap();
    assert!(
        description.contains("CallingAETitleNotRecognized"),
        "{description}"
    );

    // An operator deletes the study through the API: DICOM Study Deleted
    // (A.5.3.8), D, naming the token, the study with its SOP classes, the
    // patient and the reason.
    let deleted = http
        .delete(format!("http://{}/api/v1/studies/{study}", node.http_addr))
        .bearer_auth(WRITE_TOKEN)
        .json(&serde_json::json!({"reason": "sent to the wrong patient"}))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200, "{:?}", deleted.text().await);
    let gone = expect(&log, "Study Deleted", |m| m.event_id() == "110105").await;
    assert_eq!(gone.action(), "D");
    assert_eq!(gone.participant("modality").attr("UserIsRequestor"), "true");
    let studies = gone.objects("3");
    assert_eq!(studies.len(), 1);
    assert_eq!(studies[0].attr("ParticipantObjectID"), study);
    let reason = studies[0]
        .all("ParticipantObjectDetail")
        .into_iter()
        .find(|d| d.attr("type") == "Reason")
        .map(|d| String::from_utf8(b64(d.attr("value"))).unwrap())
        .unwrap();
    assert_eq!(reason, "sent to the wrong patient");
    assert_eq!(
        gone.objects("1")[0].attr("ParticipantObjectID"),
        "HUR-100001"
    );

    // Stop: Application Stop; every message valid; the file survives a
    // restart with its earlier lines intact.
    let config = node.config.clone();
    let dir = node.stop().await;
    let before = lines(&log);
    assert!(
        messages(&log)
            .iter()
            .any(|m| m.event_id() == "110100" && m.event_types() == ["110121"])
    );
    validate_all(&before);
    let node = support::start_node(config, dir).await;
    let after = expect(&log, "a second Application Start", |m| {
        m.event_types() == ["110120"] && lines(&log).len() > before.len()
    })
    .await;
    assert_eq!(after.event_id(), "110100");
    let now = lines(&log);
    assert_eq!(&now[..before.len()], &before[..], "earlier records kept");
    let _dir = node.stop().await;
    validate_all(&lines(&log));
}

// ------------------------------------------------------------------ page

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_sign_in_is_audited() {
    let backend = Backend::SqliteLocal;
    let registry = spawn_registry(backend).await;
    let admin = Api::new(&registry.url(), Some(ADMIN_TOKEN));
    let (status, v) = admin
        .call(
            "POST",
            "/v1/hospitals",
            Some(serde_json::json!({"hospital_id": "HOSPA0000000000001", "name": "审计医院", "level": "三级甲等"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let node = spawn_region_node(backend, &registry.url(), "HOSPA0000000000001", &token).await;
    huren::http::page::add_user(
        node.ingest.index(),
        "dr.li",
        "李医生",
        "correct-horse-battery",
    )
    .await
    .unwrap();
    let log = node.config.data_dir.join("audit.log");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://{}", node.http_addr);

    let (status, session, _, _) =
        crate::page::sign_in(&http, &base, "dr.li", "wrong-password").await;
    assert_eq!((status, session), (401, None));
    let failed = expect(&log, "User Authentication for the failed sign-in", |m| {
        m.event_id() == "110114" && m.outcome() == "4"
    })
    .await;
    assert_eq!(failed.event_types(), ["110122"]);
    let person = failed.participant("dr.li");
    assert_eq!(person.attr("UserIsRequestor"), "true");
    assert_eq!(person.attr("NetworkAccessPointID"), "127.0.0.1");

    let (status, session, _, _) =
        crate::page::sign_in(&http, &base, "dr.li", "correct-horse-battery").await;
    assert_eq!(status, 303);
    assert!(session.is_some());
    let ok = expect(&log, "User Authentication for the sign-in", |m| {
        m.event_id() == "110114" && m.outcome() == "0"
    })
    .await;
    assert_eq!(ok.participant("dr.li").attr("UserIsRequestor"), "true");
    let _dir = node.stop().await;
    registry.stop().await;
    validate_all(&lines(&log));
}

// ------------------------------------------------------------------ syslog

/// A syslog collector over TLS: a self-signed certificate for localhost
/// (openssl), rustls, RFC 5425 octet-counted frames.
struct Collector {
    frames: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A CA and a certificate it issued for localhost (webpki will not take a
/// self-signed CA certificate as the server's own). Returns (CA, chain,
/// key).
fn certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "{}", support::text(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "2",
                "-subj",
                "/CN=huren test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "collector.key",
                "-out",
                "collector.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "collector.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "collector.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("collector.pem"),
        dir.join("collector.key"),
    )
}

impl Collector {
    async fn start(listener: tokio::net::TcpListener, cert: &Path, key: &Path) -> Collector {
        use rustls::pki_types::pem::PemObject;
        use tokio::io::AsyncReadExt;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let frames = frames.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    let frames = frames.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 8192];
                        loop {
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            // MSG-LEN SP SYSLOG-MSG, as many as are complete.
                            while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                                let len: usize = std::str::from_utf8(&buf[..sp])
                                    .unwrap()
                                    .parse()
                                    .expect("octet count");
                                if buf.len() < sp + 1 + len {
                                    break;
                                }
                                let msg =
                                    String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                                buf.drain(..sp + 1 + len);
                                frames.lock().unwrap().push(msg);
                            }
                        }
                    });
                }
            }
        });
        Collector { frames, task }
    }

    fn frames(&self) -> Vec<String> {
        self.frames.lock().unwrap().clone()
    }
}

/// RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG`;
/// returns the XML of the MSG (after its BOM).
fn rfc5424_xml(frame: &str) -> String {
    let parts: Vec<&str> = frame.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{frame}");
    assert_eq!(parts[0], "<85>1", "PRI authpriv.notice, version 1: {frame}");
    chrono::DateTime::parse_from_rfc3339(parts[1]).expect("RFC 3339 timestamp");
    assert!(!parts[2].is_empty() && parts[3] == "huren", "{frame}");
    parts[4].parse::<u32>().expect("PROCID");
    assert_eq!(parts[5], "DICOM+RFC3881");
    assert_eq!(parts[6], "-");
    parts[7]
        .strip_prefix('\u{FEFF}')
        .expect("MSG starts with a BOM")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_tls_receives_what_was_queued_while_down() {
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(work.path());
    // The collector's port, not listening yet: the node starts while its
    // collector is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.audit_syslog_tls = Some(format!("localhost:{port}"));
        c.audit_syslog_ca_file = Some(ca.clone());
        c.allowed_calling_ae_titles = vec![huren::config::AllowedPeer::parse("FRIEND").unwrap()];
    })
    .await;
    let log = node.config.data_dir.join("audit.log");
    let out = support::echoscu(node.dicom_addr, &["-aet", "STRANGER", "-aec", "HUREN"]).await;
    assert!(!out.status.success());
    expect(&log, "the Security Alert in the local file", |m| {
        m.event_id() == "110113"
    })
    .await;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let collector = Collector::start(listener, &cert, &key).await;
    wait_until("queued messages delivered once the collector is up", || {
        let n = collector.frames().len();
        async move { n >= 2 }
    })
    .await;
    let _dir = node.stop().await;
    wait_until("Application Stop delivered", || {
        let done = collector
            .frames()
            .iter()
            .any(|f| f.contains("csd-code=\"110121\""));
        async move { done }
    })
    .await;
    let frames = collector.frames();
    let xml: Vec<String> = frames.iter().map(|f| rfc5424_xml(f)).collect();
    // The collector got what the file has, in the same order.
    assert_eq!(xml, lines(&log));
    let ids: Vec<String> = xml
        .iter()
        .map(|x| parse(x).event_id().to_string())
        .collect();
    assert_eq!(ids, ["110100", "110113", "110100"]);
    validate_all(&xml);
    collector.task.abort();
}
