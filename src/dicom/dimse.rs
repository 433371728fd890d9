//! DIMSE command sets (PS3.7 §6.3, §9.3): always implicit VR little
//! endian, group 0000 only. dicom-ul has no DIMSE layer, so the node parses
//! and builds command sets itself; the handful of elements involved do not
//! warrant a full data set parser.

use std::collections::BTreeMap;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use thiserror::Error;

/// Command Field values (PS3.7 §9.3 and §10.3, Table E.1-1).
pub mod command_field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    pub const N_ACTION_RQ: u16 = 0x0130;
    pub const N_ACTION_RSP: u16 = 0x8130;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command Data Set Type value meaning "no data set follows" (PS3.7 E.1-1);
/// any other value means one does.
pub const NO_DATA_SET: u16 = 0x0101;
/// The value this node sends when a data set follows.
pub const DATA_SET_PRESENT: u16 = 0x0001;

/// Largest command set accepted; real ones are a few hundred bytes, so a
/// larger one is a broken or hostile peer, not a bigger request.
pub const MAX_COMMAND_SET_LEN: usize = 64 * 1024;

/// The status codes, shared with STOW-RS: see [`crate::status`].
pub use crate::status;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("command set is truncated")]
    Truncated,
    #[error("command set element ({0:04X},{1:04X}) is not in group 0000")]
    NotCommandGroup(u16, u16),
    #[error("command set has no Command Field")]
    NoCommandField,
}

/// A parsed command set: element values by tag, as raw bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandSet {
    elements: BTreeMap<Tag, Vec<u8>>,
}

impl CommandSet {
    pub fn parse(mut bytes: &[u8]) -> Result<CommandSet, Error> {
        let mut elements = BTreeMap::new();
        while !bytes.is_empty() {
            if bytes.len() < 8 {
                return Err(Error::Truncated);
            }
            let group = u16::from_le_bytes([bytes[0], bytes[1]]);
            let element = u16::from_le_bytes([bytes[2], bytes[3]]);
            let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
            if group != 0x0000 {
                return Err(Error::NotCommandGroup(group, element));
            }
            let value = bytes.get(8..8 + len).ok_or(Error::Truncated)?;
            elements.insert(Tag(group, element), value.to_vec());
            bytes = &bytes[8 + len..];
        }
        let set = CommandSet { elements };
        if set.u16(tags::COMMAND_FIELD).is_none() {
            return Err(Error::NoCommandField);
        }
        Ok(set)
    }

    pub fn u16(&self, tag: Tag) -> Option<u16> {
        let v = self.elements.get(&tag)?;
        Some(u16::from_le_bytes([*v.first()?, *v.get(1)?]))
    }

    /// A text value without its padding (trailing NUL for UI, spaces else).
    pub fn string(&self, tag: Tag) -> Option<String> {
        let v = self.elements.get(&tag)?;
        Some(
            String::from_utf8_lossy(v)
                .trim_end_matches(['\0', ' '])
                .trim_start_matches(' ')
                .to_string(),
        )
    }

    pub fn command_field(&self) -> u16 {
        self.u16(tags::COMMAND_FIELD).unwrap_or_default()
    }

    pub fn message_id(&self) -> u16 {
        self.u16(tags::MESSAGE_ID).unwrap_or_default()
    }

    pub fn has_data_set(&self) -> bool {
        self.u16(tags::COMMAND_DATA_SET_TYPE)
            .is_some_and(|t| t != NO_DATA_SET)
    }

    pub fn affected_sop_class_uid(&self) -> Option<String> {
        self.string(tags::AFFECTED_SOP_CLASS_UID)
    }

    pub fn affected_sop_instance_uid(&self) -> Option<String> {
        self.string(tags::AFFECTED_SOP_INSTANCE_UID)
    }
}

/// Builds a command set; elements must be added in ascending tag order, as
/// PS3.5 §7.1 requires of any data set.
#[derive(Debug, Default)]
pub struct CommandSetBuilder {
    body: Vec<u8>,
    last: Option<Tag>,
}

impl CommandSetBuilder {
    fn element(mut self, tag: Tag, value: &[u8]) -> Self {
        debug_assert!(
            self.last.is_none_or(|last| last < tag),
            "elements out of order"
        );
        self.last = Some(tag);
        self.body.extend_from_slice(&tag.0.to_le_bytes());
        self.body.extend_from_slice(&tag.1.to_le_bytes());
        self.body
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.body.extend_from_slice(value);
        self
    }

    pub fn us(self, tag: Tag, value: u16) -> Self {
        self.element(tag, &value.to_le_bytes())
    }

    /// A UI value, NUL-padded to even length (PS3.5 §9.1).
    pub fn ui(self, tag: Tag, value: &str) -> Self {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.element(tag, &v)
    }

    /// A text value (LO, AE), space-padded to even length.
    pub fn text(self, tag: Tag, value: &str) -> Self {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.element(tag, &v)
    }

    /// The encoded command set, with its Command Group Length first.
    pub fn build(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.body.len());
        out.extend_from_slice(&[0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00]);
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Sub-operation counts of C-MOVE and C-GET responses (PS3.7 C.4.2.1.5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubOperations {
    pub remaining: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
}

/// A C-FIND, C-MOVE or C-GET response.
pub fn query_retrieve_response(
    request: &CommandSet,
    response_field: u16,
    status: u16,
    data_set_follows: bool,
    counts: Option<SubOperations>,
    error_comment: Option<&str>,
) -> Vec<u8> {
    let mut b = CommandSetBuilder::default();
    if let Some(uid) = request.affected_sop_class_uid() {
        b = b.ui(tags::AFFECTED_SOP_CLASS_UID, &uid);
    }
    b = b
        .us(tags::COMMAND_FIELD, response_field)
        .us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id())
        .us(
            tags::COMMAND_DATA_SET_TYPE,
            if data_set_follows {
                DATA_SET_PRESENT
            } else {
                NO_DATA_SET
            },
        )
        .us(tags::STATUS, status);
    if let Some(comment) = error_comment {
        let comment: String = comment.chars().filter(|c| *c != '\\').take(64).collect();
        b = b.text(tags::ERROR_COMMENT, &comment);
    }
    if let Some(c) = counts {
        // Remaining (C.4.2.1.5): required while sub-operations are
        // pending, allowed on Cancel (the ones the cancel left undone), and
        // absent from every other final response.
        if status == status::PENDING || status == status::CANCEL {
            b = b.us(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, c.remaining);
        }
        b = b
            .us(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, c.completed)
            .us(tags::NUMBER_OF_FAILED_SUBOPERATIONS, c.failed)
            .us(tags::NUMBER_OF_WARNING_SUBOPERATIONS, c.warning);
    }
    b.build()
}

/// A response to a request: a command set that never has a data set.
pub fn response(
    request: &CommandSet,
    response_field: u16,
    status: u16,
    error_comment: Option<&str>,
) -> Vec<u8> {
    let mut b = CommandSetBuilder::default();
    if let Some(uid) = request.affected_sop_class_uid() {
        b = b.ui(tags::AFFECTED_SOP_CLASS_UID, &uid);
    }
    b = b
        .us(tags::COMMAND_FIELD, response_field)
        .us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id())
        .us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .us(tags::STATUS, status);
    if let Some(comment) = error_comment {
        // Error Comment is LO: at most 64 characters (PS3.7 C.4).
        let comment: String = comment.chars().filter(|c| *c != '\\').take(64).collect();
        b = b.text(tags::ERROR_COMMENT, &comment);
    }
    if let Some(uid) = request.affected_sop_instance_uid() {
        b = b.ui(tags::AFFECTED_SOP_INSTANCE_UID, &uid);
    }
    b.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_rq() -> Vec<u8> {
        CommandSetBuilder::default()
            .ui(tags::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2")
            .us(tags::COMMAND_FIELD, command_field::C_STORE_RQ)
            .us(tags::MESSAGE_ID, 7)
            .us(tags::PRIORITY, 0)
            .us(tags::COMMAND_DATA_SET_TYPE, 0x0000)
            .ui(tags::AFFECTED_SOP_INSTANCE_UID, "1.2.3")
            .build()
    }

    #[test]
    fn round_trip_store_request() {
        let set = CommandSet::parse(&store_rq()).unwrap();
        assert_eq!(set.command_field(), command_field::C_STORE_RQ);
        assert_eq!(set.message_id(), 7);
        assert!(set.has_data_set());
        assert_eq!(
            set.affected_sop_class_uid().as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(set.affected_sop_instance_uid().as_deref(), Some("1.2.3"));
        // Command Group Length counts the bytes after itself.
        let bytes = store_rq();
        let group_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(group_len, bytes.len() - 12);
    }

    #[test]
    fn response_echoes_the_request() {
        let rq = CommandSet::parse(&store_rq()).unwrap();
        let rsp = CommandSet::parse(&response(
            &rq,
            command_field::C_STORE_RSP,
            status::CANNOT_UNDERSTAND,
            Some("data set is truncated"),
        ))
        .unwrap();
        assert_eq!(rsp.command_field(), command_field::C_STORE_RSP);
        assert_eq!(rsp.u16(tags::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
        assert_eq!(rsp.u16(tags::STATUS), Some(0xC000));
        assert!(!rsp.has_data_set());
        assert_eq!(rsp.affected_sop_instance_uid().as_deref(), Some("1.2.3"));
        assert_eq!(
            rsp.string(tags::ERROR_COMMENT).as_deref(),
            Some("data set is truncated")
        );
    }

    #[test]
    fn malformed_command_sets() {
        let good = store_rq();
        let cases: Vec<(&str, Vec<u8>, Error)> = vec![
            (
                "cut in a header",
                good[..good.len() - 3].to_vec(),
                Error::Truncated,
            ),
            ("short header", vec![0, 0, 0], Error::Truncated),
            (
                "wrong group",
                vec![0x08, 0x00, 0x18, 0x00, 0, 0, 0, 0],
                Error::NotCommandGroup(8, 0x18),
            ),
            (
                "no command field",
                vec![0, 0, 0x10, 0x01, 2, 0, 0, 0, 1, 0],
                Error::NoCommandField,
            ),
        ];
        for (name, bytes, expected) in cases {
            assert_eq!(CommandSet::parse(&bytes), Err(expected), "{name}");
        }
    }
}
