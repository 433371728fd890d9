//! IHE IOCM rejection notes (PS3.3 KO, CID 7011): what a Key Object
//! Selection Document that rejects instances says, read from its Part-10
//! bytes; and who may send one. Applying a note is src/lifecycle.rs's
//! work, handed the note by the ingest path (`ingest::RejectionHandler`).

use std::path::Path;

use dicom_dictionary_std::{tags, uids};
use dicom_object::OpenFileOptions;

/// The rejection reasons of CID 7011 that IHE IOCM defines, with the meaning
/// recorded beside the code.
pub const REJECTED_FOR_QUALITY_REASONS: &str = "113001";
pub const REJECTED_FOR_PATIENT_SAFETY_REASONS: &str = "113037";
pub const INCORRECT_MODALITY_WORKLIST_ENTRY: &str = "113038";
pub const DATA_RETENTION_POLICY_EXPIRED: &str = "113039";

const REASONS: [(&str, &str); 4] = [
    (REJECTED_FOR_QUALITY_REASONS, "Rejected for Quality Reasons"),
    (
        REJECTED_FOR_PATIENT_SAFETY_REASONS,
        "Rejected for Patient Safety Reasons",
    ),
    (
        INCORRECT_MODALITY_WORKLIST_ENTRY,
        "Incorrect Modality Worklist Entry",
    ),
    (
        DATA_RETENTION_POLICY_EXPIRED,
        "Data Retention Policy Expired",
    ),
];

/// The Code Meaning of a CID 7011 rejection code the node acts on.
pub fn reason_meaning(code: &str) -> Option<&'static str> {
    REASONS.iter().find(|(c, _)| *c == code).map(|(_, m)| *m)
}

/// Whether instances rejected for this reason stay rejected when sent
/// again: the quality, safety and worklist reasons say the images are wrong;
/// retention expiry says nothing about them.
pub fn blocks_resend(code: &str) -> bool {
    matches!(
        code,
        REJECTED_FOR_QUALITY_REASONS
            | REJECTED_FOR_PATIENT_SAFETY_REASONS
            | INCORRECT_MODALITY_WORKLIST_ENTRY
    )
}

/// An IOCM rejection note as received: its reason and the instances it
/// names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionNote {
    pub sop_instance_uid: String,
    /// The note's own Study Instance UID and Patient ID: IHE IOCM places a
    /// rejection note in the study of the instances it rejects.
    pub study_instance_uid: String,
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub reason_code: String,
    /// (Study, Series, SOP Instance UID) from Current Requested Procedure
    /// Evidence Sequence.
    pub referenced: Vec<(String, String, String)>,
}

/// Reads a Key Object Selection Document (a Part-10 object at `path`) and
/// returns it as a rejection note when its Concept Name Code Sequence holds
/// one of the IOCM rejection codes (scheme DCM); any other KOS (a teaching
/// file selection, say) is `None` and stored like every instance.
pub fn read_rejection_note(path: &Path) -> Result<Option<RejectionNote>, String> {
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| e.to_string())?;
    let text = |item: &dicom_object::InMemDicomObject, tag| -> String {
        item.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .unwrap_or_default()
    };
    let items =
        |item: &dicom_object::InMemDicomObject, tag| -> Vec<dicom_object::InMemDicomObject> {
            item.get(tag)
                .and_then(|e| e.items().map(|i| i.to_vec()))
                .unwrap_or_default()
        };
    let data_set: &dicom_object::InMemDicomObject = &obj;
    if text(data_set, tags::SOP_CLASS_UID) != uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE {
        return Ok(None);
    }
    let Some(concept) = items(data_set, tags::CONCEPT_NAME_CODE_SEQUENCE)
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let code = text(&concept, tags::CODE_VALUE);
    if text(&concept, tags::CODING_SCHEME_DESIGNATOR) != "DCM" || reason_meaning(&code).is_none() {
        return Ok(None);
    }
    let mut referenced = Vec::new();
    for study in items(
        data_set,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
    ) {
        let study_uid = text(&study, tags::STUDY_INSTANCE_UID);
        for series in items(&study, tags::REFERENCED_SERIES_SEQUENCE) {
            let series_uid = text(&series, tags::SERIES_INSTANCE_UID);
            for sop in items(&series, tags::REFERENCED_SOP_SEQUENCE) {
                let sop_uid = text(&sop, tags::REFERENCED_SOP_INSTANCE_UID);
                if !sop_uid.is_empty() {
                    referenced.push((study_uid.clone(), series_uid.clone(), sop_uid));
                }
            }
        }
    }
    if referenced.is_empty() {
        return Err("rejection note without any instance in Current Requested Procedure Evidence Sequence (0040,A375)".into());
    }
    Ok(Some(RejectionNote {
        sop_instance_uid: text(data_set, tags::SOP_INSTANCE_UID),
        study_instance_uid: text(data_set, tags::STUDY_INSTANCE_UID),
        patient_id: text(data_set, tags::PATIENT_ID),
        issuer_of_patient_id: text(data_set, tags::ISSUER_OF_PATIENT_ID),
        reason_code: code,
        referenced,
    }))
}

/// The calling AE titles that may send IOCM rejection notes
/// (`rejection_note_ae_titles`; by default those allowed to store, else
/// the AE directory). No one else may: a note deletes images.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RejectionSenders {
    ae_titles: std::collections::BTreeSet<String>,
}

impl RejectionSenders {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(ae_titles: I) -> RejectionSenders {
        RejectionSenders {
            ae_titles: ae_titles
                .into_iter()
                .map(|a| a.as_ref().trim().to_string())
                .filter(|a| !a.is_empty())
                .collect(),
        }
    }

    /// STOW-RS (no calling AE title) is never admitted.
    pub fn admits(&self, calling_ae_title: Option<&str>) -> bool {
        calling_ae_title.is_some_and(|ae| self.ae_titles.contains(ae.trim()))
    }
}
