-- The regional registry: the hospital directory, one record per
-- (hospital, Study Instance UID), consents and the audit trail.
--
-- It holds no name, birth date or ID number: patients are keys (keyed
-- BLAKE3, the key being a secret the registry never has). The PostgreSQL
-- migration of the same number has the same tables and columns; only the
-- key types differ. Times are RFC 3339 UTC text with microseconds, which
-- sorts as time does; booleans are 0/1 integers on both dialects.

CREATE TABLE hospital (
    -- 统一社会信用代码.
    hospital_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    -- 1 = 一级 … 7 = 三级甲等 (proto::Level::rank), so that eligibility
    -- rules can compare levels in SQL as well as in code.
    level_rank BIGINT NOT NULL,
    -- JSON array of group names.
    groups TEXT NOT NULL,
    accepts_lower_level_results BIGINT NOT NULL,
    qc_status TEXT NOT NULL,
    dicomweb_base_url TEXT,
    -- SHA-256 (hex) of the node's bearer token; the token itself is shown
    -- once when issued and never stored.
    token_sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE study_record (
    hospital_id TEXT NOT NULL REFERENCES hospital (hospital_id),
    study_instance_uid TEXT NOT NULL,
    record_version BIGINT NOT NULL,
    patient_key TEXT NOT NULL,
    study_date TEXT,
    retracted BIGINT NOT NULL,
    published_at TEXT NOT NULL,
    -- The whole proto::StudyRecord as JSON: the registry filters on the
    -- columns above and returns this as published.
    record TEXT NOT NULL,
    PRIMARY KEY (hospital_id, study_instance_uid)
);
-- The priors query: all records of one patient key, newest first.
CREATE INDEX study_record_patient_idx ON study_record (patient_key, study_date);

CREATE TABLE consent (
    consent_id TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    hospital_id TEXT NOT NULL REFERENCES hospital (hospital_id),
    method TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    -- pending, granted or revoked as recorded; "expired" is computed from
    -- expires_at when read, so no job has to flip rows at midnight.
    state TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX consent_patient_idx ON consent (patient_key, hospital_id);

-- Append-only and hash-chained: each entry's hash covers its fields and
-- the previous entry's hash, so `huren registry audit verify` finds a
-- changed, inserted or deleted row. audit_head holds the chain's end; the
-- UPDATE of its one row serialises appenders (several registry processes
-- on one PostgreSQL append one at a time).
CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_key TEXT,
    purpose TEXT,
    records_returned BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_patient_idx ON audit (patient_key);

CREATE TABLE audit_head (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
