"""The load generator: publishes commands and matches replies, in closed or open loop.

Publishes are persistent and confirmed by the broker (as `shared.client.CommandClient` does);
replies come back on an exclusive queue. Times are `time.perf_counter()` seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from cqrs_cli.workload import Cmd
from shared.amqp import broker_login
from shared.topology import AGGREGATE_ID_HEADER, COMMANDS_EXCHANGE

REPLY_TIMEOUT_SECONDS = 30.0


@dataclass(slots=True)
class Outcome:
    """What became of one command."""

    cmd: Cmd
    status: str  # accepted | rejected | duplicate | timeout
    version: int | None
    error_code: str | None
    sent_at: float
    replied_at: float

    @property
    def latency(self) -> float:
        return self.replied_at - self.sent_at


class CommandDriver:
    """Publishes command envelopes to a topic exchange and awaits their replies."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        reply_to: str,
        user_id: str | None = None,
    ) -> None:
        self._user_id = user_id
        self._connection = connection
        self._channel = channel
        self._exchange = exchange
        self._reply_to = reply_to
        self._pending: dict[str, asyncio.Future[tuple[bytes, float]]] = {}

    @classmethod
    async def connect(cls, amqp_url: str, exchange: str = COMMANDS_EXCHANGE) -> CommandDriver:
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        declared = await channel.declare_exchange(
            exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        # Signed with the login, as the SDK signs them: the command service knows the sender.
        driver = cls(connection, channel, declared, replies.name, broker_login(amqp_url))
        await replies.consume(driver._on_reply, no_ack=True)
        return driver

    async def close(self) -> None:
        await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result((message.body, time.perf_counter()))

    async def send(self, cmd: Cmd, timeout: float = REPLY_TIMEOUT_SECONDS) -> Outcome:
        future: asyncio.Future[tuple[bytes, float]] = asyncio.get_running_loop().create_future()
        self._pending[cmd.command_id] = future
        sent_at = time.perf_counter()
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    body=cmd.body,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=cmd.command_id,
                    correlation_id=cmd.command_id,
                    reply_to=self._reply_to,
                    type=cmd.type,
                    user_id=self._user_id,
                    headers={AGGREGATE_ID_HEADER: cmd.aggregate_id},
                ),
                routing_key=cmd.routing_key,
                mandatory=True,
            )
            body, replied_at = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return Outcome(cmd, "timeout", None, None, sent_at, time.perf_counter())
        finally:
            self._pending.pop(cmd.command_id, None)
        reply = json.loads(body)
        error = reply.get("error")
        return Outcome(
            cmd,
            str(reply.get("status")),
            reply.get("version"),
            error.get("code") if error else None,
            sent_at,
            replied_at,
        )


@dataclass
class LoopResult:
    """The outcomes of one load phase and its measurement window."""

    outcomes: list[Outcome] = field(default_factory=list)
    window_start: float = 0.0
    window_end: float = 0.0
    offered_rate: float | None = None
    max_schedule_lag: float = 0.0

    def in_window(self) -> list[Outcome]:
        return [o for o in self.outcomes if self.window_start <= o.replied_at <= self.window_end]

    def rate(self, *statuses: str) -> float:
        """Replies per second inside the window, of the given statuses (all when none given)."""
        seconds = self.window_end - self.window_start
        if seconds <= 0:
            return 0.0
        count = sum(1 for o in self.in_window() if not statuses or o.status in statuses)
        return count / seconds

    def statuses(self) -> dict[str, int]:
        return dict(Counter(o.status for o in self.outcomes))

    def rejections(self) -> dict[str, int]:
        return dict(Counter(o.error_code or "?" for o in self.outcomes if o.status == "rejected"))


OnOutcome = Callable[[Outcome], None]


async def closed_loop(
    driver: CommandDriver,
    next_cmd: Callable[[], Cmd],
    *,
    concurrency: int,
    seconds: float,
    warmup: float = 0.0,
    max_commands: int | None = None,
    on_outcome: OnOutcome | None = None,
) -> LoopResult:
    """`concurrency` commands in flight until `seconds` passed or `max_commands` were sent.

    The rate window starts after `warmup` and ends at the deadline (or the last reply, when
    `max_commands` ran out first), so commands still in flight at the end do not dilute it.
    """
    started = time.perf_counter()
    deadline = started + seconds
    result = LoopResult(window_start=started + warmup, window_end=deadline)
    remaining = [max_commands if max_commands is not None else -1]

    async def worker() -> None:
        while time.perf_counter() < deadline and remaining[0] != 0:
            remaining[0] -= 1
            outcome = await driver.send(next_cmd())
            result.outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if result.outcomes and remaining[0] == 0:
        result.window_end = min(deadline, max(o.replied_at for o in result.outcomes))
    return result


async def open_loop(
    driver: CommandDriver,
    next_cmd: Callable[[], Cmd],
    *,
    rate: float,
    seconds: float,
    on_outcome: OnOutcome | None = None,
    follow: Callable[[Outcome], Awaitable[None]] | None = None,
) -> LoopResult:
    """Send at a fixed `rate` for `seconds` whatever the replies do (a fixed offered load).

    `follow` runs for each reply (e.g. to wait for the read model) without holding the schedule.
    """
    started = time.perf_counter()
    result = LoopResult(window_start=started, window_end=started + seconds, offered_rate=rate)
    tasks: set[asyncio.Task[None]] = set()

    async def one(cmd: Cmd) -> None:
        outcome = await driver.send(cmd)
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if follow is not None:
            await follow(outcome)

    index = 0
    while True:
        due = started + index / rate
        if due >= result.window_end:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            result.max_schedule_lag = max(result.max_schedule_lag, -delay)
        task = asyncio.create_task(one(next_cmd()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        index += 1
    if tasks:
        await asyncio.gather(*tasks)
    # Replies to the last commands arrive after the schedule ended; they still count.
    result.window_end = max([result.window_end, *(o.replied_at for o in result.outcomes)])
    return result
