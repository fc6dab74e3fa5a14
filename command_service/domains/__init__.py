"""The domains shipped with the command service, each a package exposing `domain`."""
