"""Aggregates and their rules. No I/O here."""
