"""Handling one command: idempotency check, load, decide, append, with bounded retries."""

from __future__ import annotations

from typing import Protocol, TypeVar
from uuid import UUID

import structlog

from command_service.model.aggregate import Aggregate, DomainError
from command_service.model.authorization import FORBIDDEN, Actor, AuthorizationPolicy
from command_service.service_layer.event_store import (
    ConcurrencyError,
    DuplicateCommandError,
    EventStore,
    NewEvent,
    WrongAggregateTypeError,
)
from command_service.service_layer.registry import CommandRegistry, ParsedCommand
from command_service.service_layer.repository import AggregateRepository
from cqrs_runtime import tracing
from shared.messages import CommandEnvelope, Reply, ReplyError

log = structlog.get_logger(__name__)

A = TypeVar("A", bound=Aggregate)


class HandleCommand(Protocol):
    """`handle_command` with its dependencies bound, as the entrypoints receive it."""

    async def __call__(
        self, command: ParsedCommand | CommandEnvelope, *, actor: Actor, internal: bool = False
    ) -> Reply: ...


def _as_duplicate(reply: Reply) -> Reply:
    return reply.model_copy(update={"status": "duplicate"})


async def handle_command(
    command: ParsedCommand | CommandEnvelope,
    *,
    store: EventStore,
    actor: Actor,
    registry: CommandRegistry,
    concurrency_retries: int,
    internal: bool = False,
    snapshot_every: int = 0,
    authorize: AuthorizationPolicy | None = None,
) -> Reply:
    """Decide the command against the aggregate's current state and store the outcome.

    `actor` is who sends it; its name is stored with every event the command appends (`user`
    in the events' metadata). `authorize`, the domain's policy, is asked after the aggregate
    is loaded and before it decides; a refusal is a rejection (`forbidden`), stored like any.

    A command id seen before gets its stored reply with status `duplicate` and appends nothing.
    Process managers' commands (`internal`) are recorded apart from clients' (the event store's
    key spaces), so a client command sent under a step's id never makes the step a duplicate.
    A command whose aggregate id names a stream of another aggregate type is rejected with
    `wrong_aggregate_type`. A lost race is retried against fresh state unless the command named
    `expected_version`.

    The consumers hand it the command parsed (`CommandRegistry.parse`), so a payload is parsed
    once; an envelope is parsed here, and then raises `UnknownCommandError` or
    `pydantic.ValidationError` for a command it cannot parse.
    """
    parsed = (
        command
        if isinstance(command, ParsedCommand)
        else registry.parse(command, internal=internal)
    )
    envelope, aggregate_class = parsed.envelope, parsed.aggregate
    stored = await store.find_reply(envelope.command_id, internal=internal)
    if stored is not None:
        return _as_duplicate(stored)
    repository = AggregateRepository(store, registry, snapshot_every)

    async def load(other_class: type[A], other_id: UUID) -> A | None:
        """Another aggregate for the policy, read-only: None when none of that type exists."""
        try:
            found = await repository.load(other_class, other_id)
        except WrongAggregateTypeError:
            return None
        return found if found.version > 0 else None

    for attempt in range(concurrency_retries + 1):
        try:
            aggregate = await repository.load(aggregate_class, envelope.aggregate_id)
        except WrongAggregateTypeError as e:
            return await _reject(envelope, store, "wrong_aggregate_type", str(e), internal)
        if authorize is not None:
            try:
                await authorize(actor, parsed.command, aggregate, load)
            except DomainError as e:
                if e.code == FORBIDDEN:
                    log.info("command_forbidden", user=actor.name, reason=e.message)
                return await _reject(envelope, store, e.code, e.message, internal)
        if envelope.expected_version is not None and envelope.expected_version != aggregate.version:
            return await _reject(
                envelope,
                store,
                "concurrency_conflict",
                f"expected version {envelope.expected_version}, "
                f"aggregate is at {aggregate.version}",
                internal,
            )
        try:
            events = aggregate.decide(parsed.command)
        except DomainError as e:
            return await _reject(envelope, store, e.code, e.message, internal)
        if not events:
            return await _reject(
                envelope, store, "no_change", "the command changes nothing", internal
            )
        try:
            reply = await store.append(
                stream_id=envelope.aggregate_id,
                aggregate_type=aggregate_class.aggregate_type,
                expected_version=aggregate.version,
                events=[NewEvent.from_event(event) for event in events],
                command_id=envelope.command_id,
                correlation_id=envelope.metadata.correlation_id,
                user=actor.name,
                traceparent=tracing.current_traceparent(),
                internal=internal,
            )
            await repository.appended(aggregate, events)
            return reply
        except DuplicateCommandError as e:
            return _as_duplicate(e.reply)
        except WrongAggregateTypeError as e:
            # The store's refusal, e.g. another type's first append won a race since the load.
            return await _reject(envelope, store, "wrong_aggregate_type", str(e), internal)
        except ConcurrencyError:
            log.info("append_conflict", attempt=attempt, aggregate_id=str(envelope.aggregate_id))
            if envelope.expected_version is not None:
                break
    # Not stored: losing races is no decision about the command, so a resend may succeed.
    return _rejection(
        envelope,
        "concurrency_conflict",
        f"aggregate {envelope.aggregate_id} kept changing; gave up after "
        f"{concurrency_retries + 1} attempts",
    )


def _rejection(envelope: CommandEnvelope, code: str, message: str) -> Reply:
    return Reply(
        command_id=envelope.command_id,
        status="rejected",
        aggregate_id=envelope.aggregate_id,
        error=ReplyError(code=code, message=message),
    )


async def _reject(
    envelope: CommandEnvelope, store: EventStore, code: str, message: str, internal: bool
) -> Reply:
    reply = _rejection(envelope, code, message)
    stored = await store.record_rejection(reply, internal=internal)
    return stored if stored == reply else _as_duplicate(stored)
