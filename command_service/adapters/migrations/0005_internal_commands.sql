-- The commands that process managers issue get a command log of their own. Their ids are
-- deterministic (uuid5 of a namespace in the source), so a client can compute a step's id
-- before the step runs; with one log, a client command sent under that id first made the step
-- a "duplicate" that was never decided. In a key space of their own, no client command can
-- occupy a step's record.
CREATE TABLE internal_commands (
    command_id uuid PRIMARY KEY,
    aggregate_id uuid,
    reply jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Records written before this migration, or by a replica still running the older code during a
-- rolling update (it leaves the column to its default), may be process-manager steps: those stay
-- visible to process managers, so a step recorded before the upgrade is found and not decided
-- twice. The current code marks what it records for a client `client_only`. Adding a column with
-- a constant default rewrites nothing.
ALTER TABLE commands ADD COLUMN client_only boolean NOT NULL DEFAULT false;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_service') THEN
        GRANT SELECT, INSERT ON internal_commands TO cqrs_service;
    END IF;
END
$$;
