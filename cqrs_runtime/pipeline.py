"""One consumer pipeline for every consumer: decode → context → handle a batch → an outcome per
message → settle → metrics.

The command partitions, the process managers and the projector each run their messages through
a `Pipeline` and supply only what is their own: how a message is decoded, the log fields and the
span that name it, the handler, what their `Policy` makes of an exception, how each outcome is
settled on their transport, and what they count. The stages, for a batch of messages:

1. **receive and decode**, each message in turn and without awaiting (so deliveries that run
   concurrently still reach the gate in delivery order): its log fields are bound, its span is
   started when the consumer names one before decoding (the command consumer's covers the
   decoding too), and `decode` gives the value the handler takes, or raises `Decided` with the
   message's outcome (bad input: dead-letter or park);
2. **admit**, when the consumer has a gate (the projector's per-aggregate lanes): the gate may
   send a message back before it is handled;
3. **handle** the decoded messages as one batch, each message's span started first; the
   handler returns one `Outcome` each. An exception the handler raises is contained per the
   policy for every message of the batch: a transient one means retry, anything else becomes
   what `Policy.failed` says (or propagates, when it re-raises). Messages whose outcome is
   `retry` are handled again in place after a backoff, until the retry bound; then
   `Policy.exhausted` says what becomes of them (a requeue, by default);
4. **settle** each outcome on the transport, in order; `settle` returns the outcome as it was
   carried out (an ack the broker did not take may become a hand-back). The span gets the
   outcome's attributes (those of the decided outcome, then those of the settled one if they
   differ) and ends;
5. **metrics**: `record` counts the settled outcome with the seconds the message was in hand.

A batch of one is the simple case, and every consumer's case today. A handler of bigger batches
enters a message's `Item.scope()` while it works on that message, so its logs and spans belong to
it. Log fields *replace* the task's log context each time a message's stage runs and stay bound
afterwards, so a failure that escapes the pipeline is logged (by the consumer's loop or the
supervisor) with the ids of the message it happened on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

from cqrs_runtime import tracing

if TYPE_CHECKING:
    from opentelemetry.context import Context

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

M = TypeVar("M")  # a message as the transport delivers it
D = TypeVar("D")  # a message decoded: what the handler takes
R = TypeVar("R")  # what handling gives back with an outcome (a reply to send, a projection)


class Verdict(StrEnum):
    """What becomes of a message."""

    ACK = "ack"  # done with: consumed
    RETRY = "retry"  # handle it again here, after a backoff, in its place
    REQUEUE = "requeue"  # hand it back to its queue (or its source), to come again later
    DEAD_LETTER = "dead_letter"  # bad input: set aside with the reason, the sender answered
    PARK = "park"  # cannot be processed: set aside with the reason, for an operator


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """The decision about one message: its `verdict`, and `status`, the name spans and metrics
    give it (`accepted`, `duplicate`, `projected`, `parked`, ...)."""

    verdict: Verdict
    status: str
    reason: str | None = None  # why: the dead letter's or the park's reason, the requeue's cause
    result: R | None = None  # what handling gave back (the reply to send)
    error: BaseException | None = None  # the exception it comes from, if any

    @classmethod
    def ack(cls, status: str, result: R | None = None) -> Outcome[R]:
        return cls(Verdict.ACK, status, result=result)

    @classmethod
    def retry(cls, error: BaseException) -> Outcome[R]:
        return cls(Verdict.RETRY, "retry", reason=str(error), error=error)

    @classmethod
    def requeue(
        cls, status: str, reason: str | None = None, *, error: BaseException | None = None
    ) -> Outcome[R]:
        return cls(Verdict.REQUEUE, status, reason=reason, error=error)

    @classmethod
    def dead_letter(cls, status: str, reason: str, result: R | None = None) -> Outcome[R]:
        return cls(Verdict.DEAD_LETTER, status, reason=reason, result=result)

    @classmethod
    def park(cls, status: str, reason: str) -> Outcome[R]:
        return cls(Verdict.PARK, status, reason=reason)


class Decided(Exception):
    """Raised by a decoder: the message is not handled, `outcome` is what becomes of it.

    `fields`, when given, replace the message's log fields (what the decoder could read of it).
    """

    def __init__(self, outcome: Outcome[Any], fields: Mapping[str, Any] | None = None) -> None:
        super().__init__(outcome.reason or outcome.status)
        self.outcome = outcome
        self.fields = fields


@dataclass(frozen=True)
class SpanSpec:
    """The span a consumer names for a message."""

    name: str
    parent: Context | None = None
    kind: tracing.SpanKind = "internal"
    attributes: Mapping[str, tracing.AttributeValue | None] = field(default_factory=dict)


class Item(Generic[M, D]):
    """One message on its way through the pipeline, and what is known of it so far."""

    __slots__ = ("_active", "_pending_span", "decoded", "fields", "message", "span", "started")

    def __init__(self, message: M) -> None:
        self.message = message
        self.decoded: D | None = None
        self.fields: dict[str, Any] = {}  # its log fields; later stages may read them too
        self.span: tracing.SpanHandle = _NO_SPAN
        self.started = time.perf_counter()
        self._pending_span: SpanSpec | None = None
        self._active = False

    @property
    def value(self) -> D:
        """The decoded message (what a handler is given)."""
        if self.decoded is None:
            raise LookupError("the message was not decoded")
        return self.decoded

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Run the block as this message's: its log fields bound, its span current.

        Re-entrant; the fields stay bound after the block (see the module's docstring).
        """
        if self._active:
            yield
            return
        self._active = True
        try:
            _replace_log_context(self.fields)
            with self.span.current():
                yield
        finally:
            self._active = False

    def bind(self, fields: Mapping[str, Any]) -> None:
        self.fields = dict(fields)
        if self._active:
            _replace_log_context(self.fields)

    def name_span(self, spec: SpanSpec, *, start: bool) -> None:
        """Describe the span started already, or start it now (`start`), or when handled."""
        if self.span is not _NO_SPAN:
            self.span.rename(spec.name)
            self.span.set_all(spec.attributes)
        elif start:
            self.span = tracing.start_span(
                spec.name, parent=spec.parent, kind=spec.kind, attributes=spec.attributes
            )
        else:
            self._pending_span = spec

    def start_span(self) -> None:
        if self._pending_span is not None:
            spec, self._pending_span = self._pending_span, None
            self.name_span(spec, start=True)

    def end(self) -> None:
        self._pending_span = None
        self.span.end()


_NO_SPAN = tracing.SpanHandle(None)


def _replace_log_context(fields: Mapping[str, Any]) -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)


def _announce(attempt: int, error: BaseException) -> None:
    log.warning("transient_error_retrying", attempt=attempt, error=repr(error))


@dataclass(frozen=True)
class Retry:
    """Retry in place: a message whose outcome is `retry` (or whose handling raised one of
    `transient`) is handled again after a capped exponential backoff (`initial_seconds`
    doubling, at most `max_seconds`), until `attempts` were made or `seconds` have passed since
    the first; `announce(attempt, error)` is called before each wait."""

    transient: tuple[type[Exception], ...] = ()
    attempts: int | None = 1
    seconds: float | None = None
    initial_seconds: float = 0.1
    max_seconds: float = 5.0
    announce: Callable[[int, BaseException], None] = _announce

    def __post_init__(self) -> None:
        if self.attempts is None and self.seconds is None:
            raise ValueError("a retry needs a bound: attempts, seconds or both")

    def delay(self, attempt: int) -> float:
        return min(self.max_seconds, self.initial_seconds * 2.0 ** (attempt - 1))

    def used_up(self, attempts: int, elapsed: float) -> bool:
        return (self.attempts is not None and attempts >= self.attempts) or (
            self.seconds is not None and elapsed >= self.seconds
        )


NO_RETRY = Retry()


def _requeue_exhausted(item: Item[Any, Any], outcome: Outcome[R]) -> Outcome[R]:
    return Outcome.requeue("requeued", outcome.reason, error=outcome.error)


@dataclass(frozen=True)
class Policy(Generic[M, D, R]):
    """What exceptions become: the consumer's acknowledgement policy for what its handler (or
    its decoder) raises.

    `failed(item, error)` gives the outcome of a message whose decoding or handling raised an
    error that is not transient (it may re-raise it, to let it escape the pipeline);
    `exhausted(item, outcome)` the outcome of a message still to be retried when `retry` is
    used up (a requeue by default).
    """

    failed: Callable[[Item[M, D], Exception], Outcome[R]]
    retry: Retry = NO_RETRY
    exhausted: Callable[[Item[M, D], Outcome[R]], Outcome[R]] = _requeue_exhausted


Handler = Callable[[Sequence[Item[M, D]]], Awaitable[Sequence[Outcome[R]]]]
Settler = Callable[[Item[M, D], Outcome[R]], Awaitable[Outcome[R]]]
Gate = Callable[[Sequence[Item[M, D]]], AbstractAsyncContextManager[Sequence[Outcome[R] | None]]]
"""Entered with the decoded messages before they are handled, left after they are settled;
yields, for each message, `None` to let it through or the outcome it gets instead."""


def _no_fields(message: object, value: object) -> Mapping[str, Any]:
    return {}


def _no_span(message: object, value: object) -> SpanSpec | None:
    return None


def _no_attributes(outcome: object) -> Mapping[str, tracing.AttributeValue | None]:
    return {}


@dataclass
class _Slot(Generic[M, D, R]):
    item: Item[M, D]
    outcome: Outcome[R] | None = None

    @property
    def decided(self) -> Outcome[R]:
        if self.outcome is None:
            raise LookupError("no outcome yet")
        return self.outcome


class Pipeline(Generic[M, D, R]):
    """Runs batches of messages through the stages (see the module's docstring).

    `log_fields(message, value)` and `span(message, value)` are asked once before decoding
    (`value` is None) and once after; `span_outcome(outcome)` gives the span's attributes for
    an outcome; `record(item, outcome, seconds)` counts a settled message.
    """

    def __init__(
        self,
        *,
        decode: Callable[[M], D],
        handle: Handler[M, D, R],
        settle: Settler[M, D, R],
        policy: Policy[M, D, R],
        log_fields: Callable[[M, D | None], Mapping[str, Any]] = _no_fields,
        span: Callable[[M, D | None], SpanSpec | None] = _no_span,
        span_outcome: Callable[
            [Outcome[R]], Mapping[str, tracing.AttributeValue | None]
        ] = _no_attributes,
        record: Callable[[Item[M, D], Outcome[R], float], None] | None = None,
        gate: Gate[M, D, R] | None = None,
    ) -> None:
        self._decode = decode
        self._handler = handle
        self._settle = settle
        self._policy = policy
        self._log_fields = log_fields
        self._span = span
        self._span_outcome = span_outcome
        self._record = record
        self._gate = gate

    async def run(self, messages: Sequence[M]) -> list[Outcome[R]]:
        """Take `messages` through every stage; returns their settled outcomes, in order.

        What escapes (a policy that re-raises, a settlement the transport refused) leaves the
        messages not yet settled unsettled.
        """
        slots: list[_Slot[M, D, R]] = []
        try:
            # Nothing is awaited before the gate: see stage 1.
            for message in messages:
                slot = self._receive(message)
                slots.append(slot)
                self._decode_into(slot)
            decoded = [slot for slot in slots if slot.outcome is None]
            if self._gate is None or not decoded:
                await self._handle_and_settle(slots, decoded)
            else:
                async with self._gate([slot.item for slot in decoded]) as admissions:
                    for slot, admission in zip(decoded, admissions, strict=True):
                        slot.outcome = admission
                    admitted = [slot for slot in decoded if slot.outcome is None]
                    await self._handle_and_settle(slots, admitted)
        finally:
            for slot in slots:
                slot.item.end()
        return [slot.decided for slot in slots]

    def _receive(self, message: M) -> _Slot[M, D, R]:
        item: Item[M, D] = Item(message)
        item.fields = dict(self._log_fields(message, None))
        spec = self._span(message, None)
        if spec is not None:
            item.name_span(spec, start=True)
        item.started = time.perf_counter()
        return _Slot(item)

    def _decode_into(self, slot: _Slot[M, D, R]) -> None:
        item = slot.item
        with item.scope():
            try:
                value = self._decode(item.message)
            except Decided as decided:
                if decided.fields is not None:
                    item.bind(decided.fields)
                slot.outcome = decided.outcome
                return
            except Exception as error:  # noqa: BLE001 - the policy decides what it becomes
                slot.outcome = self._policy.failed(item, error)
                return
            item.decoded = value
            item.bind(self._log_fields(item.message, value))
            spec = self._span(item.message, value)
            if spec is not None:
                item.name_span(spec, start=False)

    async def _handle_and_settle(
        self, slots: list[_Slot[M, D, R]], admitted: list[_Slot[M, D, R]]
    ) -> None:
        for slot in admitted:
            slot.item.start_span()
        if len(admitted) == 1:
            # A batch of one is handled as that message's: its logs and spans belong to it.
            with admitted[0].item.scope():
                await self._handle(admitted)
        elif admitted:
            await self._handle(admitted)
        for slot in slots:
            await self._settle_one(slot)

    async def _handle(self, slots: list[_Slot[M, D, R]]) -> None:
        retry = self._policy.retry
        begun = time.monotonic()
        attempts = 0
        pending = slots
        while True:
            attempts += 1
            await self._attempt(pending)
            pending = [slot for slot in pending if slot.decided.verdict is Verdict.RETRY]
            if not pending:
                return
            if retry.used_up(attempts, time.monotonic() - begun):
                for slot in pending:
                    with slot.item.scope():
                        slot.outcome = self._policy.exhausted(slot.item, slot.decided)
                return
            error = pending[0].decided.error
            retry.announce(attempts, error if error is not None else RuntimeError("retry"))
            await asyncio.sleep(retry.delay(attempts))

    async def _attempt(self, slots: list[_Slot[M, D, R]]) -> None:
        try:
            outcomes = await self._handler([slot.item for slot in slots])
        except Exception as error:  # noqa: BLE001 - the policy decides what it becomes
            for slot in slots:
                slot.outcome = self._contain(slot.item, error)
            return
        if len(outcomes) != len(slots):
            raise ValueError(f"the handler gave {len(outcomes)} outcomes for {len(slots)} messages")
        for slot, outcome in zip(slots, outcomes, strict=True):
            slot.outcome = outcome

    def _contain(self, item: Item[M, D], error: Exception) -> Outcome[R]:
        if isinstance(error, self._policy.retry.transient):
            return Outcome.retry(error)
        with item.scope():
            return self._policy.failed(item, error)

    async def _settle_one(self, slot: _Slot[M, D, R]) -> None:
        item, outcome = slot.item, slot.decided
        with item.scope():
            if outcome.verdict is Verdict.REQUEUE and outcome.error is not None:
                # It comes again because its handling failed this time: the trace says so.
                item.span.fail(outcome.error)
            item.span.set_all(self._span_outcome(outcome))
            settled = await self._settle(item, outcome)
            if settled is not outcome:
                item.span.set_all(self._span_outcome(settled))
            slot.outcome = settled
            if self._record is not None:
                self._record(item, settled, time.perf_counter() - item.started)


async def settled_elsewhere(item: Item[Any, Any], outcome: Outcome[R]) -> Outcome[R]:
    """A settler for a source settled per batch by its caller (a subscription's checkpoint)."""
    return outcome
