-- Instance rows committed but not yet known to be on stable storage with
-- their blobs. In full durability on local files the node commits the row
-- without an fsync of its own and acknowledges after one syncfs(2) that
-- covers blob and row alike; a crash between the commit and that flush can
-- leave a row whose blob never reached the disk. The row's entry here
-- (written by the trigger, so in the same transaction as the row) is what
-- the recovery at start checks; entries are trimmed once a later flush has
-- covered them (crate::recovery).
CREATE TABLE unsynced_instance (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_key INTEGER NOT NULL
);

CREATE TRIGGER unsynced_instance_after_insert AFTER INSERT ON instance
BEGIN
    INSERT INTO unsynced_instance (instance_key) VALUES (NEW.instance_key);
END;
