//! One audit message in the DICOM Audit Message Schema (PS3.15 A.5.1),
//! written with quick-xml so every value is escaped, on one line.

use std::io;

use quick_xml::Writer;
use quick_xml::events::BytesText;

/// A coded value (PS3.15 A.5.1 `CodedValueType`): the schema wants the code,
/// its coding scheme and its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    pub code: &'static str,
    pub scheme: &'static str,
    pub meaning: &'static str,
}

const fn dcm(code: &'static str, meaning: &'static str) -> Code {
    Code {
        code,
        scheme: "DCM",
        meaning,
    }
}

/// Event IDs (PS3.16 CID 400 Audit Event ID) of the messages of A.5.3 the
/// node sends.
pub mod event {
    use super::{Code, dcm};
    pub const APPLICATION_ACTIVITY: Code = dcm("110100", "Application Activity");
    pub const BEGIN_TRANSFERRING: Code = dcm("110102", "Begin Transferring DICOM Instances");
    pub const INSTANCES_ACCESSED: Code = dcm("110103", "DICOM Instances Accessed");
    pub const INSTANCES_TRANSFERRED: Code = dcm("110104", "DICOM Instances Transferred");
    pub const STUDY_DELETED: Code = dcm("110105", "DICOM Study Deleted");
    pub const QUERY: Code = dcm("110112", "Query");
    pub const SECURITY_ALERT: Code = dcm("110113", "Security Alert");
    pub const USER_AUTHENTICATION: Code = dcm("110114", "User Authentication");
}

/// Event type codes (PS3.16 CID 401 Audit Event Type Code).
pub mod event_type {
    use super::{Code, dcm};
    pub const APPLICATION_START: Code = dcm("110120", "Application Start");
    pub const APPLICATION_STOP: Code = dcm("110121", "Application Stop");
    pub const LOGIN: Code = dcm("110122", "Login");
    pub const LOGOUT: Code = dcm("110123", "Logout");
    pub const NODE_AUTHENTICATION: Code = dcm("110126", "Node Authentication");
    pub const USE_OF_RESTRICTED_FUNCTION: Code = dcm("110132", "Use of Restricted Function");
}

/// Active participant roles (PS3.16 CID 402 Audit Active Participant Role
/// ID Code).
pub mod role {
    use super::{Code, dcm};
    pub const APPLICATION: Code = dcm("110150", "Application");
    pub const APPLICATION_LAUNCHER: Code = dcm("110151", "Application Launcher");
    pub const DESTINATION: Code = dcm("110152", "Destination Role ID");
    pub const SOURCE: Code = dcm("110153", "Source Role ID");
}

/// Participant object ID types (PS3.16 CID 404, and RFC 3881's own).
pub mod id_type {
    use super::{Code, dcm};
    pub const PATIENT_NUMBER: Code = Code {
        code: "2",
        scheme: "RFC-3881",
        meaning: "Patient Number",
    };
    pub const URI: Code = Code {
        code: "12",
        scheme: "RFC-3881",
        meaning: "URI",
    };
    pub const STUDY_INSTANCE_UID: Code = dcm("110180", "Study Instance UID");
    pub const SOP_CLASS_UID: Code = dcm("110181", "SOP Class UID");
    pub const NODE_ID: Code = dcm("110182", "Node ID");
}

/// EventActionCode (PS3.15 A.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// EventOutcomeIndicator (PS3.15 A.5.1): 0, 4, 8 or 12.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The request was refused or partly failed; the node is fine.
    MinorFailure,
    /// The request failed.
    SeriousFailure,
    /// The node itself is failing.
    MajorFailure,
}

impl Outcome {
    fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
            Outcome::MajorFailure => "12",
        }
    }

    /// The outcome of an HTTP request by its status code.
    pub fn of_http(status: u16) -> Outcome {
        match status {
            0..=399 => Outcome::Success,
            400..=499 => Outcome::MinorFailure,
            _ => Outcome::SeriousFailure,
        }
    }
}

/// NetworkAccessPointTypeCode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPoint {
    MachineName,
    IpAddress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Participant {
    pub user_id: String,
    pub alternative_user_id: Option<String>,
    pub user_name: Option<String>,
    pub user_is_requestor: bool,
    pub network_access_point: Option<(String, AccessPoint)>,
    pub roles: Vec<Code>,
}

/// ParticipantObjectName or ParticipantObjectQuery: the schema wants
/// exactly one (CP-2399).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrQuery {
    Name(String),
    /// The query, as the requestor sent it (written as base64).
    Query(Vec<u8>),
}

/// One SOP Class of a study in ParticipantObjectDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SopClass {
    pub uid: String,
    pub number_of_instances: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantObject {
    pub id: String,
    pub id_type: Code,
    /// ParticipantObjectTypeCode: 1 person, 2 system object.
    pub type_code: u8,
    /// ParticipantObjectTypeCodeRole: 1 patient, 3 report, 13 security
    /// resource, 24 query.
    pub role: u8,
    pub name_or_query: NameOrQuery,
    /// ParticipantObjectDetail type/value pairs (values written as base64).
    pub details: Vec<(String, Vec<u8>)>,
    pub accession_numbers: Vec<String>,
    pub sop_classes: Vec<SopClass>,
}

impl ParticipantObject {
    /// A study: Study Instance UID, SOP classes and instance counts
    /// (PS3.15 A.5.3.3, A.5.3.6, A.5.3.7).
    pub fn study(
        study_instance_uid: &str,
        accession_number: &str,
        sop_classes: Vec<SopClass>,
    ) -> ParticipantObject {
        ParticipantObject {
            id: study_instance_uid.to_string(),
            id_type: id_type::STUDY_INSTANCE_UID,
            type_code: 2,
            role: 3,
            // The schema asks for a name or a query; a study has no name
            // the node can vouch for, so its UID names it.
            name_or_query: NameOrQuery::Name(study_instance_uid.to_string()),
            details: Vec::new(),
            accession_numbers: if accession_number.trim().is_empty() {
                Vec::new()
            } else {
                vec![accession_number.trim().to_string()]
            },
            sop_classes,
        }
    }

    /// The patient: Patient ID, and the Patient's Name as stored.
    pub fn patient(patient_id: &str, patient_name: &str) -> ParticipantObject {
        ParticipantObject {
            id: patient_id.to_string(),
            id_type: id_type::PATIENT_NUMBER,
            type_code: 1,
            role: 1,
            name_or_query: NameOrQuery::Name(patient_name.to_string()),
            details: Vec::new(),
            accession_numbers: Vec::new(),
            sop_classes: Vec::new(),
        }
    }
}

/// What reports the message (AuditSourceIdentification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub id: String,
    pub enterprise_site_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub event_id: Code,
    pub action: Action,
    /// xsd:dateTime with its time zone (PS3.15 A.5.2.5).
    pub date_time: String,
    pub outcome: Outcome,
    pub outcome_description: Option<String>,
    pub event_types: Vec<Code>,
    pub participants: Vec<Participant>,
    pub source: Source,
    pub objects: Vec<ParticipantObject>,
}

/// Values come from the wire (AE titles, user IDs typed into a form, query
/// strings): control characters would end the record's line or make the
/// XML invalid (XML 1.0 forbids most of them), so each becomes U+FFFD. The
/// exact bytes of a query are kept, base64-encoded, in
/// ParticipantObjectQuery.
fn clean(value: &str) -> std::borrow::Cow<'_, str> {
    if value.chars().any(char::is_control) {
        value
            .chars()
            .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
            .collect::<String>()
            .into()
    } else {
        value.into()
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn coded<W: io::Write>(w: &mut Writer<W>, element: &str, code: &Code) -> io::Result<()> {
    w.create_element(element)
        .with_attribute(("csd-code", code.code))
        .with_attribute(("codeSystemName", code.scheme))
        .with_attribute(("originalText", code.meaning))
        .write_empty()?;
    Ok(())
}

impl Message {
    /// The message as one line of XML (no declaration, no line breaks).
    pub fn to_xml(&self) -> String {
        let mut w = Writer::new(Vec::new());
        self.write(&mut w).expect("writing to a Vec does not fail");
        String::from_utf8(w.into_inner()).expect("quick-xml writes the UTF-8 it is given")
    }

    fn write<W: io::Write>(&self, w: &mut Writer<W>) -> io::Result<()> {
        w.create_element("AuditMessage").write_inner_content(|w| {
            w.create_element("EventIdentification")
                .with_attribute(("EventActionCode", self.action.code()))
                .with_attribute(("EventDateTime", self.date_time.as_str()))
                .with_attribute(("EventOutcomeIndicator", self.outcome.code()))
                .write_inner_content(|w| {
                    coded(w, "EventID", &self.event_id)?;
                    for t in &self.event_types {
                        coded(w, "EventTypeCode", t)?;
                    }
                    if let Some(d) = &self.outcome_description {
                        w.create_element("EventOutcomeDescription")
                            .write_text_content(BytesText::new(&clean(d)))?;
                    }
                    Ok(())
                })?;
            for p in &self.participants {
                let mut e = w
                    .create_element("ActiveParticipant")
                    .with_attribute(("UserID", clean(&p.user_id).as_ref()));
                if let Some(a) = &p.alternative_user_id {
                    e = e.with_attribute(("AlternativeUserID", clean(a).as_ref()));
                }
                if let Some(n) = &p.user_name {
                    e = e.with_attribute(("UserName", clean(n).as_ref()));
                }
                e = e.with_attribute((
                    "UserIsRequestor",
                    if p.user_is_requestor { "true" } else { "false" },
                ));
                if let Some((id, kind)) = &p.network_access_point {
                    e = e
                        .with_attribute(("NetworkAccessPointID", clean(id).as_ref()))
                        .with_attribute((
                            "NetworkAccessPointTypeCode",
                            match kind {
                                AccessPoint::MachineName => "1",
                                AccessPoint::IpAddress => "2",
                            },
                        ));
                }
                if p.roles.is_empty() {
                    e.write_empty()?;
                } else {
                    e.write_inner_content(|w| {
                        for r in &p.roles {
                            coded(w, "RoleIDCode", r)?;
                        }
                        Ok(())
                    })?;
                }
            }
            let mut source = w
                .create_element("AuditSourceIdentification")
                .with_attribute(("AuditSourceID", clean(&self.source.id).as_ref()));
            if let Some(site) = &self.source.enterprise_site_id {
                source = source.with_attribute(("AuditEnterpriseSiteID", clean(site).as_ref()));
            }
            // 4: application server process (PS3.15 A.5.1.2.1).
            source.write_inner_content(|w| {
                w.create_element("AuditSourceTypeCode")
                    .with_attribute(("csd-code", "4"))
                    .write_empty()?;
                Ok(())
            })?;
            for o in &self.objects {
                write_object(w, o)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

fn write_object<W: io::Write>(w: &mut Writer<W>, o: &ParticipantObject) -> io::Result<()> {
    let type_code = o.type_code.to_string();
    let role = o.role.to_string();
    w.create_element("ParticipantObjectIdentification")
        .with_attribute(("ParticipantObjectID", clean(&o.id).as_ref()))
        .with_attribute(("ParticipantObjectTypeCode", type_code.as_str()))
        .with_attribute(("ParticipantObjectTypeCodeRole", role.as_str()))
        .write_inner_content(|w| {
            coded(w, "ParticipantObjectIDTypeCode", &o.id_type)?;
            match &o.name_or_query {
                NameOrQuery::Name(name) => {
                    w.create_element("ParticipantObjectName")
                        .write_text_content(BytesText::new(&clean(name)))?;
                }
                NameOrQuery::Query(bytes) => {
                    w.create_element("ParticipantObjectQuery")
                        .write_text_content(BytesText::new(&base64(bytes)))?;
                }
            }
            for (kind, value) in &o.details {
                w.create_element("ParticipantObjectDetail")
                    .with_attribute(("type", clean(kind).as_ref()))
                    .with_attribute(("value", base64(value).as_str()))
                    .write_empty()?;
            }
            if !o.accession_numbers.is_empty() || !o.sop_classes.is_empty() {
                w.create_element("ParticipantObjectDescription")
                    .write_inner_content(|w| {
                        for a in &o.accession_numbers {
                            w.create_element("Accession")
                                .with_attribute(("Number", clean(a).as_ref()))
                                .write_empty()?;
                        }
                        for c in &o.sop_classes {
                            let n = c.number_of_instances.to_string();
                            w.create_element("SOPClass")
                                .with_attribute(("UID", clean(&c.uid).as_ref()))
                                .with_attribute(("NumberOfInstances", n.as_str()))
                                .write_empty()?;
                        }
                        Ok(())
                    })?;
            }
            Ok(())
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(user_id: &str) -> Message {
        Message {
            event_id: event::QUERY,
            action: Action::Execute,
            date_time: "2026-12-02T10:00:00.000+08:00".into(),
            outcome: Outcome::Success,
            outcome_description: None,
            event_types: Vec::new(),
            participants: vec![Participant {
                user_id: user_id.into(),
                alternative_user_id: None,
                user_name: None,
                user_is_requestor: true,
                network_access_point: Some(("10.0.0.1".into(), AccessPoint::IpAddress)),
                roles: vec![role::SOURCE],
            }],
            source: Source {
                id: "HUREN".into(),
                enterprise_site_id: None,
            },
            objects: vec![ParticipantObject {
                id: "1.2.840.10008.5.1.4.1.2.2.1".into(),
                id_type: id_type::SOP_CLASS_UID,
                type_code: 2,
                role: 3,
                name_or_query: NameOrQuery::Query(b"\x08\x00<x>".to_vec()),
                details: vec![("TransferSyntax".into(), b"1.2.840.10008.1.2".to_vec())],
                accession_numbers: Vec::new(),
                sop_classes: Vec::new(),
            }],
        }
    }

    #[test]
    fn values_are_escaped_and_stay_on_one_line() {
        let cases = [
            ("WS1", "UserID=\"WS1\""),
            ("a\"b<c>&", "UserID=\"a&quot;b&lt;c&gt;&amp;\""),
            (
                "evil\n<AuditMessage>",
                "UserID=\"evil\u{FFFD}&lt;AuditMessage&gt;\"",
            ),
        ];
        for (user, expected) in cases {
            let xml = sample(user).to_xml();
            assert!(xml.contains(expected), "{user:?}: {xml}");
            assert!(!xml.contains('\n'), "{xml}");
            assert_eq!(xml.matches("<AuditMessage>").count(), 1, "{xml}");
        }
        let xml = sample("x").to_xml();
        assert!(xml.contains("<ParticipantObjectQuery>CAA8eD4=</ParticipantObjectQuery>"));
        assert!(xml.contains("type=\"TransferSyntax\" value=\"MS4yLjg0MC4xMDAwOC4xLjI=\""));
    }
}
