"""Both services as real processes (`python -m ...`) against the real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

from command_service.adapters.partition_leases import LOCK_SPACE
from shared import topology
from tests.conftest import Services


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pair:
    api: str
    amqp_url: str
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    command_http: str  # the command service's /healthz, /readyz, /status, /metrics


async def wait_until_ready(pair: Pair, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout), httpx.AsyncClient() as http:
        while True:
            for name, process in pair.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited: {pair.logs[name].read_text()[-3000:]}")
            try:
                healthy = (await http.get(f"{pair.api}/healthz")).status_code == 200
            except httpx.TransportError:
                healthy = False
            if healthy and await _command_partitions_consumed(pair.amqp_url):
                return
            await asyncio.sleep(0.2)


async def _command_partitions_consumed(amqp_url: str) -> bool:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.command_partition_queue(0), passive=True)
        return bool(queue.declaration_result.consumer_count)
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        await connection.close()


@pytest.fixture
def pair_env() -> dict[str, str]:
    """More `CQRS_*` settings for both processes of `pair`; a test module overrides it."""
    return {}


@pytest.fixture
async def pair(
    broker: str,
    pg_dsn: str,
    mongo_db: str,
    services: Services,
    tmp_path: Path,
    pair_env: dict[str, str],
) -> AsyncIterator[Pair]:
    port, command_port = free_port(), free_port()
    env = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_POSTGRES_DSN": pg_dsn,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_HTTP_PORT": str(port),
        "CQRS_LOG_JSON": "true",
        # These tests publish raw messages without user_id (anonymous) as the broker's guest;
        # who may do what is tested in tests/integration/test_authorization.py.
        "CQRS_AUTHORIZATION": "off",
        **pair_env,
    }
    processes, logs = {}, {}
    # CQRS_HTTP_PORT is read by both services: each gets its own.
    envs = {
        "command_service": {**env, "CQRS_HTTP_PORT": str(command_port)},
        "query_service": env,
    }
    for name, service_env in envs.items():
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", name], env=service_env, stdout=log, stderr=subprocess.STDOUT
            )
    pair = Pair(
        f"http://127.0.0.1:{port}", broker, processes, logs, f"http://127.0.0.1:{command_port}"
    )
    try:
        await wait_until_ready(pair)
        yield pair
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def stop(pair: Pair) -> Iterator[tuple[str, int]]:
    for process in pair.processes.values():
        process.send_signal(signal.SIGTERM)
    for name, process in pair.processes.items():
        yield name, process.wait(timeout=30)


@dataclass
class CommandReplicas:
    """Command-service processes started by a test; killed at teardown if still running."""

    env: dict[str, str]
    folder: Path
    processes: list[subprocess.Popen[bytes]]

    def spawn(self) -> subprocess.Popen[bytes]:
        with (self.folder / f"command_service_{len(self.processes)}.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "command_service"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.folder.glob("*.log")))

    async def wait_balanced(self, replicas: int, timeout: float = 30.0) -> list[int]:
        """Until `replicas` replicas share the partitions evenly and each has one consumer.

        Returns how many partitions each replica holds, largest first.
        """
        partitions = int(self.env["CQRS_COMMAND_PARTITIONS"])
        fair = -(-partitions // replicas)
        shares: list[int] = []
        consumers: list[int] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for process in self.processes:
                if process.returncode is None and process.poll() is not None:
                    raise AssertionError(f"a command service exited:\n{self.logs()}")
            shares = await partition_shares(self.env["CQRS_POSTGRES_DSN"])
            consumers = await _consumer_counts(self.env["CQRS_AMQP_URL"], partitions)
            if (
                len(shares) == replicas
                and sum(shares) == partitions
                and max(shares) <= fair
                and consumers == [1] * partitions
            ):
                return shares
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"not balanced over {replicas} replicas: leases {shares}, consumers {consumers}"
        )


async def partition_shares(dsn: str) -> list[int]:
    """Partitions held by each replica (by its lease connection), largest first."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """SELECT pid, count(*) AS held FROM pg_locks
               WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid > 0
                 AND objsubid = 2 AND mode = 'ExclusiveLock'
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               GROUP BY pid ORDER BY held DESC""",
            LOCK_SPACE,
        )
    finally:
        await connection.close()
    return [int(row["held"]) for row in rows]


async def _consumer_counts(amqp_url: str, partitions: int) -> list[int]:
    connection = await aio_pika.connect(amqp_url)
    counts = []
    try:
        for index in range(partitions):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(
                    topology.command_partition_queue(index), passive=True
                )
                counts.append(queue.declaration_result.consumer_count or 0)
            except aio_pika.exceptions.ChannelClosed:
                counts.append(0)
    finally:
        await connection.close()
    return counts


@pytest.fixture
def command_replicas(broker: str, pg_dsn: str, tmp_path: Path) -> Iterator[CommandReplicas]:
    env = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_POSTGRES_DSN": pg_dsn,
        "CQRS_COMMAND_PARTITIONS": "6",
        "CQRS_RELAY_POLL_SECONDS": "0.2",
        "CQRS_LOG_JSON": "true",
        "CQRS_HTTP_PORT": "0",  # replicas on one host: each binds a free port
        "CQRS_AUTHORIZATION": "off",  # as in `pair`
    }
    replicas = CommandReplicas(env, tmp_path, [])
    yield replicas
    for process in replicas.processes:
        if process.poll() is None:
            process.kill()
            process.wait()
