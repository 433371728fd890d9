-- The viewer (issue 19): the studies a doctor's session opened from the
-- page ("查看影像"). The page's session cookie authorises the viewer's
-- read-only DICOMweb requests, but only for these studies: a session is
-- not a key to search or read the whole archive. Rows of expired or ended
-- sessions are removed when someone signs in (src/http/page/auth.rs), and
-- every check joins the live session anyway.
CREATE TABLE ui_session_study (
    session_hash TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    opened_at TEXT NOT NULL,
    PRIMARY KEY (session_hash, study_instance_uid)
);
