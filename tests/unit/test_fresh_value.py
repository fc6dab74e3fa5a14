"""`FreshValue`: every caller gets a value whose load started after it asked, loads are shared."""

from __future__ import annotations

import asyncio

import pytest

from query_service.service_layer.catalog import FreshValue


class Source:
    """A value that changes; each load reads it when the load starts, then takes a while."""

    def __init__(self) -> None:
        self.value = 0
        self.loads = 0

    async def load(self) -> int:
        self.loads += 1
        seen = self.value
        await asyncio.sleep(0.02)
        return seen


async def test_a_caller_never_gets_a_load_that_began_before_it_asked() -> None:
    source = Source()
    fresh = FreshValue(source.load)

    first = asyncio.create_task(fresh.get())
    await asyncio.sleep(0.005)  # the first load is under way and has read 0
    source.value = 1
    second = await fresh.get()

    assert await first == 0
    assert second == 1


async def test_callers_that_ask_during_a_load_share_the_next_one() -> None:
    source = Source()
    fresh = FreshValue(source.load)

    running = asyncio.create_task(fresh.get())
    await asyncio.sleep(0.005)
    waiting = [asyncio.create_task(fresh.get()) for _ in range(20)]
    await asyncio.gather(running, *waiting)

    assert source.loads == 2


async def test_a_failed_load_reaches_its_callers_and_the_next_one_loads_again() -> None:
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise ConnectionError("down")
        return attempts

    fresh = FreshValue(flaky)

    with pytest.raises(ConnectionError):
        await fresh.get()
    assert await fresh.get() == 2
