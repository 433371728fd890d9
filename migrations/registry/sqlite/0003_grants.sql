-- Peer retrieval grants: hospital A asks the registry for the right to
-- fetch one study held at hospital B; the registry checks consent (or
-- break-the-glass) and issues a short-lived grant that B verifies with the
-- registry before serving. Only the grant token's SHA-256 is stored.
CREATE TABLE grant_token (
    token_sha256 TEXT PRIMARY KEY,
    grant_id TEXT NOT NULL,
    requesting_hospital_id TEXT NOT NULL,
    holding_hospital_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    purpose TEXT NOT NULL,
    user_id TEXT NOT NULL,
    -- The check or query that led to the retrieval, for the audit.
    reference TEXT,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
