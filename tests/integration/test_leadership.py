"""Leadership after a silent network cut (DESIGN.md invariant 9): handed over in bounded time.

A replica reaches PostgreSQL through a TCP proxy that is then "blackholed": it stops forwarding
but keeps both sockets open, so neither side is told (packets dropped, no reset). PostgreSQL
would keep such a session, and the advisory locks on it, until the kernel's keepalive gives up
(about two hours); the leadership connections ask it to end them within the leader timeout, and
the replica that lost its link stops acting as leader as soon as its queries go unanswered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from command_service.adapters.partition_leases import PartitionLeases
from command_service.adapters.postgres_event_store import PostgresEventStore
from command_service.adapters.subscription import RECOVERABLE_ERRORS, Subscription
from command_service.service_layer.event_store import NewEvent, StoredEvent
from cqrs_runtime.supervision import Backoff, Supervisor
from shared.ledger import AccountOpened
from tests.tcp_proxy import TcpProxy, through

pytestmark = pytest.mark.integration

LEADER_TIMEOUT = 5.0
# The bound the README promises: the server ends the session after the timeout, the standby
# polls; some slack for a loaded machine.
HANDOVER_BOUND = LEADER_TIMEOUT * 2 + 5


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(backoff=Backoff(0.2, 1.0), transient=RECOVERABLE_ERRORS)
    yield supervisor
    await supervisor.stop_all()


async def append_opening(store: PostgresEventStore) -> None:
    await store.append(
        stream_id=uuid.uuid4(),
        aggregate_type="account",
        expected_version=0,
        events=[NewEvent.from_event(AccountOpened(owner_id="o", currency="EUR"))],
        command_id=uuid.uuid4(),
        correlation_id=None,
    )


class Recorder:
    """A subscription handler that notes which positions it was given."""

    def __init__(self) -> None:
        self.positions: list[int] = []

    async def __call__(self, events: list[StoredEvent]) -> None:
        self.positions.extend(event.position for event in events)


async def until(condition: object, timeout: float) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_silently_cut_leader_hands_its_subscription_over_in_bounded_time(
    pg_dsn: str,
    store: PostgresEventStore,
    postgres_proxy: TcpProxy,
    supervisor: Supervisor,
) -> None:
    def subscription(dsn: str, handler: Recorder) -> Subscription:
        return Subscription(
            name="relay",
            dsn=dsn,
            handler=handler,
            batch_size=100,
            poll_seconds=0.2,
            leader_timeout=LEADER_TIMEOUT,
        )

    cut_off, standby = Recorder(), Recorder()
    leader = subscription(through(postgres_proxy, pg_dsn), cut_off)
    other = subscription(pg_dsn, standby)
    supervisor.spawn("cut-off", leader.run, restart_on_return=True)
    await until(lambda: leader.leading, 10)
    supervisor.spawn("standby", other.run, restart_on_return=True)
    await append_opening(store)
    await until(lambda: len(cut_off.positions) == 1, 10)
    assert not other.leading

    await postgres_proxy.blackhole()
    await append_opening(store)
    handed_over = await until(lambda: standby.positions, HANDOVER_BOUND)
    assert other.leading
    # The cut-off replica knows it no longer leads, well before anyone else could take over.
    await until(lambda: not leader.leading, 1)
    assert standby.positions[-1] == 2 and cut_off.positions == [1]
    print(f"subscription handed over {handed_over:.1f} s after the cut")

    await postgres_proxy.restore()
    await append_opening(store)
    await until(lambda: standby.positions[-1] == 3, 10)
    assert cut_off.positions == [1]  # back as a standby only


async def test_a_silently_cut_replica_gives_up_its_partitions_before_another_takes_them(
    pg_dsn: str, postgres_proxy: TcpProxy, supervisor: Supervisor
) -> None:
    log: list[tuple[float, str, str, int]] = []

    def leases(name: str, dsn: str) -> PartitionLeases:
        async def acquire(partition: int) -> None:
            log.append((time.monotonic(), name, "acquire", partition))

        async def release(partition: int) -> None:
            log.append((time.monotonic(), name, "release", partition))

        return PartitionLeases(
            dsn=dsn,
            partitions=4,
            acquire=acquire,
            release=release,
            interval_seconds=0.2,
            leader_timeout=LEADER_TIMEOUT,
        )

    cut_off = leases("cut-off", through(postgres_proxy, pg_dsn))
    other = leases("other", pg_dsn)
    supervisor.spawn("cut-off", cut_off.run, restart_on_return=True)
    await until(lambda: len(cut_off.owned) == 4, 10)
    supervisor.spawn("other", other.run, restart_on_return=True)
    await until(lambda: len(cut_off.owned) == 2 and len(other.owned) == 2, 15)
    held_by_cut_off = set(cut_off.owned)

    cut_at = time.monotonic()
    await postgres_proxy.blackhole()
    took = await until(lambda: len(other.owned) == 4, HANDOVER_BOUND)
    assert not cut_off.owned
    print(f"partitions handed over {took:.1f} s after the cut")
    for partition in held_by_cut_off:
        [released] = [
            at
            for at, who, what, p in log
            if (who, what, p) == ("cut-off", "release", partition) and at > cut_at
        ]
        [acquired] = [
            at
            for at, who, what, p in log
            if (who, what, p) == ("other", "acquire", partition) and at > cut_at
        ]
        assert released < acquired  # never two consumers of one partition at once

    await postgres_proxy.restore()
    await until(lambda: len(cut_off.owned) == 2 and len(other.owned) == 2, 20)


async def test_leadership_sessions_are_ended_by_the_server_when_silent(pg_dsn: str) -> None:
    """What the handover rests on: the server settings each leadership connection asks for."""
    from command_service.adapters.leadership import connect_leader

    connection = await connect_leader(pg_dsn, LEADER_TIMEOUT, name="cqrs-test")
    try:
        settings = {
            name: await connection.fetchval(f"SHOW {name}")
            for name in ("idle_session_timeout", "tcp_user_timeout", "statement_timeout")
        }
    finally:
        await connection.close()
    assert settings == {
        "idle_session_timeout": "5s",
        "tcp_user_timeout": "5000",
        "statement_timeout": "5s",
    }
    admin = await asyncpg.connect(pg_dsn)
    try:
        assert await admin.fetchval("SHOW idle_session_timeout") == "0"  # pool sessions: untouched
    finally:
        await admin.close()
