-- Indexes for the matcher (src/query): names matched case-insensitively by
-- prefix, studies found by the modalities of their series, instances by SOP
-- Class. The matcher compares lower(patient_name) against a prefix range,
-- which this expression index serves.
CREATE INDEX patient_name_lower_idx ON patient (lower(patient_name));
CREATE INDEX study_referring_lower_idx ON study (lower(referring_physician_name));
CREATE INDEX series_modality_idx ON series (modality, study_key);
