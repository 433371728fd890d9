//! The DICOM server: associations over dicom-ul (async, on tokio) and the
//! DIMSE services the node provides.
//!
//! - `listener`: the accept loop, the association limit, shutdown.
//! - `association`: negotiation, AE-title policy, the P-DATA loop and the
//!   dispatch to one file per service.
//! - `acceptance`: the transfer syntax accepted on a context the node
//!   sends on (C-GET storage contexts with the SCP role).
//! - `receive`: the PDUs of an established association, P-DATA-TF read
//!   into a reused buffer and handed out as slices.
//! - `dimse`: command sets, Message IDs and named statuses.
//! - `c_echo`, `c_store`, `c_find`, `retrieve` (C-MOVE, C-GET),
//!   `commitment` (Storage Commitment Push Model): the services.
//! - `context`: what the services share of the node and of their
//!   association (`DicomContext`, `Op`, the AE-title policy).
//! - `report`: a Storage Commitment result awaiting its acknowledgement.
//! - `identifier`: Q/R identifiers to and from the shared matcher's types.
//! - `sop_classes`: which abstract syntaxes are accepted.

pub mod acceptance;
pub mod association;
pub mod c_echo;
pub mod c_find;
pub mod c_store;
pub mod commitment;
pub mod context;
pub mod dimse;
pub mod identifier;
pub mod listener;
mod receive;
pub mod report;
pub mod retrieve;
pub mod sop_classes;
pub mod tls;

pub use context::DicomContext;
