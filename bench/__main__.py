"""`python -m bench [--quick] [--runs N] [--json PATH] [--baseline DIR]`: measure, print the
table, write JSON.

The servers come from `CQRS_BENCH_AMQP_URL` (a vhost of its own), `CQRS_BENCH_POSTGRES_DSN`
(server level) and `CQRS_BENCH_MONGO_URL`; `scripts/bench` sets them up and runs this.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from pymongo import AsyncMongoClient

from bench.config import REPO_ROOT, Plan, Servers, plan_for
from bench.procs import wait_quiet
from bench.project import measure_project, measure_soak
from bench.references import measure_naive, measure_raw
from bench.report import render
from bench.stats import median
from cqrs_runtime.logging import configure_logging

RESULTS_DIR = REPO_ROOT / "bench" / "results"


def _command_output(*args: str, cwd: Path = REPO_ROOT) -> str:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=30, check=False, cwd=cwd
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with open("/proc/meminfo", encoding="utf-8") as f:
        kib = int(f.readline().split()[1])
    return f"{kib / 1024 / 1024:.1f} GiB"


def _loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


async def machine(servers: Servers, source: Path, baseline: Path | None) -> dict[str, Any]:
    connection = await asyncpg.connect(servers.postgres_dsn)
    try:
        postgres = str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongo_url)
    try:
        mongo_version = str((await mongo.server_info()).get("version", "unknown"))
    finally:
        await mongo.close()
    commit = _command_output("git", "rev-parse", "--short", "HEAD", cwd=source) or "unknown"
    if _command_output(
        "git",
        "status",
        "--porcelain",
        "--",
        "command_service",
        "query_service",
        "shared",
        cwd=source,
    ):
        commit += " (services changed since)"
    if source != REPO_ROOT:
        commit += f" in {source}"
    return {
        "baseline": (
            None
            if baseline is None
            else (_command_output("git", "rev-parse", "--short", "HEAD", cwd=baseline) or "?")
            + f" in {baseline}"
        ),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": _loadavg(),
        "rabbitmq": _command_output("rabbitmqctl", "-q", "version") or "unknown",
        "postgres": postgres,
        "mongo": f"wire version {mongo_version}",
        "commit": commit,
    }


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def _attempt(
    errors: list[str], label: str, measurement: Coroutine[Any, Any, dict[str, Any]]
) -> dict[str, Any]:
    """Run one measurement; a failure is recorded and the others still run.

    On a shared machine a service can die of something else's doing (an OOM kill, a stray
    signal); ten minutes of other measurements are worth keeping. The run still fails at the end.
    """
    try:
        return await measurement
    except Exception as e:  # noqa: BLE001 - recorded, reported and turned into the exit status
        message = f"{label}: {type(e).__name__}: {e}"[:3000]
        _progress(f"FAILED {message}")
        errors.append(message)
        return {"error": message}


async def run(plan: Plan, servers: Servers, run_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {
        "meta": await machine(servers, plan.source, plan.baseline),
        "plan": dataclasses.asdict(plan),
        "runs": [],
        "errors": [],
    }
    errors: list[str] = result["errors"]
    for index in range(plan.runs):
        one: dict[str, Any] = {"project": {}}
        directory = run_dir / f"run-{index + 1}"
        one["quiet"] = {}
        if plan.references:
            _progress(f"run {index + 1}/{plan.runs}: raw limits")
            one["quiet"]["raw"] = await wait_quiet(plan.quiet_wait_seconds)
            one["raw"] = await _attempt(
                errors, f"run {index + 1} raw", measure_raw(servers, plan, directory, seed=index)
            )
            _progress(f"run {index + 1}/{plan.runs}: naive pipeline")
            one["quiet"]["naive"] = await wait_quiet(plan.quiet_wait_seconds)
            one["naive"] = await _attempt(
                errors,
                f"run {index + 1} naive",
                measure_naive(servers, plan, directory, seed=index),
            )
        if plan.baseline is not None:
            # Before the project in every run: the two interleave over the runs.
            replicas = plan.replicas[0]
            _progress(f"run {index + 1}/{plan.runs}: the baseline, {replicas} replica(s)")
            one["quiet"]["baseline"] = await wait_quiet(plan.quiet_wait_seconds)
            one["baseline"] = await _attempt(
                errors,
                f"run {index + 1} baseline x{replicas}",
                measure_project(
                    servers,
                    dataclasses.replace(plan, source=plan.baseline),
                    replicas,
                    directory / "baseline",
                    seed=index,
                    profile=False,
                    rebuild=False,
                ),
            )
        for replicas in plan.replicas:
            _progress(
                f"run {index + 1}/{plan.runs}: the project, {replicas} replica(s) of each service"
            )
            one["quiet"][f"project-{replicas}"] = await wait_quiet(plan.quiet_wait_seconds)
            one["project"][str(replicas)] = await _attempt(
                errors,
                f"run {index + 1} project x{replicas}",
                measure_project(
                    servers,
                    plan,
                    replicas,
                    directory,
                    seed=index,
                    profile=plan.profile and index == 0 and replicas == plan.replicas[0],
                    rebuild=replicas == plan.replicas[0],
                ),
            )
        result["runs"].append(one)
    first = result["runs"][0]["project"].get(str(plan.replicas[0]), {})
    if "profile" in first:
        result["profile"] = first["profile"]
    if plan.soak_seconds > 0:
        peak = median(
            [
                r["project"][str(plan.replicas[0])].get("max", {}).get("replies_per_s")
                for r in result["runs"]
            ]
        )
        rate = max(1.0, 0.5 * (peak or 2.0))
        _progress(f"memory soak: {plan.soak_seconds:.0f} s at {rate:.0f} commands/s")
        result["soak"] = await _attempt(
            errors, "soak", measure_soak(servers, plan, rate, plan.soak_seconds, run_dir)
        )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the CI smoke: seconds, numbers mean nothing"
    )
    parser.add_argument("--runs", type=int, help="runs to take medians over (default 3; quick 1)")
    parser.add_argument(
        "--json", type=Path, help="where to write the results (default bench/results/)"
    )
    parser.add_argument(
        "--soak", type=float, help="seconds of a memory soak at half load after the runs"
    )
    parser.add_argument("--replicas", type=int, nargs="+", help="replica counts (default 1 2)")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="the services' log level"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy both services during the first max phase"
    )
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="skip the raw limits and the naive pipeline (for before/after runs of the project)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="measure the services of another checkout (e.g. a git worktree with a change)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (the code before a change) measured in every run beside this "
        "one, with the first replica count: the ratios to it are taken within each run",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="commands/s offered in the open-loop latency phase (default: half the maximum "
        "just measured), to compare latencies at one rate across checkouts",
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.latency_rate is not None and args.latency_rate <= 0:
        parser.error("--latency-rate must be positive")
    plan = plan_for(
        quick=args.quick,
        runs=args.runs,
        soak_seconds=args.soak,
        log_level=args.log_level,
        profile=args.profile,
        replicas=tuple(args.replicas) if args.replicas else None,
        source=args.source,
        references=not args.no_references,
        baseline=args.baseline,
        latency_rate=args.latency_rate,
    )
    servers = Servers.from_env()
    configure_logging("WARNING")  # the project's modules used here (migrations) log at INFO
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = REPO_ROOT / ".local" / "bench" / stamp
    started = time.monotonic()
    result = uvloop.run(run(plan, servers, run_dir))
    result["meta"]["seconds"] = round(time.monotonic() - started, 1)
    result["meta"]["logs"] = str(run_dir)
    path = args.json or RESULTS_DIR / f"{stamp}{'-quick' if plan.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(render(result))
    print(f"\n{result['meta']['seconds']:.0f} s; results in {path}; service logs in {run_dir}")
    if result["errors"]:
        print("\nFAILED measurements:\n  " + "\n  ".join(result["errors"]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
