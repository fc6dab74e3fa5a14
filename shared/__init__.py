"""Contracts shared by the command and query services.

Message envelopes, the ledger's command and event schemas, broker topology names, settings and
logging set-up. This package imports neither service.
"""
