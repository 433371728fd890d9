-- Recognition at the node (src/publish.rs, src/http/api.rs).
--
-- study_publication.record: the last record this node described for the
-- study (JSON, as published): the node's own priors when the registry is
-- unreachable (degraded mode). unclassified: why the recognition list found
-- no item for the study (counted on the API).
ALTER TABLE study_publication ADD COLUMN record TEXT;
ALTER TABLE study_publication ADD COLUMN unclassified TEXT;
ALTER TABLE study_publication ADD COLUMN patient_key TEXT;
CREATE INDEX study_publication_patient_idx ON study_publication (patient_key);

-- Every duplicate-exam check and the doctor's decision on it, with the list
-- version it was computed under.
CREATE TABLE recognition_check (
    check_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    -- YYYY-MM in Asia/Shanghai.
    month TEXT NOT NULL,
    user_id TEXT NOT NULL,
    patient_key TEXT,
    item_code TEXT NOT NULL,
    outcome TEXT NOT NULL,
    list_version TEXT NOT NULL,
    registry_reached BIGINT NOT NULL,
    result TEXT NOT NULL,
    decision TEXT,
    reason_code TEXT,
    free_text TEXT,
    decided_by TEXT,
    decided_at TEXT
);
CREATE INDEX recognition_check_month_idx ON recognition_check (month, item_code);
