"""Nothing in the query service dies silently: each kind of long-lived work, made to fail, is
logged, counted (`cqrs_task_failures_total`), restarted or retried, and named in `/readyz` until
it works again. Against real RabbitMQ and MongoDB, the service in-process."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest

from cqrs_runtime.supervision import Backoff, Supervisor
from query_service.adapters.mongo import MongoCheckpoints
from query_service.bootstrap import QueryService, bootstrap
from query_service.entrypoints.event_consumer import ProjectorConsumer
from query_service.entrypoints.partitions import PartitionBalancer
from query_service.settings import QueryServiceSettings
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.integration.test_containment import Fault
from tests.metrics_support import parse, value
from tests.query_support import eventually, opened_account, publish, served

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
        projector_rebalance_seconds=0.2,
    )


async def service_with(settings: QueryServiceSettings) -> QueryService:
    return await bootstrap(settings, supervisor=Supervisor(backoff=Backoff(0.2, 0.5)))


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


# (what fails, the method made to fail, the task name readiness shows, at its start)
KINDS: dict[str, tuple[Any, str, Callable[[str], bool]]] = {
    "checkpoint flusher": (
        MongoCheckpoints,
        "advance",
        lambda name: name == "checkpoint-flusher",
    ),
    "projector partition consumer": (
        ProjectorConsumer,
        "_handle",
        lambda name: name.startswith("cqrs.projector.p"),
    ),
    "partition balancer": (
        PartitionBalancer,
        "balance",
        lambda name: name == "partition-balancer",
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_failing_work_is_counted_retried_and_shown_in_readiness(
    kind: str,
    settings: QueryServiceSettings,
    channel: aio_pika.abc.AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, attribute, named = KINDS[kind]
    fault = Fault()
    original: Callable[..., Awaitable[Any]] = getattr(target, attribute)
    monkeypatch.setattr(target, attribute, fault.around(original))
    service = await service_with(settings)
    try:
        assert service.app is not None
        async with served(service.app) as http:
            events = await channel.get_exchange(EVENTS_EXCHANGE)
            account = uuid.uuid4()
            for event in opened_account(account, deposit=7):
                await publish(events, event)

            async def readiness() -> dict[str, Any]:
                response = await http.get("/readyz")
                return {**response.json(), "code": response.status_code}

            failing = await eventually(
                readiness,
                lambda body: (
                    body["code"] == 503
                    and any(named(t["task"]) for t in body["checks"]["tasks"]["failing"])
                ),
            )
            [entry] = [t for t in failing["checks"]["tasks"]["failing"] if named(t["task"])]
            assert entry["failures"] >= 3 and entry["reason"] == "task_failed"
            assert "InjectedFailure" not in json.dumps(failing)
            samples = parse((await http.get("/metrics")).text)
            assert value(samples, "cqrs_task_failures_total", task=entry["task"]) >= 3

            fault.heal()

            async def account_read() -> httpx.Response:
                return await http.get(f"/accounts/{account}")

            # Nothing was lost on the way: the events are projected once it works again.
            await eventually(
                account_read, lambda r: r.status_code == 200 and r.json()["balance"] == 7
            )
            await eventually(readiness, lambda body: body["code"] == 200, timeout=40)
    finally:
        await service.close()
