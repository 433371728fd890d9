-- Instance counts (and the study's last_received_at, the study-stability
-- clock) follow the instance rows inside the database: a row that becomes a
-- current version adds one, a row that stops being current takes one away.
-- A new version of a known SOP Instance UID is therefore counted once. Done
-- in triggers because each statement the ingest path saves is a round trip
-- per instance, and because increments stay right when several writers
-- commit at once.
CREATE TRIGGER instance_counts_after_insert AFTER INSERT ON instance
WHEN NEW.is_current = 1
BEGIN
    UPDATE series
    SET number_of_series_related_instances = number_of_series_related_instances + 1
    WHERE series_key = NEW.series_key;
    UPDATE study
    SET number_of_study_related_instances = number_of_study_related_instances + 1,
        last_received_at = NEW.received_at
    WHERE study_key = (SELECT study_key FROM series WHERE series_key = NEW.series_key);
END;

CREATE TRIGGER instance_counts_after_update AFTER UPDATE OF is_current ON instance
WHEN NEW.is_current <> OLD.is_current
BEGIN
    UPDATE series
    SET number_of_series_related_instances = number_of_series_related_instances
        + (CASE WHEN NEW.is_current = 1 THEN 1 ELSE -1 END)
    WHERE series_key = NEW.series_key;
    UPDATE study
    SET number_of_study_related_instances = number_of_study_related_instances
        + (CASE WHEN NEW.is_current = 1 THEN 1 ELSE -1 END),
        last_received_at = CASE WHEN NEW.is_current = 1 THEN NEW.received_at ELSE last_received_at END
    WHERE study_key = (SELECT study_key FROM series WHERE series_key = NEW.series_key);
END;
