//! The DICOM server: associations over dicom-ul (async, on tokio) and the
//! DIMSE services the node provides.
//!
//! - `listener`: the accept loop, the association limit, shutdown.
//! - `association`: negotiation, AE-title policy, the P-DATA loop and the
//!   dispatch to one file per service.
//! - `dimse`: command sets, Message IDs and named statuses.
//! - `c_echo`, `c_store`: the services.
//! - `sop_classes`: which abstract syntaxes are accepted.

pub mod association;
pub mod c_echo;
pub mod c_store;
pub mod dimse;
pub mod listener;
pub mod sop_classes;
mod storage_sop_classes;

pub use association::DicomContext;
