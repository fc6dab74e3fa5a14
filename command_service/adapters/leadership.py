"""Connections that hold leadership: advisory locks of the relay, the process managers and the
partition leases.

An advisory lock lives as long as its session. After a silent network cut (packets dropped, no
reset) PostgreSQL would keep such a session, and so the lock, until the kernel's keepalive gives
up (about two hours by default), while the replica that held it can no longer act on it. These
connections therefore ask the server to end them within a bounded time once the client stops
talking (`idle_session_timeout`, TCP keepalive and `tcp_user_timeout`), and give up on a query
the server does not answer (`command_timeout`), so leadership passes to another replica within
about `timeout` seconds. A leader must then show it is alive more often than that, also while it
works on something else: `while_alive` runs the work and touches the session meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg

T = TypeVar("T")


async def connect_leader(dsn: str, timeout: float, *, name: str) -> asyncpg.Connection:
    """A session that the server ends about `timeout` seconds after its client went silent."""
    millis = str(max(int(timeout * 1000), 1000))
    probe = str(max(int(timeout / 3), 1))
    return await asyncpg.connect(
        dsn,
        timeout=timeout,
        command_timeout=timeout / 3,
        server_settings={
            "application_name": name,
            "idle_session_timeout": millis,
            "idle_in_transaction_session_timeout": millis,
            "statement_timeout": millis,
            "tcp_keepalives_idle": probe,
            "tcp_keepalives_interval": probe,
            "tcp_keepalives_count": "2",
            "tcp_user_timeout": millis,
        },
    )


async def while_alive(connection: asyncpg.Connection, work: Awaitable[T], *, every: float) -> T:
    """Await `work`, touching the session every `every` seconds so the server keeps it.

    If the session does not answer, the work is cancelled and the error raised: whoever held a
    lock on it cannot be sure to hold it any more.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            await connection.execute("SELECT 1")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
