//! huren (互认, "mutual recognition"): the imaging result-sharing node of a
//! regional health cloud.
//!
//! # Layout
//!
//! - [`config`]: settings from defaults, a TOML file, the environment and
//!   flags, resolved once into a `NodeConfig`.
//! - [`types`]: `AeTitle`, `Uid`, `BlobHash`: parsed at the edge.
//! - [`dicom`]: the DICOM server (dicom-ul, async): accept loop, association
//!   negotiation, DIMSE command sets, one module per service.
//! - [`ingest`]: the one path by which an instance enters the node (C-STORE
//!   and STOW-RS): stage while hashing, check, publish, index.
//! - [`part10`]: the node's deterministic file meta, the structural check of
//!   a received data set, and the attributes the index keeps.
//! - [`storage`]: blobs on object_store keyed by BLAKE3, group-committed
//!   fsyncs on the local file system.
//! - [`transcode`]: transfer syntax conversion on the way out (C-MOVE,
//!   C-GET, WADO-RS), dicom-pixeldata for JPEG and RLE.
//! - [`index`]: patients, studies, series, instances on SQLite or
//!   PostgreSQL through one set of SQL, with a group-committing writer.
//! - [`query`]: the one matcher C-FIND and QIDO-RS share: a level, keys in
//!   DICOM matching syntax, matches streamed from the index.
//! - [`http`]: health, DICOMweb (QIDO-RS over [`query`], WADO-RS from
//!   verified blobs, STOW-RS into [`ingest`]) and the node's JSON API.
//! - [`patient_key`]: cross-enterprise identifiers (GB 11643) and the
//!   keyed hash that is the only patient identity the registry sees.
//! - [`peer`]: fetching a prior study from another hospital's node under a
//!   registry grant, verified against its published content root; the cache
//!   of such studies.
//! - [`confirm`]: confirmation of a study's recognition items at the
//!   hospital that did the exam, and the mark that its images cannot be
//!   retrieved: what the JSON API and the doctor's page share.
//! - [`priors`]: a patient's priors (degraded to the node's own when the
//!   registry is unreachable), the duplicate-exam check, decisions and
//!   statistics: what the JSON API and the doctor's page share.
//! - [`publish`]: study stability, the transactional outbox, the publisher
//!   and the directory poller: the node's side of the region.
//! - [`recognition`]: the mutual-recognition list, classification of a
//!   study into items, and the duplicate-exam check (pure code).
//! - [`registry`]: `huren registry` (hospital directory, study records,
//!   consent, hash-chained audit) and the client nodes reach it with; the
//!   contract is proto/huren.openapi.json.
//! - [`metrics`]: every metric the node and the registry export, and the
//!   one-line helpers that record them (`/metrics`, Prometheus text).
//! - [`tls`]: TLS on the node's and the registry's own ports: HTTPS, the
//!   certificate of the DICOM TLS listener, reloaded on SIGHUP.
//! - [`node`]: wires them together; `main` and the tests both start a node
//!   through it.
//! - [`verify`]: scrub the store against the index; rebuild the index.
//! - [`audit`]: DICOM audit messages (PS3.15 A.5) to an append-only file
//!   and, optionally, a syslog collector over TLS.
//! - [`lifecycle`]: deletion by an operator, an IOCM rejection note or the
//!   retention policy, with its record.
//! - [`gc`]: the collector of unreferenced blobs, safe against ingest.
//! - [`backup`]: online backup and restore.
//!
//! See docs/ARCHITECTURE.md for the path of one instance.

pub mod audit;
pub mod backup;
pub mod charset;
pub mod common;
pub mod config;
pub mod confirm;
pub mod contract;
pub mod dicom;
pub mod gc;
pub mod http;
pub mod index;
pub mod ingest;
pub mod iocm;
pub mod lifecycle;
pub mod metrics;
pub mod node;
pub mod part10;
pub mod patient_key;
pub mod peer;
pub mod priors;
pub mod progress;
pub mod publish;
pub mod query;
pub mod recognition;
pub mod recovery;
pub mod registry;
pub mod status;
pub mod storage;
pub mod storage_sop_classes;
pub mod tls;
pub mod transcode;
pub mod types;
pub mod verify;
