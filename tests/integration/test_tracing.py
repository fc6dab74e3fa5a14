"""One trace from the client's span through the command service to the projections.

The real command service (consumer, event store, relay, process manager) and the real query
service's projector run in this process, with spans kept in memory.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.bootstrap import CommandService
from command_service.service_layer.event_store import NewEvent
from query_service.bootstrap import QueryService, bootstrap
from query_service.settings import QueryServiceSettings
from shared.client import CommandClient
from shared.ledger import ACCOUNT, AccountOpened, OpenAccount, RequestTransfer
from tests.conftest import Services
from tests.query_support import ACCOUNTS, eventually
from tests.tracing_support import named, traced

pytestmark = pytest.mark.integration


@pytest.fixture
def tracer() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    with traced() as provider_and_exporter:
        yield provider_and_exporter


@pytest.fixture
async def query_service(
    broker: str, services: Services, mongo_db: str, command_service: CommandService
) -> AsyncIterator[QueryService]:
    service = await bootstrap(
        QueryServiceSettings(
            amqp_url=broker,
            mongo_url=services.mongo_url,
            mongo_db=mongo_db,
            projector_partitions=2,
            run_api=False,
        )
    )
    yield service
    await service.close()


async def spans_until(
    exporter: InMemorySpanExporter, *names: str, count: int = 1
) -> tuple[ReadableSpan, ...]:
    """The finished spans, once each of `names` has finished `count` times."""

    async def finished() -> tuple[ReadableSpan, ...]:
        return exporter.get_finished_spans()

    return await eventually(
        finished, lambda spans: all(len(named(spans, name)) >= count for name in names)
    )


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


async def test_the_projection_continues_the_trace_of_the_command(
    tracer: tuple[TracerProvider, InMemorySpanExporter],
    client: CommandClient,
    query_service: QueryService,
) -> None:
    provider, exporter = tracer
    account = uuid.uuid4()
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        reply = await client.send_command(
            OpenAccount(owner_id="o", currency="EUR", initial_deposit=100), account
        )
    assert reply.status == "accepted"
    trace_id, caller_id = caller.get_span_context().trace_id, caller.get_span_context().span_id

    spans = await spans_until(exporter, "project AccountOpened", "project MoneyDeposited")
    (command,) = named(spans, "command OpenAccount")
    assert ids(command)[0] == trace_id
    assert parent_of(command) == caller_id
    attributes = dict(command.attributes or {})
    assert attributes["cqrs.command_id"] == str(reply.command_id)
    assert attributes["cqrs.aggregate_id"] == str(account)
    assert attributes["cqrs.command_type"] == "OpenAccount"
    assert attributes["cqrs.outcome"] == "accepted"

    for name in ("project AccountOpened", "project MoneyDeposited"):
        (projection,) = named(spans, name)
        assert ids(projection)[0] == trace_id
        assert parent_of(projection) == ids(command)[1]
        assert dict(projection.attributes or {})["cqrs.outcome"] == "projected"
        assert dict(projection.attributes or {})["cqrs.aggregate_id"] == str(account)


async def test_transfer_steps_continue_the_trace_of_the_request(
    tracer: tuple[TracerProvider, InMemorySpanExporter],
    client: CommandClient,
    query_service: QueryService,
) -> None:
    provider, exporter = tracer
    a, b = uuid.uuid4(), uuid.uuid4()
    for account in (a, b):
        reply = await client.send_command(
            OpenAccount(owner_id="o", currency="EUR", initial_deposit=100), account
        )
        assert reply.status == "accepted"
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        reply = await client.send_command(
            RequestTransfer(from_account_id=a, to_account_id=b, amount=30), uuid.uuid4()
        )
    assert reply.status == "accepted"
    trace_id = caller.get_span_context().trace_id

    spans = await spans_until(exporter, "project TransferCompleted")
    in_trace = [span for span in spans if ids(span)[0] == trace_id]
    by_id = {ids(span)[1]: span for span in in_trace}
    (completed,) = named(tuple(in_trace), "project TransferCompleted")
    # Up the parent chain: projection ← command ← reaction ← … ← the client's span.
    chain = []
    span: ReadableSpan | None = completed
    while span is not None:
        chain.append(span.name)
        parent = parent_of(span)
        span = by_id.get(parent) if parent is not None else None
    assert chain[:3] == ["project TransferCompleted", "command CompleteTransfer", chain[2]]
    assert chain[2].startswith("react ")
    assert chain[-2:] == ["command RequestTransfer", "caller"]
    names = {span.name for span in in_trace}
    assert {"command DebitForTransfer", "command CreditFromTransfer"} <= names


async def test_an_event_stored_without_traceparent_still_projects(
    tracer: tuple[TracerProvider, InMemorySpanExporter],
    command_service: CommandService,
    store: PostgresEventStore,
    query_service: QueryService,
) -> None:
    _, exporter = tracer
    account = uuid.uuid4()
    # As stored before tracing existed (or with it off): no traceparent in the metadata.
    await store.append(
        stream_id=account,
        aggregate_type=ACCOUNT,
        expected_version=0,
        events=[NewEvent.from_event(AccountOpened(owner_id="o", currency="EUR"))],
        command_id=uuid.uuid4(),
        correlation_id=None,
    )
    stored = await store.load_stream(account)
    assert "traceparent" not in stored[0].metadata

    spans = await spans_until(exporter, "project AccountOpened")
    (projection,) = named(spans, "project AccountOpened")
    assert projection.parent is None  # a trace of its own
    assert dict(projection.attributes or {})["cqrs.outcome"] == "projected"
    document = await query_service.mongo[query_service.settings.mongo_db][ACCOUNTS].find_one(
        {"_id": str(account)}
    )
    assert document is not None
