//! The status codes the node answers with (PS3.7 Annex C, PS3.4 Annex B and
//! C): in DIMSE responses, and as STOW-RS FailureReason (PS3.18 Table
//! I.2-1 uses the same codes), so they live beside ingest, not in one
//! protocol's folder.
//!
//! DIMSE status codes returned by this node. Each cites where the standard
//! defines it.

/// Success (PS3.7 C.1.1).
pub const SUCCESS: u16 = 0x0000;
/// Refused: SOP Class not supported (PS3.7 C.5.13): the C-STORE-RQ's
/// Affected SOP Class UID is not the presentation context's abstract
/// syntax.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Unrecognized Operation (PS3.7 C.5.6): a DIMSE service this node does
/// not provide on that presentation context.
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// Refused: Not Authorized (PS3.7 Annex C, a general status): the calling
/// AE may not query or retrieve, or not to that destination.
pub const NOT_AUTHORIZED: u16 = 0x0124;
/// Pending, all optional keys supported (PS3.4 C.4.1.1.4), and the
/// Pending of C-MOVE / C-GET sub-operations (C.4.2.1.5, C.4.3.1.4).
pub const PENDING: u16 = 0xFF00;
/// Pending, one or more optional keys were not supported (C.4.1.1.4).
pub const PENDING_OPTIONAL_KEYS_UNSUPPORTED: u16 = 0xFF01;
/// Cancel: matching or sub-operations terminated due to a C-CANCEL.
pub const CANCEL: u16 = 0xFE00;
/// Refused: Out of Resources, unable to perform sub-operations
/// (C-MOVE/C-GET 0xA702): no sub-operation could be performed.
pub const UNABLE_TO_PERFORM_SUB_OPERATIONS: u16 = 0xA702;
/// Refused: Move Destination unknown (C-MOVE 0xA801).
pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
/// Identifier does not match SOP Class (Q/R 0xA900).
pub const IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
/// Warning: sub-operations complete, one or more failures or warnings
/// (C-MOVE/C-GET 0xB000).
pub const SUB_OPERATIONS_COMPLETE_WITH_FAILURES: u16 = 0xB000;
/// Refused: Out of Resources (PS3.4 B.2.3, Storage 0xA7xx): the blob
/// store or the index could not take the instance.
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// Error: Data Set does not match SOP Class (PS3.4 B.2.3, 0xA9xx): the
/// data set's SOP Class UID is not the one the C-STORE-RQ announced.
pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
/// Error: Cannot understand (PS3.4 B.2.3, 0xCxxx): the data set is
/// truncated or malformed and cannot be parsed.
pub const CANNOT_UNDERSTAND: u16 = 0xC000;
/// Error: Cannot understand (0xCxxx), sub-code of this node: the data
/// set lacks a required UID (SOP Instance, Study Instance, Series
/// Instance) or it is not a valid UID.
pub const CANNOT_UNDERSTAND_MISSING_UID: u16 = 0xC001;
/// Error: Cannot understand (0xCxxx), sub-code of this node: the data
/// set's SOP Instance UID differs from the C-STORE-RQ's Affected SOP
/// Instance UID.
pub const CANNOT_UNDERSTAND_INSTANCE_MISMATCH: u16 = 0xC002;
/// Error: Cannot understand (0xCxxx), sub-code of this node: the
/// C-STORE-RQ announced no data set, or no valid Affected SOP Instance
/// UID.
pub const CANNOT_UNDERSTAND_COMMAND: u16 = 0xC003;
