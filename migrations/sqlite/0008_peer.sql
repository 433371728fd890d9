-- Peer retrieval (src/peer.rs).
--
-- cached_study: studies fetched from another hospital's node, kept as a
-- cache (least recently used evicted past the budget); never published as
-- this hospital's exams, never counted as its own.
CREATE TABLE cached_study (
    study_instance_uid TEXT PRIMARY KEY,
    hospital_id TEXT NOT NULL,
    content_root TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    fetched_at TEXT NOT NULL,
    last_access TEXT NOT NULL
);

-- Regional priors this node has been told of (priors answers): which
-- hospital holds a study, so that a C-MOVE, C-GET or WADO-RS for it can be
-- served by fetching it.
CREATE TABLE regional_prior (
    study_instance_uid TEXT PRIMARY KEY,
    hospital_id TEXT NOT NULL,
    seen_at TEXT NOT NULL
);

-- The node's own record of studies it fetched from and served to peers.
CREATE TABLE peer_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    -- fetched (this node took a study) or served (a peer took one of ours).
    action TEXT NOT NULL,
    peer_hospital_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    purpose TEXT NOT NULL,
    user_id TEXT NOT NULL,
    grant_id TEXT,
    detail TEXT NOT NULL
);
