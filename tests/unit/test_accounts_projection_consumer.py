"""The projector consumer's ack policy and per-aggregate ordering, with fake messages."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError
from pymongo.errors import AutoReconnect

from query_service.entrypoints.event_consumer import ProjectorConsumer, RetryPolicy
from query_service.entrypoints.lanes import AggregateLanes
from query_service.projections.envelope import UnreadableMessage, parse_envelope
from query_service.service_layer.projector import Outcome, Projected, Rejected
from shared.ledger import MoneyDeposited
from shared.messages import EventEnvelope
from shared.topology import AGGREGATE_ID_HEADER
from tests.query_support import envelope

FAST_RETRIES = RetryPolicy(attempts=3, initial_seconds=0.001, max_seconds=0.001)


@dataclass
class FakeMessage:
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    message_id: str | None = None
    routing_key: str | None = "account.MoneyDeposited"
    exchange: str | None = "cqrs.events"
    consumer_tag: str | None = None
    settled: list[str] = field(default_factory=list)

    async def ack(self, multiple: bool = False) -> None:
        self.settled.append("ack")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.settled.append("requeue" if requeue else "nack")


@dataclass
class FakeParker:
    parked: list[tuple[FakeMessage, str]] = field(default_factory=list)

    async def park(self, message: AbstractIncomingMessage, reason: str) -> None:
        self.parked.append((cast(FakeMessage, message), reason))


def message_for(event: EventEnvelope, *, body: bytes | None = None) -> FakeMessage:
    return FakeMessage(
        body=event.model_dump_json().encode() if body is None else body,
        headers={AGGREGATE_ID_HEADER: str(event.aggregate_id)},
        correlation_id=event.metadata.correlation_id,
        message_id=str(event.event_id),
    )


def deposits(account: UUID, versions: range) -> list[EventEnvelope]:
    return [envelope(account, version, MoneyDeposited(amount=1)) for version in versions]


async def deliver(consumer: ProjectorConsumer, *messages: FakeMessage) -> None:
    """Deliver like aio-pika: one task per message, started in delivery order."""
    await asyncio.gather(
        *(consumer.on_message(cast(AbstractIncomingMessage, message)) for message in messages)
    )


class TestParseEnvelope:
    def test_reads_a_relay_body(self) -> None:
        event = envelope(uuid4(), 2, MoneyDeposited(amount=5))
        body = event.model_dump_json().encode()
        assert parse_envelope(body, {AGGREGATE_ID_HEADER: str(event.aggregate_id)}) == event

    def test_names_malformed_json(self) -> None:
        with pytest.raises(UnreadableMessage, match=r"^malformed JSON"):
            parse_envelope(b'{"event_id": ')

    def test_names_the_missing_envelope_fields(self) -> None:
        with pytest.raises(UnreadableMessage, match=r"^invalid event envelope: event_id: Field"):
            parse_envelope(b'{"type": "MoneyDeposited"}')

    def test_refuses_an_oversized_body(self) -> None:
        with pytest.raises(UnreadableMessage, match="exceeds the limit of 10"):
            parse_envelope(b"x" * 11, max_bytes=10)

    def test_refuses_a_partition_header_that_contradicts_the_body(self) -> None:
        event = envelope(uuid4(), 2, MoneyDeposited(amount=5))
        with pytest.raises(UnreadableMessage, match="does not match"):
            parse_envelope(event.model_dump_json().encode(), {AGGREGATE_ID_HEADER: str(uuid4())})


async def test_lanes_run_one_key_in_join_order_and_other_keys_alongside() -> None:
    lanes = AggregateLanes()
    log: list[str] = []

    async def work(key: str, label: str, delay: float) -> None:
        previous, turn = lanes.join(key)
        if previous is not None:
            await previous.wait()
        log.append(f"start {label}")
        await asyncio.sleep(delay)
        log.append(f"end {label}")
        lanes.leave(key, turn)

    await asyncio.gather(work("a", "a1", 0.03), work("a", "a2", 0), work("b", "b1", 0.01))

    assert log.index("end a1") < log.index("start a2")
    assert log.index("start b1") < log.index("end a1")
    assert len(lanes) == 0


async def test_projects_one_aggregate_in_delivery_order_despite_concurrency() -> None:
    account, other = uuid4(), uuid4()
    seen: list[tuple[UUID, int]] = []

    async def handler(event: EventEnvelope) -> Outcome:
        # Random latency: without lanes, later versions would overtake earlier ones.
        await asyncio.sleep(random.uniform(0, 0.01))
        seen.append((event.aggregate_id, event.version))
        return Projected(applied=("fake",), duplicates=())

    consumer = ProjectorConsumer(handler=handler, parker=FakeParker(), retry_policy=FAST_RETRIES)
    messages = [
        message_for(event)
        for pair in zip(deposits(account, range(1, 21)), deposits(other, range(1, 21)), strict=True)
        for event in pair
    ]

    await deliver(consumer, *messages)

    assert [version for aggregate, version in seen if aggregate == account] == list(range(1, 21))
    assert [version for aggregate, version in seen if aggregate == other] == list(range(1, 21))
    assert all(message.settled == ["ack"] for message in messages)


async def test_parks_unreadable_messages_and_acks_them_without_projecting() -> None:
    calls: list[EventEnvelope] = []

    async def handler(event: EventEnvelope) -> Outcome:
        calls.append(event)
        return Projected(applied=("fake",), duplicates=())

    parker = FakeParker()
    consumer = ProjectorConsumer(handler=handler, parker=parker, retry_policy=FAST_RETRIES)
    bad = FakeMessage(body=b"not json at all")

    await deliver(consumer, bad)

    assert calls == []
    assert [(message, reason.split(":")[0]) for message, reason in parker.parked] == [
        (bad, "malformed JSON")
    ]
    assert bad.settled == ["ack"]


async def test_parks_a_rejected_event_with_the_reason() -> None:
    async def handler(event: EventEnvelope) -> Outcome:
        return Rejected("version gap in projection fake")

    parker = FakeParker()
    consumer = ProjectorConsumer(handler=handler, parker=parker, retry_policy=FAST_RETRIES)
    message = message_for(envelope(uuid4(), 3, MoneyDeposited(amount=1)))

    await deliver(consumer, message)

    assert parker.parked == [(message, "version gap in projection fake")]
    assert message.settled == ["ack"]


async def test_retries_transient_errors_then_requeues_the_event_and_its_successors() -> None:
    account = uuid4()
    calls: list[int] = []

    async def handler(event: EventEnvelope) -> Outcome:
        calls.append(event.version)
        raise AutoReconnect("primary stepped down")

    parker = FakeParker()
    consumer = ProjectorConsumer(handler=handler, parker=parker, retry_policy=FAST_RETRIES)
    first, second = (message_for(event) for event in deposits(account, range(2, 4)))

    await deliver(consumer, first, second)

    assert calls == [2] * FAST_RETRIES.attempts  # the successor is never tried ahead of it
    assert first.settled == ["requeue"]
    assert second.settled == ["requeue"]
    assert parker.parked == []


def test_lanes_hold_back_only_what_arrived_before_the_requeue() -> None:
    lanes = AggregateLanes()
    _, first = lanes.join("a")
    _, second = lanes.join("a")
    lanes.hold_back("a")
    _, redelivered = lanes.join("a")

    assert lanes.must_requeue("a", first)
    assert lanes.must_requeue("a", second)
    assert not lanes.must_requeue("a", redelivered)
    for turn in (first, second, redelivered):
        lanes.leave("a", turn)
    assert len(lanes) == 0


async def test_requeued_events_come_back_in_order_without_bouncing_forever() -> None:
    """A fake broker redelivers every requeued message at once, as RabbitMQ does."""
    account = uuid4()
    failures = iter([AutoReconnect("blip")] * FAST_RETRIES.attempts)
    projected: list[int] = []
    consumer: ProjectorConsumer
    redeliveries: list[asyncio.Task[None]] = []

    async def handler(event: EventEnvelope) -> Outcome:
        if event.version == 2:
            error = next(failures, None)
            if error is not None:
                raise error
        await asyncio.sleep(0.001)
        projected.append(event.version)
        return Projected(applied=("fake",), duplicates=())

    class BrokerMessage(FakeMessage):
        async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
            await super().nack(multiple, requeue)
            if len(redeliveries) < 100:
                again = BrokerMessage(body=self.body, headers=self.headers)
                redeliveries.append(
                    asyncio.create_task(consumer.on_message(cast(AbstractIncomingMessage, again)))
                )

    consumer = ProjectorConsumer(handler=handler, parker=FakeParker(), retry_policy=FAST_RETRIES)
    first_deliveries = [
        BrokerMessage(body=event.model_dump_json().encode())
        for event in deposits(account, range(2, 7))
    ]

    await deliver(consumer, *first_deliveries)
    while not all(task.done() for task in redeliveries):
        await asyncio.gather(*redeliveries)

    assert projected == [2, 3, 4, 5, 6]
    assert len(redeliveries) == 5  # each message handed back exactly once


async def test_a_transient_error_that_clears_is_acked() -> None:
    failures = iter([AutoReconnect("blip")])

    async def handler(event: EventEnvelope) -> Outcome:
        error = next(failures, None)
        if error is not None:
            raise error
        return Projected(applied=("fake",), duplicates=())

    consumer = ProjectorConsumer(handler=handler, parker=FakeParker(), retry_policy=FAST_RETRIES)
    message = message_for(envelope(uuid4(), 1, MoneyDeposited(amount=1)))

    await deliver(consumer, message)

    assert message.settled == ["ack"]


async def test_an_unexpected_error_parks_the_event_and_the_consumer_goes_on() -> None:
    account = uuid4()

    async def handler(event: EventEnvelope) -> Outcome:
        if event.version == 2:
            raise KeyError("bug")
        return Projected(applied=("fake",), duplicates=())

    parker = FakeParker()
    consumer = ProjectorConsumer(handler=handler, parker=parker, retry_policy=FAST_RETRIES)
    broken, fine = (message_for(event) for event in deposits(account, range(2, 4)))

    await deliver(consumer, broken, fine)

    assert [reason for _, reason in parker.parked] == ["projection failed: KeyError: 'bug'"]
    assert broken.settled == ["ack"]
    assert fine.settled == ["ack"]


async def test_stop_lets_the_message_in_hand_finish() -> None:
    started = asyncio.Event()

    async def handler(event: EventEnvelope) -> Outcome:
        started.set()
        await asyncio.sleep(0.05)
        return Projected(applied=("fake",), duplicates=())

    consumer = ProjectorConsumer(handler=handler, parker=FakeParker(), retry_policy=FAST_RETRIES)
    message = message_for(envelope(uuid4(), 1, MoneyDeposited(amount=1)))
    delivery = asyncio.create_task(deliver(consumer, message))
    await started.wait()

    await consumer.stop(grace_seconds=5)

    assert message.settled == ["ack"]
    assert consumer.in_flight == 0
    await delivery


async def test_stop_cancels_what_outlives_the_grace_period_unsettled() -> None:
    started = asyncio.Event()

    async def handler(event: EventEnvelope) -> Outcome:
        started.set()
        await asyncio.sleep(10)
        return Projected(applied=("fake",), duplicates=())

    consumer = ProjectorConsumer(handler=handler, parker=FakeParker(), retry_policy=FAST_RETRIES)
    message = message_for(envelope(uuid4(), 1, MoneyDeposited(amount=1)))
    delivery = asyncio.create_task(deliver(consumer, message))
    await started.wait()

    await consumer.stop(grace_seconds=0.01)

    # Unsettled: closing the channel hands it back to the broker.
    assert message.settled == []
    with pytest.raises(asyncio.CancelledError):
        await delivery


async def test_a_lone_delivery_is_projected_before_any_other_arrives() -> None:
    """Nothing waits for a batch to fill: the first event is handled while no second one has
    been delivered (were it held back for company, this would never finish)."""
    handled: list[int] = []
    first_handled = asyncio.Event()

    async def batch_handler(events: Sequence[EventEnvelope]) -> list[Outcome]:
        handled.append(len(events))
        first_handled.set()
        return [Projected(applied=("fake",), duplicates=()) for _ in events]

    consumer = ProjectorConsumer(
        handler=_unused, batch_handler=batch_handler, parker=FakeParker(), batch_size=64
    )
    first, second = (message_for(event) for event in deposits(uuid4(), range(1, 3)))

    delivered = asyncio.create_task(deliver(consumer, first))
    await asyncio.wait_for(first_handled.wait(), timeout=30)  # a deadlock guard, not a timing
    await delivered
    await deliver(consumer, second)

    assert handled == [1, 1]
    assert first.settled == ["ack"]
    assert second.settled == ["ack"]


async def test_deliveries_that_arrive_during_a_batch_make_the_next_one() -> None:
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def batch_handler(events: Sequence[EventEnvelope]) -> list[Outcome]:
        batches.append([event.version for event in events])
        await release.wait()
        return [Projected(applied=("fake",), duplicates=()) for _ in events]

    consumer = ProjectorConsumer(
        handler=_unused,
        batch_handler=batch_handler,
        parker=FakeParker(),
        batch_size=3,
        batches_in_flight=1,
    )
    messages = [message_for(event) for event in deposits(uuid4(), range(1, 8))]
    first = asyncio.create_task(deliver(consumer, messages[0]))
    while not batches:
        await asyncio.sleep(0)
    rest = asyncio.create_task(deliver(consumer, *messages[1:]))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, rest)

    assert batches == [[1], [2, 3, 4], [5, 6, 7]]
    assert all(message.settled == ["ack"] for message in messages)


@dataclass(eq=False)
class FakeChannel:
    """Acks as the broker counts them: `multiple` covers every unsettled tag up to it."""

    unacked: list[int] = field(default_factory=list)
    acks: list[tuple[int, bool]] = field(default_factory=list)
    is_closed: bool = False

    def settle(self, tag: int, multiple: bool) -> None:
        self.acks.append((tag, multiple))
        if multiple:
            self.unacked = [t for t in self.unacked if t > tag]
        else:
            self.unacked.remove(tag)


@dataclass
class ChannelMessage(FakeMessage):
    channel: FakeChannel | None = None
    delivery_tag: int = 0

    async def ack(self, multiple: bool = False) -> None:
        await super().ack(multiple)
        assert self.channel is not None
        self.channel.settle(self.delivery_tag, multiple)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await super().nack(multiple, requeue)
        assert self.channel is not None
        self.channel.settle(self.delivery_tag, multiple)


async def test_a_batch_is_acked_with_one_multiple_ack_after_its_parks() -> None:
    account = uuid4()
    events = deposits(account, range(1, 6))

    async def batch_handler(batch: Sequence[EventEnvelope]) -> list[Outcome]:
        await asyncio.sleep(0)  # the others are delivered meanwhile
        return [
            Rejected("invalid") if event.version == 3 else Projected(("fake",), ())
            for event in batch
        ]

    channel = FakeChannel(unacked=[1, 2, 3, 4, 5])
    messages = []
    for tag, event in enumerate(events, start=1):
        plain = message_for(event)
        messages.append(
            ChannelMessage(
                body=plain.body, headers=plain.headers, channel=channel, delivery_tag=tag
            )
        )
    parker = FakeParker()
    consumer = ProjectorConsumer(
        handler=_unused,
        batch_handler=batch_handler,
        parker=parker,
        batch_size=64,
        batches_in_flight=1,
    )
    # A batch of one first, then the four that came meanwhile as one batch.
    await deliver(consumer, *messages)

    assert [cast(ChannelMessage, message).delivery_tag for message, _ in parker.parked] == [3]
    assert channel.unacked == []
    # The lone one, then the park's own ack and one multiple ack for the batch's three others.
    assert channel.acks == [(1, False), (3, False), (5, True)]


async def test_a_multiple_ack_never_covers_a_batch_still_in_hand() -> None:
    release = asyncio.Event()
    first, second, third = deposits(uuid4(), range(1, 2))[0], *deposits(uuid4(), range(1, 3))

    async def batch_handler(batch: Sequence[EventEnvelope]) -> list[Outcome]:
        if batch[0].event_id == first.event_id:
            await release.wait()  # the first batch is slow; the next one overtakes it
        else:
            await asyncio.sleep(0)
        return [Projected(("fake",), ()) for _ in batch]

    channel = FakeChannel(unacked=[1, 2, 3])
    messages = []
    for tag, event in enumerate((first, second, third), start=1):
        plain = message_for(event)
        messages.append(
            ChannelMessage(
                body=plain.body, headers=plain.headers, channel=channel, delivery_tag=tag
            )
        )
    consumer = ProjectorConsumer(
        handler=_unused, batch_handler=batch_handler, parker=FakeParker(), batches_in_flight=2
    )
    delivered = asyncio.create_task(deliver(consumer, *messages))
    while len(channel.acks) < 2:
        await asyncio.sleep(0.001)

    assert channel.unacked == [1]  # still in hand: not acked along with the later ones
    release.set()
    await delivered
    assert channel.unacked == []
    assert channel.acks == [(2, False), (3, False), (1, False)]


async def _unused(event: EventEnvelope) -> Outcome:
    raise AssertionError("the batch handler handles every event")


@dataclass
class ClosableMessage(FakeMessage):
    """Like aio-pika's: reading `channel` raises once the channel is closed."""

    on: FakeChannel = field(default_factory=FakeChannel)
    delivery_tag: int = 0

    @property
    def channel(self) -> FakeChannel:
        if self.on.is_closed:
            raise ChannelInvalidStateError
        return self.on

    async def ack(self, multiple: bool = False) -> None:
        await super().ack(multiple)
        self.channel.settle(self.delivery_tag, multiple)


async def test_a_channel_closed_under_a_batch_does_not_stop_its_partition() -> None:
    first, second = deposits(uuid4(), range(1, 3))
    old, new = FakeChannel(unacked=[1]), FakeChannel(unacked=[1])

    async def batch_handler(batch: Sequence[EventEnvelope]) -> list[Outcome]:
        old.is_closed = True  # the broker closed the channel meanwhile (a connection cut)
        return [Projected(("fake",), ()) for _ in batch]

    consumer = ProjectorConsumer(handler=_unused, batch_handler=batch_handler, parker=FakeParker())

    def on(channel: FakeChannel, event: EventEnvelope) -> ClosableMessage:
        plain = message_for(event)
        return ClosableMessage(body=plain.body, headers=plain.headers, on=channel, delivery_tag=1)

    lost = on(old, first)
    await deliver(consumer, lost)
    assert lost.settled == []  # nothing sent on the closed channel: the broker requeues it

    # The redelivery on the channel that replaced it is projected and acked.
    again = on(new, first)
    later = on(new, second)
    later.delivery_tag = 2
    new.unacked = [1, 2]
    await asyncio.wait_for(deliver(consumer, again, later), timeout=5)
    assert new.unacked == []
