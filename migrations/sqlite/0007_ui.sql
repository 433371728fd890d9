-- The doctor's page (src/http/page/): node-local accounts, sessions and the
-- page's own audit trail.
--
-- ui_user: one row per doctor. password_hash is an argon2 PHC string
-- ($argon2id$v=19$...); the password itself is never stored.
CREATE TABLE ui_user (
    user_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- ui_session: one row per signed-in browser. The cookie carries a random
-- token; only its SHA-256 (hex) is kept, so a copy of the database signs
-- nobody in. Times are RFC 3339 UTC with microseconds (fixed width: text
-- comparison is time comparison). The patient the doctor is looking at is
-- kept here, server side, so that no identifier ever travels in a URL:
-- patient is the PatientRef as given (JSON), patient_key its key (NULL when
-- the identity cannot be verified; patient_note then says why).
CREATE TABLE ui_session (
    session_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES ui_user (user_id),
    csrf_token TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    patient TEXT,
    patient_key TEXT,
    patient_note TEXT
);
CREATE INDEX ui_session_expires_idx ON ui_session (expires_at);

-- ui_audit: append-only; every look at a patient (timeline, check,
-- decision, study) and every sign-in and sign-out, with the doctor's user
-- ID. The patient appears only as the patient key, never a raw identifier.
CREATE TABLE ui_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_key TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX ui_audit_patient_idx ON ui_audit (patient_key);
