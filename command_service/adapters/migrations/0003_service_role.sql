-- Least privilege: the service connects as a member of cqrs_service, which may read, append
-- and keep its bookkeeping, but can neither rewrite history (no UPDATE or DELETE on events or
-- commands) nor change the schema (migrations run as the owner, see CQRS_POSTGRES_MIGRATION_DSN).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_service')
       AND (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
        CREATE ROLE cqrs_service NOLOGIN;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'cqrs_service') THEN
        GRANT USAGE ON SCHEMA public TO cqrs_service;
        GRANT SELECT, INSERT ON events, commands TO cqrs_service;
        GRANT SELECT, UPDATE ON event_position TO cqrs_service;
        GRANT SELECT, INSERT, UPDATE ON checkpoints, snapshots TO cqrs_service;
        GRANT SELECT ON schema_migrations TO cqrs_service;
    END IF;
END
$$;
