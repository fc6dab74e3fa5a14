"""Adversarial command messages against a running command service (property-based).

Whatever arrives, the sender gets a clear answer, the consumer keeps going, and nothing already
stored changes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from command_service.adapters.postgres_event_store import read_all
from command_service.service_layer.event_store import StoredEvent
from shared import topology
from shared.messages import Reply
from tests.e2e.conftest import CommandReplicas

pytestmark = pytest.mark.e2e

MAX_BYTES = 4096
COMMAND_TYPES = ["OpenAccount", "DepositMoney", "WithdrawMoney", "CloseAccount", "RequestTransfer"]
AMOUNTS = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
)
# Any code point, surrogates and controls included, as JSON can carry them escaped.
NASTY_TEXT = st.text(alphabet=st.characters(), max_size=80)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def envelope_like(draw: st.DrawFn) -> bytes:
    """Something shaped like a command envelope, with any field wrong."""
    body: dict[str, Any] = {
        "command_id": draw(st.one_of(st.uuids().map(str), NASTY_TEXT, st.integers())),
        "type": draw(st.one_of(st.sampled_from(COMMAND_TYPES), NASTY_TEXT)),
        "aggregate_id": draw(st.one_of(st.uuids().map(str), NASTY_TEXT, st.none())),
        "payload": draw(
            st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "amount": AMOUNTS,
                        "owner_id": NASTY_TEXT,
                        "currency": st.one_of(st.sampled_from(["EUR", "eur", "XXX"]), NASTY_TEXT),
                        "initial_deposit": AMOUNTS,
                        "from_account_id": st.uuids().map(str),
                        "to_account_id": st.uuids().map(str),
                    },
                ),
                JSON_VALUES,
            )
        ),
    }
    if draw(st.booleans()):
        body["expected_version"] = draw(AMOUNTS)
    if draw(st.booleans()):
        body[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    return json.dumps(body, allow_nan=True).encode()


BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    envelope_like(),
    st.integers(min_value=500, max_value=20_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=MAX_BYTES + 1, max_value=4 * MAX_BYTES).map(lambda n: b" " * n),
)


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    connection: AbstractConnection
    channel: AbstractChannel
    replies: AbstractQueue
    answers: list[Reply]

    def send(self, body: bytes, content_type: str | None, header: str | None) -> Reply:
        return self.loop.run_until_complete(self._send(body, content_type, header))

    async def _send(self, body: bytes, content_type: str | None, header: str | None) -> Reply:
        correlation_id = str(uuid.uuid4())
        exchange = await self.channel.get_exchange(topology.COMMANDS_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                body,
                content_type=content_type,
                correlation_id=correlation_id,
                reply_to=self.replies.name,
                headers={} if header is None else {topology.AGGREGATE_ID_HEADER: header},
            ),
            routing_key="account.Anything",
        )
        async with asyncio.timeout(20):
            while True:
                message = await self.replies.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.005)
                    continue
                await message.ack()
                if message.correlation_id == correlation_id:
                    reply = Reply.model_validate_json(message.body)
                    self.answers.append(reply)
                    return reply


@pytest.fixture
def harness(command_replicas: CommandReplicas, broker: str) -> Iterator[Harness]:
    command_replicas.env["CQRS_MAX_MESSAGE_BYTES"] = str(MAX_BYTES)
    command_replicas.spawn()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(command_replicas.wait_balanced(1))

        async def connect() -> Harness:
            connection = await aio_pika.connect(broker)
            channel = await connection.channel()
            replies = await channel.declare_queue(exclusive=True)
            return Harness(loop, connection, channel, replies, [])

        harness = loop.run_until_complete(connect())
        yield harness
        loop.run_until_complete(harness.connection.close())
    finally:
        loop.close()


def stored_events(loop: asyncio.AbstractEventLoop, dsn: str) -> list[StoredEvent]:
    async def read() -> list[StoredEvent]:
        connection = await asyncpg.connect(dsn)
        try:
            return await read_all(connection, 0, 10**6)
        finally:
            await connection.close()

    return loop.run_until_complete(read())


def test_hostile_messages_get_an_answer_and_change_nothing_stored(
    harness: Harness, pg_dsn: str
) -> None:
    sentinel = str(uuid.uuid4())
    opening = json.dumps(
        {
            "type": "OpenAccount",
            "aggregate_id": sentinel,
            "payload": {"owner_id": "s", "currency": "EUR", "initial_deposit": 500},
        }
    ).encode()
    assert harness.send(opening, "application/json", sentinel).status == "accepted"
    before = stored_events(harness.loop, pg_dsn)
    answered_before = len(harness.answers)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        body=BODIES,
        content_type=st.sampled_from([None, "application/json", "text/plain", "application/xml"]),
        header=st.one_of(st.none(), st.uuids().map(str), st.text(max_size=40)),
    )
    def every_message_is_answered(
        body: bytes, content_type: str | None, header: str | None
    ) -> None:
        reply = harness.send(body, content_type, header)
        assert reply.status in ("rejected", "accepted")
        if reply.status == "rejected":
            assert reply.error is not None and reply.error.code and reply.error.message

    every_message_is_answered()

    after = stored_events(harness.loop, pg_dsn)
    assert after[: len(before)] == before  # nothing stored before changed
    # Only accepted commands appended anything: every new event is in an accepted command's
    # stream (a transfer's process manager appends to it too), none was caused by a rejected
    # command, and each accepted reply's last event is a new one.
    hostile = harness.answers[answered_before:]
    accepted = [reply for reply in hostile if reply.status == "accepted"]
    rejected = [reply for reply in hostile if reply.status == "rejected"]
    assert len(rejected) > 100
    new = after[len(before) :]
    assert {event.stream_id for event in new} <= {reply.aggregate_id for reply in accepted}
    causes = {event.metadata["causation_id"] for event in new}
    assert causes.isdisjoint(str(reply.command_id) for reply in rejected)
    appended = {(event.metadata["causation_id"], event.position) for event in new}
    assert {(str(reply.command_id), reply.position) for reply in accepted} <= appended
    # The consumer is still alive and correct.
    deposit = json.dumps(
        {"type": "DepositMoney", "aggregate_id": sentinel, "payload": {"amount": 5}}
    ).encode()
    reply = harness.send(deposit, "application/json", sentinel)
    assert (reply.status, reply.version) == ("accepted", 3)
