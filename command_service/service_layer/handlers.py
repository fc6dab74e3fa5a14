"""Handling commands: idempotency check, load, decide, append; one command with bounded
retries (`handle_command`), or a batch in one transaction (`handle_commands`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from uuid import UUID

import structlog

from command_service.model.aggregate import Aggregate, DomainError
from command_service.model.authorization import (
    FORBIDDEN,
    Actor,
    AggregateLoader,
    AuthorizationPolicy,
)
from command_service.service_layer.event_store import (
    Appending,
    BatchWrite,
    ConcurrencyError,
    DuplicateCommandError,
    EventStore,
    NewEvent,
    WrongAggregateTypeError,
)
from command_service.service_layer.registry import CommandRegistry, ParsedCommand
from command_service.service_layer.repository import AggregateRepository, LoadedStream
from cqrs_runtime import tracing
from shared.messages import CommandEnvelope, Event, Reply, ReplyError

log = structlog.get_logger(__name__)

A = TypeVar("A", bound=Aggregate)


class HandleCommand(Protocol):
    """`handle_command` with its dependencies bound, as the entrypoints receive it."""

    async def __call__(
        self, command: ParsedCommand | CommandEnvelope, *, actor: Actor, internal: bool = False
    ) -> Reply: ...


@dataclass(frozen=True)
class BatchCommand:
    """One command of a batch: the command parsed, who sends it, and `scope`, the context its
    work runs in (its log fields and span bound: the consumer pipeline's `Item.scope`)."""

    command: ParsedCommand
    actor: Actor
    scope: Callable[[], AbstractContextManager[None]] = field(default=contextlib.nullcontext)


class HandleCommands(Protocol):
    """`handle_commands` with its dependencies bound, as the entrypoints receive it."""

    async def __call__(
        self, commands: Sequence[BatchCommand], *, internal: bool = False
    ) -> list[Reply]: ...


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
        events = await _decide(parsed, aggregate, actor, authorize, load)
        if isinstance(events, Reply):
            return await _record(events, store, internal)
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


async def _decide(
    parsed: ParsedCommand,
    aggregate: Aggregate,
    actor: Actor,
    authorize: AuthorizationPolicy | None,
    load: AggregateLoader,
) -> Sequence[Event] | Reply:
    """The command's events, or its rejection: the policy (`load` reads other aggregates for
    it), `expected_version`, then the aggregate's decision; one command or a batch alike."""
    envelope = parsed.envelope
    if authorize is not None:
        try:
            await authorize(actor, parsed.command, aggregate, load)
        except DomainError as e:
            if e.code == FORBIDDEN:
                log.info("command_forbidden", user=actor.name, reason=e.message)
            return _rejection(envelope, e.code, e.message)
    if envelope.expected_version is not None and envelope.expected_version != aggregate.version:
        return _rejection(
            envelope,
            "concurrency_conflict",
            f"expected version {envelope.expected_version}, aggregate is at {aggregate.version}",
        )
    try:
        events = aggregate.decide(parsed.command)
    except DomainError as e:
        return _rejection(envelope, e.code, e.message)
    if not events:
        return _rejection(envelope, "no_change", "the command changes nothing")
    return events


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
    return await _record(_rejection(envelope, code, message), store, internal)


async def _record(reply: Reply, store: EventStore, internal: bool) -> Reply:
    stored = await store.record_rejection(reply, internal=internal)
    return stored if stored == reply else _as_duplicate(stored)


async def handle_commands(
    commands: Sequence[BatchCommand],
    *,
    store: EventStore,
    registry: CommandRegistry,
    internal: bool = False,
    snapshot_every: int = 0,
    authorize: AuthorizationPolicy | None = None,
) -> list[Reply]:
    """Decide a batch of commands in order and store all their outcomes in one transaction;
    one reply each, in order, as `handle_command` would have given them one after the other.

    The batch's stored replies are looked up in one round trip, its aggregates' snapshots and
    streams in one each. Commands for one aggregate are decided one after the other on its
    state in memory (a command sees the events of those before it in the batch). Then one
    transaction appends every accepted command's events (positions in batch order), records
    every command and rejection, and notifies the relay once. A command id seen before, or
    earlier in the batch, is a `duplicate` of its stored reply, as is a rejection whose command
    id another writer recorded meanwhile.

    Raises `EventStoreUnavailableError` when the store is away; any other error (another writer
    came first: `ConcurrencyError`, `WrongAggregateTypeError`; a decision that raised) means
    nothing of the batch was stored, and the caller handles its commands one at a time with
    `handle_command` (which retries lost races, and contains a failing command on its own).
    """
    stored = await store.find_replies(
        list({c.command.envelope.command_id: None for c in commands}), internal=internal
    )
    first_of: dict[UUID, int] = {}  # a command id's first place in the batch
    deciding: list[int] = []
    wanted: dict[UUID, type[Aggregate]] = {}
    for index, item in enumerate(commands):
        envelope = item.command.envelope
        if envelope.command_id in stored or envelope.command_id in first_of:
            continue
        first_of[envelope.command_id] = index
        deciding.append(index)
        wanted.setdefault(envelope.aggregate_id, item.command.aggregate)
    repository = AggregateRepository(store, registry, snapshot_every)
    loaded = await repository.load_many(wanted) if wanted else {}
    batch = _BatchState(repository, loaded)
    writes: list[BatchWrite] = []
    for index in deciding:
        item = commands[index]
        with item.scope():
            writes.append(await batch.decide(item, authorize))
    results = await store.append_batch(writes, internal=internal) if writes else []
    outcome: dict[UUID, Reply] = {}
    for write, result in zip(writes, results, strict=True):
        if isinstance(write, Appending):
            outcome[write.command_id] = result
        else:
            outcome[write.command_id] = result if result == write else _as_duplicate(result)
    replies: list[Reply] = []
    for index, item in enumerate(commands):
        command_id = item.command.envelope.command_id
        if command_id in stored:
            replies.append(_as_duplicate(stored[command_id]))
        elif first_of[command_id] != index:
            replies.append(_as_duplicate(outcome[command_id]))
        else:
            replies.append(outcome[command_id])
    await batch.snapshot()
    return replies


class _BatchState:
    """The aggregates of a batch in memory, as its decisions leave them."""

    def __init__(self, repository: AggregateRepository, loaded: dict[UUID, LoadedStream]) -> None:
        self._repository = repository
        self._loaded = loaded
        self._types = {stream: s.recorded_type for stream, s in loaded.items()}
        self._aggregates: dict[tuple[UUID, type[Aggregate]], Aggregate] = {}
        self._loaded_at: dict[tuple[UUID, type[Aggregate]], int] = {}

    def aggregate(self, aggregate_class: type[A], aggregate_id: UUID) -> A:
        """The aggregate as the batch's decisions so far leave it; raises
        `WrongAggregateTypeError` when its stream is another type's (also one opened earlier
        in the batch)."""
        recorded = self._types.get(aggregate_id)
        wanted = aggregate_class.aggregate_type
        if recorded is not None and recorded != wanted:
            raise WrongAggregateTypeError(aggregate_id, wanted, recorded)
        key = (aggregate_id, aggregate_class)
        found = self._aggregates.get(key)
        if found is None:
            found = self._repository.rebuild(aggregate_class, self._loaded[aggregate_id])
            self._aggregates[key] = found
            self._loaded_at[key] = found.version
        assert isinstance(found, aggregate_class)
        return found

    async def load(self, other_class: type[A], other_id: UUID) -> A | None:
        """Another aggregate for the policy, read-only: None when none of that type exists;
        as the batch leaves it when the batch holds it."""
        try:
            if other_id in self._loaded:
                found = self.aggregate(other_class, other_id)
            else:
                found = await self._repository.load(other_class, other_id)
        except WrongAggregateTypeError:
            return None
        return found if found.version > 0 else None

    async def decide(self, item: BatchCommand, authorize: AuthorizationPolicy | None) -> BatchWrite:
        """What the batch stores for one command: its events or its rejection; the aggregate
        in memory takes the events."""
        parsed, actor = item.command, item.actor
        envelope, aggregate_class = parsed.envelope, parsed.aggregate
        try:
            aggregate = self.aggregate(aggregate_class, envelope.aggregate_id)
        except WrongAggregateTypeError as e:
            return _rejection(envelope, "wrong_aggregate_type", str(e))
        events = await _decide(parsed, aggregate, actor, authorize, self.load)
        if isinstance(events, Reply):
            return events
        append = Appending(
            stream_id=envelope.aggregate_id,
            aggregate_type=aggregate_class.aggregate_type,
            expected_version=aggregate.version,
            events=[NewEvent.from_event(event) for event in events],
            command_id=envelope.command_id,
            correlation_id=envelope.metadata.correlation_id,
            user=actor.name,
            traceparent=tracing.current_traceparent(),
        )
        for event in events:
            aggregate.apply(event)
            aggregate.version += 1
        self._types[envelope.aggregate_id] = aggregate_class.aggregate_type
        return append

    async def snapshot(self) -> None:
        """After the commit: snapshot the aggregates whose new events crossed the interval."""
        for key, aggregate in self._aggregates.items():
            await self._repository.advanced(aggregate, self._loaded_at[key])
