-- Federation (docs/federation.md): registries of several provinces ask
-- each other for a patient's records by a federation pseudonym, computed
-- at the node from the resident ID with the federation's secret, which no
-- registry holds.

-- The pseudonym of a patient key, learnt from the node: from records its
-- pilot hospitals publish (the holding side finds the patient by it) and
-- from queries that carry it (the asking side fans out by it). One patient
-- key has one pseudonym (both are functions of the same identifier); the
-- newest write wins, so a rotated federation secret replaces the old one.
CREATE TABLE federation_identity (
    patient_key TEXT PRIMARY KEY,
    pseudonym TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX federation_identity_pseudonym_idx ON federation_identity (pseudonym);

-- A patient's consent, recorded in this (the holding) province, that this
-- province's records of them may be shown to another member's hospitals.
-- Not a row of `consent`: that one names a hospital of this registry's
-- directory, and the other province's hospitals are not in it.
CREATE TABLE federation_consent (
    consent_id TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    member_id TEXT NOT NULL,
    method TEXT NOT NULL,
    recorded_by TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX federation_consent_patient_idx ON federation_consent (patient_key, member_id);

-- Nonces of signed member requests seen within the allowed clock skew: a
-- replayed request is refused. In the database, not in memory, so that
-- several registry processes refuse a replay to any of them.
CREATE TABLE federation_nonce (
    nonce TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
CREATE INDEX federation_nonce_seen_idx ON federation_nonce (seen_at);

-- The other provinces' records this registry showed its hospitals: a grant
-- for one of them goes to the member that holds it, with the patient's
-- pseudonym (the holding registry checks that the study is that patient's).
CREATE TABLE federation_prior (
    hospital_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    member_id TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    pseudonym TEXT NOT NULL,
    seen_at TEXT NOT NULL,
    PRIMARY KEY (hospital_id, study_instance_uid)
);
-- Read once per fan-out: which of a patient's shown records are known.
CREATE INDEX federation_prior_patient_idx ON federation_prior (patient_key);

-- A grant issued to another member's hospital: which member vouched for
-- it, and the consent it rests on (`holding`: checked again at every
-- verification, as a regional grant's; `asking`: the asking registry's
-- word, valid until the grant expires).
ALTER TABLE grant_token ADD COLUMN federation_member TEXT;
ALTER TABLE grant_token ADD COLUMN consent_basis TEXT;
