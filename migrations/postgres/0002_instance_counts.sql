-- Instance counts (and the study's last_received_at, the study-stability
-- clock) follow the instance rows inside the database: a row that becomes a
-- current version adds one, a row that stops being current takes one away.
-- A new version of a known SOP Instance UID is therefore counted once. Done
-- in a trigger because each statement the ingest path saves is a round trip
-- per instance, and because increments stay right when several node
-- processes commit at once. Same behaviour as the SQLite migration 0002.
CREATE FUNCTION instance_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.is_current <> 1 THEN
            RETURN NULL;
        END IF;
        delta := 1;
    ELSE
        IF NEW.is_current = OLD.is_current THEN
            RETURN NULL;
        END IF;
        delta := CASE WHEN NEW.is_current = 1 THEN 1 ELSE -1 END;
    END IF;
    UPDATE series
    SET number_of_series_related_instances = number_of_series_related_instances + delta
    WHERE series_key = NEW.series_key;
    UPDATE study
    SET number_of_study_related_instances = number_of_study_related_instances + delta,
        last_received_at = CASE WHEN delta > 0 THEN NEW.received_at ELSE last_received_at END
    WHERE study_key = (SELECT study_key FROM series WHERE series_key = NEW.series_key);
    RETURN NULL;
END
$$;

CREATE TRIGGER instance_counts AFTER INSERT OR UPDATE OF is_current ON instance
FOR EACH ROW EXECUTE FUNCTION instance_counts();
