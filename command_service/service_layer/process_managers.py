"""Runs a process manager as a subscription to the event store.

Each reaction's commands are handled in-process through the same `handle_command` as commands
from the broker, with deterministic command ids, so re-running a batch after a crash or a
leadership change appends nothing twice. They act as `process:<name>` (the events they append
name it as their `user`), which the domain's policy sees as a process, not a login. A step is
built typed by the process manager, so it is handed on as it is, never parsed again.

The events of a page that it reacts to go through the consumer pipeline
(`cqrs_runtime.pipeline`) as one batch, in position order: each decoded into the domain event
and reacted to in a `react <EventType>` span that continues the trace of the command that caused
it. The steps of all the reactions are handled together through the batch use case
(`handle_commands`: one transaction), in the reactions' order; the steps a rejection calls for
(`on_rejected`) make the next round. A batch that cannot be stored as one (another writer came
first, a step whose handling raises) is handled one step at a time with `handle_command`. A
step that keeps losing races requeues the page: it is run again later (the subscription stores
no checkpoint for it; the steps done already answer as duplicates); any other error escapes to
the subscription, which tries the page again after a backoff.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog

from command_service.model.authorization import Actor
from command_service.model.process import IssuedCommand, ProcessManager
from command_service.service_layer.event_store import (
    EventStoreUnavailableError,
    RetryLaterError,
    StoredEvent,
)
from command_service.service_layer.handlers import BatchCommand, HandleCommand, HandleCommands
from command_service.service_layer.registry import CommandRegistry, ParsedCommand
from cqrs_runtime import tracing
from cqrs_runtime.pipeline import (
    Item,
    Outcome,
    Pipeline,
    Policy,
    SpanSpec,
    Verdict,
    settled_elsewhere,
)
from shared.messages import CommandEnvelope, CommandMetadata, Event, Reply

log = structlog.get_logger(__name__)

Reaction = Item[StoredEvent, Event]


@dataclass
class _Step:
    """A step to issue: its command, and the reaction and span it belongs to."""

    issued: IssuedCommand
    command: ParsedCommand
    reaction: Reaction
    span: tracing.SpanHandle

    @property
    def envelope(self) -> CommandEnvelope:
        return self.command.envelope

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The step's context: its reaction's, with the step's ids bound and its span current."""
        envelope = self.envelope
        with (
            self.reaction.scope(),
            structlog.contextvars.bound_contextvars(
                correlation_id=envelope.metadata.correlation_id,
                causation_id=envelope.metadata.causation_id,
                command_id=str(envelope.command_id),
                command_type=envelope.type,
                aggregate_id=str(envelope.aggregate_id),
            ),
            self.span.current(),
        ):
            yield


class ProcessManagerRunner:
    """The batch handler of a process manager's subscription."""

    def __init__(
        self,
        process: ProcessManager,
        *,
        handle: HandleCommand,
        registry: CommandRegistry,
        handle_batch: HandleCommands | None = None,
    ) -> None:
        self.process = process
        self._handle_command = handle
        self._handle_batch = handle_batch
        self._registry = registry
        self._event_types = {event.type_name() for event in process.events}
        self.actor = Actor.process(process.name)
        self.issued = 0
        self._pipeline: Pipeline[StoredEvent, Event, None] = Pipeline(
            decode=self._decode,
            span=self._span,
            handle=self._react,
            policy=Policy(failed=_retry_later),
            # The subscription stores its checkpoint once the whole batch went through.
            settle=settled_elsewhere,
        )

    async def __call__(self, events: list[StoredEvent]) -> None:
        # Every event passes by; most are not this process manager's.
        mine = [stored for stored in events if stored.type in self._event_types]
        if not mine:
            return
        for outcome in await self._pipeline.run(mine):
            if outcome.verdict is Verdict.REQUEUE:
                # Lost races are not a decision: run this batch again later.
                raise outcome.error or RetryLaterError(outcome.reason)

    def _decode(self, stored: StoredEvent) -> Event:
        return self._registry.event_from_stored(stored.type, stored.schema_version, stored.data)

    def _span(self, stored: StoredEvent, event: Event | None) -> SpanSpec | None:
        if event is None:
            return None
        # The commands continue the trace of the command that caused the event, so the
        # events they append carry it on to the projector.
        return SpanSpec(
            f"react {stored.type}",
            parent=tracing.extract(stored.metadata),
            attributes={
                "cqrs.process": self.process.name,
                "cqrs.event_id": str(stored.event_id),
                "cqrs.aggregate_id": str(stored.stream_id),
            },
        )

    async def _react(self, batch: Sequence[Reaction]) -> list[Outcome[None]]:
        steps: list[_Step] = []
        for reaction in batch:
            with reaction.scope():
                stored = reaction.message
                metadata = CommandMetadata(
                    correlation_id=stored.metadata.get("correlation_id"),
                    causation_id=str(stored.event_id),
                    user=self.actor.name,
                )
                steps.extend(
                    self._step(issued, metadata, reaction)
                    for issued in self.process.react(reaction.value, stored.stream_id)
                )
        while steps:  # a round: these steps, then the ones their rejections call for
            replies = await self._issue(steps)
            conflicting: list[str] = []
            following: list[_Step] = []
            for step, reply in zip(steps, replies, strict=True):
                if reply.error is None:
                    continue
                if reply.error.code == "concurrency_conflict":
                    conflicting.append(f"{step.envelope.type} on {step.envelope.aggregate_id}")
                elif step.issued.on_rejected is not None:
                    metadata = step.envelope.metadata
                    following.extend(
                        self._step(next_step, metadata, step.reaction)
                        for next_step in step.issued.on_rejected(reply.error)
                    )
            if conflicting:
                raise RetryLaterError(f"{', '.join(conflicting)} kept conflicting")
            steps = following
        return [Outcome.ack("reacted") for _ in batch]

    def _step(self, issued: IssuedCommand, metadata: CommandMetadata, reaction: Reaction) -> _Step:
        envelope = CommandEnvelope(
            command_id=issued.command_id,
            type=issued.command.type_name(),
            aggregate_id=issued.aggregate_id,
            payload=issued.command.model_dump(mode="json"),
            metadata=metadata,
        )
        with reaction.scope():
            span = tracing.start_span(
                f"command {envelope.type}",
                attributes={
                    "cqrs.command_id": str(envelope.command_id),
                    "cqrs.command_type": envelope.type,
                    "cqrs.aggregate_id": str(envelope.aggregate_id),
                },
            )
        command = self._registry.resolve(envelope, issued.command, internal=True)
        return _Step(issued, command, reaction, span)

    async def _issue(self, steps: list[_Step]) -> list[Reply]:
        """Handle a round of steps, together when there are several; one reply each."""
        try:
            replies = await self._issue_batch(steps)
            if replies is None:
                replies = [await self._issue_one(step) for step in steps]
        except BaseException as error:
            for step in steps:
                step.span.fail(error)
                step.span.end()
            raise
        for step, reply in zip(steps, replies, strict=True):
            with step.scope():
                step.span.set("cqrs.outcome", reply.status)
                log.debug(
                    "process_step",
                    process=self.process.name,
                    status=reply.status,
                    version=reply.version,
                    error_code=reply.error.code if reply.error else None,
                )
            step.span.end()
        self.issued += len(steps)
        return replies

    async def _issue_batch(self, steps: list[_Step]) -> list[Reply] | None:
        """The steps in one transaction; None when they must go one at a time."""
        if len(steps) < 2 or self._handle_batch is None:
            return None
        try:
            return await self._handle_batch(
                [BatchCommand(step.command, self.actor, scope=step.scope) for step in steps],
                internal=True,
            )
        except EventStoreUnavailableError:
            raise
        except Exception as e:  # noqa: BLE001 - nothing was stored: one at a time
            log.info("process_steps_split", process=self.process.name, error=repr(e))
            return None

    async def _issue_one(self, step: _Step) -> Reply:
        with step.scope():
            return await self._handle_command(step.command, actor=self.actor, internal=True)


def _retry_later(reaction: Reaction, error: Exception) -> Outcome[None]:
    """A step that kept losing races requeues its event; any other error escapes."""
    if isinstance(error, RetryLaterError):
        return Outcome.requeue("retry_later", str(error), error=error)
    raise error
