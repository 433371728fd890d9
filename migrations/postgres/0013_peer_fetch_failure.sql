-- A prior this node could not retrieve from the hospital holding it (issue
-- 17 section 3, "images that cannot be retrieved"): the peer was down, had
-- no node URL, or sent bytes that did not verify. Until a fetch of the
-- study succeeds (the row goes) or the memory ages out (peer.rs), this
-- node's duplicate-exam check does not warn on that prior
-- (images_unavailable): a doctor must not skip an exam whose images cannot
-- be opened. A refused grant (no consent) is not a failure of the images
-- and is not remembered.
CREATE TABLE peer_fetch_failure (
    hospital_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    reason TEXT NOT NULL,
    failed_at TEXT NOT NULL,
    PRIMARY KEY (hospital_id, study_instance_uid)
);
