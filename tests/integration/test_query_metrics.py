"""The query service's `/metrics`: projector counters, projection lag and request timings move
with real work (events over the real broker into the real MongoDB, reads through the app)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from uuid import uuid4

import aio_pika
import httpx
import pytest

from query_service.bootstrap import QueryService, bootstrap
from query_service.settings import QueryServiceSettings
from shared.topology import EVENTS_EXCHANGE
from tests.conftest import Services
from tests.metrics_support import Samples, labelled, scrape, value
from tests.query_support import eventually, opened_account, publish, relay_message, served

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(broker: str, services: Services, mongo_db: str) -> QueryServiceSettings:
    return QueryServiceSettings(
        amqp_url=broker,
        mongo_url=services.mongo_url,
        mongo_db=mongo_db,
        projector_partitions=2,
        projector_gap_attempts=1,
        projector_gap_delay_seconds=0,
    )


@pytest.fixture
async def service(settings: QueryServiceSettings) -> AsyncIterator[QueryService]:
    service = await bootstrap(settings)
    yield service
    await service.close()


@pytest.fixture
async def api(service: QueryService) -> AsyncIterator[httpx.AsyncClient]:
    app = service.app
    assert app is not None
    async with served(app) as client:
        yield client


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_projector_counters_and_lag_follow_the_events(
    api: httpx.AsyncClient, broker: str
) -> None:
    before = await scrape(api)
    account = uuid4()
    opened, deposited = opened_account(account, deposit=100)
    connection = await aio_pika.connect(broker)
    async with connection:
        channel = await connection.channel()
        events = await channel.get_exchange(EVENTS_EXCHANGE)
        await publish(events, opened)
        await publish(events, deposited)
        await publish(events, opened)  # a redelivery: suppressed, not projected twice
        await events.publish(
            relay_message(deposited, body=b"{not json"), routing_key=deposited.routing_key
        )

        def settled(samples: Samples) -> bool:
            return (
                moved(before, samples, "cqrs_duplicates_suppressed_total") == 1
                and moved(before, samples, "cqrs_parked_events_total") == 1
            )

        after = await eventually(lambda: scrape(api), settled)

    projected = "cqrs_events_projected_total"
    assert moved(before, after, projected, event_type="AccountOpened") == 1
    assert moved(before, after, projected, event_type="MoneyDeposited") == 1
    # The write round trips to MongoDB, per collection: the two events made at least one each.
    writes = "cqrs_read_model_writes_total"
    assert moved(before, after, writes, collection="accounts") >= 2
    assert moved(before, after, writes, collection="transaction_heads") >= 2
    # The events were recorded (in the test's envelopes) long ago: the lag says so.
    lag_seconds = value(after, "cqrs_projection_lag_seconds")
    assert math.isfinite(lag_seconds)
    assert lag_seconds > 3600
    # Measured from the partition queues when scraped: nothing is waiting any more.
    assert value(after, "cqrs_projection_lag_events") == 0


async def test_request_timings_are_labelled_by_route_template(api: httpx.AsyncClient) -> None:
    unknown = uuid4()
    before = await scrape(api)

    assert (await api.get(f"/accounts/{unknown}")).status_code == 404
    assert (await api.get(f"/accounts/{unknown}/transactions?limit=0")).status_code == 422
    assert (await api.get("/no/such/path")).status_code == 404
    after = await scrape(api)

    count = "cqrs_http_request_seconds_count"
    assert moved(before, after, count, method="GET", route="/accounts/{account_id}", status="404")
    assert moved(
        before,
        after,
        count,
        method="GET",
        route="/accounts/{account_id}/transactions",
        status="422",
    )
    assert moved(before, after, count, method="GET", route="<unmatched>", status="404") == 1
    assert moved(before, after, count, method="GET", route="/metrics", status="200") == 1
    routes = {labels["route"] for labels in labelled(after, count)}
    assert not any(str(unknown) in route or route.startswith("/no/") for route in routes)
