//! DICOM audit messages (PS3.15 A.5, the Audit Trail Message Format
//! Profile) that a hospital's auditors and their ATNA audit repository
//! read: who did what to which patient's studies, from where, and when.
//!
//! This is not the registry's hash-chained trail (src/registry/db.rs) nor
//! the page's own table (`ui_audit`): those record the region's and the
//! page's decisions for huren itself; these messages are the standard
//! format a hospital's security tooling collects from every system.
//!
//! - [`message`]: the message model and its XML (quick-xml).
//! - `sink`: the local append-only file and the syslog-over-TLS task.
//!
//! Hooks: each service calls one function here. The calls that happen
//! inside a DICOM association or an HTTP request find who is asking (the
//! calling AE title or the token/user, and the peer's address) in a
//! task-local [`Scope`] that the association's and the request's wrapper
//! set up, so that a hook in a file other engineers edit stays one line
//! and needs no new parameter threaded through.

pub mod message;
mod sink;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use message::{
    AccessPoint, Action, Code, Message, NameOrQuery, Outcome, Participant, ParticipantObject,
    SopClass, Source,
};
use message::{event, event_type, id_type, role};
pub use sink::SYSLOG_QUEUE;

use crate::config::NodeConfig;
use crate::index::Index;

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("enabled", &self.0.is_some())
            .finish()
    }
}

/// The node's audit sinks. Cloning is cheap; a `disabled` handle (tools
/// that only open the store) emits nothing.
#[derive(Clone, Default)]
pub struct Audit(Option<Arc<Inner>>);

struct Inner {
    ae_title: String,
    hostname: String,
    enterprise_site_id: Option<String>,
    file: sink::File,
    syslog: Option<sink::Syslog>,
    /// How many Security Alerts each caller's refused HTTP requests have
    /// cost this minute.
    alerts: Mutex<AlertBudget>,
}

/// Security Alerts for refused HTTP requests, at most this many per
/// caller address a minute; the rest are counted and summarized in one
/// alert (issue 22: a caller must not be able to fill the log, nor hide
/// in it).
pub const ALERTS_PER_MINUTE: u32 = 20;
const ALERT_WINDOW: Duration = Duration::from_secs(60);
/// Callers tracked at once: the budget's memory is bounded too. Past it,
/// callers whose minute is over are dropped (their summaries written);
/// if all are current, new callers share one budget.
const ALERT_CALLERS: usize = 4096;

#[derive(Default)]
struct AlertBudget {
    callers: std::collections::HashMap<Option<IpAddr>, AlertWindow>,
}

struct AlertWindow {
    started: std::time::Instant,
    sent: u32,
    suppressed: u64,
}

/// What to do with one more alert.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    Send,
    Suppress,
}

impl AlertBudget {
    /// Whether `caller`'s next alert goes out; the summaries of windows
    /// that ended (caller, alerts not written one by one) come first.
    fn admit(
        &mut self,
        caller: Option<IpAddr>,
        now: std::time::Instant,
    ) -> (Admit, Vec<(Option<IpAddr>, u64)>) {
        let mut summaries = Vec::new();
        let mut key = caller;
        if !self.callers.contains_key(&key) && self.callers.len() >= ALERT_CALLERS {
            self.callers.retain(|caller, w| {
                let over = now.duration_since(w.started) >= ALERT_WINDOW;
                if over && w.suppressed > 0 {
                    summaries.push((*caller, w.suppressed));
                }
                !over
            });
            if self.callers.len() >= ALERT_CALLERS {
                key = None;
            }
        }
        let w = self.callers.entry(key).or_insert(AlertWindow {
            started: now,
            sent: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= ALERT_WINDOW {
            if w.suppressed > 0 {
                summaries.push((key, w.suppressed));
            }
            *w = AlertWindow {
                started: now,
                sent: 0,
                suppressed: 0,
            };
        }
        if w.sent < ALERTS_PER_MINUTE {
            w.sent += 1;
            (Admit::Send, summaries)
        } else {
            w.suppressed += 1;
            (Admit::Suppress, summaries)
        }
    }

    /// Every pending summary (at stop).
    fn drain(&mut self) -> Vec<(Option<IpAddr>, u64)> {
        self.callers
            .drain()
            .filter(|(_, w)| w.suppressed > 0)
            .map(|(caller, w)| (caller, w.suppressed))
            .collect()
    }
}

/// `<data_dir>/audit.log` unless `audit_log` says otherwise.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit.log")
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The current time as xsd:dateTime with the machine's UTC offset
/// (PS3.15 A.5.2.5: the time zone is required).
fn now() -> String {
    chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

impl Audit {
    pub fn disabled() -> Audit {
        Audit(None)
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Flushes the file and gives the syslog collector a moment to take
    /// what is queued: the end of a CLI command that wrote messages.
    pub async fn close(&self) {
        if let Some(inner) = &self.0 {
            inner.file.sync();
            if let Some(syslog) = &inner.syslog {
                syslog.close(Duration::from_secs(5)).await;
            }
        }
    }

    /// Opens the local file and, when configured, starts the syslog task.
    pub fn open(config: &NodeConfig) -> Result<Audit, String> {
        let path = config
            .audit_log
            .clone()
            .unwrap_or_else(|| default_path(&config.data_dir));
        let file = sink::File::open(&path)?;
        let hostname = hostname();
        let syslog = match &config.audit_syslog_tls {
            Some(address) => {
                let ca_file = config
                    .audit_syslog_ca_file
                    .clone()
                    .ok_or("audit_syslog_tls needs audit_syslog_ca_file")?;
                let target = sink::SyslogTarget {
                    address: address.clone(),
                    ca_file,
                };
                tracing::info!(collector = %address, "audit messages also go to a syslog collector over TLS");
                Some(sink::Syslog::start(&target, &hostname)?)
            }
            None => None,
        };
        tracing::info!(path = %path.display(), "audit log (DICOM PS3.15 A.5)");
        Ok(Audit(Some(Arc::new(Inner {
            ae_title: config.ae_title.as_str().to_string(),
            hostname,
            enterprise_site_id: config.region.as_ref().map(|r| r.hospital_id.clone()),
            file,
            syslog,
            alerts: Mutex::new(AlertBudget::default()),
        }))))
    }

    /// A Security Alert summarizing refused requests of one caller that
    /// were not audited one by one.
    fn alerts_summary(&self, caller: Option<IpAddr>, suppressed: u64) {
        let scope = Scope {
            audit: self.clone(),
            peer: caller,
            requestor: Requestor::Http {
                user: "anonymous".into(),
            },
            refusal: None,
            stored: BTreeMap::new(),
        };
        let subject = ParticipantObject {
            id: "/".into(),
            id_type: id_type::URI,
            type_code: 2,
            role: 13,
            name_or_query: NameOrQuery::Name("refused requests".into()),
            details: vec![(
                "Alert Description".into(),
                format!(
                    "{suppressed} further refused requests from this address within a minute \
                     (past {ALERTS_PER_MINUTE} audited one by one)"
                )
                .into_bytes(),
            )],
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        };
        security_alert(&scope, event_type::USE_OF_RESTRICTED_FUNCTION, subject);
    }

    pub fn path(&self) -> Option<&Path> {
        self.0.as_ref().map(|i| i.file.path())
    }

    /// Messages the syslog queue had to drop so far.
    pub fn syslog_dropped(&self) -> u64 {
        self.0
            .as_ref()
            .and_then(|i| i.syslog.as_ref())
            .map_or(0, |s| s.dropped())
    }

    /// Writes a message to the file and queues it for the collector. A
    /// record the file could not take is logged and counted, and the node
    /// is not ready until a record is written again (docs/operations.md).
    pub fn emit(&self, message: &Message) {
        let _ = self.emit_checked(message);
    }

    /// As [`Audit::emit`], saying whether the local file took the record:
    /// for what must not happen unaudited (a deletion).
    pub fn emit_checked(&self, message: &Message) -> Result<(), String> {
        let Some(inner) = &self.0 else { return Ok(()) };
        let xml = message.to_xml();
        let written = inner.file.append(&xml);
        if let Some(syslog) = &inner.syslog {
            syslog.send(&xml);
        }
        written.map_err(|e| format!("{}: {e}", inner.file.path().display()))
    }

    /// Whether the last audit record could not be written to the file.
    pub fn failing(&self) -> bool {
        self.0.as_ref().is_some_and(|i| i.file.failing())
    }

    /// Audit records the file could not take since start.
    pub fn write_failures(&self) -> u64 {
        self.0.as_ref().map_or(0, |i| i.file.failures())
    }

    fn source(&self) -> Source {
        let inner = self
            .0
            .as_ref()
            .expect("only enabled handles build messages");
        Source {
            id: inner.ae_title.clone(),
            enterprise_site_id: inner.enterprise_site_id.clone(),
        }
    }

    /// The node itself as an active participant.
    fn node(&self, user_is_requestor: bool, role: Option<Code>) -> Participant {
        let inner = self
            .0
            .as_ref()
            .expect("only enabled handles build messages");
        Participant {
            user_id: inner.ae_title.clone(),
            alternative_user_id: Some(format!("AETITLES={}", inner.ae_title)),
            user_name: Some(format!("huren {}", std::process::id())),
            user_is_requestor,
            network_access_point: Some((inner.hostname.clone(), AccessPoint::MachineName)),
            roles: role.into_iter().collect(),
        }
    }

    fn message(
        &self,
        event_id: Code,
        action: Action,
        outcome: Outcome,
        event_types: Vec<Code>,
    ) -> Message {
        Message {
            event_id,
            action,
            date_time: now(),
            outcome,
            outcome_description: None,
            event_types,
            participants: Vec::new(),
            source: self.source(),
            objects: Vec::new(),
        }
    }

    fn application_activity(&self, kind: Code) {
        if self.0.is_none() {
            return;
        }
        let mut m = self.message(
            event::APPLICATION_ACTIVITY,
            Action::Execute,
            Outcome::Success,
            vec![kind],
        );
        m.participants
            .push(self.node(false, Some(role::APPLICATION)));
        // Who started or stopped it: the operating-system account.
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }));
        m.participants.push(Participant {
            user_id: user,
            alternative_user_id: None,
            user_name: None,
            user_is_requestor: true,
            network_access_point: None,
            roles: vec![role::APPLICATION_LAUNCHER],
        });
        self.emit(&m);
    }

    /// Application Activity: Application Start (PS3.15 A.5.3.1).
    /// DICOM Study Deleted (PS3.15 A.5.3.8), action D: one message per
    /// patient, naming the studies instances were deleted from (with the
    /// SOP classes and counts deleted), who deleted them (`actor`: a token
    /// name, an operator, a rejection note's calling AE title; `None`: the
    /// node itself, by its retention policy) and why.
    pub fn study_deleted(
        &self,
        actor: Option<&str>,
        reason: &str,
        studies: &[DeletedStudy],
    ) -> Result<(), String> {
        if self.0.is_none() || studies.is_empty() {
            return Ok(());
        }
        let mut by_patient: std::collections::BTreeMap<&str, Vec<&DeletedStudy>> =
            Default::default();
        for study in studies {
            by_patient.entry(&study.patient_id).or_default().push(study);
        }
        for (patient_id, studies) in by_patient {
            let mut m = self.message(
                event::STUDY_DELETED,
                Action::Delete,
                Outcome::Success,
                Vec::new(),
            );
            match actor {
                Some(actor) => {
                    m.participants.push(Participant {
                        user_id: actor.chars().take(64).collect(),
                        alternative_user_id: None,
                        user_name: None,
                        user_is_requestor: true,
                        network_access_point: None,
                        roles: Vec::new(),
                    });
                    m.participants.push(self.node(false, None));
                }
                None => m.participants.push(self.node(true, None)),
            }
            for study in studies {
                let mut object = ParticipantObject::study(
                    &study.study_instance_uid,
                    "",
                    study
                        .sop_classes
                        .iter()
                        .map(|(uid, n)| SopClass {
                            uid: uid.clone(),
                            number_of_instances: *n,
                        })
                        .collect(),
                );
                object
                    .details
                    .push(("Reason".into(), reason.as_bytes().to_vec()));
                m.objects.push(object);
            }
            m.objects.push(ParticipantObject::patient(patient_id, ""));
            self.emit_checked(&m)?;
        }
        Ok(())
    }

    pub fn application_start(&self) {
        self.application_activity(event_type::APPLICATION_START);
    }

    /// Application Activity: Application Stop; then the file is synced
    /// and the collector gets a few seconds to take what is queued.
    pub async fn application_stop(&self) {
        if let Some(inner) = &self.0 {
            let pending = inner
                .alerts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain();
            for (caller, suppressed) in pending {
                self.alerts_summary(caller, suppressed);
            }
        }
        self.application_activity(event_type::APPLICATION_STOP);
        if let Some(inner) = &self.0 {
            inner.file.sync();
            if let Some(syslog) = &inner.syslog {
                syslog.close(Duration::from_secs(5)).await;
            }
        }
    }
}

// ------------------------------------------------------------------ scope

/// Who is asking, for the length of one association or HTTP request.
#[derive(Debug, Clone)]
enum Requestor {
    Dicom {
        calling_ae_title: String,
        called_ae_title: String,
    },
    /// A DICOMweb token's name, a peer's grant, or a page user.
    Http { user: String },
}

/// What an association or a request did that is audited when it ends.
struct Scope {
    audit: Audit,
    peer: Option<IpAddr>,
    requestor: Requestor,
    refusal: Option<String>,
    stored: BTreeMap<String, PatientStored>,
}

/// Instances of one patient received in one association or request.
#[derive(Default)]
struct PatientStored {
    patient_name: String,
    studies: BTreeMap<String, StudyStored>,
    created: bool,
    updated: bool,
}

#[derive(Default)]
struct StudyStored {
    accession_number: String,
    sop_classes: BTreeMap<String, u64>,
}

tokio::task_local! {
    static SCOPE: Arc<Mutex<Scope>>;
}

/// One study a deletion removed instances from (DICOM Study Deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedStudy {
    pub study_instance_uid: String,
    pub patient_id: String,
    /// SOP Class UID and how many of its instances (every version) went.
    pub sop_classes: Vec<(String, u64)>,
}

/// The audit handle of the association or HTTP request being served, or a
/// disabled one outside them: for work (a rejection note's deletion) that
/// the ingest path does on a requestor's behalf.
pub fn current() -> Audit {
    SCOPE
        .try_with(|s| s.lock().unwrap_or_else(|e| e.into_inner()).audit.clone())
        .unwrap_or_else(|_| Audit::disabled())
}

/// Names the user of the HTTP request being served, once it is known
/// inside it: a DICOMweb request admitted by the page's session (the
/// viewer's, issue 19), whose doctor only the DICOMweb gate learns.
pub fn http_user(user: String) {
    with_scope(|s| {
        if let Requestor::Http { user: u } = &mut s.requestor {
            *u = user;
        }
    });
}

fn with_scope<T>(f: impl FnOnce(&mut Scope) -> T) -> Option<T> {
    SCOPE
        .try_with(|s| {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            if s.audit.0.is_none() {
                None
            } else {
                Some(f(&mut s))
            }
        })
        .ok()
        .flatten()
}

impl Scope {
    /// The one who asked, as an active participant.
    fn requestor(&self, user_is_requestor: bool, role: Option<Code>) -> Participant {
        let access_point = self.peer.map(|ip| (ip.to_string(), AccessPoint::IpAddress));
        match &self.requestor {
            Requestor::Dicom {
                calling_ae_title, ..
            } => Participant {
                user_id: calling_ae_title.clone(),
                alternative_user_id: Some(format!("AETITLES={calling_ae_title}")),
                user_name: None,
                user_is_requestor,
                network_access_point: access_point,
                roles: role.into_iter().collect(),
            },
            Requestor::Http { user } => Participant {
                user_id: user.clone(),
                alternative_user_id: None,
                user_name: None,
                user_is_requestor,
                network_access_point: access_point,
                roles: role.into_iter().collect(),
            },
        }
    }

    /// DICOM Instances Transferred (PS3.15 A.5.3.7) for what was received,
    /// one message per patient (the message may name one patient only).
    fn emit_received(&mut self, outcome: Outcome) {
        let audit = self.audit.clone();
        for (patient_id, p) in std::mem::take(&mut self.stored) {
            // A.5.3.7: U when held copies changed, C when the node did
            // not hold them, R when it already held them all unchanged.
            let action = if p.updated {
                Action::Update
            } else if p.created {
                Action::Create
            } else {
                Action::Read
            };
            let mut m = audit.message(event::INSTANCES_TRANSFERRED, action, outcome, Vec::new());
            m.participants
                .push(self.requestor(true, Some(role::SOURCE)));
            m.participants
                .push(audit.node(false, Some(role::DESTINATION)));
            for (uid, study) in &p.studies {
                m.objects.push(ParticipantObject::study(
                    uid,
                    &study.accession_number,
                    study
                        .sop_classes
                        .iter()
                        .map(|(uid, n)| SopClass {
                            uid: uid.clone(),
                            number_of_instances: *n,
                        })
                        .collect(),
                ));
            }
            m.objects
                .push(ParticipantObject::patient(&patient_id, &p.patient_name));
            audit.emit(&m);
        }
    }
}

/// Runs one association's future with a scope; when it ends, reports a
/// refusal (Security Alert) or what the association stored (Instances
/// Transferred).
pub async fn association<F: Future>(audit: Audit, peer: SocketAddr, association: F) -> F::Output {
    if audit.0.is_none() {
        return association.await;
    }
    let scope = Arc::new(Mutex::new(Scope {
        audit: audit.clone(),
        peer: Some(peer.ip()),
        requestor: Requestor::Dicom {
            calling_ae_title: String::new(),
            called_ae_title: String::new(),
        },
        refusal: None,
        stored: BTreeMap::new(),
    }));
    let out = SCOPE.scope(scope.clone(), association).await;
    let mut scope = scope.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(reason) = scope.refusal.take() {
        let (calling, called) = match &scope.requestor {
            Requestor::Dicom {
                calling_ae_title,
                called_ae_title,
            } => (calling_ae_title.clone(), called_ae_title.clone()),
            Requestor::Http { user } => (user.clone(), String::new()),
        };
        let description = format!(
            "A-ASSOCIATE-RQ from calling AE title {calling:?} to called AE title {called:?} rejected (A-ASSOCIATE-RJ permanent, service user): {reason}"
        );
        let subject = ParticipantObject {
            id: peer.ip().to_string(),
            id_type: id_type::NODE_ID,
            type_code: 2,
            role: 13,
            name_or_query: NameOrQuery::Name(calling),
            details: vec![("Alert Description".into(), description.into_bytes())],
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        };
        security_alert(&scope, event_type::NODE_AUTHENTICATION, subject);
    }
    scope.emit_received(Outcome::Success);
    out
}

/// Security Alert (PS3.15 A.5.3.11): reported by the node; the one who
/// caused it is a performing participant (UserIsRequestor false, as the
/// standard says); Minor failure: the node refused, security held.
fn security_alert(scope: &Scope, kind: Code, subject: ParticipantObject) {
    let audit = &scope.audit;
    let mut m = audit.message(
        event::SECURITY_ALERT,
        Action::Execute,
        Outcome::MinorFailure,
        vec![kind],
    );
    m.participants.push(audit.node(false, None));
    m.participants.push(scope.requestor(false, None));
    m.objects.push(subject);
    audit.emit(&m);
}

/// Hook (ingest): an IOCM rejection note was refused (an AE that may not
/// reject, or instances of another patient or study): Security Alert, Use
/// of Restricted Function, naming the note's study and patient and why.
pub fn rejection_note_refused(
    rejection_note_uid: &str,
    study_instance_uid: &str,
    patient_id: &str,
    why: &str,
) {
    with_scope(|s| {
        let mut subject = ParticipantObject::study(study_instance_uid, "", Vec::new());
        subject.details.push((
            "Alert Description".into(),
            format!("IOCM rejection note {rejection_note_uid} refused: {why}").into_bytes(),
        ));
        let audit = s.audit.clone();
        let mut m = audit.message(
            event::SECURITY_ALERT,
            Action::Execute,
            Outcome::MinorFailure,
            vec![event_type::USE_OF_RESTRICTED_FUNCTION],
        );
        m.participants.push(audit.node(false, None));
        m.participants.push(s.requestor(false, None));
        m.objects.push(subject);
        m.objects.push(ParticipantObject::patient(patient_id, ""));
        audit.emit(&m);
    });
}

/// Hook (association negotiation): who is asking for the association.
pub fn association_requested(calling_ae_title: &str, called_ae_title: &str) {
    with_scope(|s| {
        s.requestor = Requestor::Dicom {
            calling_ae_title: calling_ae_title.trim().to_string(),
            called_ae_title: called_ae_title.trim().to_string(),
        }
    });
}

/// Hook (association negotiation): the association is rejected for
/// `reason`, which is passed through.
pub fn association_refused<R: std::fmt::Debug>(reason: R) -> R {
    with_scope(|s| s.refusal = Some(format!("{reason:?}")));
    reason
}

/// An instance the ingest path is storing for the current association or
/// STOW-RS request.
pub struct StoredInstance {
    patient_id: String,
    patient_name: String,
    study_instance_uid: String,
    accession_number: String,
    sop_class_uid: String,
}

impl StoredInstance {
    /// `None` outside an audited association or request (verify
    /// --reindex, peer fetches), so nothing is copied there.
    pub fn of(a: &crate::part10::InstanceAttributes) -> Option<StoredInstance> {
        with_scope(|_| StoredInstance {
            patient_id: a.patient_id.clone(),
            patient_name: a.patient_name.clone(),
            study_instance_uid: a.study_instance_uid.clone(),
            accession_number: a.accession_number.clone(),
            sop_class_uid: a.sop_class_uid.clone(),
        })
    }

    /// Hook (ingest): the instance is stored and indexed.
    pub fn record(self, outcome: &crate::index::StoreOutcome) {
        use crate::index::StoreOutcome;
        // A rejection note acts on other instances and is not stored
        // (src/lifecycle.rs): nothing was transferred in.
        if *outcome == StoreOutcome::RejectionNote {
            return;
        }
        with_scope(|s| {
            let p = s.stored.entry(self.patient_id).or_default();
            p.patient_name = self.patient_name;
            match outcome {
                StoreOutcome::Stored => p.created = true,
                StoreOutcome::NewVersion { .. } => p.updated = true,
                StoreOutcome::Duplicate | StoreOutcome::RejectionNote => {}
            }
            let study = p.studies.entry(self.study_instance_uid).or_default();
            study.accession_number = self.accession_number;
            *study.sop_classes.entry(self.sop_class_uid).or_default() += 1;
        });
    }
}

/// Hook (C-FIND): Query (PS3.15 A.5.3.10) with the identifier as received,
/// base64 in ParticipantObjectQuery, and its transfer syntax. `allowed`
/// false: the calling AE may not query (Minor failure).
pub fn dicom_query(
    sop_class_uid: &str,
    transfer_syntax_uid: &str,
    identifier: &[u8],
    allowed: bool,
) {
    with_scope(|s| {
        let audit = s.audit.clone();
        let outcome = if allowed {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let mut m = audit.message(event::QUERY, Action::Execute, outcome, Vec::new());
        if !allowed {
            m.outcome_description = Some("calling AE title may not query".into());
        }
        m.participants.push(s.requestor(true, Some(role::SOURCE)));
        m.participants
            .push(audit.node(false, Some(role::DESTINATION)));
        m.objects.push(ParticipantObject {
            id: sop_class_uid.to_string(),
            id_type: id_type::SOP_CLASS_UID,
            type_code: 2,
            role: 3,
            name_or_query: NameOrQuery::Query(identifier.to_vec()),
            details: vec![(
                "TransferSyntax".into(),
                transfer_syntax_uid.as_bytes().to_vec(),
            )],
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        });
        audit.emit(&m);
    });
}

// ------------------------------------------------------------------ retrieve

/// The studies of one patient a C-MOVE or C-GET sends.
struct PatientTransfer {
    patient: Option<ParticipantObject>,
    studies: Vec<ParticipantObject>,
}

/// A retrieval whose Begin Transferring message went out; `transferred`
/// reports its end. Dropped without it (the requestor's association broke
/// during a C-GET), it reports the transfer as failed, so that no Begin
/// Transferring goes without its Instances Transferred.
pub struct Transfer {
    audit: Audit,
    participants: Vec<Participant>,
    patients: Vec<PatientTransfer>,
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if !self.patients.is_empty() {
            self.report(
                Outcome::SeriousFailure,
                Some("the association ended before the sub-operations completed".into()),
            );
        }
    }
}

/// Groups instances by study, then studies by patient (from the index).
async fn by_patient(
    index: &Index,
    instances: &[crate::query::InstanceLocation],
) -> Vec<PatientTransfer> {
    let mut studies: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for i in instances {
        *studies
            .entry(i.study_instance_uid.as_str())
            .or_default()
            .entry(i.sop_class_uid.as_str())
            .or_default() += 1;
    }
    let mut patients: BTreeMap<String, PatientTransfer> = BTreeMap::new();
    for (uid, classes) in studies {
        let row = index.study(uid).await.ok().flatten();
        let (patient_id, patient_name, accession) = row
            .map(|r| (r.patient_id, r.patient_name, r.accession_number))
            .unwrap_or_default();
        let entry = patients
            .entry(patient_id.clone())
            .or_insert_with(|| PatientTransfer {
                patient: Some(ParticipantObject::patient(&patient_id, &patient_name)),
                studies: Vec::new(),
            });
        entry.studies.push(ParticipantObject::study(
            uid,
            &accession,
            classes
                .into_iter()
                .map(|(uid, n)| SopClass {
                    uid: uid.to_string(),
                    number_of_instances: n,
                })
                .collect(),
        ));
    }
    patients.into_values().collect()
}

/// Hook (C-MOVE, C-GET): Begin Transferring DICOM Instances (PS3.15
/// A.5.3.3), one per patient, before the first sub-operation.
/// `move_destination`: the C-MOVE destination (AE title, host); `None`
/// for C-GET, whose destination is the requestor.
pub async fn begin_transferring(
    index: &Index,
    move_destination: Option<(&str, &str)>,
    instances: &[crate::query::InstanceLocation],
) -> Option<Transfer> {
    let (audit, requestor, destination) = with_scope(|s| {
        let destination = match move_destination {
            Some((ae_title, host)) => Participant {
                user_id: ae_title.trim().to_string(),
                alternative_user_id: Some(format!("AETITLES={}", ae_title.trim())),
                user_name: None,
                user_is_requestor: false,
                network_access_point: Some((
                    host.to_string(),
                    if host.parse::<IpAddr>().is_ok() {
                        AccessPoint::IpAddress
                    } else {
                        AccessPoint::MachineName
                    },
                )),
                roles: vec![role::DESTINATION],
            },
            None => s.requestor(true, Some(role::DESTINATION)),
        };
        let requestor = move_destination.map(|_| s.requestor(true, None));
        (s.audit.clone(), requestor, destination)
    })?;
    if instances.is_empty() {
        return None;
    }
    let mut participants = vec![audit.node(false, Some(role::SOURCE)), destination];
    participants.extend(requestor);
    let patients = by_patient(index, instances).await;
    for p in &patients {
        let mut m = audit.message(
            event::BEGIN_TRANSFERRING,
            Action::Execute,
            Outcome::Success,
            Vec::new(),
        );
        m.participants = participants.clone();
        m.objects.extend(p.studies.iter().cloned());
        m.objects.extend(p.patient.iter().cloned());
        audit.emit(&m);
    }
    Some(Transfer {
        audit,
        participants,
        patients,
    })
}

impl Transfer {
    /// DICOM Instances Transferred (A.5.3.7) once the sub-operations have
    /// ended: R (the node is the sender); Minor failure when some failed,
    /// Serious when none completed.
    pub fn transferred(mut self, completed: u16, failed: u16, warning: u16) {
        let (outcome, description) = if failed == 0 {
            (Outcome::Success, None)
        } else if completed > 0 || warning > 0 {
            let total = u32::from(completed) + u32::from(warning) + u32::from(failed);
            (
                Outcome::MinorFailure,
                Some(format!("{failed} of {total} sub-operations failed")),
            )
        } else {
            (
                Outcome::SeriousFailure,
                Some(format!("all {failed} sub-operations failed")),
            )
        };
        self.report(outcome, description);
    }

    fn report(&mut self, outcome: Outcome, description: Option<String>) {
        for p in std::mem::take(&mut self.patients) {
            let mut m = self.audit.message(
                event::INSTANCES_TRANSFERRED,
                Action::Read,
                outcome,
                Vec::new(),
            );
            m.outcome_description = description.clone();
            m.participants = self.participants.clone();
            m.objects.extend(p.studies);
            m.objects.extend(p.patient);
            self.audit.emit(&m);
        }
    }
}

// ------------------------------------------------------------------ HTTP

/// Why an HTTP request was refused, for its Security Alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No valid credential (401): Node Authentication.
    Unauthenticated,
    /// A valid credential without the right (403): Use of Restricted
    /// Function.
    Forbidden,
}

/// An HTTP request served under an audit scope: the ingest path's and the
/// page's hooks record into it while it runs, and the HTTP layer
/// (src/http/audit.rs) says afterwards, in plain facts, what it was.
pub struct HttpRequest {
    audit: Audit,
    scope: Arc<Mutex<Scope>>,
}

impl Audit {
    /// Serves a request (`serve`) within a scope naming who asks (`user`)
    /// and from where; `None` beside the output when auditing is off.
    pub async fn http_request<F: Future>(
        &self,
        peer: Option<IpAddr>,
        user: String,
        serve: F,
    ) -> (F::Output, Option<HttpRequest>) {
        if self.0.is_none() {
            return (serve.await, None);
        }
        let scope = Arc::new(Mutex::new(Scope {
            audit: self.clone(),
            peer,
            requestor: Requestor::Http { user },
            refusal: None,
            stored: BTreeMap::new(),
        }));
        let output = SCOPE.scope(scope.clone(), serve).await;
        (
            output,
            Some(HttpRequest {
                audit: self.clone(),
                scope,
            }),
        )
    }
}

impl HttpRequest {
    fn scope(&self) -> std::sync::MutexGuard<'_, Scope> {
        self.scope.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Security Alert for a refused request, naming it by its URI; past
    /// [`ALERTS_PER_MINUTE`] for its caller, counted for a summary instead.
    pub fn refused(&self, refusal: Refusal, method: &str, path: &str, description: &str) {
        let Some(inner) = &self.audit.0 else {
            return;
        };
        let caller = self.scope().peer;
        let (admit, summaries) = inner
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(caller, std::time::Instant::now());
        for (caller, suppressed) in summaries {
            self.audit.alerts_summary(caller, suppressed);
        }
        if admit == Admit::Suppress {
            return;
        }
        let kind = match refusal {
            Refusal::Unauthenticated => event_type::NODE_AUTHENTICATION,
            Refusal::Forbidden => event_type::USE_OF_RESTRICTED_FUNCTION,
        };
        let subject = ParticipantObject {
            id: path.to_string(),
            id_type: id_type::URI,
            type_code: 2,
            role: 13,
            name_or_query: NameOrQuery::Name(format!("{method} {path}")),
            details: vec![("Alert Description".into(), description.as_bytes().to_vec())],
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        };
        security_alert(&self.scope(), kind, subject);
    }

    /// Query (A.5.3.10) for a search: not a DICOM data set, so the query
    /// "in the format of the protocol used": the request's query string,
    /// naming the resource by its URI.
    pub fn queried(&self, path: &str, query: &str, status: u16) {
        let audit = &self.audit;
        let scope = self.scope();
        let mut m = audit.message(
            event::QUERY,
            Action::Execute,
            Outcome::of_http(status),
            Vec::new(),
        );
        m.participants
            .push(scope.requestor(true, Some(role::SOURCE)));
        m.participants
            .push(audit.node(false, Some(role::DESTINATION)));
        m.objects.push(ParticipantObject {
            id: path.to_string(),
            id_type: id_type::URI,
            type_code: 2,
            role: 3,
            name_or_query: NameOrQuery::Query(query.as_bytes().to_vec()),
            details: Vec::new(),
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        });
        audit.emit(&m);
    }

    /// Instances Transferred for what a store request stored, one message
    /// per patient; nothing when nothing was stored (the response and the
    /// node's log say why, and there is no study or patient to name).
    pub fn stored(&self, status: u16) {
        let mut scope = self.scope();
        if !scope.stored.is_empty() {
            scope.emit_received(Outcome::of_http(status));
        }
    }

    /// A study's instances read: Instances Transferred, or Instances
    /// Accessed when only their metadata or a rendering went out.
    pub fn instances_read(
        &self,
        study_instance_uid: &str,
        accessed: bool,
        status: u16,
        accession_number: &str,
        patient: Option<(&str, &str)>,
    ) {
        let audit = &self.audit;
        let requestor = self.scope().requestor(true, Some(role::DESTINATION));
        let (event_id, action) = if accessed {
            (event::INSTANCES_ACCESSED, Action::Read)
        } else {
            (event::INSTANCES_TRANSFERRED, Action::Read)
        };
        let mut m = audit.message(event_id, action, Outcome::of_http(status), Vec::new());
        if accessed {
            m.participants.push(requestor);
            m.participants.push(audit.node(false, None));
        } else {
            m.participants.push(audit.node(false, Some(role::SOURCE)));
            m.participants.push(requestor);
        }
        m.objects.push(ParticipantObject::study(
            study_instance_uid,
            accession_number,
            Vec::new(),
        ));
        if let Some((patient_id, patient_name)) = patient {
            m.objects
                .push(ParticipantObject::patient(patient_id, patient_name));
        }
        audit.emit(&m);
    }
}

// ------------------------------------------------------------------ page

/// Hook (page sign-in and sign-out): User Authentication (PS3.15
/// A.5.3.12), Login or Logout; a failed sign-in is a Minor failure naming
/// the user ID that was tried.
pub fn user_authentication(user_id: &str, login: bool, success: bool) {
    with_scope(|s| {
        let audit = s.audit.clone();
        let kind = if login {
            event_type::LOGIN
        } else {
            event_type::LOGOUT
        };
        let outcome = if success {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        let mut m = audit.message(
            event::USER_AUTHENTICATION,
            Action::Execute,
            outcome,
            vec![kind],
        );
        if !success {
            m.outcome_description = Some("wrong user ID or password".into());
        }
        // The ID as typed (bounded: it is attacker-controlled).
        let user: String = user_id.trim().chars().take(64).collect();
        s.requestor = Requestor::Http { user };
        let mut person = s.requestor(true, None);
        if person.network_access_point.is_none() {
            // Mandatory for the person in A.5.3.12.
            person.network_access_point = Some(("unknown".into(), AccessPoint::MachineName));
        }
        m.participants.push(person);
        m.participants.push(audit.node(false, None));
        audit.emit(&m);
    });
}

/// Hook (page sign-in): an attempt refused by the throttle, before its
/// password was checked: User Authentication, Login, a Serious failure
/// (told apart from a wrong password, a Minor one), naming the user ID
/// tried and how long the account or address must still wait.
pub fn sign_in_throttled(user_id: &str, wait: Duration) {
    with_scope(|s| {
        let audit = s.audit.clone();
        let mut m = audit.message(
            event::USER_AUTHENTICATION,
            Action::Execute,
            Outcome::SeriousFailure,
            vec![event_type::LOGIN],
        );
        m.outcome_description = Some(format!(
            "sign-in refused without checking the password: too many failed sign-ins for \
             this user ID or from this address ({} s left)",
            wait.as_secs()
        ));
        let user: String = user_id.trim().chars().take(64).collect();
        s.requestor = Requestor::Http { user };
        let mut person = s.requestor(true, None);
        if person.network_access_point.is_none() {
            person.network_access_point = Some(("unknown".into(), AccessPoint::MachineName));
        }
        m.participants.push(person);
        m.participants.push(audit.node(false, None));
        audit.emit(&m);
    });
}

/// Hook (page): a doctor opened a patient's prior exams: Query (A.5.3.10)
/// for the page's timeline, naming the patient (an extension: the page
/// asks about one patient, which an auditor wants to see).
pub fn patient_viewed(user_id: &str, patient_id: Option<&str>, patient_key: Option<&str>) {
    with_scope(|s| {
        let audit = s.audit.clone();
        s.requestor = Requestor::Http {
            user: user_id.to_string(),
        };
        let mut m = audit.message(event::QUERY, Action::Execute, Outcome::Success, Vec::new());
        m.participants.push(s.requestor(true, Some(role::SOURCE)));
        m.participants
            .push(audit.node(false, Some(role::DESTINATION)));
        let query = format!(
            "PatientID={}&patient_key={}",
            patient_id.unwrap_or(""),
            patient_key.unwrap_or("")
        );
        m.objects.push(ParticipantObject {
            id: "/ui/patient".into(),
            id_type: id_type::URI,
            type_code: 2,
            role: 3,
            name_or_query: NameOrQuery::Query(query.into_bytes()),
            details: Vec::new(),
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        });
        if let Some(id) = patient_id.filter(|id| !id.is_empty()) {
            m.objects.push(ParticipantObject::patient(id, ""));
        }
        audit.emit(&m);
    });
}

/// Hook (page): a doctor opened a study held here: DICOM Instances
/// Accessed (A.5.3.6), R, with the study's patient from the index.
pub fn study_viewed(user_id: &str, index: &Index, study_instance_uid: &str) {
    let Some((audit, requestor)) = with_scope(|s| {
        s.requestor = Requestor::Http {
            user: user_id.to_string(),
        };
        (s.audit.clone(), s.requestor(true, None))
    }) else {
        return;
    };
    let index = index.clone();
    let study = study_instance_uid.to_string();
    tokio::spawn(async move {
        let row = index.study(&study).await.ok().flatten();
        let mut m = audit.message(
            event::INSTANCES_ACCESSED,
            Action::Read,
            Outcome::Success,
            Vec::new(),
        );
        m.participants.push(requestor);
        m.participants.push(audit.node(false, None));
        let accession = row
            .as_ref()
            .map(|r| r.accession_number.as_str())
            .unwrap_or("");
        m.objects
            .push(ParticipantObject::study(&study, accession, Vec::new()));
        if let Some(r) = &row {
            m.objects
                .push(ParticipantObject::patient(&r.patient_id, &r.patient_name));
        }
        audit.emit(&m);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_gets_a_bounded_number_of_alerts_a_minute() {
        let mut budget = AlertBudget::default();
        let start = std::time::Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..ALERTS_PER_MINUTE {
            assert_eq!(budget.admit(a, start).0, Admit::Send);
        }
        for _ in 0..5 {
            assert_eq!(budget.admit(a, start).0, Admit::Suppress);
        }
        assert_eq!(budget.admit(b, start).0, Admit::Send, "another caller");
        let later = start + ALERT_WINDOW;
        assert_eq!(budget.admit(a, later), (Admit::Send, vec![(a, 5)]));
        assert!(budget.drain().is_empty());
        for i in 0..ALERT_CALLERS as u32 + 10 {
            budget.admit(Some(IpAddr::from(i.to_be_bytes())), later);
        }
        assert!(budget.callers.len() <= ALERT_CALLERS + 1, "bounded");
    }
}
