//! A Storage Commitment result (PS3.4 J.3.3) waiting for its
//! N-EVENT-REPORT-RSP: what src/dicom/commitment.rs builds and an
//! association keeps until the SCU acknowledges it.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::dimse::{self, CommandSetBuilder, command_field};
use super::identifier;

/// The well-known SOP Instance of the Storage Commitment Push Model.
pub(super) const WELL_KNOWN_INSTANCE: &str = "1.2.840.10008.1.20.1.1";

/// The outcome of one requested instance.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub(super) sop_class_uid: String,
    pub(super) sop_instance_uid: String,
    pub(super) failure_reason: Option<u16>,
}

/// A commitment result waiting for its N-EVENT-REPORT-RSP.
#[derive(Debug, Clone)]
pub struct Report {
    pub(super) message_id: u16,
    pub(super) transaction_uid: String,
    pub(super) outcomes: Vec<Outcome>,
}

impl Report {
    pub(super) fn event_type(&self) -> u16 {
        if self.outcomes.iter().all(|o| o.failure_reason.is_none()) {
            1
        } else {
            2
        }
    }

    pub(super) fn command(&self) -> Vec<u8> {
        CommandSetBuilder::default()
            .ui(
                tags::AFFECTED_SOP_CLASS_UID,
                uids::STORAGE_COMMITMENT_PUSH_MODEL,
            )
            .us(tags::COMMAND_FIELD, command_field::N_EVENT_REPORT_RQ)
            .us(tags::MESSAGE_ID, self.message_id)
            .us(tags::COMMAND_DATA_SET_TYPE, dimse::DATA_SET_PRESENT)
            .ui(tags::AFFECTED_SOP_INSTANCE_UID, WELL_KNOWN_INSTANCE)
            .us(tags::EVENT_TYPE_ID, self.event_type())
            .build()
    }

    /// The Event Information (PS3.4 J.3.3.1).
    pub(super) fn data_set(&self, transfer_syntax: &str) -> Result<Vec<u8>, String> {
        let item = |o: &Outcome| {
            let mut item = InMemDicomObject::new_empty();
            item.put(DataElement::new(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(o.sop_class_uid.as_str()),
            ));
            item.put(DataElement::new(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(o.sop_instance_uid.as_str()),
            ));
            if let Some(reason) = o.failure_reason {
                item.put(DataElement::new(
                    tags::FAILURE_REASON,
                    VR::US,
                    PrimitiveValue::from(reason),
                ));
            }
            item
        };
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::TRANSACTION_UID,
            VR::UI,
            PrimitiveValue::from(self.transaction_uid.as_str()),
        ));
        let committed: Vec<InMemDicomObject> = self
            .outcomes
            .iter()
            .filter(|o| o.failure_reason.is_none())
            .map(item)
            .collect();
        let failed: Vec<InMemDicomObject> = self
            .outcomes
            .iter()
            .filter(|o| o.failure_reason.is_some())
            .map(item)
            .collect();
        if !committed.is_empty() {
            obj.put(DataElement::new(
                tags::REFERENCED_SOP_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(committed),
            ));
        }
        if !failed.is_empty() {
            obj.put(DataElement::new(
                tags::FAILED_SOP_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(failed),
            ));
        }
        identifier::encode(&obj, transfer_syntax)
    }
}
