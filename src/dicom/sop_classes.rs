//! The SOP classes this node accepts: every Storage SOP Class in the
//! standard's registry, as dicom-dictionary-std carries it (see
//! `src/storage_sop_classes.rs`, generated from that table; a test checks the
//! two agree, so a dependency update cannot silently leave one out).

pub use crate::storage_sop_classes::STORAGE_SOP_CLASSES;

use dicom_dictionary_std::uids;

pub fn storage_sop_classes() -> impl Iterator<Item = &'static str> {
    STORAGE_SOP_CLASSES.iter().map(|(uid, _)| *uid)
}

pub fn is_storage(uid: &str) -> bool {
    STORAGE_SOP_CLASSES.iter().any(|(u, _)| *u == uid)
}

/// The Query/Retrieve SOP classes (PS3.4 C.6): Patient Root and Study Root,
/// each with FIND, MOVE and GET.
pub const QUERY_RETRIEVE: &[&str] = &[
    uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
    uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE,
    uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET,
    uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
    uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE,
    uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET,
];

pub fn is_find(uid: &str) -> bool {
    uid == uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND
        || uid == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND
}

pub fn is_move(uid: &str) -> bool {
    uid == uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE
        || uid == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_MOVE
}

pub fn is_get(uid: &str) -> bool {
    uid == uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET
        || uid == uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET
}

/// Whether the information model is Study Root (where PATIENT is not a
/// level).
pub fn is_study_root(uid: &str) -> bool {
    uid.starts_with("1.2.840.10008.5.1.4.1.2.2.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::dictionary::{UidDictionary, UidType};
    use dicom_dictionary_std::{StandardSopClassDictionary, uids};

    #[test]
    fn list_matches_the_dictionary() {
        // Every listed UID is a storage SOP class of the dictionary...
        for (uid, name) in STORAGE_SOP_CLASSES {
            let entry = StandardSopClassDictionary.by_uid(uid).expect(uid);
            assert_eq!(entry.r#type, UidType::SopClass, "{uid}");
            assert_eq!(entry.name, *name, "{uid}");
        }
        // ...and the dictionary has no storage SOP class the list lacks. The
        // crate exposes no iterator, so read its registry's Debug form.
        let dump = format!("{:?}", dicom_dictionary_std::sop_class::registry());
        let mut in_dictionary = std::collections::BTreeSet::new();
        for part in dump.split("uid: \"").skip(1) {
            let uid = &part[..part.find('"').unwrap()];
            let name_start = part.find("name: \"").unwrap() + 7;
            let name = &part[name_start..name_start + part[name_start..].find('"').unwrap()];
            if name.contains("Storage")
                && !name.contains("Storage Commitment")
                && uid != uids::MEDIA_STORAGE_DIRECTORY_STORAGE
            {
                in_dictionary.insert(uid.to_string());
            }
        }
        let listed: std::collections::BTreeSet<String> =
            storage_sop_classes().map(str::to_string).collect();
        assert!(!in_dictionary.is_empty());
        assert_eq!(
            listed, in_dictionary,
            "run scripts/gen-storage-sop-classes.py"
        );
    }

    #[test]
    fn covers_the_common_storage_sop_classes() {
        let all: Vec<&str> = storage_sop_classes().collect();
        let must = [
            uids::CT_IMAGE_STORAGE,
            uids::ENHANCED_CT_IMAGE_STORAGE,
            uids::MR_IMAGE_STORAGE,
            uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
            uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE,
            uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
            uids::ENCAPSULATED_PDF_STORAGE,
            uids::BASIC_TEXT_SR_STORAGE,
            uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
            uids::RT_PLAN_STORAGE,
            uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
            uids::VIDEO_ENDOSCOPIC_IMAGE_STORAGE,
            uids::DIGITAL_MAMMOGRAPHY_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
            uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
        ];
        for uid in must {
            assert!(all.contains(&uid), "{uid} missing");
        }
        let must_not = [
            uids::VERIFICATION,
            uids::STORAGE_COMMITMENT_PUSH_MODEL,
            uids::MEDIA_STORAGE_DIRECTORY_STORAGE,
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
        ];
        for uid in must_not {
            assert!(!all.contains(&uid), "{uid} wrongly included");
        }
    }
}
