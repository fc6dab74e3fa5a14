"""`python -m query_service` as a process: events in over AMQP, account out over HTTP, exit 0.

By default the API runs in a child process of the projector's: a read is answered while the
projector's process is stopped, a killed API process is started again, and `/metrics` shows
the projector's counters and the supervisor's count of the API process's failures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import aio_pika
import httpx
import pytest

from shared.ledger import MoneyWithdrawn
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.metrics_support import scrape, value
from tests.query_support import envelope, eventually, opened_account, publish

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunningService:
    process: asyncio.subprocess.Process
    http_url: str
    amqp_url: str
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def service(broker: str, services: Services, mongo_db: str) -> AsyncIterator[RunningService]:
    port = _free_port()
    env = {
        **os.environ,
        "CQRS_AMQP_URL": broker,
        "CQRS_MONGO_URL": services.mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_HTTP_HOST": "127.0.0.1",
        "CQRS_HTTP_PORT": str(port),
        "CQRS_PROJECTOR_PARTITIONS": "2",
        "CQRS_LOG_JSON": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "query_service", cwd=REPO, env=env
    )
    try:
        yield RunningService(process, f"http://127.0.0.1:{port}", broker, env)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_projects_serves_and_exits_cleanly_on_sigterm(
    service: RunningService,
) -> None:
    account_id = uuid4()
    async with httpx.AsyncClient(base_url=service.http_url, timeout=2) as http:

        async def health() -> int:
            try:
                return (await http.get("/healthz")).status_code
            except httpx.TransportError:
                return 0

        await eventually(health, lambda status: status == 200)

        connection = await aio_pika.connect(service.amqp_url)
        async with connection:
            channel = await connection.channel()
            events = await channel.get_exchange(EVENTS_EXCHANGE)
            for event in [
                *opened_account(account_id, owner_id="erin", currency="SEK", deposit=500),
                envelope(account_id, 3, MoneyWithdrawn(amount=120)),
            ]:
                await publish(events, event)

        async def shown() -> dict[str, object]:
            response = await http.get(f"/accounts/{account_id}")
            return dict(response.json()) if response.status_code == 200 else {}

        account = await eventually(shown, lambda body: body.get("version") == 3)

    assert (account["owner_id"], account["currency"], account["balance"]) == ("erin", "SEK", 380)
    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), timeout=20) == 0


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status").read_text()
    return "\nState:\tZ" not in status


async def project_account(service: RunningService, http: httpx.AsyncClient) -> str:
    """Wait until the service answers, publish an account's events, wait until it is shown."""

    async def health() -> int:
        try:
            return (await http.get("/healthz")).status_code
        except httpx.TransportError:
            return 0

    await eventually(health, lambda status: status == 200)
    account_id = uuid4()
    connection = await aio_pika.connect(service.amqp_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.get_exchange(EVENTS_EXCHANGE)
        for event in [
            *opened_account(account_id, owner_id="fay", currency="EUR", deposit=50),
            envelope(account_id, 3, MoneyWithdrawn(amount=20)),
        ]:
            await publish(events, event)
    url = f"/accounts/{account_id}"

    async def version() -> int:
        response = await http.get(url)
        return int(response.json()["version"]) if response.status_code == 200 else 0

    await eventually(version, lambda found: found == 3)
    return url


async def test_reads_are_answered_while_the_projectors_process_is_stopped(
    service: RunningService,
) -> None:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as http:
        url = await project_account(service, http)
        [api_process] = children_of(service.process.pid)

        # The projector's counters, reported by its process, are on the API's /metrics (it
        # counts an event once its batch is through, a moment after the read model shows it).
        async def withdrawn() -> float:
            samples = await scrape(http)
            return value(samples, "cqrs_events_projected_total", event_type="MoneyWithdrawn")

        await eventually(withdrawn, lambda found: found == 1)
        ready = (await http.get("/readyz")).json()
        assert ready["checks"]["projector"]["ok"] is True, ready
        assert ready["detail"]["projector"]["projected"] >= 3, ready

        service.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(20):
                response = await http.get(url)
                assert response.status_code == 200 and response.json()["balance"] == 30
            # /metrics answers too, with the last report it has.
            samples = await scrape(http)
            assert value(samples, "cqrs_events_projected_total", event_type="MoneyWithdrawn") == 1
        finally:
            service.process.send_signal(signal.SIGCONT)

    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), timeout=30) == 0
    assert not alive(api_process)


async def test_a_killed_api_process_is_started_again_and_counted(
    service: RunningService,
) -> None:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as http:
        url = await project_account(service, http)
        [first] = children_of(service.process.pid)
        os.kill(first, signal.SIGKILL)

        async def replaced() -> list[int]:
            return [pid for pid in children_of(service.process.pid) if pid != first]

        [second] = await eventually(replaced, lambda found: len(found) == 1)

        async def shown() -> int:
            try:
                return (await http.get(url)).status_code
            except httpx.TransportError:
                return 0

        await eventually(shown, lambda status: status == 200)
        samples = await scrape(http)
        assert value(samples, "cqrs_task_failures_total", task="api-process-0") == 1

    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), timeout=30) == 0
    assert not alive(second)


async def test_api_processes_stop_when_the_projectors_process_is_killed_and_a_successor_serves(
    service: RunningService,
) -> None:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as http:
        await project_account(service, http)
    [api_process] = children_of(service.process.pid)
    service.process.kill()
    await service.process.wait()
    # A successor started at once takes the port over as the orphan lets go of it.
    successor = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "query_service", cwd=REPO, env=service.env
    )
    try:

        async def running() -> bool:
            return alive(api_process)

        assert await eventually(running, lambda found: not found) is False
        async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as http:
            await project_account(service, http)
        successor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(successor.wait(), timeout=30) == 0
    finally:
        if successor.returncode is None:
            successor.kill()
            await successor.wait()


async def test_a_rebuild_asked_of_an_api_process_is_started_by_the_projectors(
    service: RunningService,
) -> None:
    async with httpx.AsyncClient(base_url=service.http_url, timeout=5) as http:
        url = await project_account(service, http)
        started = await http.post("/admin/rebuilds", json={"read_models": ["accounts"]})
        assert started.status_code == 202, started.text
        again = await http.post("/admin/rebuilds", json={"read_models": ["accounts"]})
        assert again.status_code in (202, 409), again.text

        async def state() -> dict[str, object]:
            return dict((await http.get("/admin/read-models/accounts")).json())

        # Without a command service to replay the events it fails; where it ran is the point
        # here (tests/e2e/test_query_pair.py has one go through).
        found = await eventually(state, lambda model: model["rebuild"] is not None)
        rebuild = found["rebuild"]
        assert isinstance(rebuild, dict)
        assert str(rebuild["owner"]).endswith(f":{service.process.pid}"), rebuild
        assert (await http.get(url)).json()["balance"] == 30

    service.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.process.wait(), timeout=30) == 0
