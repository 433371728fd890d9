-- The index of what the blob store holds: patients, studies, series and
-- instances with the attributes C-FIND and QIDO-RS match on.
--
-- Text attributes are stored as the data set had them (padding removed),
-- never NULL: DICOM's "zero length" and "absent" both match the universal
-- match, so '' keeps matching SQL simple. Numbers that may be absent
-- (Series Number, Instance Number) are NULL when absent.
--
-- The PostgreSQL migration of the same number has the same tables and
-- columns; only the key types differ.

-- One row per (Patient ID, Issuer of Patient ID): the same Patient ID from
-- two issuers is two patients.
CREATE TABLE patient (
    patient_key INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    patient_birth_date TEXT NOT NULL,
    patient_sex TEXT NOT NULL,
    UNIQUE (patient_id, issuer_of_patient_id)
);
CREATE INDEX patient_name_idx ON patient (patient_name);

CREATE TABLE study (
    study_key INTEGER PRIMARY KEY,
    patient_key INTEGER NOT NULL REFERENCES patient (patient_key),
    study_instance_uid TEXT NOT NULL UNIQUE,
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_id TEXT NOT NULL,
    referring_physician_name TEXT NOT NULL,
    study_description TEXT NOT NULL,
    -- Derived from the series, kept current by the ingest transaction so
    -- that a study-level C-FIND reads one row.
    modalities_in_study TEXT NOT NULL DEFAULT '',
    number_of_study_related_series INTEGER NOT NULL DEFAULT 0,
    number_of_study_related_instances INTEGER NOT NULL DEFAULT 0,
    -- When the last instance arrived: the study-stability timer (and so
    -- publication to the registry) starts from here.
    last_received_at TEXT NOT NULL
);
CREATE INDEX study_patient_idx ON study (patient_key);
CREATE INDEX study_date_idx ON study (study_date);
CREATE INDEX study_accession_idx ON study (accession_number);

CREATE TABLE series (
    series_key INTEGER PRIMARY KEY,
    study_key INTEGER NOT NULL REFERENCES study (study_key),
    series_instance_uid TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    series_number INTEGER,
    series_description TEXT NOT NULL,
    body_part_examined TEXT NOT NULL,
    number_of_series_related_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX series_study_idx ON series (study_key);

-- Every version of every instance. A SOP Instance UID received again with
-- different bytes adds a row and becomes current; the old row and its blob
-- stay, so nothing is overwritten silently.
CREATE TABLE instance (
    instance_key INTEGER PRIMARY KEY,
    series_key INTEGER NOT NULL REFERENCES series (series_key),
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax_uid TEXT NOT NULL,
    -- BLAKE3 of the Part-10 object, lowercase hex: the blob's key.
    blob_hash TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    -- NULL when the row was rebuilt from the blob store (huren verify
    -- --reindex): the store does not remember who sent a blob.
    calling_ae_title TEXT,
    received_at TEXT NOT NULL,
    version INTEGER NOT NULL,
    is_current INTEGER NOT NULL,
    UNIQUE (sop_instance_uid, blob_hash)
);
-- At most one current version per SOP Instance UID, enforced by the
-- database so that concurrent writers (several node processes on one
-- PostgreSQL) cannot both make theirs current.
CREATE UNIQUE INDEX instance_current_idx ON instance (sop_instance_uid) WHERE is_current = 1;
CREATE INDEX instance_series_idx ON instance (series_key);
CREATE INDEX instance_blob_idx ON instance (blob_hash);
