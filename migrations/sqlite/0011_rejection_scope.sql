-- A rejection note bars a SOP Instance UID it names that the node does not
-- hold yet. Before this migration any calling AE could bar any UID, for any
-- patient. IHE IOCM applies a note to instances of its own patient and
-- study only, so the bar now remembers both: an instance arriving later
-- under that UID is refused only when it belongs to the same study and
-- patient. NULL (rows from before) keeps the old meaning: any instance.
ALTER TABLE rejected_instance ADD COLUMN study_instance_uid TEXT;
ALTER TABLE rejected_instance ADD COLUMN patient_id TEXT;
