-- Instance rows committed but not yet known to be on stable storage with
-- their blobs: with local blob files the node commits the row while the
-- blob's flush runs, and acknowledges once both are done; a crash between
-- the two can leave a row whose blob never reached the disk. The row's
-- entry here (written by the trigger, in the row's transaction) is what the
-- recovery at start checks; entries are trimmed once a later flush has
-- covered them (crate::recovery).
CREATE TABLE unsynced_instance (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_key BIGINT NOT NULL
);

CREATE FUNCTION note_unsynced_instance() RETURNS trigger AS $$
BEGIN
    INSERT INTO unsynced_instance (instance_key) VALUES (NEW.instance_key);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER unsynced_instance_after_insert AFTER INSERT ON instance
FOR EACH ROW EXECUTE FUNCTION note_unsynced_instance();
