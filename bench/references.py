"""The references measured in every run: the raw limits and the naive pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import naive, raw
from bench.config import Plan, Servers
from bench.driver import CommandDriver, Outcome, closed_loop
from bench.infra import QueueProbe, fresh_database, fresh_mongo_database, reset_vhost
from bench.procs import CpuWindow, ServerGroups, ServiceProcess, start_module
from bench.project import measure_drain, mongo_port
from cqrs_cli.workload import Workload, latency_summary_ms
from shared.messages import EventEnvelope, EventMetadata

APPEND_CONCURRENCY = 10  # the command service's default pool size
MONGO_CONCURRENCY = 64  # the projector's default prefetch
# A prefetch window (what a live projector could write at once) and a rebuild batch.
MONGO_BULKS = (64, 500)


def typical_event_bytes() -> int:
    """The size of a typical event envelope as the relay publishes it."""
    envelope = EventEnvelope(
        event_id=uuid.uuid4(),
        type="MoneyDeposited",
        aggregate_type="account",
        aggregate_id=uuid.uuid4(),
        version=12,
        position=123_456,
        recorded_at=datetime.now(UTC),
        data={"amount": 512},
        metadata=EventMetadata(correlation_id=str(uuid.uuid4()), causation_id=str(uuid.uuid4())),
    )
    return len(envelope.model_dump_json().encode())


async def _wait_consumer(probe: QueueProbe, queue: str, worker: ServiceProcess) -> None:
    deadline = time.monotonic() + 30
    while True:
        if not worker.running:
            raise RuntimeError(f"{worker.name} exited:\n{worker.log_tail()}")
        found = await probe.depth(queue)
        if found is not None and found[1] > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{worker.name} did not start consuming {queue}")
        await asyncio.sleep(0.1)


def _primed_workload(seed: int, plan: Plan) -> Workload:
    """A workload whose accounts exist only as ids: for bodies of the right size and mix."""
    workload = Workload(seed, plan.hot_accounts)
    for cmd in workload.openings(plan.accounts):
        workload.opened(cmd)
    return workload


async def measure_raw(servers: Servers, plan: Plan, run_dir: Path, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await reset_vhost(servers.amqp_url)
    event_bytes = typical_event_bytes()
    workload = _primed_workload(seed, plan)
    command_bytes = sum(len(workload.next().body) for _ in range(200)) // 200
    probe = await QueueProbe.connect(servers.amqp_url)
    echo = await start_module(
        "bench.raw",
        ["echo", servers.amqp_url, str(event_bytes)],
        "raw-echo",
        run_dir / "raw-echo.log",
    )
    driver: CommandDriver | None = None
    try:
        await _wait_consumer(probe, raw.COMMANDS_QUEUE, echo)
        driver = await CommandDriver.connect(servers.amqp_url, exchange=raw.COMMANDS_EXCHANGE)
        window = CpuWindow({"worker": [echo.pid]}).start()
        loop = await closed_loop(
            driver,
            workload.next,
            concurrency=plan.concurrency,
            seconds=plan.raw_seconds,
            warmup=min(plan.warmup_seconds, plan.raw_seconds / 4),
        )
        cpu = window.stop()
        out["amqp"] = {
            "round_trips_per_s": loop.rate("accepted"),
            "command_bytes": command_bytes,
            "event_bytes": event_bytes,
            "reply_ms": latency_summary_ms([o.latency for o in loop.in_window()]),
            "worker_cpu_per_1000": round(cpu["worker"] / max(1, len(loop.outcomes)) * 1000, 3),
        }
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                await driver.close()
        await probe.close()
        await echo.stop()
    out["amqp_pipelined"] = await measure_pipelined(servers, plan, run_dir, event_bytes)
    async with fresh_database(servers.postgres_dsn) as dsn:
        out["append"] = await raw.raw_append(
            dsn, seconds=plan.raw_seconds, concurrency=APPEND_CONCURRENCY, one_statement=False
        )
    async with fresh_database(servers.postgres_dsn) as dsn:
        out["append_one_statement"] = await raw.raw_append(
            dsn, seconds=plan.raw_seconds, concurrency=APPEND_CONCURRENCY, one_statement=True
        )
    async with fresh_mongo_database(servers.mongo_url) as database:
        out["mongo"] = await raw.raw_mongo(
            servers.mongo_url,
            database,
            seconds=plan.raw_seconds,
            concurrency=MONGO_CONCURRENCY,
            bulks=MONGO_BULKS,
        )
    return out


async def measure_pipelined(
    servers: Servers, plan: Plan, run_dir: Path, event_bytes: int
) -> dict[str, Any]:
    """The broker with pipelined confirms and batched acks (`raw.pipelined_publish`)."""
    await reset_vhost(servers.amqp_url)
    probe = await QueueProbe.connect(servers.amqp_url)
    worker = await start_module(
        "bench.raw", ["sink", servers.amqp_url], "raw-sink", run_dir / "raw-sink.log"
    )
    try:
        await _wait_consumer(probe, raw.PIPELINED_QUEUE, worker)
        window = CpuWindow(
            {"sink": [worker.pid], "bench": [os.getpid()], **ServerGroups(None).pids()}
        ).start()
        found: dict[str, Any] = dict(
            await raw.pipelined_publish(
                servers.amqp_url, event_bytes=event_bytes, seconds=plan.raw_seconds
            )
        )
        cpu = window.stop()
        messages = max(1, int(found["messages"]))
        found["cpu_per_1000"] = {
            name: round(cpu[name] / messages * 1000, 3) for name in ("sink", "bench", "rabbitmq")
        }
        found["machine_busy_pct"] = round(100 * cpu["machine_busy"] / cpu["machine_total"], 1)
        return found
    finally:
        await probe.close()
        await worker.stop()


async def measure_naive(servers: Servers, plan: Plan, run_dir: Path, seed: int) -> dict[str, Any]:
    """The naive pipeline, measured like the project: commands with the projector running, then
    a backlog built while the projector is down and drained when it is back."""
    out: dict[str, Any] = {}
    await reset_vhost(servers.amqp_url)
    async with (
        fresh_database(servers.postgres_dsn) as dsn,
        fresh_mongo_database(servers.mongo_url) as database,
    ):
        probe = await QueueProbe.connect(servers.amqp_url)
        workers: list[ServiceProcess] = []
        driver: CommandDriver | None = None

        async def start_projector() -> ServiceProcess:
            projector = await start_module(
                "bench.naive",
                ["projector", servers.amqp_url, servers.mongo_url, database],
                "naive-projector",
                run_dir / "naive-projector.log",
            )
            workers.append(projector)
            await _wait_consumer(probe, naive.EVENTS_QUEUE, projector)
            return projector

        try:
            commands = await start_module(
                "bench.naive",
                ["commands", servers.amqp_url, dsn],
                "naive-commands",
                run_dir / "naive-commands.log",
            )
            workers.append(commands)
            await _wait_consumer(probe, naive.COMMANDS_QUEUE, commands)
            projector = await start_projector()
            driver = await CommandDriver.connect(servers.amqp_url, exchange=naive.COMMANDS_EXCHANGE)
            workload = Workload(seed, plan.hot_accounts)

            def opened(outcome: Outcome) -> None:
                if outcome.status == "accepted":
                    workload.opened(outcome.cmd)

            openings = iter(workload.openings(plan.accounts))
            await closed_loop(
                driver,
                lambda: next(openings),
                concurrency=min(plan.concurrency, plan.accounts),
                seconds=plan.idle_timeout_seconds,
                max_commands=plan.accounts,
                on_outcome=opened,
            )
            window = CpuWindow(
                {
                    "commands": [commands.pid],
                    "projector": [projector.pid],
                    "bench": [os.getpid()],
                    **ServerGroups(mongo_port(servers.mongo_url)).pids(),
                }
            ).start()
            loop = await closed_loop(
                driver,
                workload.next,
                concurrency=plan.concurrency,
                seconds=plan.naive_seconds,
                warmup=min(plan.warmup_seconds, plan.naive_seconds / 4),
                on_outcome=opened,
            )
            cpu = window.stop()
            handled = max(1, len(loop.outcomes))
            out["commands"] = {
                "accepted_per_s": loop.rate("accepted"),
                "replies_per_s": loop.rate(),
                "statuses": loop.statuses(),
                "reply_ms": latency_summary_ms([o.latency for o in loop.in_window()]),
                "cpu_per_1000": {
                    k: round(v / handled * 1000, 3)
                    for k, v in cpu.items()
                    if not k.startswith("machine")
                },
            }
            # The backlog: commands handled while the projector is down (plus whatever it had
            # not caught up with), then drained by a projector started afresh.
            await projector.stop()
            await closed_loop(
                driver,
                workload.next,
                concurrency=plan.concurrency,
                seconds=plan.naive_seconds,
                max_commands=plan.backlog_commands,
                on_outcome=opened,
            )
            backlog = await probe.total_depth([naive.EVENTS_QUEUE])
            workers.append(
                await start_module(
                    "bench.naive",
                    ["projector", servers.amqp_url, servers.mongo_url, database],
                    "naive-projector-2",
                    run_dir / "naive-projector.log",
                )
            )
            # One event at a time is slow: the rate is read off what drains in a bounded time.
            out["projection"] = await measure_drain(
                probe, [naive.EVENTS_QUEUE], backlog, max(5.0, 1.5 * plan.naive_seconds)
            )
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    await driver.close()
            await probe.close()
            for worker in workers:
                await worker.stop()
    return out
