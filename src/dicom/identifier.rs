//! Identifiers: the data sets of C-FIND, C-MOVE and C-GET requests and
//! responses, decoded and encoded with dicom-object in the presentation
//! context's transfer syntax and the identifier's character set.

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::query::{self, Level, Match, Query};

/// Identifiers larger than this are refused: real ones are a few hundred
/// bytes.
pub const MAX_IDENTIFIER_LEN: usize = 1024 * 1024;

pub fn decode(bytes: &[u8], transfer_syntax_uid: &str) -> Result<InMemDicomObject, String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax_uid)
        .ok_or_else(|| format!("unknown transfer syntax {transfer_syntax_uid}"))?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| e.to_string())
}

pub fn encode(obj: &InMemDicomObject, transfer_syntax_uid: &str) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax_uid)
        .ok_or_else(|| format!("unknown transfer syntax {transfer_syntax_uid}"))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A text value of an identifier element, or "" (absent, empty, or not
/// text).
pub fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches([' ', '\0']).to_string())
        .unwrap_or_default()
}

/// The Query/Retrieve Level of an identifier.
pub fn level(obj: &InMemDicomObject) -> Result<Level, String> {
    let code = text(obj, tags::QUERY_RETRIEVE_LEVEL);
    Level::from_code(&code).ok_or_else(|| format!("Query/Retrieve Level {code:?} is not valid"))
}

/// Elements that describe the identifier itself rather than ask for an
/// attribute.
fn is_control(tag: Tag) -> bool {
    tag == tags::SPECIFIC_CHARACTER_SET
        || tag == tags::QUERY_RETRIEVE_LEVEL
        || tag == tags::RETRIEVE_AE_TITLE
        || tag == tags::INSTANCE_AVAILABILITY
        || tag.0 == 0x0000
        || tag.0 == 0x0002
}

/// A query from a C-FIND identifier: each element is a key, matching when
/// it has a value. Returns the query and whether any key is one the index
/// cannot answer (Pending 0xFF01).
pub fn query_from(obj: &InMemDicomObject, level: Level) -> Result<(Query, bool), String> {
    let mut query = Query::new(level);
    let mut unsupported = false;
    for element in obj.iter() {
        let tag = element.tag();
        if is_control(tag) {
            continue;
        }
        if element.vr() == VR::SQ {
            // Sequence matching is not supported: the key is returned
            // empty (PS3.4 C.2.2.1.1 lets the SCP ignore it).
            query.request(tag);
            unsupported = true;
            continue;
        }
        let value = element.to_str().map(|s| s.into_owned()).unwrap_or_default();
        query.add_key(tag, &value).map_err(|e| e.to_string())?;
        if !query.is_supported(tag) {
            unsupported = true;
        }
    }
    Ok((query, unsupported))
}

/// The unique key of a level (PS3.4 C.6.1.1, C.6.2.1).
pub fn unique_key(level: Level) -> Tag {
    match level {
        Level::Patient => tags::PATIENT_ID,
        Level::Study => tags::STUDY_INSTANCE_UID,
        Level::Series => tags::SERIES_INSTANCE_UID,
        Level::Image => tags::SOP_INSTANCE_UID,
    }
}

/// The IMAGE-level query that finds every instance a C-MOVE or C-GET
/// identifier names. The unique key of the identifier's level must be
/// given: a retrieve without it would send everything.
pub fn retrieve_query(obj: &InMemDicomObject) -> Result<Query, String> {
    let level = level(obj)?;
    let key = unique_key(level);
    if text(obj, key).is_empty() {
        return Err(format!(
            "{} retrieve without its unique key {}",
            level.code(),
            keyword(key)
        ));
    }
    let mut query = Query::new(Level::Image);
    for element in obj.iter() {
        let tag = element.tag();
        if is_control(tag) || element.vr() == VR::SQ {
            continue;
        }
        // Only the unique keys of the levels down to the requested one
        // identify what to retrieve (C.4.2.2.1).
        if ![
            tags::PATIENT_ID,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ]
        .contains(&tag)
        {
            continue;
        }
        let value = element.to_str().map(|s| s.into_owned()).unwrap_or_default();
        query.add_key(tag, &value).map_err(|e| e.to_string())?;
    }
    Ok(query)
}

fn keyword(tag: Tag) -> &'static str {
    query::attribute(tag).map(|a| a.keyword).unwrap_or("?")
}

/// Character sets this node writes responses in: the one the request used
/// when it can hold the values, else UTF-8.
fn response_charset(request: &InMemDicomObject, m: &Match) -> Option<String> {
    let requested = text(request, tags::SPECIFIC_CHARACTER_SET);
    let all_ascii = m
        .elements
        .iter()
        .all(|e| e.values.iter().all(|v| v.is_ascii()));
    match requested.as_str() {
        "" if all_ascii => None,
        "ISO_IR 192" | "GB18030" => Some(requested),
        _ if all_ascii && !requested.is_empty() => Some(requested),
        _ => Some("ISO_IR 192".to_string()),
    }
}

/// The C-FIND response identifier for a match: every key the request gave,
/// with the index's value or empty, plus the Query/Retrieve Level and the
/// Retrieve AE Title.
pub fn response(request: &InMemDicomObject, m: &Match, ae_title: &str) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    if let Some(cs) = response_charset(request, m) {
        out.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from(cs),
        ));
    }
    out.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from(m.level.code()),
    ));
    out.put(DataElement::new(
        tags::RETRIEVE_AE_TITLE,
        VR::AE,
        PrimitiveValue::from(ae_title),
    ));
    for element in request.iter() {
        let tag = element.tag();
        if is_control(tag) {
            if tag == tags::INSTANCE_AVAILABILITY {
                // Every instance the index lists is in the blob store.
                out.put(DataElement::new(
                    tag,
                    VR::CS,
                    PrimitiveValue::from("ONLINE"),
                ));
            }
            continue;
        }
        match m.get(tag) {
            // Sequence matching is not supported: empty (query_from).
            Some(e) if !e.values.is_empty() && element.vr() != VR::SQ => {
                out.put(DataElement::new(
                    tag,
                    e.vr,
                    PrimitiveValue::Strs(e.values.iter().cloned().collect()),
                ));
            }
            _ => {
                out.put(empty(tag, element.vr()));
            }
        }
    }
    out
}

/// A return key with no value. A sequence key is an empty sequence, not
/// an empty primitive value under VR SQ: the writer would take the latter
/// for malformed data and log a warning per match.
fn empty(tag: Tag, vr: VR) -> dicom_object::mem::InMemElement {
    if vr == VR::SQ {
        DataElement::new(tag, VR::SQ, DataSetSequence::<InMemDicomObject>::empty())
    } else {
        DataElement::new(tag, vr, PrimitiveValue::Empty)
    }
}

/// A study-level response for a regional prior held at another hospital:
/// the keys the request asked for that a registry record carries, the
/// source institution in InstitutionName, this node as RetrieveAETitle.
/// InstanceAvailability is UNAVAILABLE: this node does not hold the
/// instances (peer retrieval fetches them on demand once it is built).
pub fn regional_response(
    request: &InMemDicomObject,
    record: &crate::contract::StudyRecord,
    institution: &str,
    description: &str,
    ae_title: &str,
) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    let put = |out: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str| {
        out.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    put(&mut out, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    put(&mut out, tags::QUERY_RETRIEVE_LEVEL, VR::CS, "STUDY");
    put(&mut out, tags::RETRIEVE_AE_TITLE, VR::AE, ae_title);
    put(&mut out, tags::INSTITUTION_NAME, VR::LO, institution);
    let date = record.study_date.as_deref().unwrap_or("").replace('-', "");
    let time = record.study_time.as_deref().unwrap_or("").replace(':', "");
    for element in request.iter() {
        let tag = element.tag();
        let value: Option<String> = match tag {
            t if t == tags::STUDY_INSTANCE_UID => Some(record.study_instance_uid.clone()),
            t if t == tags::STUDY_DATE => Some(date.clone()),
            t if t == tags::STUDY_TIME => Some(time.clone()),
            t if t == tags::MODALITIES_IN_STUDY => Some(record.modalities.join("\\")),
            t if t == tags::NUMBER_OF_STUDY_RELATED_SERIES => {
                Some(record.number_of_series.to_string())
            }
            t if t == tags::NUMBER_OF_STUDY_RELATED_INSTANCES => {
                Some(record.number_of_instances.to_string())
            }
            t if t == tags::STUDY_DESCRIPTION => Some(description.to_string()),
            t if t == tags::INSTANCE_AVAILABILITY => Some("UNAVAILABLE".into()),
            // The patient as the workstation named them.
            t if t == tags::PATIENT_ID || t == tags::ISSUER_OF_PATIENT_ID => Some(text(request, t)),
            t if t == tags::QUERY_RETRIEVE_LEVEL
                || t == tags::SPECIFIC_CHARACTER_SET
                || t == tags::RETRIEVE_AE_TITLE
                || t == tags::INSTITUTION_NAME =>
            {
                continue;
            }
            _ => None,
        };
        match value {
            Some(v) if !v.is_empty() => {
                out.put(DataElement::new(tag, element.vr(), PrimitiveValue::from(v)));
            }
            _ => {
                out.put(empty(tag, element.vr()));
            }
        }
    }
    out
}
