-- The latest snapshot of each long stream: aggregate state at a version, so loading reads only
-- the events after it. A cache, never the truth: deleting every row loses nothing.
CREATE TABLE snapshots (
    stream_id uuid PRIMARY KEY,
    aggregate_type text NOT NULL,
    version integer NOT NULL,
    schema_version integer NOT NULL,
    state jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
