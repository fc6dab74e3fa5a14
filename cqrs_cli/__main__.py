"""`python -m cqrs_cli`: the same as `cqrs`."""

from cqrs_cli import main

main()
