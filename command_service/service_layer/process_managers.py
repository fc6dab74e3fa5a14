"""Runs a process manager as a subscription to the event store.

Each reaction's commands are handled in-process through the same `handle_command` as commands
from the broker, with deterministic command ids, so re-running a batch after a crash or a
leadership change appends nothing twice. They act as `process:<name>` (the events they append
name it as their `user`), which the domain's policy sees as a process, not a login. A step is
built typed by the process manager, so it is handed on as it is, never parsed again.

Each event of a type it reacts to goes through the consumer pipeline (`cqrs_runtime.pipeline`),
one at a time and in position order: decoded into the domain event, handled in a
`react <EventType>` span that continues the trace of the command that caused it. A step that
keeps losing races requeues its event: the reaction and those after it are run again later
(the subscription stores no checkpoint for the batch); any other error escapes to the
subscription, which tries the batch again after a backoff.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from command_service.model.authorization import Actor
from command_service.model.process import IssuedCommand, ProcessManager
from command_service.service_layer.event_store import RetryLaterError, StoredEvent
from command_service.service_layer.handlers import HandleCommand
from command_service.service_layer.registry import CommandRegistry
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
from shared.messages import CommandEnvelope, CommandMetadata, Event

log = structlog.get_logger(__name__)

Reaction = Item[StoredEvent, Event]


class ProcessManagerRunner:
    """The batch handler of a process manager's subscription."""

    def __init__(
        self,
        process: ProcessManager,
        *,
        handle: HandleCommand,
        registry: CommandRegistry,
    ) -> None:
        self.process = process
        self._handle_command = handle
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
        for stored in events:
            if stored.type not in self._event_types:
                continue  # every event passes by; most are not this process manager's
            [outcome] = await self._pipeline.run([stored])
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
        for reaction in batch:
            with reaction.scope():
                stored = reaction.message
                metadata = CommandMetadata(
                    correlation_id=stored.metadata.get("correlation_id"),
                    causation_id=str(stored.event_id),
                    user=self.actor.name,
                )
                for step in self.process.react(reaction.value, stored.stream_id):
                    await self._issue(step, metadata)
        return [Outcome.ack("reacted") for _ in batch]

    async def _issue(self, step: IssuedCommand, metadata: CommandMetadata) -> None:
        envelope = CommandEnvelope(
            command_id=step.command_id,
            type=step.command.type_name(),
            aggregate_id=step.aggregate_id,
            payload=step.command.model_dump(mode="json"),
            metadata=metadata,
        )
        command = self._registry.resolve(envelope, step.command, internal=True)
        with (
            structlog.contextvars.bound_contextvars(
                correlation_id=metadata.correlation_id,
                causation_id=metadata.causation_id,
                command_id=str(envelope.command_id),
                command_type=envelope.type,
                aggregate_id=str(envelope.aggregate_id),
            ),
            tracing.span(
                f"command {envelope.type}",
                attributes={
                    "cqrs.command_id": str(envelope.command_id),
                    "cqrs.command_type": envelope.type,
                    "cqrs.aggregate_id": str(envelope.aggregate_id),
                },
            ) as span,
        ):
            reply = await self._handle_command(command, actor=self.actor, internal=True)
            span.set("cqrs.outcome", reply.status)
            log.debug(
                "process_step",
                process=self.process.name,
                status=reply.status,
                version=reply.version,
                error_code=reply.error.code if reply.error else None,
            )
        self.issued += 1
        if reply.error is None:
            return
        if reply.error.code == "concurrency_conflict":
            raise RetryLaterError(f"{envelope.type} on {envelope.aggregate_id} kept conflicting")
        if step.on_rejected is not None:
            for next_step in step.on_rejected(reply.error):
                await self._issue(next_step, metadata)


def _retry_later(reaction: Reaction, error: Exception) -> Outcome[None]:
    """A step that kept losing races requeues its event; any other error escapes."""
    if isinstance(error, RetryLaterError):
        return Outcome.requeue("retry_later", str(error), error=error)
    raise error
