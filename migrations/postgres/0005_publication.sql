-- Publishing to the regional registry (src/publish.rs).
--
-- study_publication: one row per study the stability worker or the node's
-- API has touched. The worker publishes a study when it has been quiet
-- (no new instance) for the quiet time and either its last instance or its
-- `changes` counter (report, QC, identifier mapping from the node's API)
-- moved since the last evaluation. Every update of a row is a
-- compare-and-set on (changes, evaluated_received_at, record_version), so
-- two node processes on one database never publish the same version twice
-- and never lose a change.
CREATE TABLE study_publication (
    study_instance_uid TEXT PRIMARY KEY,
    -- study.last_received_at when last evaluated ('' = never).
    evaluated_received_at TEXT NOT NULL,
    changes BIGINT NOT NULL,
    evaluated_changes BIGINT NOT NULL,
    -- pending (not evaluated), published, local_only (no valid
    -- cross-enterprise identifier: never sent), retracted.
    state TEXT NOT NULL,
    -- local_only: no_identifier, check_digit or identifier_format.
    reason TEXT,
    record_version BIGINT NOT NULL,
    -- BLAKE3 of the last published record with its version zeroed: an
    -- evaluation that yields the same record publishes nothing.
    fingerprint TEXT NOT NULL,
    content_root TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX study_publication_state_idx ON study_publication (state);

-- What the hospital's systems tell the node and DICOM does not carry.
CREATE TABLE study_report (
    study_instance_uid TEXT PRIMARY KEY,
    report_status TEXT NOT NULL,
    report_issued_date TEXT,
    qc_status TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- Local Patient ID → cross-enterprise identifier, filled through the
-- node's API from the hospital's master patient index. The identifier is
-- kept normalised; it never leaves the node (only its keyed hash does).
CREATE TABLE patient_identifier (
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL,
    identifier_type TEXT NOT NULL,
    identifier TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (patient_id, issuer_of_patient_id)
);

-- The transactional outbox: written in the transaction that moves a
-- study's publication row, drained by the publisher in batches. A row is
-- leased (lease_until in the future) while a publisher sends it, so that
-- two processes do not send the same rows at once; a row is deleted once
-- the registry has answered for it. dead = 1: the registry refused the
-- row itself (400); kept for the operator, not retried.
CREATE TABLE publication_outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    record_version BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    lease_until TEXT NOT NULL,
    dead BIGINT NOT NULL,
    last_error TEXT
);
CREATE INDEX publication_outbox_lease_idx ON publication_outbox (dead, lease_until, seq);
