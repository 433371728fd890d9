-- Confirmation at the source (issue 17 section 2). The hospital that did
-- the exam knows what it was: its technologist or radiologist confirms or
-- corrects the classifier's items for a study, and the publisher applies
-- the confirmation when it builds the record (confirmed items are certain,
-- with `confirmed_by` the role, never the person, at the registry).
--
-- One row per study: a later confirmation replaces the earlier one. It
-- holds for the images it was made on: `content_root` is the study's
-- content root then, and an instance added or removed since makes it lapse
-- (the classifier's items are published again, to be confirmed anew).
CREATE TABLE study_confirmation (
    study_instance_uid TEXT PRIMARY KEY,
    -- JSON array of {code, laterality}: the items the study is. Empty:
    -- the study is none of the list's items.
    items TEXT NOT NULL,
    -- technologist or radiologist: what the registry sees.
    role TEXT NOT NULL,
    -- The user ID at this hospital: stays here (audit), never published.
    user_id TEXT NOT NULL,
    -- JSON array of the classifier's items (code, laterality, confidence)
    -- the person saw; `corrected` = 1 when the confirmed items differ from
    -- them, so a region can see where equipment misleads the classifier.
    classified TEXT NOT NULL,
    corrected INTEGER NOT NULL,
    content_root TEXT NOT NULL,
    confirmed_at TEXT NOT NULL
);

-- Images that cannot be retrieved (issue 17 section 3): the operator marks
-- a study's images unavailable (archive lost, media unreadable). The record
-- is published with images_available = false and no check warns on it
-- (images_unavailable).
-- No row: available when the node holds instances of the study.
CREATE TABLE study_images (
    study_instance_uid TEXT PRIMARY KEY,
    available INTEGER NOT NULL,
    reason TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- The classifier's full answer for the study (items, confidence, doubts and
-- evidence with the values read): shown to the hospital's own staff on the
-- node's page and API when they confirm. Only attribute names are
-- published; the values (free text) stay here.
ALTER TABLE study_publication ADD COLUMN classification TEXT;
