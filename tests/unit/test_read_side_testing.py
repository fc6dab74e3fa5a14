"""The read side's offline helpers: events as the relay publishes them, the projector's use
case over the in-memory store, and the API over both with read-your-writes."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, HTTPException, Query

from query_service.domain import QueryDomain
from query_service.entrypoints.api.dependencies import Catalog
from query_service.entrypoints.api.freshness import Freshness, FreshReads
from query_service.projections.document import DocumentReadModel
from query_service.service_layer.catalog import build_catalog
from query_service.service_layer.projector import Projected, Rejected
from query_service.settings import QueryServiceSettings
from query_service.testing import EventStream, api_client, memory_database, project_events
from tests.document_store_contract import RULES, Counted, Opened

router = APIRouter()


@router.get("/counters/{counter_id}")
async def get_counter(
    counter_id: UUID, params: Annotated[Freshness, Query()], catalog: Catalog, fresh: FreshReads
) -> dict[str, Any]:
    async def read() -> dict[str, Any] | None:
        collection = await catalog.collection("counters")
        return await collection.find_one({"_id": str(counter_id)}, {"_id": 0})

    found = await fresh.read(
        read,
        params,
        reached=lambda d: (d["version"], d["last_position"]),
        what=f"counter {counter_id}",
    )
    if found is None:
        raise HTTPException(status_code=404, detail="counter not found")
    return found


DOMAIN = QueryDomain(name="counters", read_models=(DocumentReadModel(RULES),), routes=router)
QUICK = QueryServiceSettings(read_wait_seconds=0.5)


def test_a_stream_numbers_versions_and_positions_as_the_relay_does() -> None:
    first, other = EventStream("counter"), EventStream("counter")

    envelopes = [*first.record(Opened(name="a")), *other.record(Opened(name="b"))]
    envelopes += first.record(Counted(by=1))

    assert [(e.aggregate_id, e.version) for e in envelopes] == [
        (first.aggregate_id, 1),
        (other.aggregate_id, 1),
        (first.aggregate_id, 2),
    ]
    assert [e.position for e in envelopes] == sorted({e.position for e in envelopes})
    assert envelopes[2].routing_key == "counter.Counted"
    assert envelopes[2].data == {"by": 1}


async def test_events_are_projected_once_and_a_gap_is_rejected() -> None:
    catalog = build_catalog(memory_database(), DOMAIN.read_models)
    stream = EventStream("counter")
    opened, counted = stream.record(Opened(name="a"), Counted(by=2))
    stream.version += 1  # version 3 goes missing
    (after_gap,) = stream.record(Counted(by=4))

    outcomes = await project_events(catalog, opened, counted, counted, after_gap)

    assert outcomes[:3] == [
        Projected(applied=("counters",), duplicates=()),
        Projected(applied=("counters",), duplicates=()),
        Projected(applied=(), duplicates=("counters",)),
    ]
    assert isinstance(outcomes[3], Rejected)
    assert "version gap" in outcomes[3].reason
    found = await (await catalog.collection("counters")).find_one({"_id": str(stream.aggregate_id)})
    assert found is not None
    assert (found["count"], found["version"]) == (2, 2)


async def test_the_api_serves_the_route_and_waits_for_a_version() -> None:
    catalog = build_catalog(memory_database(), DOMAIN.read_models)
    stream = EventStream("counter")
    opened, counted = stream.record(Opened(name="a"), Counted(by=2))
    await project_events(catalog, opened)

    async with api_client([DOMAIN], catalog, settings=QUICK) as http:
        missing = await http.get(f"/counters/{UUID(int=1)}")
        behind = await http.get(f"/counters/{stream.aggregate_id}", params={"min_version": 2})
        waiting = asyncio.create_task(
            http.get(f"/counters/{stream.aggregate_id}", params={"min_version": 2})
        )
        await asyncio.sleep(0.05)
        await project_events(catalog, counted)
        caught_up = await waiting

    assert missing.status_code == 404
    assert behind.status_code == 504
    assert behind.json()["current"] == {"version": 1, "last_position": opened.position}
    assert caught_up.status_code == 200
    assert caught_up.json() == {
        "name": "a",
        "count": 2,
        "largest": 2,
        "version": 2,
        "last_position": counted.position,
    }
