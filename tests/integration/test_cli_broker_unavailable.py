"""`cqrs send` without a broker: "broker unavailable" and exit code 2, within its timeout; the
other commands without the broker or the query API they read: exit code 2 as well.

The tool runs as a user runs it (the installed script, as a process). Two ways a broker is not
there: nothing listens on its port, or something accepts the connection and never answers (a
broker that hangs, or a network that drops packets).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port

pytestmark = pytest.mark.integration

CQRS = Path(sys.executable).with_name("cqrs")


async def cqrs(amqp_url: str, *args: str, query_url: str | None = None) -> tuple[int, str, float]:
    """Exit code, stderr and seconds taken."""
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(CQRS),
        *args,
        env={
            **os.environ,
            "CQRS_AMQP_URL": amqp_url,
            "CQRS_QUERY_URL": query_url or f"http://127.0.0.1:{free_port()}",
            "COLUMNS": "200",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode(), time.monotonic() - started


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


async def test_send_with_nothing_listening_says_broker_unavailable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    code, stderr, _ = await cqrs(url, "send", "OpenAccount", "owner_id=a", "currency=EUR")
    assert code == 2, stderr
    assert "broker unavailable" in stderr
    assert "Traceback" not in stderr


async def test_send_to_a_broker_that_never_answers_gives_up_within_its_timeout() -> None:
    async with silent_listener() as port:
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        code, stderr, took = await cqrs(
            url, "send", "OpenAccount", "owner_id=a", "currency=EUR", "--timeout", "3"
        )
    assert code == 2, stderr
    assert "broker unavailable" in stderr
    assert "Traceback" not in stderr
    assert took < 20, took  # the 3 s timeout plus the interpreter's start-up


async def test_dlq_list_with_nothing_listening_says_broker_unavailable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    code, stderr, _ = await cqrs(url, "dlq", "list")
    assert code == 2, stderr
    assert "broker unavailable" in stderr


async def test_parked_list_with_nothing_listening_says_broker_unavailable() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    code, stderr, _ = await cqrs(url, "parked", "list")
    assert code == 2, stderr
    assert "broker unavailable" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "args", [("get",), ("get", "account", "a"), ("rebuild",), ("rebuild", "--all")]
)
async def test_get_and_rebuild_without_the_query_api_exit_2(args: tuple[str, ...]) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    code, stderr, _ = await cqrs(url, *args, query_url=f"http://127.0.0.1:{free_port()}")
    assert code == 2, stderr
    assert "does not answer" in stderr
    assert "Traceback" not in stderr
