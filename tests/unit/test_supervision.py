"""The supervisor: nothing dies silently (DESIGN.md invariant 9)."""

from __future__ import annotations

import asyncio

import structlog

from cqrs_runtime.supervision import Backoff, Failure, Supervisor, mark_healthy

FAST = Backoff(initial=0.01, maximum=0.05)


async def test_a_failing_task_is_logged_counted_restarted_and_reported() -> None:
    supervisor = Supervisor(backoff=FAST, failing_after=3)
    counter = supervisor.failures_total
    runs = 0
    recovered = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            structlog.contextvars.bind_contextvars(message_id=f"m{runs}")
            raise Failure("publish_failed", "the broker refused it")
        mark_healthy()
        recovered.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        supervisor.spawn("relay", flaky)
        while counter["relay"] < 3:
            await asyncio.sleep(0.005)
        assert [h.name for h in supervisor.failing()] == ["relay"]
        readiness = supervisor.readiness()
        assert readiness["ok"] is False
        assert readiness["failing"][0]["reason"] == "publish_failed"
        await asyncio.wait_for(recovered.wait(), 5)
    assert runs == 5
    assert counter["relay"] == 4
    assert supervisor.failing() == []  # it said it works again
    errors = [entry for entry in logs if entry["event"] == "task_failed"]
    assert len(errors) == 4
    assert errors[0]["log_level"] == "error"
    assert errors[0]["exc_info"] is not None  # the traceback goes to the log
    assert errors[0]["message_id"] == "m1"  # with the ids the task had in hand
    assert errors[0]["restart_in_seconds"] <= FAST.maximum
    await supervisor.stop_all()
    assert supervisor.running() == []


async def test_returning_ends_a_task_unless_it_must_never_end() -> None:
    supervisor = Supervisor(backoff=FAST)
    ended = 0

    async def once() -> None:
        nonlocal ended
        ended += 1

    supervised = supervisor.spawn("once", once)
    await supervised.task
    assert ended == 1
    loop = supervisor.spawn("loop", once, restart_on_return=True)
    while ended < 4:
        await asyncio.sleep(0.005)
    assert supervisor._tasks["loop"].health.reason == "task_ended"
    await supervisor.stop("loop")
    assert loop.task.cancelled()


async def test_outages_are_warnings_and_still_back_off() -> None:
    supervisor = Supervisor(backoff=FAST, transient=(ConnectionError,), failing_after=2)
    attempts = 0

    async def outage() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("refused")

    with structlog.testing.capture_logs() as logs:
        supervisor.spawn("leases", outage)
        while attempts < 3:
            await asyncio.sleep(0.005)
    await supervisor.stop_all()
    assert {entry["event"] for entry in logs} == {"task_interrupted"}
    assert {entry["log_level"] for entry in logs} == {"warning"}
    assert supervisor._tasks == {}


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial=1, maximum=8)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 8)]:
        delays = {backoff.delay(failures) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered


async def test_callback_work_reports_into_the_same_table() -> None:
    supervisor = Supervisor(failing_after=2)
    error = ZeroDivisionError("a bug")
    supervisor.outcome("projector:p0", error)
    supervisor.outcome("projector:p0", error)
    assert [h.name for h in supervisor.failing()] == ["projector:p0"]
    supervisor.outcome("projector:p0", None)
    assert supervisor.failing() == []
