"""The benchmark harness: raw limits, a naive pipeline and the project, measured in one run.

Run it with `scripts/bench` (which sets up the servers) or, with the servers named in
`CQRS_BENCH_*` variables, `python -m bench [--quick] [--runs N] [--json PATH]`. See README.md.
"""
