"""What the query API tells the outside when MongoDB or the broker is cut: reason codes, never
the driver's exception (that goes to the log, at WARNING). Against `python -m query_service`,
its links to the servers through `tests.tcp_proxy`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
import httpx
import pytest

from query_service.adapters import broker as amqp
from query_service.settings import QueryServiceSettings
from tests.conftest import Services
from tests.query_support import eventually, query_api_process
from tests.reason_support import driver_details
from tests.tcp_proxy import TcpProxy, proxy_for, through

pytestmark = pytest.mark.integration

PARTITIONS = 2


@pytest.fixture
async def topology(broker: str) -> str:
    """The projector's queues, declared, so that the broker check has something to count."""
    connection = await aio_pika.connect(broker)
    async with connection:
        channel = await connection.channel()
        defaults = QueryServiceSettings()
        parked = amqp.parked_bounds(defaults.parked_max_messages, defaults.parked_max_bytes)
        await amqp.declare_projector_topology(channel, amqp.ProjectorTopology(PARTITIONS, parked))
    return broker


@pytest.fixture
async def mongo_proxy(services: Services) -> AsyncIterator[TcpProxy]:
    async with proxy_for(services.mongo_url) as proxy:
        yield proxy


@pytest.fixture
async def broker_proxy(topology: str) -> AsyncIterator[TcpProxy]:
    async with proxy_for(topology) as proxy:
        yield proxy


def logged(path: Path, event: str) -> list[dict[str, Any]]:
    """The service's JSON log lines about `event` (the drivers' own lines are not JSON)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == event]


def api_settings(amqp_url: str, mongo_url: str, mongo_db: str) -> dict[str, str]:
    return {
        "CQRS_AMQP_URL": amqp_url,
        "CQRS_MONGO_URL": mongo_url,
        "CQRS_MONGO_DB": mongo_db,
        "CQRS_PROJECTOR_PARTITIONS": str(PARTITIONS),
    }


async def readiness(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/readyz")
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def test_mongodb_cut_is_a_reason_code_outside_and_the_error_in_the_log(
    services: Services, topology: str, mongo_proxy: TcpProxy, mongo_db: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "query.log"
    settings = api_settings(topology, through(mongo_proxy, services.mongo_url), mongo_db)
    with log_path.open("wb") as log:
        async with (
            query_api_process(settings, log=log) as api,
            httpx.AsyncClient(base_url=api.url, timeout=30) as http,
        ):
            _, before = await eventually(lambda: readiness(http), lambda r: r[0] == 200)
            await mongo_proxy.cut()
            status, after = await readiness(http)
            read = await http.get(f"/accounts/{uuid4()}")

    assert before["checks"]["mongo"] == {"ok": True}
    assert status == 503
    # The probe's own 2 s deadline ends it before the driver's 5 s server selection does.
    assert after["checks"]["mongo"] == {"ok": False, "reason": "timeout"}
    assert after["checks"]["broker"] == {"ok": True}
    assert read.status_code == 503
    assert read.headers["retry-after"] == "1"
    assert read.json() == {"detail": "read store unavailable", "reason": "store_unavailable"}
    address = f"127.0.0.1:{mongo_proxy.port}"
    assert driver_details(json.dumps(after), address) == []
    assert driver_details(read.text, address) == []
    [failed] = logged(log_path, "readiness_check_failed")
    assert (failed["level"], failed["check"], failed["reason"]) == ("warning", "mongo", "timeout")
    assert "TimeoutError" in failed["error"]
    [unavailable] = logged(log_path, "read_store_unavailable")
    assert unavailable["level"] == "warning"
    assert "ServerSelectionTimeoutError" in unavailable["error"]


async def test_broker_cut_is_a_reason_code_outside_and_the_error_in_the_log(
    services: Services, broker_proxy: TcpProxy, topology: str, mongo_db: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "query.log"
    settings = api_settings(through(broker_proxy, topology), services.mongo_url, mongo_db)
    with log_path.open("wb") as log:
        async with (
            query_api_process(settings, log=log) as api,
            httpx.AsyncClient(base_url=api.url, timeout=30) as http,
        ):
            _, before = await eventually(lambda: readiness(http), lambda r: r[0] == 200)
            await broker_proxy.cut()
            _, after = await eventually(
                lambda: readiness(http), lambda r: r[1]["checks"]["broker"]["ok"] is False
            )

    assert before["checks"]["broker"] == {"ok": True}
    assert after["status"] == "not_ready"
    # Down and reconnecting, or refused, depending on what the probe met first.
    assert after["checks"]["broker"] in (
        {"ok": False, "reason": "disconnected"},
        {"ok": False, "reason": "unreachable"},
    )
    assert after["checks"]["lag"] == {"ok": False, "reason": "unknown_without_broker"}
    assert after["checks"]["mongo"] == {"ok": True}
    assert driver_details(json.dumps(after), f"127.0.0.1:{broker_proxy.port}") == []
    failed = logged(log_path, "readiness_check_failed")
    assert failed and all(entry["level"] == "warning" for entry in failed)
    assert any("Error" in entry["error"] for entry in failed)


async def test_a_rebuild_without_the_broker_is_503_with_a_reason_code(
    services: Services, broker_proxy: TcpProxy, topology: str, mongo_db: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "query.log"
    await broker_proxy.cut()
    settings = api_settings(through(broker_proxy, topology), services.mongo_url, mongo_db)
    with log_path.open("wb") as log:
        async with (
            query_api_process(settings, log=log) as api,
            httpx.AsyncClient(base_url=api.url, timeout=30) as http,
        ):
            response = await http.post("/admin/rebuilds", json={"read_models": ["accounts"]})

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == {
        "detail": "the broker is unavailable: no rebuild started; try again",
        "reason": "broker_unavailable",
    }
    assert driver_details(response.text, f"127.0.0.1:{broker_proxy.port}") == []
    [failed] = logged(log_path, "rebuild_not_started")
    assert (failed["level"], failed["reason"]) == ("warning", "unreachable")
    assert "AMQPConnectionError" in failed["error"]
