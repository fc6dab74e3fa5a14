"""Read your writes: a read that waits until its document reflects a version or position.

A command's reply carries the aggregate's `version` and the event's global `position`.
`?min_version=` (and `?min_position=`) make a read wait, up to `CQRS_READ_WAIT_SECONDS`, until the
document reflects at least that version (position) of its aggregate; when it does not in time
the answer is 504 with `Retry-After`, never stale data. At most `CQRS_READ_WAIT_MAX_WAITERS`
reads wait at once; one more is a 503 at once. `Fresh.read` is the one way a route does this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import Field

from query_service.entrypoints.api.dependencies import Params
from query_service.entrypoints.api.errors import NotCaughtUpError
from query_service.entrypoints.api.limits import ReadWaits
from query_service.settings import QueryServiceSettings
from shared.messages import MAX_COUNTER

T = TypeVar("T")


class Freshness(Params):
    min_version: int | None = Field(
        default=None, ge=1, le=MAX_COUNTER, description="wait until the aggregate has this version"
    )
    min_position: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COUNTER,
        description="wait until the document reflects an event of its aggregate at or after "
        "this global position",
    )

    @property
    def wanted(self) -> bool:
        return self.min_version is not None or self.min_position is not None

    def met_by(self, version: int, position: int) -> bool:
        return (self.min_version is None or version >= self.min_version) and (
            self.min_position is None or position >= self.min_position
        )


# What a read reached: (version, last_position) of the aggregate in the document it found.
Reached = Callable[[T], tuple[int, int]]


async def wait_for(
    read: Callable[[], Awaitable[T]],
    ready: Callable[[T], bool],
    *,
    timeout: float,
    waits: ReadWaits,
) -> tuple[T, bool]:
    """Read until `ready` holds or `timeout` passed; returns the last value read and whether.

    A read that has to wait takes one of the `waits` slots (`TooManyWaitingReadsError` when
    none is free); one whose version is there at the first read needs none.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await read()
    if ready(value):
        return value, True
    if loop.time() >= deadline:
        return value, False
    with waits.slot():
        delay = 0.01
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return value, False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)
            value = await read()
            if ready(value):
                return value, True


@dataclass(frozen=True)
class Fresh:
    """A route's access to read-your-writes (`Depends` gives one per request)."""

    wait_seconds: float
    waits: ReadWaits

    async def read(
        self,
        read: Callable[[], Awaitable[T | None]],
        params: Freshness,
        *,
        reached: Callable[[T], tuple[int, int]],
        what: str,
    ) -> T | None:
        """`read()`, or, when `params` asks for a version or position, `read()` again until it
        reflects it; raises `NotCaughtUpError` (504) when it does not within the wait. `reached`
        says which version and position a value read stands at; `what` names it in the 504."""
        if not params.wanted:
            return await read()
        value, ready = await wait_for(
            read,
            lambda found: found is not None and params.met_by(*reached(found)),
            timeout=self.wait_seconds,
            waits=self.waits,
        )
        if not ready:
            current: dict[str, int | None] | None = None
            if value is not None:
                version, position = reached(value)
                current = {"version": version, "last_position": position}
            raise NotCaughtUpError(
                what,
                {"min_version": params.min_version, "min_position": params.min_position},
                current,
                self.wait_seconds,
            )
        return value


def get_fresh(request: Request) -> Fresh:
    settings: QueryServiceSettings = request.app.state.settings
    waits: ReadWaits = request.app.state.read_waits
    return Fresh(settings.read_wait_seconds, waits)


FreshReads = Annotated[Fresh, Depends(get_fresh)]
