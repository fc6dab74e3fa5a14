"""Contracts shared by the command and query services, and the client SDK.

Message envelopes, the domains' command and event schemas (the ledger's: `shared.ledger`),
broker topology names, what a travelling string may hold, AMQP decoding and `CommandClient`.
This package imports no other package of this project (an import-linter contract).
"""
