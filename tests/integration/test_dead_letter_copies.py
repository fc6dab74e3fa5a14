"""Dead-letter copies are bounded: an oversized command's copy keeps a prefix, and says so.

The copy's headers carry the original size and SHA-256; `cqrs dlq list` shows it as truncated
and `cqrs dlq replay` refuses to publish what is left of it as if it were the command.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, HeadersType

from command_service.bootstrap import CommandService
from cqrs_cli.dlq_command import list_dead_letters, replay_dead_letters
from shared import topology
from shared.amqp import ORIGINAL_SHA256_HEADER, ORIGINAL_SIZE_HEADER, TRUNCATED_BODY_BYTES
from shared.messages import Reply

pytestmark = pytest.mark.integration


@pytest.fixture
async def channel(broker: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(broker)
    yield await connection.channel()
    await connection.close()


async def take(queue: AbstractQueue, timeout: float = 10.0) -> AbstractIncomingMessage:
    async with asyncio.timeout(timeout):
        while (message := await queue.get(fail=False, no_ack=True)) is None:
            await asyncio.sleep(0.02)
    return message


async def send_raw(
    channel: AbstractChannel, body: bytes, *, headers: HeadersType | None = None
) -> tuple[str, Reply]:
    """Publish a body to `cqrs.commands`; its command id and the reply."""
    replies = await channel.declare_queue(exclusive=True)
    commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
    command_id = str(uuid.uuid4())
    await commands.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            message_id=command_id,
            reply_to=replies.name,
            headers={topology.AGGREGATE_ID_HEADER: str(uuid.uuid4()), **(headers or {})},
        ),
        routing_key="account.DepositMoney",
    )
    return command_id, Reply.model_validate_json((await take(replies)).body)


async def test_an_oversized_command_is_dead_lettered_as_a_prefix_with_its_size_and_digest(
    command_service: CommandService, channel: AbstractChannel, broker: str
) -> None:
    limit = command_service.settings.max_message_bytes
    body = b'{"pad": "' + bytes(range(32, 127)) * 1_000 + b'"}'
    assert len(body) > limit
    command_id, reply = await send_raw(channel, body)
    assert reply.error is not None and reply.error.code == "message_too_large"

    dead = await channel.declare_queue(topology.COMMAND_DEAD_LETTER_QUEUE, passive=True)
    letter = await take(dead)
    assert letter.message_id == command_id
    assert letter.body == body[: min(TRUNCATED_BODY_BYTES, limit)]
    assert letter.headers[ORIGINAL_SIZE_HEADER] == len(body)
    assert letter.headers[ORIGINAL_SHA256_HEADER] == hashlib.sha256(body).hexdigest()
    assert str(letter.headers[topology.REASON_HEADER]).startswith("message_too_large")


async def test_a_truncated_dead_letter_is_listed_as_such_and_never_replayed(
    command_service: CommandService, channel: AbstractChannel, broker: str
) -> None:
    big = b'{"pad": "' + b"y" * 50_000 + b'"}'
    big_id, _ = await send_raw(channel, big)
    # A client cannot make a whole dead letter look cut, nor the reverse, with headers of its own.
    small = b"{not json"
    small_id, _ = await send_raw(channel, small, headers={ORIGINAL_SIZE_HEADER: 1})

    waiting, letters = await list_dead_letters(broker, limit=10)
    assert waiting == 2
    by_id = {letter.command_id: letter for letter in letters}
    assert by_id[big_id].truncated
    assert by_id[big_id].original_size == len(big)
    assert by_id[big_id].original_sha256 == hashlib.sha256(big).hexdigest()
    assert not by_id[small_id].truncated

    refused = await replay_dead_letters(broker, command_ids={big_id})
    assert refused.replayed == []
    [skipped] = refused.skipped
    assert skipped["command_id"] == big_id
    assert "truncated" in str(skipped["why"]) and f"{len(big):,}" in str(skipped["why"])
    # Still there, and the whole one is replayed (and dead-lettered again: still not JSON).
    waiting, letters = await list_dead_letters(broker, limit=10)
    assert waiting == 2 and {letter.command_id for letter in letters} == {big_id, small_id}
    replayed = await replay_dead_letters(broker, command_ids={small_id})
    assert replayed.replayed == [small_id] and replayed.skipped == []
