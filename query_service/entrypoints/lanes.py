"""Per-aggregate lanes: keep one aggregate's messages in delivery order while others run alongside.

aio-pika runs each delivered message in its own task, so with a prefetch above one, two events of
the same aggregate could be projected concurrently and race the version guard. A lane makes each
message wait for the previous message of the same aggregate.

When a message is handed back to the broker (requeued), the messages of its aggregate that were
delivered before that moment must be handed back too, or they would overtake it. Messages
delivered after it (its own redelivery among them) must not: they are already in order again,
and requeueing them as well could bounce the lane forever.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass


class Turn:
    """One message's place in its lane; `seq` is its arrival number across all lanes."""

    __slots__ = ("_done", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self._done = asyncio.Event()

    def finish(self) -> None:
        self._done.set()

    async def wait(self) -> None:
        # An Event rather than a Future: a waiter that is cancelled must not cancel the turn.
        await self._done.wait()


@dataclass
class _Lane:
    tail: Turn


class AggregateLanes:
    """Serialises work per key in the order `join` is called; different keys do not wait."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}
        # Per key, the last arrival number a requeue holds back (kept after the lane empties:
        # a message that arrived before may join only later, with a batch of its own).
        self._held: dict[str, int] = {}
        self._arrivals = itertools.count(1)
        self._last_seq = 0

    def arrive(self) -> int:
        """Number a message as it is delivered, before its key is known (it joins later, with
        this number, when it is handled with a batch)."""
        self._last_seq = next(self._arrivals)
        return self._last_seq

    def join(self, key: str, seq: int | None = None) -> tuple[Turn | None, Turn]:
        """Take the next turn for `key`; synchronous, so call order is lane order.

        `seq` is the arrival number (`arrive`) of the turn's first message, if it has one.
        Returns the previous turn (to wait for, `None` when the lane was empty) and the new one.
        """
        turn = Turn(self.arrive() if seq is None else seq)
        lane = self._lanes.get(key)
        if lane is None:
            self._lanes[key] = _Lane(tail=turn)
            return None, turn
        previous, lane.tail = lane.tail, turn
        return previous, turn

    def must_requeue(self, key: str, turn: Turn, seq: int | None = None) -> bool:
        """Whether `turn` (or its message that arrived as `seq`) arrived before a requeue in its
        lane and so must be requeued too."""
        return (turn.seq if seq is None else seq) <= self._held.get(key, 0)

    def hold_back(self, key: str) -> None:
        """Mark every message of `key` that has arrived so far to be requeued when its turn comes.

        Call it just before requeueing a message: nothing delivered after this can be behind it.
        """
        self._held[key] = self._last_seq

    def release_holds(self, oldest_pending: int | None) -> None:
        """Forget the holds that no message still pending (arrived as `oldest_pending` or
        later; `None`: none is pending) can be subject to."""
        if oldest_pending is None:
            self._held.clear()
            return
        for key in [key for key, through in self._held.items() if through < oldest_pending]:
            del self._held[key]

    def leave(self, key: str, turn: Turn) -> None:
        """End `turn`, waking the next message of the lane."""
        lane = self._lanes.get(key)
        if lane is not None and lane.tail is turn:
            del self._lanes[key]
        turn.finish()

    def __len__(self) -> int:
        return len(self._lanes)
