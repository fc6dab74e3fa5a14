"""What a benchmark run does (the plan) and where the servers are, read in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Servers:
    """The servers a run uses; it creates and drops its own databases and topology there."""

    amqp_url: str  # a vhost of the benchmark's own: every queue in it is deleted between phases
    postgres_dsn: str  # server level: databases `cqrs_bench_*` are created and dropped
    mongo_url: str

    @classmethod
    def from_env(cls) -> Servers:
        names = ("CQRS_BENCH_AMQP_URL", "CQRS_BENCH_POSTGRES_DSN", "CQRS_BENCH_MONGO_URL")
        values = {name: os.environ.get(name, "") for name in names}
        missing = [name for name, value in values.items() if not value]
        if missing:
            raise SystemExit(
                "the benchmark needs its servers: set "
                + ", ".join(missing)
                + " (scripts/bench sets them all up and runs the benchmark)"
            )
        return cls(*values.values())


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one benchmark invocation; every loop is bounded by them."""

    runs: int
    replicas: tuple[int, ...]
    accounts: int  # opened before the measured phases
    hot_accounts: int  # a fraction of the commands contend on these
    concurrency: int  # commands in flight in the closed-loop phases
    warmup_seconds: float  # excluded from rates at the start of a closed-loop phase
    max_seconds: float  # closed loop: the maximum rate
    latency_seconds: float  # open loop at half the maximum: command -> read model latency
    latency_samples_per_second: float  # commands followed into the read model
    raw_seconds: float
    naive_seconds: float
    backlog_commands: int  # commands whose events make the projection backlog
    projection_timeout_seconds: float
    rebuild_timeout_seconds: float
    idle_timeout_seconds: float
    soak_seconds: float  # 0: no memory soak
    quiet_wait_seconds: float  # longest wait for the machine to calm down before a measurement
    log_level: str
    profile: bool
    quick: bool  # the CI smoke: the numbers mean nothing
    source: Path = REPO_ROOT  # the checkout whose services are measured
    references: bool = True  # the raw limits and the naive pipeline (off: the project only)
    # Another checkout (the code before a change) measured in every run beside `source`, with
    # the first replica count, for ratios within each run; None: no baseline.
    baseline: Path | None = None
    # The open-loop phase's offered rate, commands/s; None: half the maximum just measured.
    latency_rate: float | None = None


DEFAULT = Plan(
    runs=3,
    replicas=(1, 2),
    accounts=200,
    hot_accounts=4,
    concurrency=128,
    warmup_seconds=2.0,
    max_seconds=10.0,
    latency_seconds=10.0,
    latency_samples_per_second=20.0,
    raw_seconds=4.0,
    naive_seconds=6.0,
    backlog_commands=1200,
    projection_timeout_seconds=40.0,
    rebuild_timeout_seconds=120.0,
    idle_timeout_seconds=90.0,
    soak_seconds=0.0,
    quiet_wait_seconds=30.0,
    log_level="INFO",
    profile=False,
    quick=False,
)

# The CI smoke: every code path once, in seconds; its numbers mean nothing.
QUICK = Plan(
    runs=1,
    replicas=(1, 2),
    accounts=40,
    hot_accounts=2,
    concurrency=32,
    warmup_seconds=0.3,
    max_seconds=1.5,
    latency_seconds=1.5,
    latency_samples_per_second=20.0,
    raw_seconds=1.0,
    naive_seconds=1.0,
    backlog_commands=150,
    projection_timeout_seconds=20.0,
    rebuild_timeout_seconds=60.0,
    idle_timeout_seconds=30.0,
    soak_seconds=0.0,
    quiet_wait_seconds=0.0,
    log_level="INFO",
    profile=False,
    quick=True,
)


def plan_for(
    *,
    quick: bool,
    runs: int | None,
    soak_seconds: float | None,
    log_level: str | None,
    profile: bool,
    replicas: tuple[int, ...] | None,
    source: Path | None = None,
    references: bool = True,
    baseline: Path | None = None,
    latency_rate: float | None = None,
) -> Plan:
    base = QUICK if quick else DEFAULT
    changes: dict[str, object] = {"profile": profile, "references": references}
    if runs is not None:
        changes["runs"] = runs
    if soak_seconds is not None:
        changes["soak_seconds"] = soak_seconds
    if log_level is not None:
        changes["log_level"] = log_level
    if replicas is not None:
        changes["replicas"] = replicas
    if source is not None:
        changes["source"] = source.resolve()
    if baseline is not None:
        changes["baseline"] = baseline.resolve()
    if latency_rate is not None:
        changes["latency_rate"] = latency_rate
    return replace(base, **changes)  # type: ignore[arg-type]
