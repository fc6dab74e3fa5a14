"""Both services as real processes (`python -m ...`) against the real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import pytest

from shared import topology
from shared.client import CommandClient
from shared.ledger import DepositMoney, OpenAccount, WithdrawMoney
from tests.conftest import Services

pytestmark = pytest.mark.e2e


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
async def pair(
    broker: str, pg_dsn: str, mongo_db: str, services: Services, tmp_path: Path
) -> AsyncIterator[Pair]:
    port = free_port()
    env = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_POSTGRES_DSN": pg_dsn,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_HTTP_PORT": str(port),
        "CQRS_LOG_JSON": "true",
    }
    processes, logs = {}, {}
    for name in ("command_service", "query_service"):
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", name], env=env, stdout=log, stderr=subprocess.STDOUT
            )
    pair = Pair(f"http://127.0.0.1:{port}", broker, processes, logs)
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


async def read_account(http: httpx.AsyncClient, url: str, version: int) -> dict[str, object]:
    """Poll the read model until it reaches `version`."""
    async with asyncio.timeout(20):
        while True:
            response = await http.get(url)
            if response.status_code == 200 and response.json()["version"] >= version:
                return dict(response.json())
            await asyncio.sleep(0.1)


async def test_commands_become_visible_in_the_read_model(pair: Pair) -> None:
    account = uuid.uuid4()
    async with await CommandClient.connect(pair.amqp_url) as client, httpx.AsyncClient() as http:
        url = f"{pair.api}/accounts/{account}"
        assert (await http.get(url)).status_code == 404

        opened = await client.send_command(
            OpenAccount(owner_id="alice", currency="EUR", initial_deposit=1000), account
        )
        deposited = await client.send_command(DepositMoney(amount=250), account)
        refused = await client.send_command(WithdrawMoney(amount=5000), account)
        assert (opened.status, deposited.status, refused.status) == (
            "accepted",
            "accepted",
            "rejected",
        )

        # A malformed command is dead-lettered; the service keeps serving.
        connection = await aio_pika.connect(pair.amqp_url)
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(aio_pika.Message(b"not json"), routing_key="account.OpenAccount")
        await connection.close()
        withdrawn = await client.send_command(WithdrawMoney(amount=50), account)
        assert withdrawn.status == "accepted" and withdrawn.version == 4

        document = await read_account(http, url, 4)
    assert document["id"] == str(account)
    assert document["owner_id"] == "alice"
    assert document["currency"] == "EUR"
    assert document["balance"] == 1200
    assert document["status"] == "open"
    assert document["version"] == 4

    assert dict(stop(pair)) == {"command_service": 0, "query_service": 0}
