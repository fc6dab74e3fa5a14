"""`python -m shared.cli`: the same as `cqrs`."""

from shared.cli import main

main()
