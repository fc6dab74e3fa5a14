-- The event store, the command log (idempotency + stored replies) and subscription checkpoints.

-- One row: the last global position handed out. Appends take its row lock, so positions are
-- assigned in commit order and without gaps: a reader of "position > checkpoint" can never
-- miss a row that commits late.
CREATE TABLE event_position (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    last bigint NOT NULL
);
INSERT INTO event_position (id, last) VALUES (true, 0);

CREATE TABLE events (
    position bigint PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    stream_id uuid NOT NULL,
    aggregate_type text NOT NULL,
    version integer NOT NULL CHECK (version >= 1),
    type text NOT NULL,
    schema_version integer NOT NULL DEFAULT 1,
    data jsonb NOT NULL,
    metadata jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

CREATE TABLE commands (
    command_id uuid PRIMARY KEY,
    aggregate_id uuid,
    reply jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Progress of each subscription to the store (the relay, process managers), by name.
CREATE TABLE checkpoints (
    name text PRIMARY KEY,
    position bigint NOT NULL
);
