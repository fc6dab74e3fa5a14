"""Valid at the edge means valid everywhere (DESIGN.md invariant 8), property-based.

Commands shaped as the envelope's schema allows, but adversarial in every string they carry:
any code point, NUL, lone surrogates, bidi controls, the longest strings by characters and by
bytes, in the metadata, the payload and the AMQP properties. Through both services as
processes, each is either refused at the edge with a reason code, or accepted, published,
projected and readable as sent; after each, a plain command still flows end to end.

The services run with one command partition and one projector partition, so a message that
stopped a partition would stop everything after it: the plain command would never come through.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared import topology
from shared.messages import Reply
from tests.e2e.conftest import Pair

pytestmark = pytest.mark.e2e

EDGE_CODES = {"invalid_envelope", "invalid_payload", "aggregate_id_mismatch"}

# Strings of up to 128 characters (the schema's old character limit), from every part of
# Unicode, plus the shapes most likely to break a later stage.
ANY_TEXT = st.text(alphabet=st.characters(codec=None), max_size=128)
NASTY = st.sampled_from(
    [
        "x\u0000",
        "\ud800",
        "a\udfffb",
        "€" * 128,  # 128 characters, 384 bytes
        "𝄞" * 128,  # four bytes each
        "\u202eevil",
        "mark\u200f",
        "line\nbreak",
        "tab\tbed",
        "\x7f",
        "\ufffe",
        "x" * 128,
        "",
        " ",
        '"quoted" and \\ backslashed',
        "$where",
        "a.b",
    ]
)
STRINGS = st.one_of(ANY_TEXT, NASTY)
# Owner ids: what `OpenAccount`'s pattern lets through, up to its 64-character limit.
OWNER_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}\Z")
# AMQP short strings: at most 255 bytes in UTF-8.
SHORT = st.text(alphabet=st.characters(codec="utf-8"), max_size=85)


@st.composite
def adversarial_commands(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """An `OpenAccount` envelope and the AMQP properties it is published with."""
    metadata = {
        key: draw(STRINGS)
        for key in ("correlation_id", "causation_id", "user")
        if draw(st.booleans())
    }
    envelope = {
        "command_id": str(uuid.uuid4()),
        "type": "OpenAccount",
        "aggregate_id": str(uuid.uuid4()),
        "payload": {
            "owner_id": draw(OWNER_IDS),
            "currency": draw(st.sampled_from(["EUR", "JPY", "XOF"])),
            "initial_deposit": draw(st.integers(min_value=0, max_value=10**12)),
        },
        "metadata": metadata,
    }
    properties = {
        "message_id": draw(st.one_of(st.none(), SHORT)),
        "correlation_id": draw(SHORT),
        "type": draw(st.one_of(st.none(), SHORT)),
        "app_id": draw(st.one_of(st.none(), SHORT)),
    }
    return envelope, properties


@pytest.fixture
def one_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read by the services the `pair` fixture starts after it."""
    monkeypatch.setenv("CQRS_COMMAND_PARTITIONS", "1")
    monkeypatch.setenv("CQRS_PROJECTOR_PARTITIONS", "1")


class Client:
    """Publishes raw command messages and reads replies and read models."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair

    async def send(self, envelope: dict[str, Any], properties: dict[str, Any]) -> Reply:
        async with await aio_pika.connect(self.pair.amqp_url) as connection:
            channel = await connection.channel()
            replies = await channel.declare_queue(
                f"{topology.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}", exclusive=True
            )
            exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
            body = json.dumps(envelope).encode()  # lone surrogates travel escaped, as JSON allows
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    reply_to=replies.name,
                    headers={topology.AGGREGATE_ID_HEADER: envelope["aggregate_id"]},
                    **properties,
                ),
                routing_key="account.OpenAccount",
            )
            async with asyncio.timeout(20):
                while (message := await replies.get(fail=False, no_ack=True)) is None:
                    await asyncio.sleep(0.005)
        return Reply.model_validate_json(message.body)

    async def visible(self, account: str, owner_id: str) -> None:
        async with asyncio.timeout(20), httpx.AsyncClient(timeout=10) as http:
            while True:
                response = await http.get(f"{self.pair.api}/accounts/{account}")
                if response.status_code == 200:
                    assert response.json()["owner_id"] == owner_id
                    return
                await asyncio.sleep(0.02)


def _plain(owner_id: str, **metadata: str) -> tuple[dict[str, Any], dict[str, Any]]:
    envelope = {
        "command_id": str(uuid.uuid4()),
        "type": "OpenAccount",
        "aggregate_id": str(uuid.uuid4()),
        "payload": {"owner_id": owner_id, "currency": "EUR"},
        "metadata": metadata,
    }
    return envelope, {"correlation_id": str(uuid.uuid4())}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(command=adversarial_commands())
# Both outcomes, whatever the draw: one that travels, one the edge refuses.
@example(command=_plain("m" * 64, correlation_id="c" * 128))
@example(command=_plain("n", correlation_id="€" * 100))
@example(command=_plain("o", causation_id="x\u0000"))
async def test_every_string_is_refused_at_the_edge_or_travels_everywhere(
    one_partition: None, pair: Pair, command: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    client = Client(pair)
    envelope, properties = command
    reply = await client.send(envelope, properties)
    if reply.status == "rejected":
        assert reply.error is not None and reply.error.code in EDGE_CODES, reply
        assert reply.error.message
    else:
        assert reply.status == "accepted", reply
        await client.visible(envelope["aggregate_id"], envelope["payload"]["owner_id"])
    # Whatever that was, a plain command still flows: answered, published, projected.
    plain, properties = _plain("plain")
    assert (await client.send(plain, properties)).status == "accepted"
    await client.visible(plain["aggregate_id"], "plain")
