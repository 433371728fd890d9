-- The recognition list and the duplicate-exam statistics.
--
-- recognition_list: every list ever activated, by content hash; the active
-- one is the newest activation. A list is stored only after it validated,
-- so an invalid upload never replaces the active list.
CREATE TABLE recognition_list (
    content_hash TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    text TEXT NOT NULL,
    activated_at TEXT NOT NULL,
    activated_by TEXT NOT NULL
);

-- Warnings shown and doctors' decisions, as the nodes report them: one row
-- per event, idempotent by event ID (a node's outbox may send twice).
CREATE TABLE recognition_event (
    event_id TEXT PRIMARY KEY,
    hospital_id TEXT NOT NULL,
    check_id TEXT NOT NULL,
    -- warning, accepted or repeated.
    kind TEXT NOT NULL,
    item_code TEXT NOT NULL,
    reason_code TEXT,
    -- repeated with a reason that counts as non-recognition (not 98/99).
    non_recognition INTEGER NOT NULL,
    list_version TEXT NOT NULL,
    -- YYYY-MM in Asia/Shanghai, the statistics' grouping.
    month TEXT NOT NULL,
    at TEXT NOT NULL,
    user_id TEXT NOT NULL
);
CREATE INDEX recognition_event_month_idx ON recognition_event (month, hospital_id, item_code);
