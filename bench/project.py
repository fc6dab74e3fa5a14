"""The project measured end to end: both services as real processes, N replicas of each.

Phases, on one deployment with a fresh event store, read-model database and broker vhost:

1. open the accounts (not measured);
2. the maximum: a closed loop of commands, accepted commands/s from publish to reply, the CPU
   each process spent on them until the whole pipeline was idle again;
3. half load: an open loop at half that rate; sampled commands are followed into the read model
   (`GET /accounts/{id}?min_version=` until it shows the reply's version);
4. projection: the query services are stopped, commands pile their events up in the projector
   queues, the query services start again and the drain rate is read off the queue depth;
5. rebuild: the command service's replay stream of the whole store into a queue, then the
   query service's rebuild of every read model (`POST /admin/rebuilds`) until it switched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from bench import profiling
from bench.config import Plan, Servers
from bench.driver import CommandDriver, LoopResult, Outcome, closed_loop, open_loop
from bench.infra import (
    QueueProbe,
    command_queues,
    fresh_database,
    fresh_mongo_database,
    projector_queues,
    reset_vhost,
    wait_store_idle,
)
from bench.procs import CpuWindow, ServerGroups, ServiceProcess, start_module
from bench.stats import slope
from command_service.adapters.partition_leases import LOCK_SPACE
from command_service.settings import CommandServiceSettings
from cqrs_cli.workload import Workload, latency_summary_ms
from query_service.settings import QueryServiceSettings
from shared import topology
from shared.amqp import broker_login
from shared.messages import ReplayRequest

COMMAND_PARTITIONS: int = CommandServiceSettings.model_fields["command_partitions"].default
PROJECTOR_PARTITIONS: int = QueryServiceSettings.model_fields["projector_partitions"].default
READY_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mongo_port(mongo_url: str) -> int | None:
    host = mongo_url.split("://", 1)[-1].split("/", 1)[0].split(",")[0]
    _, _, port = host.rpartition(":")
    return int(port) if port.isdigit() else None


@dataclass
class Deployment:
    """The services of one configuration, started and stopped as processes."""

    servers: Servers
    plan: Plan
    replicas: int
    dsn: str
    mongo_db: str
    log_dir: Path
    commands: list[ServiceProcess] = field(default_factory=list)
    queries: list[ServiceProcess] = field(default_factory=list)
    api_ports: list[int] = field(default_factory=list)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)
    starts: int = 0

    def env(self) -> dict[str, str]:
        return {
            "CQRS_AMQP_URL": self.servers.amqp_url,
            "CQRS_POSTGRES_DSN": self.dsn,
            "CQRS_MONGO_URL": self.servers.mongo_url,
            "CQRS_MONGO_DB": self.mongo_db,
            "CQRS_HTTP_HOST": "127.0.0.1",
            "CQRS_LOG_JSON": "true",
            "CQRS_LOG_LEVEL": self.plan.log_level,
            # The grace before a rebuild drops the replaced generation: none here, so that the
            # rebuild's final progress is saved as soon as it switched.
            "CQRS_REBUILD_RETIRE_SECONDS": "0",
            # The benchmark's login sends every command, for owners of every name: privileged,
            # as a service's login is (the policy stays on; a client's check is not measured).
            "CQRS_PRIVILEGED_USERS": broker_login(self.servers.amqp_url) or "",
        }

    @property
    def apis(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.api_ports]

    @property
    def processes(self) -> list[ServiceProcess]:
        return [*self.commands, *self.queries]

    async def start_queries(self) -> None:
        self.starts += 1
        if not self.api_ports:
            self.api_ports = [free_port() for _ in range(self.replicas)]
        for index, port in enumerate(self.api_ports, 1):
            name = f"query_service#{index}"
            self.queries.append(
                await start_module(
                    "query_service",
                    [],
                    name,
                    self.log_dir / f"{name.replace('#', '-')}.{self.starts}.log",
                    {**self.env(), "CQRS_HTTP_PORT": str(port)},
                    cwd=self.plan.source,
                )
            )

    async def start_commands(self) -> None:
        for index in range(1, self.replicas + 1):
            name = f"command_service#{index}"
            self.commands.append(
                await start_module(
                    "command_service",
                    [],
                    name,
                    self.log_dir / f"{name.replace('#', '-')}.log",
                    # Replicas on one host: each binds a free port for its /metrics.
                    {**self.env(), "CQRS_HTTP_PORT": "0"},
                    cwd=self.plan.source,
                )
            )

    def _check_alive(self) -> None:
        for process in self.processes:
            if not process.running:
                raise RuntimeError(
                    f"{process.name} exited with {process.process.returncode}:\n"
                    f"{process.log_tail()}"
                )

    async def wait_ready(self, probe: QueueProbe, http: httpx.AsyncClient) -> None:
        """Every API answers, every queue has its consumer, the partitions are shared out."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            self._check_alive()
            if await self._ready(probe, http):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"services not ready within {READY_TIMEOUT_SECONDS}s")
            await asyncio.sleep(0.2)

    async def _ready(self, probe: QueueProbe, http: httpx.AsyncClient) -> bool:
        for api in self.apis if self.queries else []:
            try:
                if (await http.get(f"{api}/healthz")).status_code != 200:
                    return False
            except httpx.TransportError:
                return False
        names = command_queues(COMMAND_PARTITIONS) if self.commands else []
        names += projector_queues(PROJECTOR_PARTITIONS) if self.queries else []
        for name in names:
            found = await probe.depth(name)
            if found is None or found[1] == 0:
                return False
        return not self.commands or await self._partitions_shared()

    async def _partitions_shared(self) -> bool:
        connection = await asyncpg.connect(self.dsn)
        try:
            holders = await connection.fetchval(
                """SELECT count(DISTINCT pid) FROM pg_locks
                   WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid > 0
                     AND objsubid = 2 AND mode = 'ExclusiveLock'
                     AND database = (SELECT oid FROM pg_database
                                     WHERE datname = current_database())""",
                LOCK_SPACE,
            )
        finally:
            await connection.close()
        return int(holders) == min(self.replicas, COMMAND_PARTITIONS)

    def sample_memory(self) -> None:
        for process in self.processes:
            process.sample_memory()
            key = process.service
            self.peak_rss_kib[key] = max(self.peak_rss_kib.get(key, 0), process.peak_rss_kib)

    async def stop_queries(self) -> None:
        self.sample_memory()
        await asyncio.gather(*(process.stop() for process in self.queries))
        self.queries = []

    async def stop_all(self) -> None:
        self.sample_memory()
        # Commands first, so nothing is left half-handled for a projector that is gone.
        await asyncio.gather(*(process.stop() for process in self.commands))
        await asyncio.gather(*(process.stop() for process in self.queries))
        self.commands, self.queries = [], []

    async def wait_idle(self, probe: QueueProbe) -> float:
        """Until the relay and process managers caught up and the projector queues are empty."""
        started = time.monotonic()
        await wait_store_idle(self.dsn, self.plan.idle_timeout_seconds)
        if self.queries:
            await probe.wait_empty(
                projector_queues(PROJECTOR_PARTITIONS), self.plan.idle_timeout_seconds
            )
        return time.monotonic() - started

    def cpu_window(self, servers: ServerGroups) -> CpuWindow:
        groups: dict[str, list[int]] = {
            "command_service": [pid for p in self.commands for pid in p.pids],
            "query_service": [pid for p in self.queries for pid in p.pids],
            "bench": [os.getpid()],
        }
        groups.update(servers.pids())
        return CpuWindow(groups).start()


class Follower:
    """Follows sampled accepted account commands into the read model through the HTTP API.

    It polls `GET /accounts/{id}` every `poll_seconds` until the version reaches the reply's.
    Not `?min_version=`: the API's own wait re-reads at 10, 20, 40, 80, then 100 ms intervals,
    which would add up to that much to each sample; a 5 ms poll keeps the error small.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        apis: list[str],
        probability: float,
        seed: int,
        *,
        poll_seconds: float = 0.005,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._http = http
        self._apis = apis
        self._probability = probability
        self._rng = random.Random(seed)
        self._poll = poll_seconds
        self._timeout = timeout_seconds
        self.latencies: list[float] = []
        # (account id, version, sent at, replied at, visible at) of every followed command
        self.samples: list[tuple[str, int, float, float, float]] = []
        self.timeouts = 0
        self.requests = 0
        self.request_seconds: list[float] = []
        self._next_api = 0

    async def follow(self, outcome: Outcome) -> None:
        account = outcome.cmd.account_id
        version = outcome.version
        if outcome.status != "accepted" or account is None or version is None:
            return
        if self._rng.random() >= self._probability:
            return
        api = self._apis[self._next_api % len(self._apis)]
        self._next_api += 1
        url = f"{api}/accounts/{account}"
        deadline = outcome.sent_at + self._timeout
        while True:
            try:
                asked = time.perf_counter()
                response = await self._http.get(url)
                self.request_seconds.append(time.perf_counter() - asked)
                self.requests += 1
                if response.status_code == 200 and response.json()["version"] >= version:
                    visible = time.perf_counter()
                    self.latencies.append(visible - outcome.sent_at)
                    self.samples.append(
                        (account, version, outcome.sent_at, outcome.replied_at, visible)
                    )
                    return
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                self.timeouts += 1
                return
            await asyncio.sleep(self._poll)


class EventTap:
    """Notes when each event appears on `cqrs.events`, through a queue of the benchmark's own.

    With the follower's samples it splits command -> read model into its stages: handled and
    replied, relayed to the broker, projected and read back.
    """

    def __init__(self, connection: AbstractConnection) -> None:
        self._connection = connection
        self.seen: dict[tuple[str, int], float] = {}

    @classmethod
    async def start(cls, amqp_url: str) -> EventTap:
        connection = await aio_pika.connect(amqp_url)
        tap = cls(connection)
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")
        await queue.consume(tap._on_event, no_ack=True)
        return tap

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        aggregate, version = headers.get(topology.AGGREGATE_ID_HEADER), headers.get("version")
        if isinstance(aggregate, bytes):
            aggregate = aggregate.decode()
        if isinstance(version, int):
            self.seen.setdefault((str(aggregate), version), time.perf_counter())

    async def close(self) -> None:
        await self._connection.close()

    def stages(self, follower: Follower) -> dict[str, Any]:
        """Per followed command: publish -> reply, publish -> event on the bus, bus -> visible."""
        reply, bus, visible_after_bus = [], [], []
        for account, version, sent, replied, visible in follower.samples:
            reply.append(replied - sent)
            relayed = self.seen.get((account, version))
            if relayed is not None:
                bus.append(relayed - sent)
                visible_after_bus.append(visible - relayed)
        return {
            "publish_to_reply_ms": latency_summary_ms(reply),
            "publish_to_event_on_bus_ms": latency_summary_ms(bus),
            "event_on_bus_to_visible_ms": latency_summary_ms(visible_after_bus),
        }


async def measure_drain(
    probe: QueueProbe, queues: list[str], initial: int, timeout: float
) -> dict[str, Any]:
    """Events/s a consumer takes off a backlog of `initial` messages, from the queue depths.

    The rate is the slope between 90% and 10% of the backlog left, so start-up, the first
    prefetch and the tail do not count; if the timeout comes first, up to where it got.
    """
    started = time.perf_counter()
    samples: list[tuple[float, int]] = []
    empty_polls = 0
    while empty_polls < 3 and time.perf_counter() - started < timeout:
        depth = await probe.total_depth(queues)
        samples.append((time.perf_counter() - started, depth))
        empty_polls = empty_polls + 1 if depth == 0 else 0
        await asyncio.sleep(0.05)
    high = next(((t, d) for t, d in samples if d <= 0.9 * initial), None)
    low = next(((t, d) for t, d in samples if d <= 0.1 * initial), samples[-1] if samples else None)
    rate = None
    if high is not None and low is not None and low[0] > high[0]:
        rate = (high[1] - low[1]) / (low[0] - high[0])
    drained = next((t for t, d in samples if d == 0), None)
    return {
        "backlog_events": initial,
        "events_per_s": rate,
        "drained_in_s": drained,
        "left_at_timeout": samples[-1][1] if samples and drained is None else 0,
    }


async def measure_replay(amqp_url: str, timeout: float) -> dict[str, Any]:
    """Events/s of the command service's replay stream (what a read-model rebuild consumes)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        done = asyncio.Event()
        marks: dict[str, float] = {}
        events = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal events
            if message.type == topology.REPLAY_STARTED:
                marks["started"] = time.perf_counter()
            elif message.type == topology.REPLAY_FINISHED:
                marks["finished"] = time.perf_counter()
                done.set()
            else:
                events += 1

        await queue.consume(on_message, no_ack=True)
        request = ReplayRequest(reply_queue=queue.name)
        exchange = await channel.get_exchange(topology.REPLAY_EXCHANGE, ensure=True)
        requested = time.perf_counter()
        await exchange.publish(
            aio_pika.Message(
                body=request.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.REPLAY_REQUESTS_QUEUE,
        )
        await asyncio.wait_for(done.wait(), timeout)
        seconds = marks["finished"] - requested
        return {
            "method": "replay stream (ReplayRequest -> ReplayFinished)",
            "events": events,
            "seconds": round(seconds, 3),
            "events_per_s": events / seconds if seconds > 0 else None,
        }
    finally:
        await connection.close()


async def measure_rebuild(http: httpx.AsyncClient, api: str, timeout: float) -> dict[str, Any]:
    """Events/s of the query service's rebuild of every read model (`POST /admin/rebuilds`).

    Timed from the request until the rebuild is done: replay, writes, verification, switch and
    dropping the replaced generation (the grace before that is set to 0 for the benchmark).
    """
    models = [m["name"] for m in (await http.get(f"{api}/admin/read-models")).json()]
    started = time.perf_counter()
    response = await http.post(f"{api}/admin/rebuilds", json={"read_models": models})
    response.raise_for_status()
    status_url = f"{api}{response.json()['status_url']}"
    rebuild_id = response.json()["rebuild_id"]
    deadline = started + timeout
    while True:
        status = (await http.get(status_url)).json()
        progress = status.get("rebuild") or {}
        if progress.get("id") == rebuild_id and progress.get("state") in ("done", "failed"):
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"rebuild not switched within {timeout}s: {progress}")
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - started
    events = int(progress.get("events") or 0)
    return {
        "read_models": models,
        "state": progress.get("state"),
        "rounds": progress.get("round"),
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": events / seconds if progress.get("state") != "failed" else None,
        "error": progress.get("error"),
    }


READ_MODEL_WRITES = "cqrs_read_model_writes_total"
EVENTS_PROJECTED = "cqrs_events_projected_total"


async def mongo_opcounters(mongo_url: str) -> dict[str, int] | None:
    """The server's `serverStatus` opcounters (None when it has none)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    try:
        status = await client.admin.command("serverStatus")
    except PyMongoError:
        return None
    finally:
        await client.close()
    counters = status.get("opcounters")
    if not isinstance(counters, dict):
        return None
    return {key: int(value) for key, value in counters.items() if isinstance(value, int | float)}


async def scrape_sums(
    http: httpx.AsyncClient, apis: list[str], names: tuple[str, ...]
) -> dict[str, float | None]:
    """Each metric's samples summed over every query service's `/metrics` (labels ignored);
    None for a metric no replica exposes."""
    sums: dict[str, float | None] = dict.fromkeys(names)
    for api in apis:
        response = await http.get(f"{api}/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in sums:
                    sums[sample.name] = (sums[sample.name] or 0.0) + sample.value
    return sums


@dataclass
class MongoWrites:
    """MongoDB writes per projected event over a phase: the server's write opcounters and the
    query service's own count of read-model writes, each divided by the events projected."""

    mongo_url: str
    http: httpx.AsyncClient
    apis: list[str]
    before_server: dict[str, int] | None = None
    before_service: dict[str, float | None] = field(default_factory=dict)

    async def start(self) -> MongoWrites:
        self.before_server = await mongo_opcounters(self.mongo_url)
        self.before_service = await scrape_sums(
            self.http, self.apis, (READ_MODEL_WRITES, EVENTS_PROJECTED)
        )
        return self

    async def stop(self) -> dict[str, Any]:
        after_server = await mongo_opcounters(self.mongo_url)
        after_service = await scrape_sums(
            self.http, self.apis, (READ_MODEL_WRITES, EVENTS_PROJECTED)
        )

        def delta(name: str) -> float | None:
            first, last = self.before_service.get(name), after_service.get(name)
            return None if first is None or last is None else last - first

        events = delta(EVENTS_PROJECTED)
        server_writes = None
        if self.before_server is not None and after_server is not None:
            server_writes = sum(
                after_server.get(key, 0) - self.before_server.get(key, 0)
                for key in ("insert", "update", "delete")
            )
        service_writes = delta(READ_MODEL_WRITES)
        return {
            "events_projected": events,
            "server_write_ops": server_writes,
            "read_model_writes": service_writes,
            "server_write_ops_per_event": (
                server_writes / events if server_writes is not None and events else None
            ),
            "read_model_writes_per_event": (
                service_writes / events if service_writes is not None and events else None
            ),
        }


def _cpu_per_1000(cpu: dict[str, float], commands: int) -> dict[str, float | None]:
    return {
        name: (round(seconds / commands * 1000, 3) if commands else None)
        for name, seconds in cpu.items()
        if not name.startswith("machine")
    }


def _phase(result: LoopResult) -> dict[str, Any]:
    return {
        "accepted_per_s": result.rate("accepted"),
        "replies_per_s": result.rate(),
        "statuses": result.statuses(),
        "rejections": result.rejections(),
        "reply_ms": latency_summary_ms([o.latency for o in result.in_window()]),
    }


async def measure_project(
    servers: Servers,
    plan: Plan,
    replicas: int,
    run_dir: Path,
    seed: int,
    *,
    profile: bool,
    rebuild: bool,
) -> dict[str, Any]:
    """All phases on one deployment of `replicas` command and query service replicas."""
    out: dict[str, Any] = {"replicas": replicas}
    server_groups = ServerGroups(mongo_port(servers.mongo_url))
    log_dir = run_dir / f"project-{replicas}"
    await reset_vhost(servers.amqp_url)
    async with (
        fresh_database(servers.postgres_dsn) as dsn,
        fresh_mongo_database(servers.mongo_url) as mongo_db,
        httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=64)) as http,
    ):
        deployment = Deployment(servers, plan, replicas, dsn, mongo_db, log_dir)
        probe = await QueueProbe.connect(servers.amqp_url)
        driver: CommandDriver | None = None
        try:
            await deployment.start_queries()
            await deployment.start_commands()
            await deployment.wait_ready(probe, http)
            driver = await CommandDriver.connect(servers.amqp_url)
            workload = Workload(seed, plan.hot_accounts)

            def opened(outcome: Outcome) -> None:
                if outcome.status == "accepted":
                    workload.opened(outcome.cmd)

            openings = iter(workload.openings(plan.accounts))
            setup = await closed_loop(
                driver,
                lambda: next(openings),
                concurrency=min(plan.concurrency, plan.accounts),
                seconds=plan.idle_timeout_seconds,
                max_commands=plan.accounts,
                on_outcome=opened,
            )
            out["setup"] = {"statuses": setup.statuses(), "accounts": len(workload.accounts)}
            if len(workload.accounts) < 2:
                raise RuntimeError(f"opening the accounts failed: {setup.statuses()}")
            await deployment.wait_idle(probe)

            # 2. The maximum, and the CPU it costs until everything it caused is done.
            writes = await MongoWrites(servers.mongo_url, http, deployment.apis).start()
            window = deployment.cpu_window(server_groups)
            profilers = []
            if profile:
                for process in (deployment.commands[0], deployment.queries[0]):
                    spy = await profiling.start(
                        process.pid,
                        plan.max_seconds,
                        log_dir / f"profile-{process.service}.txt",
                    )
                    if spy is not None:
                        profilers.append((process.service, spy))
            peak = await closed_loop(
                driver,
                workload.next,
                concurrency=plan.concurrency,
                seconds=plan.max_seconds,
                warmup=plan.warmup_seconds,
                on_outcome=opened,
            )
            machine_after_load = window.stop()
            out["idle_after_max_s"] = round(await deployment.wait_idle(probe), 2)
            cpu = window.stop()
            out["max"] = _phase(peak)
            out["max"]["mongo_writes"] = await writes.stop()
            out["max"]["machine_busy_pct"] = round(
                100 * machine_after_load["machine_busy"] / machine_after_load["machine_total"], 1
            )
            out["cpu_seconds"] = cpu
            out["cpu_per_1000_commands"] = _cpu_per_1000(cpu, len(peak.outcomes))
            for service, spy in profilers:
                await spy.wait()
                collapsed = log_dir / f"profile-{service}.txt"
                if collapsed.exists():
                    out.setdefault("profile", {})[service] = profiling.top_frames(collapsed)
            deployment.sample_memory()

            # 3. Half load (or the rate asked for), followed into the read model.
            rate = plan.latency_rate or max(1.0, 0.5 * peak.rate())
            follower = Follower(
                http,
                deployment.apis,
                probability=min(1.0, plan.latency_samples_per_second / rate),
                seed=seed,
            )
            tap = await EventTap.start(servers.amqp_url)
            try:
                half = await open_loop(
                    driver,
                    workload.next,
                    rate=rate,
                    seconds=plan.latency_seconds,
                    on_outcome=opened,
                    follow=follower.follow,
                )
            finally:
                await tap.close()
            out["half_load"] = {
                "offered_per_s": round(rate, 1),
                "achieved_per_s": half.rate(),
                "max_schedule_lag_ms": round(half.max_schedule_lag * 1000, 1),
                "statuses": half.statuses(),
                "reply_ms": latency_summary_ms([o.latency for o in half.outcomes]),
                "visible_ms": latency_summary_ms(follower.latencies),
                "visible_timeouts": follower.timeouts,
                "stages": tap.stages(follower),
                "api_requests": follower.requests,
                "api_request_ms": latency_summary_ms(follower.request_seconds),
            }
            await deployment.wait_idle(probe)
            deployment.sample_memory()

            # 4. Projection: a backlog built while the query services are down, then drained.
            await deployment.stop_queries()
            backlog = await closed_loop(
                driver,
                workload.next,
                concurrency=plan.concurrency,
                seconds=plan.idle_timeout_seconds,
                warmup=plan.warmup_seconds / 2,
                max_commands=plan.backlog_commands,
                on_outcome=opened,
            )
            # The same closed loop with the read side stopped: what the command side alone does.
            out["commands_only"] = _phase(backlog)
            await wait_store_idle(dsn, plan.idle_timeout_seconds)
            queues = projector_queues(PROJECTOR_PARTITIONS)
            depth = await probe.total_depth(queues)
            await deployment.start_queries()
            projection = await measure_drain(probe, queues, depth, plan.projection_timeout_seconds)
            projection["commands"] = len(backlog.outcomes)
            out["projection"] = projection
            await deployment.wait_ready(probe, http)
            await deployment.wait_idle(probe)

            # 5. Rebuild: the command side's replay stream alone, then the query service's
            # rebuild of every read model (which consumes such a stream). A rebuild runs in one
            # query service replica whatever their number: measured in the first configuration.
            if rebuild:
                out["replay"] = await measure_replay(servers.amqp_url, plan.idle_timeout_seconds)
                out["rebuild"] = await measure_rebuild(
                    http, deployment.apis[0], plan.rebuild_timeout_seconds
                )
            deployment.sample_memory()
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    await driver.close()
            await probe.close()
            await deployment.stop_all()
        out["peak_rss_mib"] = {
            service: round(kib / 1024, 1) for service, kib in deployment.peak_rss_kib.items()
        }
    return out


async def measure_soak(
    servers: Servers, plan: Plan, rate: float, seconds: float, run_dir: Path
) -> dict[str, Any]:
    """One replica of each service under a steady `rate` for `seconds`; RSS every 5 seconds."""
    log_dir = run_dir / "soak"
    await reset_vhost(servers.amqp_url)
    async with (
        fresh_database(servers.postgres_dsn) as dsn,
        fresh_mongo_database(servers.mongo_url) as mongo_db,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        deployment = Deployment(servers, plan, 1, dsn, mongo_db, log_dir)
        probe = await QueueProbe.connect(servers.amqp_url)
        driver: CommandDriver | None = None
        samples: dict[str, list[tuple[float, float]]] = {}
        try:
            await deployment.start_queries()
            await deployment.start_commands()
            await deployment.wait_ready(probe, http)
            driver = await CommandDriver.connect(servers.amqp_url)
            workload = Workload(7, plan.hot_accounts)
            for cmd in workload.openings(plan.accounts):
                if (await driver.send(cmd)).status == "accepted":
                    workload.opened(cmd)
            started = time.perf_counter()

            async def sample() -> None:
                while True:
                    for process in deployment.processes:
                        rss = process.sample_memory().get("VmRSS", 0) / 1024
                        samples.setdefault(process.service, []).append(
                            (round(time.perf_counter() - started, 1), round(rss, 1))
                        )
                    await asyncio.sleep(5.0)

            def opened(outcome: Outcome) -> None:
                if outcome.status == "accepted":
                    workload.opened(outcome.cmd)

            sampler = asyncio.create_task(sample())
            try:
                load = await open_loop(
                    driver, workload.next, rate=rate, seconds=seconds, on_outcome=opened
                )
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
        finally:
            if driver is not None:
                with contextlib.suppress(Exception):
                    await driver.close()
            await probe.close()
            await deployment.stop_all()
    growth: dict[str, Any] = {}
    for service, points in samples.items():
        # The first minute is warm-up (caches, pools, allocator arenas filling).
        settled = [(t, rss) for t, rss in points if t >= min(60.0, seconds / 3)]
        per_minute = slope(settled)
        growth[service] = {
            "first_mib": settled[0][1] if settled else None,
            "last_mib": settled[-1][1] if settled else None,
            "slope_mib_per_min": None if per_minute is None else round(per_minute * 60, 2),
        }
    return {
        "seconds": seconds,
        "rate": rate,
        "statuses": load.statuses(),
        "rss_mib": samples,
        "growth": growth,
    }
