"""Sharing the command partitions among the running replicas, through PostgreSQL.

Every replica holds a shared advisory lock (its membership) and an exclusive advisory lock on
each partition it consumes. Once a second it counts the members and moves towards its fair
share, ceil(P / members): it releases extra partitions (first stopping their consumers and
finishing the message in hand, so the next owner starts strictly after it) or takes free ones.
A replica that dies loses its connection and with it its locks, so the others take its
partitions over; after a silent network cut the server ends that session within about the leader
timeout (see `leadership`), and this replica stops its consumers as soon as its own queries go
unanswered. The queues' single-active-consumer setting stays on as a second guard.

`run` raises whatever interrupts it (the partitions are released first); the service's
supervisor restarts it with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable

import asyncpg
import structlog

from command_service.adapters.leadership import connect_leader, while_alive
from command_service.adapters.subscription import RECOVERABLE_ERRORS
from cqrs_runtime.supervision import mark_healthy

log = structlog.get_logger(__name__)

LOCK_SPACE = 0x63717273  # "cqrs": the first key of every lock here
MEMBERSHIP = 0  # second key of the membership lock; partition i uses i + 1

PartitionHook = Callable[[int], Awaitable[None]]

_MEMBERS = """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = $2 AND objsubid = 2
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


class PartitionLeases:
    """Decides which partitions this replica consumes; calls `acquire`/`release` as that changes."""

    def __init__(
        self,
        *,
        dsn: str,
        partitions: int,
        acquire: PartitionHook,
        release: PartitionHook,
        interval_seconds: float = 1.0,
        leader_timeout: float = 15.0,
    ) -> None:
        self._dsn = dsn
        self._partitions = partitions
        self._acquire = acquire
        self._release = release
        self._interval = interval_seconds
        self._leader_timeout = leader_timeout
        self.owned: set[int] = set()
        # Replicas holding the membership lock, as last counted.
        self.members = 0
        self._held: asyncpg.Connection | None = None

    @property
    def connected(self) -> bool:
        """Whether the leases are held: the connection with the membership lock is open."""
        return self._held is not None and not self._held.is_closed()

    async def run(self) -> None:
        """Keep a fair share of the partitions until cancelled or interrupted (it raises then)."""
        connection = await connect_leader(self._dsn, self._leader_timeout, name="cqrs-leases")
        try:
            await connection.execute(
                "SELECT pg_advisory_lock_shared($1, $2)", LOCK_SPACE, MEMBERSHIP
            )
            self._held = connection
            while True:
                await self._rebalance(connection)
                mark_healthy()
                await asyncio.sleep(self._interval)
        finally:
            self._held = None
            # Stop consuming before the locks go (with the connection), so that the next
            # owner starts after the last message handled here.
            if self.owned:
                log.warning("partitions_released_with_leases", partitions=sorted(self.owned))
            for partition in sorted(self.owned):
                await self._release(partition)
            self.owned.clear()
            with contextlib.suppress(*RECOVERABLE_ERRORS):
                await connection.close(timeout=2)

    async def _rebalance(self, connection: asyncpg.Connection) -> None:
        members = int(await connection.fetchval(_MEMBERS, LOCK_SPACE, MEMBERSHIP))
        self.members = members
        share = math.ceil(self._partitions / max(members, 1))
        alive = self._leader_timeout / 3
        for partition in sorted(self.owned, reverse=True)[: max(len(self.owned) - share, 0)]:
            # The consumer is stopped before the lock is let go.
            await while_alive(connection, self._release(partition), every=alive)
            await connection.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_SPACE, partition + 1)
            self.owned.discard(partition)
            log.info("partition_released", partition=partition, members=members)
        for partition in range(self._partitions):
            if len(self.owned) >= share:
                break
            if partition in self.owned:
                continue
            if await connection.fetchval(
                "SELECT pg_try_advisory_lock($1, $2)", LOCK_SPACE, partition + 1
            ):
                self.owned.add(partition)
                await while_alive(connection, self._acquire(partition), every=alive)
                log.info("partition_acquired", partition=partition, members=members)
