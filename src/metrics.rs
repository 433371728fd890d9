//! What the node and the registry count, in one place: every metric's
//! name, its description, and the one-line helpers the code records through
//! where each thing happens. `/metrics` on the HTTP ports renders them in
//! the Prometheus text format (docs/operations.md, "Monitoring").
//!
//! Names follow Prometheus' conventions: the `huren_` prefix, the unit in
//! the name (`_seconds`, `_bytes`), `_total` on counters, durations as
//! histograms in seconds. Label values come from small fixed sets, never
//! from wire data (no AE titles, no UIDs): each label value is a series
//! the monitoring keeps forever.
//!
//! The recorder is process-wide (the `metrics` facade has one global
//! recorder): several nodes started in one process, as the tests do, share
//! it and their counts add up.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// ------------------------------------------------------------- the node

/// 1 when `/ready` would answer 200, 0 when not (set at each scrape), so
/// that an alert needs no separate probe of `/ready`.
pub const READY: &str = "huren_ready";
/// Associations past negotiation and not yet ended.
pub const DICOM_ASSOCIATIONS_OPEN: &str = "huren_dicom_associations_open";
/// Associations not established, by `reason`.
pub const DICOM_ASSOCIATIONS_REFUSED: &str = "huren_dicom_associations_refused_total";
/// C-STORE, C-FIND, C-MOVE and C-GET, from the request to the final
/// response, by `operation`.
pub const DIMSE_DURATION: &str = "huren_dimse_request_duration_seconds";
/// QIDO-RS, WADO-RS and STOW-RS, from the request to the response head (a
/// WADO-RS body streams after it), by `service`.
pub const DICOMWEB_DURATION: &str = "huren_dicomweb_request_duration_seconds";
/// Instances acknowledged, by `source`, `durability` and `outcome`.
pub const INSTANCES_STORED: &str = "huren_instances_stored_total";
/// Bytes of the Part-10 objects written for them (a duplicate writes none).
pub const STORED_BYTES: &str = "huren_stored_bytes_total";
/// Failures of the blob store or the index, by `operation`.
pub const STORAGE_ERRORS: &str = "huren_storage_errors_total";
/// Blobs checked by `huren verify`, by `result`.
pub const VERIFY_BLOBS: &str = "huren_verify_blobs_total";
/// When `huren verify` last finished its scrub.
pub const VERIFY_LAST_RUN: &str = "huren_verify_last_run_timestamp_seconds";
/// Audit records the local audit file could not take (a full disk): what
/// they recorded went unaudited; `/ready` answers 503 until a record is
/// written again.
pub const AUDIT_WRITE_FAILURES: &str = "huren_audit_write_failures_total";
/// Outbox rows waiting for the registry (not dead).
pub const PUBLISH_BACKLOG: &str = "huren_publish_backlog";
/// Outbox rows the registry refused for good.
pub const PUBLISH_DEAD: &str = "huren_publish_dead";
/// When the publisher last delivered a batch.
pub const PUBLISH_LAST_SUCCESS: &str = "huren_publish_last_success_timestamp_seconds";
/// Publication attempts that failed (each is retried).
pub const PUBLISH_FAILURES: &str = "huren_publish_failures_total";
/// Bytes of instances fetched from peer nodes.
pub const PEER_FETCH_BYTES: &str = "huren_peer_fetch_bytes_total";
/// Study fetches from a peer node that failed.
pub const PEER_FETCH_FAILURES: &str = "huren_peer_fetch_failures_total";
/// Duplicate-exam checks, by `outcome` and `registry_reached`.
pub const RECOGNITION_CHECKS: &str = "huren_recognition_checks_total";
/// Studies whose items the hospital confirmed at the source, by `outcome`:
/// `confirmed` (the classifier's items kept) or `corrected` (other items
/// chosen): where a region's equipment misleads the classifier.
pub const RECOGNITION_CONFIRMATIONS: &str = "huren_recognition_confirmations_total";

// --------------------------------------------------------- the registry

/// The priors query, from request to answer (consent, records, audit).
pub const REGISTRY_PRIORS_DURATION: &str = "huren_registry_priors_query_duration_seconds";
/// Study records and retractions published, by `outcome`.
pub const REGISTRY_RECORDS_PUBLISHED: &str = "huren_registry_records_published_total";
/// Entries appended to the audit chain, by `action`.
pub const REGISTRY_AUDIT_ENTRIES: &str = "huren_registry_audit_entries_total";
/// A federated priors query's call to each member, from the request to its
/// answer (or the deadline), by `member` (the member IDs of the federation
/// configuration: a fixed set, not wire data).
pub const FEDERATION_MEMBER_DURATION: &str = "huren_registry_federation_member_duration_seconds";
/// Member calls of a federated priors query that did not reach the member
/// (down, past the deadline, an invalid answer), by `member`.
pub const FEDERATION_NOT_REACHED: &str = "huren_registry_federation_not_reached_total";

/// Every metric either process exports, for the docs and the tests.
pub const ALL: &[&str] = &[
    READY,
    DICOM_ASSOCIATIONS_OPEN,
    DICOM_ASSOCIATIONS_REFUSED,
    DIMSE_DURATION,
    DICOMWEB_DURATION,
    INSTANCES_STORED,
    STORED_BYTES,
    STORAGE_ERRORS,
    VERIFY_BLOBS,
    VERIFY_LAST_RUN,
    PUBLISH_BACKLOG,
    PUBLISH_DEAD,
    PUBLISH_LAST_SUCCESS,
    PUBLISH_FAILURES,
    PEER_FETCH_BYTES,
    PEER_FETCH_FAILURES,
    RECOGNITION_CHECKS,
    REGISTRY_PRIORS_DURATION,
    REGISTRY_RECORDS_PUBLISHED,
    REGISTRY_AUDIT_ENTRIES,
    FEDERATION_MEMBER_DURATION,
    FEDERATION_NOT_REACHED,
];

/// Histogram buckets in seconds: a C-ECHO-sized request on loopback takes
/// a fraction of a millisecond, a C-MOVE of a large study minutes.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Which process the recorder serves: each registers (at zero) only the
/// series it can move, so a dashboard reads 0, not "no data", before the
/// first event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Node,
    Registry,
    Verify,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder on first use; later calls (a second
/// node in the same test process) get the same handle. If another recorder
/// was installed first, `/metrics` renders an empty page rather than the
/// process failing to start.
pub fn install(process: Process) -> PrometheusHandle {
    let handle = HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(error) = ::metrics::set_global_recorder(recorder) {
                tracing::warn!(%error, "another metrics recorder is installed; /metrics stays empty");
            }
            // Histogram samples wait in per-thread buffers until drained;
            // without a scrape they would pile up.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the metrics upkeep thread");
            }
            describe();
            handle
        })
        .clone();
    register(process);
    handle
}

/// The installed recorder's handle, if `install` has run.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

fn describe() {
    describe_gauge!(
        READY,
        "1 when the process is ready (database and blob store reachable, startup finished), else 0"
    );
    describe_gauge!(
        DICOM_ASSOCIATIONS_OPEN,
        "DICOM associations established and not yet ended"
    );
    describe_counter!(
        DICOM_ASSOCIATIONS_REFUSED,
        "DICOM connections that did not become an association, by reason"
    );
    describe_histogram!(
        DIMSE_DURATION,
        Unit::Seconds,
        "DIMSE requests from request to final response, by operation"
    );
    describe_histogram!(
        DICOMWEB_DURATION,
        Unit::Seconds,
        "DICOMweb requests from request to response head, by service"
    );
    describe_counter!(
        INSTANCES_STORED,
        "instances acknowledged (stored, duplicate or new version), by source and durability"
    );
    describe_counter!(
        STORED_BYTES,
        Unit::Bytes,
        "bytes of Part-10 objects written to the blob store, by source and durability"
    );
    describe_counter!(
        STORAGE_ERRORS,
        "blob store and index failures, by operation (write, index, read, corrupt_read)"
    );
    describe_counter!(
        VERIFY_BLOBS,
        "blobs checked by huren verify, by result (ok, corrupt, missing)"
    );
    describe_gauge!(
        VERIFY_LAST_RUN,
        Unit::Seconds,
        "unix time at which huren verify last finished"
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        "audit records the local audit file could not take"
    );
    describe_gauge!(PUBLISH_BACKLOG, "outbox rows waiting for the registry");
    describe_gauge!(PUBLISH_DEAD, "outbox rows the registry refused for good");
    describe_gauge!(
        PUBLISH_LAST_SUCCESS,
        Unit::Seconds,
        "unix time of the last batch delivered to the registry (0: none since start)"
    );
    describe_counter!(
        PUBLISH_FAILURES,
        "failed attempts to deliver outbox rows to the registry"
    );
    describe_counter!(
        PEER_FETCH_BYTES,
        Unit::Bytes,
        "bytes of instances fetched from peer nodes"
    );
    describe_counter!(
        PEER_FETCH_FAILURES,
        "study fetches from a peer node that failed"
    );
    describe_counter!(
        RECOGNITION_CHECKS,
        "duplicate-exam checks, by outcome and whether the registry was reached"
    );
    describe_counter!(
        RECOGNITION_CONFIRMATIONS,
        "studies whose recognition items were confirmed at the source, by outcome (confirmed, corrected)"
    );
    describe_histogram!(
        REGISTRY_PRIORS_DURATION,
        Unit::Seconds,
        "registry priors queries from request to answer"
    );
    describe_counter!(
        REGISTRY_RECORDS_PUBLISHED,
        "study records and retractions published to the registry, by outcome"
    );
    describe_counter!(
        REGISTRY_AUDIT_ENTRIES,
        "entries appended to the registry's audit chain, by action"
    );
    describe_histogram!(
        FEDERATION_MEMBER_DURATION,
        Unit::Seconds,
        "federated priors queries' calls to each member registry, to the answer or the deadline, by member"
    );
    describe_counter!(
        FEDERATION_NOT_REACHED,
        "federated priors queries' calls that did not reach the member registry, by member"
    );
}

/// Why an association was not established (the `reason` label).
pub mod refused {
    /// Past `max_associations`: A-ASSOCIATE-RJ, local limit exceeded.
    pub const LIMIT: &str = "association_limit";
    /// Refused by the AE-title policy or negotiation (A-ASSOCIATE-RJ).
    pub const REJECTED: &str = "rejected";
    /// No A-ASSOCIATE-RQ within the ARTIM timeout.
    pub const ARTIM_TIMEOUT: &str = "artim_timeout";
    /// The peer broke off or spoke something else than the upper layer
    /// protocol.
    pub const PROTOCOL: &str = "protocol_error";
    pub const ALL: &[&str] = &[LIMIT, REJECTED, ARTIM_TIMEOUT, PROTOCOL];
}

/// Where an instance came from (the `source` label).
pub mod source {
    pub const C_STORE: &str = "c_store";
    pub const STOW: &str = "stow";
    pub const PEER: &str = "peer";
    pub const ALL: &[&str] = &[C_STORE, STOW, PEER];
}

const DIMSE_OPERATIONS: &[&str] = &["C-STORE", "C-FIND", "C-MOVE", "C-GET"];
const DICOMWEB_SERVICES: &[&str] = &["QIDO-RS", "WADO-RS", "STOW-RS"];
const STORAGE_OPERATIONS: &[&str] = &["write", "index", "read", "corrupt_read"];
const VERIFY_RESULTS: &[&str] = &["ok", "corrupt", "missing"];
const STORE_OUTCOMES: &[&str] = &["stored", "duplicate", "new_version"];

fn register(process: Process) {
    match process {
        Process::Node => {
            gauge!(DICOM_ASSOCIATIONS_OPEN).increment(0.0);
            counter!(AUDIT_WRITE_FAILURES).increment(0);
            for reason in refused::ALL {
                counter!(DICOM_ASSOCIATIONS_REFUSED, "reason" => *reason).increment(0);
            }
            for operation in DIMSE_OPERATIONS {
                let _ = histogram!(DIMSE_DURATION, "operation" => *operation);
            }
            for service in DICOMWEB_SERVICES {
                let _ = histogram!(DICOMWEB_DURATION, "service" => *service);
            }
            for operation in STORAGE_OPERATIONS {
                counter!(STORAGE_ERRORS, "operation" => *operation).increment(0);
            }
            gauge!(PUBLISH_BACKLOG).increment(0.0);
            gauge!(PUBLISH_DEAD).increment(0.0);
            gauge!(PUBLISH_LAST_SUCCESS).increment(0.0);
            counter!(PUBLISH_FAILURES).increment(0);
            counter!(PEER_FETCH_BYTES).increment(0);
            counter!(PEER_FETCH_FAILURES).increment(0);
            for outcome in ["warn", "no_warn", "info"] {
                for reached in ["true", "false"] {
                    counter!(RECOGNITION_CHECKS, "outcome" => outcome, "registry_reached" => reached)
                        .increment(0);
                }
            }
        }
        Process::Registry => {
            let _ = histogram!(REGISTRY_PRIORS_DURATION);
            for outcome in ["applied", "unchanged"] {
                counter!(REGISTRY_RECORDS_PUBLISHED, "outcome" => outcome).increment(0);
            }
        }
        Process::Verify => {
            for result in VERIFY_RESULTS {
                counter!(VERIFY_BLOBS, "result" => *result).increment(0);
            }
            for operation in STORAGE_OPERATIONS {
                counter!(STORAGE_ERRORS, "operation" => *operation).increment(0);
            }
        }
    }
}

/// Registers the stored-instance series of a node's durability mode at
/// zero (the mode is the node's configuration, not the process's).
/// `durability`: "full" or "relaxed".
pub fn register_durability(d: &'static str) {
    for source in source::ALL {
        for outcome in STORE_OUTCOMES {
            counter!(INSTANCES_STORED, "source" => *source, "durability" => d, "outcome" => *outcome)
                .increment(0);
        }
        counter!(STORED_BYTES, "source" => *source, "durability" => d).increment(0);
    }
}

pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ------------------------------------------------------------- recording

/// Counts an open association for as long as it lives.
pub struct AssociationOpen(());

impl AssociationOpen {
    pub fn start() -> AssociationOpen {
        gauge!(DICOM_ASSOCIATIONS_OPEN).increment(1.0);
        AssociationOpen(())
    }
}

impl Drop for AssociationOpen {
    fn drop(&mut self) {
        gauge!(DICOM_ASSOCIATIONS_OPEN).decrement(1.0);
    }
}

pub fn association_refused(reason: &'static str) {
    counter!(DICOM_ASSOCIATIONS_REFUSED, "reason" => reason).increment(1);
}

/// Records the time from its start to its drop as one DIMSE operation, so
/// that every return path (a refusal, a cancel, a broken association)
/// counts.
pub struct DimseTimer {
    operation: &'static str,
    started: Instant,
}

impl DimseTimer {
    pub fn start(operation: &'static str) -> DimseTimer {
        DimseTimer {
            operation,
            started: Instant::now(),
        }
    }

    /// An operation that never got its response (a C-STORE whose
    /// association ended mid data set) is not a latency.
    pub fn discard(mut self) {
        self.operation = "";
    }
}

impl Drop for DimseTimer {
    fn drop(&mut self) {
        if !self.operation.is_empty() {
            histogram!(DIMSE_DURATION, "operation" => self.operation)
                .record(self.started.elapsed().as_secs_f64());
        }
    }
}

/// An acknowledged instance: `outcome` one of [`STORE_OUTCOMES`], `size`
/// its bytes (counted for the outcomes that wrote a blob).
pub fn instance_stored(source: &'static str, d: &'static str, outcome: &'static str, size: u64) {
    counter!(INSTANCES_STORED, "source" => source, "durability" => d, "outcome" => outcome)
        .increment(1);
    if outcome != "duplicate" && outcome != "rejection_note" {
        counter!(STORED_BYTES, "source" => source, "durability" => d).increment(size);
    }
}

/// `operation`: one of write, index, read, corrupt_read.
pub fn storage_error(operation: &'static str) {
    counter!(STORAGE_ERRORS, "operation" => operation).increment(1);
}

/// The totals of one `huren verify` scrub.
pub fn verify_finished(ok: u64, corrupt: u64, missing: u64) {
    counter!(VERIFY_BLOBS, "result" => "ok").increment(ok);
    counter!(VERIFY_BLOBS, "result" => "corrupt").increment(corrupt);
    counter!(VERIFY_BLOBS, "result" => "missing").increment(missing);
    gauge!(VERIFY_LAST_RUN).set(unix_now());
}

pub fn publish_backlog(backlog: i64, dead: i64) {
    gauge!(PUBLISH_BACKLOG).set(backlog as f64);
    gauge!(PUBLISH_DEAD).set(dead as f64);
}

pub fn publish_succeeded() {
    gauge!(PUBLISH_LAST_SUCCESS).set(unix_now());
}

pub fn publish_failed() {
    counter!(PUBLISH_FAILURES).increment(1);
}

/// One study fetch from a peer: a failure unless `succeeded` is called
/// before it drops (every early return of the fetch is a failure).
pub struct PeerFetch {
    done: bool,
}

impl PeerFetch {
    pub fn start() -> PeerFetch {
        PeerFetch { done: false }
    }

    pub fn bytes(&self, bytes: u64) {
        counter!(PEER_FETCH_BYTES).increment(bytes);
    }

    pub fn succeeded(mut self) {
        self.done = true;
    }
}

impl Drop for PeerFetch {
    fn drop(&mut self) {
        if !self.done {
            counter!(PEER_FETCH_FAILURES).increment(1);
        }
    }
}

/// `outcome` as the check answers it (warn, no_warn, info).
pub fn recognition_check(outcome: &str, registry_reached: bool) {
    let outcome = match outcome {
        "warn" => "warn",
        "no_warn" => "no_warn",
        _ => "info",
    };
    let reached = if registry_reached { "true" } else { "false" };
    counter!(RECOGNITION_CHECKS, "outcome" => outcome, "registry_reached" => reached).increment(1);
}

pub fn recognition_confirmation(corrected: bool) {
    let outcome = if corrected { "corrected" } else { "confirmed" };
    counter!(RECOGNITION_CONFIRMATIONS, "outcome" => outcome).increment(1);
}

pub fn registry_priors_query(started: Instant) {
    histogram!(REGISTRY_PRIORS_DURATION).record(started.elapsed().as_secs_f64());
}

/// `outcome`: applied or unchanged.
pub fn registry_published(outcome: &'static str) {
    counter!(REGISTRY_RECORDS_PUBLISHED, "outcome" => outcome).increment(1);
}

/// The members of this registry's federation, registered at zero.
pub fn register_federation_members<'a>(members: impl IntoIterator<Item = &'a str>) {
    for member in members {
        let _ = histogram!(FEDERATION_MEMBER_DURATION, "member" => member.to_string());
        counter!(FEDERATION_NOT_REACHED, "member" => member.to_string()).increment(0);
    }
}

/// One member's part of a federated priors query.
pub fn federation_member_called(member: &str, elapsed: Duration, reached: bool) {
    histogram!(FEDERATION_MEMBER_DURATION, "member" => member.to_string())
        .record(elapsed.as_secs_f64());
    if !reached {
        counter!(FEDERATION_NOT_REACHED, "member" => member.to_string()).increment(1);
    }
}

pub fn registry_audit_appended(action: &'static str) {
    counter!(REGISTRY_AUDIT_ENTRIES, "action" => action).increment(1);
}

/// DICOMweb timing by service: a POST is STOW-RS; a GET whose path ends in
/// a resource collection (`/studies`, `/series`, `/instances`) is QIDO-RS;
/// any other GET is WADO-RS. The path is the routed one, so this holds for
/// every route of `http::dicomweb::router`.
pub async fn dicomweb_timing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path();
    let service = if request.method() == axum::http::Method::POST {
        Some("STOW-RS")
    } else if request.method() == axum::http::Method::GET {
        if ["/studies", "/series", "/instances"]
            .iter()
            .any(|c| path.ends_with(c))
        {
            Some("QIDO-RS")
        } else {
            Some("WADO-RS")
        }
    } else {
        None
    };
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(service) = service {
        histogram!(DICOMWEB_DURATION, "service" => service).record(started.elapsed().as_secs_f64());
    }
    response
}

/// The Prometheus text rendering of this process's metrics.
pub fn render(handle: &PrometheusHandle) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Writes the metrics to `path` for node_exporter's textfile collector
/// (`huren verify` is not scraped: it ends). Written to a temporary file
/// and renamed, so the collector never reads half a file.
pub fn write_textfile(handle: &PrometheusHandle, path: &std::path::Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut temp, handle.render().as_bytes())?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
