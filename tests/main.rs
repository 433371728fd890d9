//! huren's integration tests: one binary, one module per area.
//!
//! Run through `scripts/test.sh`, which starts PostgreSQL and Garage and
//! prepares dcmtk and pynetdicom; see support/mod.rs.

mod architecture;
mod audit;
mod cli;
mod dicomweb;
mod durability;
mod federation;
mod ingest;
mod interop;
mod lifecycle;
mod metrics;
mod negotiation;
mod page;
mod peer;
mod query_retrieve;
mod recognition;
mod recognition_table;
mod region;
mod security;
mod security_node;
mod security_registry;
mod storage_config;
mod support;
mod tls;
mod viewer;
