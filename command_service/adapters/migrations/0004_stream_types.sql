-- A stream has one aggregate type (invariant 10): a stream's first event records its type
-- here, and every event must name the type its stream was recorded with. Without it a command
-- whose aggregate id is another aggregate's could write into that aggregate's history.
--
-- The primary key serialises racing first appends of one stream: the second waits for the
-- first to commit and then fails on `streams_pkey`. The foreign key makes the database refuse
-- an event of another type even from code that skips the store's own check.
CREATE TABLE streams (
    stream_id uuid PRIMARY KEY,
    aggregate_type text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT streams_stream_type_key UNIQUE (stream_id, aggregate_type)
);

-- A stream's first event (version 1) records the stream: one more statement for that event
-- only. In the database rather than in the store's code, so that a replica still running the
-- older code during a rolling update keeps opening new streams.
CREATE FUNCTION record_stream() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO streams (stream_id, aggregate_type) VALUES (NEW.stream_id, NEW.aggregate_type);
    RETURN NEW;
END
$$;
CREATE TRIGGER events_record_stream BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.version = 1) EXECUTE FUNCTION record_stream();

-- Existing streams take the type of their first event.
INSERT INTO streams (stream_id, aggregate_type, recorded_at)
SELECT DISTINCT ON (stream_id) stream_id, aggregate_type, recorded_at
FROM events
ORDER BY stream_id, version;

-- NOT VALID: enforced for every new event at once, without checking the old ones here, so
-- that streams already holding events of two types (written before this migration) do not
-- stop the upgrade. Validated just below when there are none, which is the normal case.
ALTER TABLE events
    ADD CONSTRAINT events_stream_type_fkey FOREIGN KEY (stream_id, aggregate_type)
    REFERENCES streams (stream_id, aggregate_type) NOT VALID;

DO $$
DECLARE
    mixed bigint;
BEGIN
    SELECT count(DISTINCT e.stream_id) INTO mixed
    FROM events e JOIN streams s USING (stream_id)
    WHERE e.aggregate_type <> s.aggregate_type;
    IF mixed = 0 THEN
        ALTER TABLE events VALIDATE CONSTRAINT events_stream_type_fkey;
    ELSE
        -- Their events stay as they are (history is never rewritten); new appends to them
        -- must be of the stream's recorded type. List them with:
        --   SELECT DISTINCT e.stream_id, s.aggregate_type, e.aggregate_type FROM events e
        --   JOIN streams s USING (stream_id) WHERE e.aggregate_type <> s.aggregate_type;
        RAISE WARNING 'stream types: % stream(s) hold events of more than one aggregate type; '
            'each keeps the type of its first event', mixed;
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_service') THEN
        -- INSERT for a stream's first event (the trigger runs as the inserting role), SELECT
        -- to name the type in a refusal; never UPDATE or DELETE: a stream's type does not change.
        GRANT SELECT, INSERT ON streams TO cqrs_service;
    END IF;
END
$$;
