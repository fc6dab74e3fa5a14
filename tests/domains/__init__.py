"""Domains that live only in the tests: each a package loaded by `CQRS_DOMAINS` like one of
your own (`tests.domains.cart`)."""
