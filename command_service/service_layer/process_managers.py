"""Runs a process manager as a subscription to the event store.

Each reaction's commands are handled in-process through the same `handle_command` as commands
from the broker, with deterministic command ids, so re-running a batch after a crash or a
leadership change appends nothing twice. They act as `process:<name>` (the events they append
name it as their `user`), which the domain's policy sees as a process, not a login.
"""

from __future__ import annotations

import structlog

from command_service.model.authorization import Actor
from command_service.model.process import IssuedCommand, ProcessManager
from command_service.service_layer.event_store import RetryLaterError, StoredEvent
from command_service.service_layer.handlers import HandleCommand
from command_service.service_layer.registry import CommandRegistry
from cqrs_runtime import tracing
from shared.messages import CommandEnvelope, CommandMetadata

log = structlog.get_logger(__name__)


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

    async def __call__(self, events: list[StoredEvent]) -> None:
        for stored in events:
            if stored.type not in self._event_types:
                continue
            event = self._registry.event_from_stored(
                stored.type, stored.schema_version, stored.data
            )
            metadata = CommandMetadata(
                correlation_id=stored.metadata.get("correlation_id"),
                causation_id=str(stored.event_id),
                user=self.actor.name,
            )
            # The commands continue the trace of the command that caused the event, so the
            # events they append carry it on to the projector.
            with tracing.span(
                f"react {stored.type}",
                parent=tracing.extract(stored.metadata),
                attributes={
                    "cqrs.process": self.process.name,
                    "cqrs.event_id": str(stored.event_id),
                    "cqrs.aggregate_id": str(stored.stream_id),
                },
            ):
                for step in self.process.react(event, stored.stream_id):
                    await self._issue(step, metadata)

    async def _issue(self, step: IssuedCommand, metadata: CommandMetadata) -> None:
        envelope = CommandEnvelope(
            command_id=step.command_id,
            type=step.command.type_name(),
            aggregate_id=step.aggregate_id,
            payload=step.command.model_dump(mode="json"),
            metadata=metadata,
        )
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
            reply = await self._handle_command(envelope, actor=self.actor, internal=True)
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
            # Lost races are not a decision: run this batch again later.
            raise RetryLaterError(f"{envelope.type} on {envelope.aggregate_id} kept conflicting")
        if step.on_rejected is not None:
            for next_step in step.on_rejected(reply.error):
                await self._issue(next_step, metadata)
