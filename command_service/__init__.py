"""The command service: consumes commands, decides with event-sourced aggregates, stores events
in PostgreSQL and relays them to the events exchange."""
