-- Runs once, when the PostgreSQL container initialises its data directory.
-- The command service connects as cqrs_command, a member of cqrs_service: it can append and
-- read but not rewrite history or the schema. Its migrations run as the owner (postgres).
CREATE ROLE cqrs_service NOLOGIN;
CREATE ROLE cqrs_command LOGIN PASSWORD 'cqrs-command-dev' IN ROLE cqrs_service;
