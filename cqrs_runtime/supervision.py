"""Supervision of long-lived tasks: nothing dies silently (DESIGN.md invariant 9).

Every loop a service runs for its whole life (a consumer, the relay, a lease loop, a flusher, an
HTTP server) is started through `Supervisor.spawn`. When it raises, the supervisor logs the error
at ERROR with its traceback and whatever ids the task had bound to its log context, counts it,
and starts it again after a capped exponential backoff with jitter; a task that then runs for
`healthy_after` seconds has its failure count reset. A task that has failed `failing_after` times
in a row is reported by `failing()`, which readiness probes turn into a 503 naming the task and
its reason code.

Work driven by callbacks rather than a loop of its own (a broker consumer whose deliveries each
run in a task of the driver's) reports into the same health table with `Supervisor.outcome`.

A task says it works again with `mark_healthy()` (after a unit of work went through), which
clears its failures at once; a task that never says so is taken as healthy after `healthy_after`
seconds without a failure.

The reason code of a failure is the `reason` attribute of the exception when it has one (see
`Failure`), else `task_failed`; readiness shows codes only, the log has the details.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

DEFAULT_REASON = "task_failed"
UNAVAILABLE_REASON = "unavailable"


class Failure(Exception):
    """An error with a reason code for readiness (`publish_failed`, `handler_failed`, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: the n-th restart waits about `initial * 2**(n-1)`,
    at most `maximum`, between half and all of that (so replicas that failed together spread
    out, and no wait is close to zero)."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, failures: int) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** max(failures - 1, 0))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class TaskHealth:
    """What the supervisor knows of one task."""

    name: str
    failures: int = 0  # in a row, reset after a healthy period
    failures_total: int = 0
    reason: str | None = None
    last_started: float = 0.0
    last_failed: float | None = None


_current: contextvars.ContextVar[TaskHealth | None] = contextvars.ContextVar(
    "cqrs_supervised_task", default=None
)


def mark_healthy() -> None:
    """Called from inside a supervised task: it did its work, so its failures are behind it."""
    health = _current.get()
    if health is not None and health.failures:
        health.failures, health.reason = 0, None


@dataclass
class Supervised:
    """A running supervised task: its health and the asyncio task that runs it."""

    health: TaskHealth
    task: asyncio.Task[None]
    stopping: asyncio.Event


@dataclass
class Supervisor:
    """Runs long-lived tasks, restarts them when they fail, and knows which keep failing."""

    # Outages of a server the task needs (logged at WARNING, without a traceback); they count,
    # back off and show in readiness like any failure.
    transient: tuple[type[BaseException], ...] = ()
    backoff: Backoff = field(default_factory=Backoff)
    healthy_after: float = 30.0
    failing_after: int = 3
    # Failures per task name since start; never forgotten, so a counter only grows.
    failures_total: Counter[str] = field(default_factory=Counter)
    _tasks: dict[str, Supervised] = field(default_factory=dict)
    _callbacks: dict[str, TaskHealth] = field(default_factory=dict)

    def spawn(
        self, name: str, run: Callable[[], Awaitable[None]], *, restart_on_return: bool = False
    ) -> Supervised:
        """Start `run()` as task `name` and keep it running.

        A return ends the task unless `restart_on_return` (for loops that should never end:
        returning is then a failure too); cancellation ends it.
        """
        if name in self._tasks and not self._tasks[name].task.done():
            raise RuntimeError(f"a task named {name!r} is running already")
        health, stopping = TaskHealth(name), asyncio.Event()
        task = asyncio.create_task(
            self._keep_running(health, stopping, run, restart_on_return), name=name
        )
        supervised = self._tasks[name] = Supervised(health, task, stopping)
        return supervised

    async def stop(
        self, name: str, *, timeout: float | None = None, ask: Callable[[], None] | None = None
    ) -> None:
        """Stop task `name`: call `ask` (which should make it end by itself), give it `timeout`
        seconds if given, then cancel it. It is not restarted, whatever it does meanwhile."""
        supervised = self._tasks.pop(name, None)
        if supervised is None:
            return
        supervised.stopping.set()
        if ask is not None:
            ask()
        if timeout is not None:
            await asyncio.wait({supervised.task}, timeout=timeout)
        supervised.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervised.task

    def forget(self, name: str) -> None:
        """Stop reporting `name` (its task ended on purpose)."""
        self._tasks.pop(name, None)
        self._callbacks.pop(name, None)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(name) for name in list(self._tasks)))

    def running(self) -> list[str]:
        return sorted(name for name, s in self._tasks.items() if not s.task.done())

    def outcome(self, name: str, error: BaseException | None) -> None:
        """Record one unit of callback-driven work of `name`: a success or a failure.

        The error is logged and counted here; the caller has already contained it (parked,
        requeued, dead-lettered) so the consumer goes on.
        """
        health = self._callbacks.get(name)
        if health is None:
            health = self._callbacks[name] = TaskHealth(name, last_started=_now())
        if error is None:
            if health.failures:
                health.failures, health.reason = 0, None
            return
        self._failed(health, error, restart_in=None)

    def failing(self) -> list[TaskHealth]:
        """The tasks that failed `failing_after` times in a row and have not been healthy since."""
        now = _now()
        found = []
        for health in [*(s.health for s in self._tasks.values()), *self._callbacks.values()]:
            if health.failures >= self.failing_after and not self._healthy_since(health, now):
                found.append(health)
        return sorted(found, key=lambda health: health.name)

    def _healthy_since(self, health: TaskHealth, now: float) -> bool:
        last = health.last_failed or 0.0
        return health.last_started > last and now - health.last_started >= self.healthy_after

    async def _keep_running(
        self,
        health: TaskHealth,
        stopping: asyncio.Event,
        run: Callable[[], Awaitable[None]],
        restart_on_return: bool,
    ) -> None:
        _current.set(health)
        while True:
            health.last_started = _now()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the point of a supervisor
                if stopping.is_set():
                    return
                if _now() - health.last_started >= self.healthy_after:
                    health.failures = 0
                delay = self.backoff.delay(health.failures + 1)
                self._failed(health, error, restart_in=delay)
                await asyncio.sleep(delay)
                continue
            if not restart_on_return or stopping.is_set():
                return
            if _now() - health.last_started >= self.healthy_after:
                health.failures = 0
            delay = self.backoff.delay(health.failures + 1)
            self._failed(health, Failure("task_ended", "the task returned"), restart_in=delay)
            await asyncio.sleep(delay)

    def _failed(
        self, health: TaskHealth, error: BaseException, *, restart_in: float | None
    ) -> None:
        health.failures += 1
        health.failures_total += 1
        default = UNAVAILABLE_REASON if isinstance(error, self.transient) else DEFAULT_REASON
        health.reason = getattr(error, "reason", None) or default
        health.last_failed = _now()
        self.failures_total[health.name] += 1
        fields: dict[str, Any] = {
            "task": health.name,
            "reason": health.reason,
            "failures_in_a_row": health.failures,
            "restart_in_seconds": None if restart_in is None else round(restart_in, 3),
        }
        if isinstance(error, self.transient):
            log.warning("task_interrupted", error=f"{type(error).__name__}: {error}", **fields)
        else:
            log.error("task_failed", exc_info=error, **fields)

    def readiness(self) -> dict[str, Any]:
        """The `tasks` check of a readiness probe: names and reason codes of failing tasks."""
        failing = self.failing()
        return {
            "ok": not failing,
            "failing": [
                {"task": health.name, "reason": health.reason, "failures": health.failures}
                for health in failing
            ],
        }


def _now() -> float:
    return asyncio.get_running_loop().time()


class TaskFailuresCollector(Collector):
    """`cqrs_task_failures_total{task}` from a supervisor's table, when scraped; `elsewhere`
    adds the counts of another process's supervisor (one this process reports for)."""

    def __init__(
        self, supervisor: Supervisor, elsewhere: Callable[[], Mapping[str, int]] | None = None
    ) -> None:
        self._supervisor = supervisor
        self._elsewhere = elsewhere

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "cqrs_task_failures",
            "Failures of a supervised long-lived task (restarted with backoff), by task",
            labels=["task"],
        )
        counts = Counter(self._supervisor.failures_total)
        if self._elsewhere is not None:
            counts.update(self._elsewhere())
        for task, count in sorted(counts.items()):
            family.add_metric([task], count)
        yield family
