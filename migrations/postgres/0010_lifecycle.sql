-- Deletion, rejection and retention (src/lifecycle.rs).
--
-- deletion: one row per instance version removed from the index, whoever
-- removed it: an operator (JSON API, `huren delete`), a modality or PACS
-- (an IOCM Key Object Selection rejection note), or the retention policy.
-- The index rows themselves are deleted (every query and retrieval reads
-- the index, so the instance disappears from all of them in the one
-- transaction); this table is what remains to say what was there, who
-- removed it and why. The blob is left to the collector (src/gc.rs), which
-- removes it once no row names it. Kept forever: a few hundred bytes per
-- instance, and a hospital must be able to answer "who removed this".
CREATE TABLE deletion (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    blob_hash TEXT NOT NULL,
    version BIGINT NOT NULL,
    -- operator (API or CLI), rejection_note, retention.
    source TEXT NOT NULL,
    -- Who: the API token's name, the CLI user, the calling AE title of the
    -- rejection note, or 'retention'.
    actor TEXT NOT NULL,
    -- The reason as a code of CID 7011 (113001, 113037, 113038, 113039) when
    -- it is one, else '' with free text in reason.
    reason_code TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- The rejection note's SOP Instance UID, when one caused it.
    rejection_note_uid TEXT
);
CREATE INDEX deletion_study_idx ON deletion (study_instance_uid);
CREATE INDEX deletion_sop_idx ON deletion (sop_instance_uid);

-- SOP Instance UIDs rejected by an IOCM rejection note for quality, patient
-- safety or a wrong worklist entry: the same instance sent again stays out
-- (IHE RAD TF-2 4.66.4.1.3: an Image Manager that received a rejection note
-- must not make the rejected instance available again). A UID may be
-- rejected before the node ever held it: the note names it, and the
-- instance arriving later is refused.
CREATE TABLE rejected_instance (
    sop_instance_uid TEXT PRIMARY KEY,
    reason_code TEXT NOT NULL,
    rejection_note_uid TEXT NOT NULL,
    at TEXT NOT NULL
);
