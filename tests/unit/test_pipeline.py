"""The consumer pipeline on fakes: an outcome per message, the policy, metrics, logs and spans."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from cqrs_runtime import tracing
from cqrs_runtime.pipeline import (
    Decided,
    Item,
    Outcome,
    Pipeline,
    Policy,
    Retry,
    SpanSpec,
    Verdict,
)
from tests.tracing_support import named, traced

log = structlog.get_logger(__name__)


class Blip(Exception):
    """A transient error."""


@dataclass(frozen=True)
class Message:
    """A delivery: `body` is a number, or anything else for bad input."""

    body: str
    message_id: str = ""


Batch = Sequence[Item[Message, int]]


@dataclass
class Consumer:
    """What a consumer supplies, recording what the pipeline asks of it."""

    handled: list[list[int]] = field(default_factory=list)
    settled: list[tuple[str, Verdict, str]] = field(default_factory=list)
    recorded: list[tuple[str, str, float]] = field(default_factory=list)
    failures: int = 0

    def decode(self, message: Message) -> int:
        log.info("decoding")
        if not message.body.isdigit():
            raise Decided(Outcome.dead_letter("dead_lettered", f"not a number: {message.body}"))
        return int(message.body)

    def log_fields(self, message: Message, value: int | None) -> Mapping[str, Any]:
        fields: dict[str, Any] = {"message_id": message.message_id or message.body}
        if value is not None:
            fields["number"] = value
        return fields

    async def handle(self, batch: Batch) -> list[Outcome[int]]:
        self.handled.append([item.value for item in batch])
        log.info("handling")
        return [
            Outcome.ack("even", result=item.value * 10)
            if item.value % 2 == 0
            else Outcome.park("odd", f"{item.value} is odd")
            for item in batch
        ]

    async def settle(self, item: Item[Message, int], outcome: Outcome[int]) -> Outcome[int]:
        log.info("settling", status=outcome.status)
        self.settled.append((item.message.body, outcome.verdict, outcome.status))
        return outcome

    def record(self, item: Item[Message, int], outcome: Outcome[int], seconds: float) -> None:
        self.recorded.append((item.message.body, outcome.status, seconds))

    def failed(self, item: Item[Message, int], error: Exception) -> Outcome[int]:
        self.failures += 1
        return Outcome.dead_letter("failed", f"{type(error).__name__}: {error}")

    def pipeline(self, **overrides: Any) -> Pipeline[Message, int, int]:
        stages: dict[str, Any] = {
            "decode": self.decode,
            "handle": self.handle,
            "settle": self.settle,
            "policy": Policy(failed=self.failed),
            "log_fields": self.log_fields,
            "record": self.record,
            **overrides,
        }
        return Pipeline(**stages)


def messages(*bodies: str) -> list[Message]:
    return [Message(body) for body in bodies]


def fast(**bounds: Any) -> Retry:
    """A retry without real waits."""
    return Retry(initial_seconds=0.001, max_seconds=0.001, **bounds)


class TestOutcomes:
    async def test_each_message_of_a_batch_gets_its_outcome_and_is_settled_in_order(self) -> None:
        consumer = Consumer()

        outcomes = await consumer.pipeline().run(messages("2", "x", "3", "4"))

        assert [(o.verdict, o.status) for o in outcomes] == [
            (Verdict.ACK, "even"),
            (Verdict.DEAD_LETTER, "dead_lettered"),
            (Verdict.PARK, "odd"),
            (Verdict.ACK, "even"),
        ]
        assert outcomes[0].result == 20
        assert outcomes[1].reason == "not a number: x"
        assert consumer.handled == [[2, 3, 4]]  # one batch; the bad input never reaches it
        assert [body for body, _, _ in consumer.settled] == ["2", "x", "3", "4"]

    async def test_a_gate_holds_messages_back_and_is_left_after_they_are_settled(self) -> None:
        consumer = Consumer()
        events: list[str] = []

        @contextlib.asynccontextmanager
        async def gate(batch: Batch) -> AsyncIterator[list[Outcome[int] | None]]:
            events.append("enter")
            yield [Outcome.requeue("held") if item.value == 3 else None for item in batch]
            events.append(f"leave after {len(consumer.settled)} settled")

        outcomes = await consumer.pipeline(gate=gate).run(messages("2", "3"))

        assert [o.status for o in outcomes] == ["even", "held"]
        assert consumer.handled == [[2]]
        assert events == ["enter", "leave after 2 settled"]

    async def test_messages_reach_the_gate_in_the_order_they_were_run(self) -> None:
        """Deliveries run as concurrent tasks keep their order up to the gate (no await before)."""
        consumer = Consumer()
        order: list[int] = []

        @contextlib.asynccontextmanager
        async def gate(batch: Batch) -> AsyncIterator[list[Outcome[int] | None]]:
            order.extend(item.value for item in batch)
            await asyncio.sleep(0.001 * (5 - batch[0].value))  # later ones would overtake
            yield [None for _ in batch]

        pipeline = consumer.pipeline(gate=gate)
        await asyncio.gather(*(pipeline.run([Message(str(n))]) for n in range(5)))

        assert order == [0, 1, 2, 3, 4]

    async def test_settling_may_change_the_outcome_and_metrics_count_what_was_settled(
        self,
    ) -> None:
        consumer = Consumer()

        async def settle(item: Item[Message, int], outcome: Outcome[int]) -> Outcome[int]:
            consumer.settled.append((item.message.body, outcome.verdict, outcome.status))
            return Outcome.requeue("handed_back") if item.decoded == 4 else outcome

        outcomes = await consumer.pipeline(settle=settle).run(messages("2", "4", "x"))

        assert [o.status for o in outcomes] == ["even", "handed_back", "dead_lettered"]
        assert [(body, status) for body, status, _ in consumer.recorded] == [
            ("2", "even"),
            ("4", "handed_back"),
            ("x", "dead_lettered"),
        ]
        assert all(seconds >= 0 for _, _, seconds in consumer.recorded)

    async def test_the_handler_must_give_one_outcome_per_message(self) -> None:
        consumer = Consumer()

        async def short(batch: Batch) -> list[Outcome[int]]:
            return [Outcome.ack("even")]

        with pytest.raises(ValueError, match="1 outcomes for 2 messages"):
            await consumer.pipeline(handle=short).run(messages("2", "4"))
        assert consumer.settled == []


class TestPolicy:
    async def test_an_exception_in_handle_becomes_the_policys_outcome_for_each_message(
        self,
    ) -> None:
        consumer = Consumer()

        async def broken(batch: Batch) -> list[Outcome[int]]:
            raise KeyError("bug")

        pipeline = consumer.pipeline(handle=broken)
        outcomes = await pipeline.run(messages("2", "3"))

        assert [(o.verdict, o.reason) for o in outcomes] == [
            (Verdict.DEAD_LETTER, "KeyError: 'bug'"),
            (Verdict.DEAD_LETTER, "KeyError: 'bug'"),
        ]
        assert [body for body, _, _ in consumer.settled] == ["2", "3"]
        # The consumer goes on.
        assert [o.status for o in await pipeline.run(messages("x"))] == ["dead_lettered"]

    async def test_an_exception_in_decode_is_contained_by_the_policy_too(self) -> None:
        consumer = Consumer()

        def decode(message: Message) -> int:
            raise ZeroDivisionError("decoder bug")

        [outcome] = await consumer.pipeline(decode=decode).run(messages("2"))

        assert (outcome.status, outcome.reason) == ("failed", "ZeroDivisionError: decoder bug")
        assert consumer.handled == []

    async def test_a_policy_that_re_raises_lets_the_error_escape_with_nothing_settled(
        self,
    ) -> None:
        consumer = Consumer()

        def escalate(item: Item[Message, int], error: Exception) -> Outcome[int]:
            raise error

        async def broken(batch: Batch) -> list[Outcome[int]]:
            raise KeyError("bug")

        pipeline = consumer.pipeline(handle=broken, policy=Policy(failed=escalate))
        with pytest.raises(KeyError):
            await pipeline.run(messages("2", "x"))
        assert consumer.settled == []
        assert consumer.recorded == []

    async def test_transient_errors_are_retried_in_place_then_requeued(self) -> None:
        consumer = Consumer()
        calls = 0
        announced: list[int] = []

        async def unavailable(batch: Batch) -> list[Outcome[int]]:
            nonlocal calls
            calls += 1
            raise Blip("store away")

        retry = fast(
            transient=(Blip,), attempts=3, announce=lambda attempt, error: announced.append(attempt)
        )
        policy = Policy(failed=consumer.failed, retry=retry)
        [outcome] = await consumer.pipeline(handle=unavailable, policy=policy).run(messages("2"))

        assert calls == 3
        assert announced == [1, 2]  # before each wait, not after the last attempt
        assert (outcome.verdict, outcome.status, outcome.reason) == (
            Verdict.REQUEUE,
            "requeued",
            "store away",
        )
        assert isinstance(outcome.error, Blip)
        assert consumer.failures == 0

    async def test_what_retries_become_when_used_up_is_the_policys(self) -> None:
        consumer = Consumer()

        async def unavailable(batch: Batch) -> list[Outcome[int]]:
            raise Blip("away")

        def exhausted(item: Item[Message, int], outcome: Outcome[int]) -> Outcome[int]:
            return Outcome.park("gave_up", f"{item.value}: {outcome.reason}")

        policy = Policy(
            failed=consumer.failed,
            retry=fast(transient=(Blip,), attempts=None, seconds=0.02),
            exhausted=exhausted,
        )
        [outcome] = await consumer.pipeline(handle=unavailable, policy=policy).run(messages("2"))

        assert (outcome.status, outcome.reason) == ("gave_up", "2: away")

    async def test_a_transient_error_that_clears_is_handled(self) -> None:
        consumer = Consumer()
        failures = iter([Blip("blip")])

        async def flaky(batch: Batch) -> list[Outcome[int]]:
            if (error := next(failures, None)) is not None:
                raise error
            return await consumer.handle(batch)

        policy = Policy(failed=consumer.failed, retry=fast(transient=(Blip,), attempts=3))
        [outcome] = await consumer.pipeline(handle=flaky, policy=policy).run(messages("2"))

        assert outcome.status == "even"

    async def test_only_the_messages_whose_outcome_is_retry_are_handled_again(self) -> None:
        consumer = Consumer()
        first = True

        async def partly(batch: Batch) -> list[Outcome[int]]:
            nonlocal first
            outcomes = await consumer.handle(batch)
            if first:
                first = False
                return [Outcome.retry(Blip("later")) if o.status == "odd" else o for o in outcomes]
            return outcomes

        policy = Policy(failed=consumer.failed, retry=fast(attempts=2))
        outcomes = await consumer.pipeline(handle=partly, policy=policy).run(
            messages("2", "3", "4")
        )

        assert consumer.handled == [[2, 3, 4], [3]]
        assert [o.status for o in outcomes] == ["even", "odd", "even"]

    def test_a_retry_has_a_bound(self) -> None:
        with pytest.raises(ValueError, match="bound"):
            Retry(attempts=None, seconds=None)
        assert [Retry(initial_seconds=0.1, max_seconds=0.5).delay(n) for n in (1, 2, 3, 4)] == [
            0.1,
            0.2,
            0.4,
            0.5,
        ]


class TestLogBinding:
    async def test_each_stage_logs_with_the_fields_of_its_message(self) -> None:
        consumer = Consumer()

        with capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            await consumer.pipeline().run(messages("2"))

        seen = [(entry["event"], entry["message_id"], entry.get("number")) for entry in logs]
        assert seen == [("decoding", "2", None), ("handling", "2", 2), ("settling", "2", 2)]

    async def test_a_batch_handler_enters_each_messages_scope(self) -> None:
        consumer = Consumer()

        async def each(batch: Batch) -> list[Outcome[int]]:
            for item in batch:
                with item.scope():
                    log.info("handling_one")
            return [Outcome.ack("even") for _ in batch]

        with capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            await consumer.pipeline(handle=each).run(messages("2", "4"))

        assert [e["number"] for e in logs if e["event"] == "handling_one"] == [2, 4]
        assert [e["number"] for e in logs if e["event"] == "settling"] == [2, 4]

    async def test_what_the_decoder_read_of_bad_input_is_bound(self) -> None:
        consumer = Consumer()

        def decode(message: Message) -> int:
            raise Decided(Outcome.park("parked", "bad"), fields={"read": message.body})

        with capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            await consumer.pipeline(decode=decode).run(messages("x"))

        [settling] = [entry for entry in logs if entry["event"] == "settling"]
        assert settling["read"] == "x"
        assert "message_id" not in settling  # replaced, not added to

    async def test_the_fields_stay_bound_for_whoever_logs_an_escaping_failure(self) -> None:
        consumer = Consumer()

        async def settle(item: Item[Message, int], outcome: Outcome[int]) -> Outcome[int]:
            raise ConnectionError("channel closed")

        structlog.contextvars.bind_contextvars(stale="from before")
        with pytest.raises(ConnectionError):
            await consumer.pipeline(settle=settle).run([Message("2", message_id="m-2")])

        bound = structlog.contextvars.get_contextvars()
        assert (bound["message_id"], bound["number"], "stale" in bound) == ("m-2", 2, False)
        structlog.contextvars.clear_contextvars()


class TestTracing:
    @staticmethod
    def span_outcome(outcome: Outcome[int]) -> Mapping[str, tracing.AttributeValue | None]:
        return {"cqrs.outcome": outcome.status, "cqrs.result": outcome.result}

    async def test_a_span_named_after_decoding_starts_when_the_message_is_handled(self) -> None:
        consumer = Consumer()

        def span(message: Message, value: int | None) -> SpanSpec | None:
            if value is None:
                return None
            return SpanSpec(f"work {value}", kind="consumer", attributes={"cqrs.value": value})

        @contextlib.asynccontextmanager
        async def gate(batch: Batch) -> AsyncIterator[list[Outcome[int] | None]]:
            yield [Outcome.requeue("held") if item.value == 6 else None for item in batch]

        async def handle(batch: Batch) -> list[Outcome[int]]:
            for item in batch:
                with item.scope(), tracing.span("inner"):
                    pass
            return await consumer.handle(batch)

        with traced() as (_, exporter):
            await consumer.pipeline(
                span=span, span_outcome=self.span_outcome, gate=gate, handle=handle
            ).run(messages("2", "x", "6"))
        spans = exporter.get_finished_spans()

        # None for the bad input, none for the message the gate held back.
        assert sorted(s.name for s in spans) == ["inner", "work 2"]
        [work] = named(spans, "work 2")
        [inner] = named(spans, "inner")
        assert dict(work.attributes or {}) == {
            "cqrs.value": 2,
            "cqrs.outcome": "even",
            "cqrs.result": 20,
        }
        assert inner.parent is not None and work.context is not None
        assert inner.parent.span_id == work.context.span_id

    async def test_a_span_named_on_receipt_covers_decoding_and_is_renamed(self) -> None:
        consumer = Consumer()

        def span(message: Message, value: int | None) -> SpanSpec:
            if value is None:
                return SpanSpec("message", kind="consumer")
            return SpanSpec(f"message {value}", attributes={"cqrs.value": value})

        async def settle(item: Item[Message, int], outcome: Outcome[int]) -> Outcome[int]:
            return Outcome.requeue("handed_back") if outcome.status == "odd" else outcome

        with traced() as (_, exporter):
            await consumer.pipeline(span=span, span_outcome=self.span_outcome, settle=settle).run(
                messages("2", "x", "3")
            )
        spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}

        assert spans == {
            "message 2": {"cqrs.value": 2, "cqrs.outcome": "even", "cqrs.result": 20},
            "message": {"cqrs.outcome": "dead_lettered"},  # bad input: never renamed
            "message 3": {"cqrs.value": 3, "cqrs.outcome": "handed_back"},  # as settled
        }

    async def test_a_message_that_comes_again_after_failing_shows_the_error(self) -> None:
        consumer = Consumer()

        async def unavailable(batch: Batch) -> list[Outcome[int]]:
            raise Blip("store away")

        def span(message: Message, value: int | None) -> SpanSpec:
            return SpanSpec("message")

        policy = Policy(failed=consumer.failed, retry=Retry(transient=(Blip,), attempts=1))
        with traced() as (_, exporter):
            await consumer.pipeline(handle=unavailable, policy=policy, span=span).run(messages("2"))
        [finished] = exporter.get_finished_spans()

        assert not finished.status.is_ok
        assert [event.name for event in finished.events] == ["exception"]

    async def test_spans_end_when_an_error_escapes(self) -> None:
        consumer = Consumer()

        def escalate(item: Item[Message, int], error: Exception) -> Outcome[int]:
            raise error

        async def broken(batch: Batch) -> list[Outcome[int]]:
            raise KeyError("bug")

        def span(message: Message, value: int | None) -> SpanSpec:
            return SpanSpec("message")

        pipeline = consumer.pipeline(handle=broken, policy=Policy(failed=escalate), span=span)
        with traced() as (_, exporter), pytest.raises(KeyError):
            await pipeline.run(messages("2"))
        [finished] = exporter.get_finished_spans()

        assert not finished.status.is_ok
        assert [event.name for event in finished.events] == ["exception"]
