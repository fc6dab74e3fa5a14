"""The domains shipped with the query service, each a package exposing `domain`."""
