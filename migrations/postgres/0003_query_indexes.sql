-- Indexes for the matcher (src/query): names matched case-insensitively by
-- prefix, studies found by the modalities of their series. The matcher
-- compares lower(patient_name) COLLATE "C" against a prefix range: byte
-- order, so that a prefix range holds exactly the names with that prefix
-- whatever the database's default collation.
CREATE INDEX patient_name_lower_idx ON patient ((lower(patient_name) COLLATE "C"));
CREATE INDEX study_referring_lower_idx ON study ((lower(referring_physician_name) COLLATE "C"));
CREATE INDEX series_modality_idx ON series (modality, study_key);
