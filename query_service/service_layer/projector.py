"""Project events: hand each to every projection that wants it, wait out short gaps, checkpoint.

One event (`project`) or a batch (`project_batch`): a batch is written per projection in few
round trips (see `ManyProjection`) and checkpointed once per projection, with the outcome of
each event what projecting them one by one gives.

The outcome says what the consumer should do with the message: `Projected` (ack) or `Rejected`
(park with the reason). Transient driver errors propagate so the consumer can retry or requeue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from query_service.projections.base import (
    Applied,
    ApplyResult,
    ApplyStatus,
    CheckpointStore,
    InvalidEvent,
    ManyProjection,
    Projection,
)
from query_service.projections.store import TRANSIENT_ERRORS
from shared.messages import EventEnvelope

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GapPolicy:
    """How long an event ahead of a gap waits for the missing one before it is parked.

    The missing event may still be in flight on another path (another partition during a
    rebalance, a requeue), so a few short waits are worth it; a real gap is for a human or a replay.
    """

    attempts: int = 5
    delay_seconds: float = 0.2


@dataclass(frozen=True)
class Projected:
    """Every projection that handles the event has it now (applied now or before)."""

    applied: tuple[str, ...]
    duplicates: tuple[str, ...]


@dataclass(frozen=True)
class Rejected:
    """The event cannot be applied; it must be parked with `reason`."""

    reason: str


Outcome = Projected | Rejected

DEFAULT_GAP_POLICY = GapPolicy()


@dataclass(frozen=True)
class Shadow:
    """The next generation of a read model that a rebuild is filling, written alongside.

    It may be behind the live stream (the replay has not reached an aggregate yet): an event it
    cannot take yet is skipped, not waited for nor parked, and `on_skip` is told its position so
    the rebuild knows it must replay at least that far.
    """

    projection: Projection
    on_skip: Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Targets:
    """Where one event goes: the current generations, and the ones being rebuilt."""

    live: Sequence[Projection]
    shadows: Sequence[Shadow] = ()


async def project(
    envelope: EventEnvelope,
    *,
    projections: Sequence[Projection],
    checkpoints: CheckpointStore,
    gap_policy: GapPolicy = DEFAULT_GAP_POLICY,
    shadows: Sequence[Shadow] = (),
) -> Outcome:
    """Apply `envelope` to each projection that handles it, exactly once and in version order.

    Then to each shadow, whatever the live outcome: a shadow filled by a replay may well take an
    event the live generation has to park.
    """
    outcome = await _project_live(
        envelope, projections=projections, checkpoints=checkpoints, gap_policy=gap_policy
    )
    for shadow in shadows:
        await _project_shadow(envelope, shadow)
    return outcome


async def _project_shadow(envelope: EventEnvelope, shadow: Shadow) -> None:
    if not shadow.projection.handles(envelope):
        return
    try:
        result = await shadow.projection.apply(envelope)
    except InvalidEvent:
        return  # the live projection parks it; the replay skips it the same way
    if result.status is ApplyStatus.GAP:
        log.debug("event_skipped_for_rebuild", projection=shadow.projection.name)
        await shadow.on_skip(envelope.position)


async def _project_live(
    envelope: EventEnvelope,
    *,
    projections: Sequence[Projection],
    checkpoints: CheckpointStore,
    gap_policy: GapPolicy,
) -> Outcome:
    pending = [projection for projection in projections if projection.handles(envelope)]
    if not pending:
        # Not ours: the events exchange carries every aggregate's events, and a read model
        # subscribes to what it needs. A gap surfaces if a handled stream misses a version.
        return Projected(applied=(), duplicates=())

    applied: list[str] = []
    duplicates: list[str] = []
    gaps: dict[str, ApplyResult] = {}
    for attempt in range(1, gap_policy.attempts + 1):
        gapped: list[Projection] = []
        for projection in pending:
            try:
                result = await projection.apply(envelope)
            except InvalidEvent as e:
                return Rejected(f"invalid event for projection {projection.name}: {e}")
            if result.status is ApplyStatus.GAP:
                gapped.append(projection)
                gaps[projection.name] = result
                continue
            # Also on a duplicate: heals a checkpoint write lost between the view write and this.
            await checkpoints.advance(projection.name, envelope.position)
            if result.status is ApplyStatus.APPLIED:
                applied.append(projection.name)
            else:
                duplicates.append(projection.name)
        if not gapped:
            return Projected(applied=tuple(applied), duplicates=tuple(duplicates))
        pending = gapped
        if attempt < gap_policy.attempts:
            log.info(
                "event_waits_for_gap",
                projections=[projection.name for projection in gapped],
                attempt=attempt,
            )
            await asyncio.sleep(gap_policy.delay_seconds)

    return Rejected("; ".join(_gap_reason(name, gaps[name], envelope) for name in _names(pending)))


def _names(projections: Sequence[Projection]) -> list[str]:
    return [projection.name for projection in projections]


def _gap_reason(projection: str, result: ApplyResult, envelope: EventEnvelope) -> str:
    if result.stored_version is None:
        return (
            f"version gap in projection {projection}: aggregate {envelope.aggregate_id} is "
            f"unknown, event {envelope.type} has version {envelope.version}"
        )
    return (
        f"version gap in projection {projection}: aggregate {envelope.aggregate_id} is at version "
        f"{result.stored_version}, event {envelope.type} has version {envelope.version} "
        f"(expected {result.stored_version + 1})"
    )


class _Failed:
    """A projection raised an unexpected error on this event (a bug, a store refusal)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


async def _apply_each(
    work: Sequence[tuple[Projection, list[int]]], envelopes: Sequence[EventEnvelope]
) -> list[list[Applied | _Failed]]:
    """`_apply_all` of every projection at once (each with the events at its indexes).

    All of them finish before an error propagates, so that a batch tried again never races
    a write of its previous attempt.
    """
    outcomes = await asyncio.gather(
        *(_apply_all(projection, [envelopes[i] for i in indexes]) for projection, indexes in work),
        return_exceptions=True,
    )
    results: list[list[Applied | _Failed]] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results


async def _apply_all(
    projection: Projection, envelopes: Sequence[EventEnvelope]
) -> list[Applied | _Failed]:
    """Each event's result in `projection`: in one go where it can, else one by one.

    When the batch fails for an unexpected reason, the events are applied one by one (the
    version guard skips what the batch wrote), so the error stays with the events it belongs
    to and the others are applied. Transient errors propagate: the batch is tried again.
    """
    if isinstance(projection, ManyProjection) and len(envelopes) > 1:
        try:
            return list(await projection.apply_many(envelopes))
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - isolated per event below
            log.warning(
                "projection_batch_failed",
                projection=projection.name,
                events=len(envelopes),
                error=repr(e),
            )
    results: list[Applied | _Failed] = []
    for envelope in envelopes:
        try:
            results.append(await projection.apply(envelope))
        except InvalidEvent as e:
            results.append(e)
        except TRANSIENT_ERRORS:
            raise
        except Exception as e:  # the event is parked with it
            log.error(
                "projection_failed",
                projection=projection.name,
                event_id=str(envelope.event_id),
                position=envelope.position,
                exc_info=e,
            )
            results.append(_Failed(e))
    return results


def _failure_reason(error: Exception) -> str:
    return f"projection failed: {type(error).__name__}: {error}"


@dataclass
class _Event:
    """What is known of one event of a batch so far."""

    envelope: EventEnvelope
    applied: list[str]
    duplicates: list[str]
    rejected: str | None = None

    def reject(self, reason: str) -> None:
        if self.rejected is None:
            self.rejected = reason

    def outcome(self) -> Outcome:
        if self.rejected is not None:
            return Rejected(self.rejected)
        return Projected(applied=tuple(self.applied), duplicates=tuple(self.duplicates))


def _by_projection(
    targets: Sequence[Sequence[Projection]],
) -> list[tuple[Projection, list[int]]]:
    """Each projection with the indexes of the events it takes, in order."""
    groups: dict[int, tuple[Projection, list[int]]] = {}
    for index, projections in enumerate(targets):
        for projection in projections:
            groups.setdefault(id(projection), (projection, []))[1].append(index)
    return list(groups.values())


async def project_batch(
    envelopes: Sequence[EventEnvelope],
    targets: Sequence[Targets],
    *,
    checkpoints: CheckpointStore,
    gap_policy: GapPolicy = DEFAULT_GAP_POLICY,
) -> list[Outcome]:
    """`project` for a batch of events (`targets[i]` says where `envelopes[i]` goes): each
    projection gets its events at once, each event its own outcome.

    An event after a gap waits per `gap_policy` (the others of the batch are written already)
    and then is rejected, with its aggregate's later events, which find the same gap; an event
    a projection finds invalid, or fails on, is rejected alone. Each projection's checkpoint
    is advanced once, to the highest position it took.
    """
    events = [_Event(envelope, [], []) for envelope in envelopes]
    # The generations being rebuilt first: should one be switched to while this batch is
    # written, readers then find there at least what they found in the one it replaces.
    shadow_failures = await _project_shadows(envelopes, targets)
    pending = [
        (projection, [i for i in indexes if projection.handles(envelopes[i])])
        for projection, indexes in _by_projection([t.live for t in targets])
    ]
    reached: dict[str, int] = {}
    gaps: dict[tuple[int, str], ApplyResult] = {}
    for attempt in range(1, gap_policy.attempts + 1):
        gapped: list[tuple[Projection, list[int]]] = []
        work = [
            (projection, taken)
            for projection, indexes in pending
            if (taken := [i for i in indexes if events[i].rejected is None])
        ]
        # The read models are independent of one another: their writes go out together, so a
        # batch takes the time of its slowest read model, not the sum of them all.
        for (projection, indexes), results in zip(
            work, await _apply_each(work, envelopes), strict=True
        ):
            waiting: list[int] = []
            for index, result in zip(indexes, results, strict=True):
                event = events[index]
                if isinstance(result, InvalidEvent):
                    event.reject(f"invalid event for projection {projection.name}: {result}")
                elif isinstance(result, _Failed):
                    event.reject(_failure_reason(result.error))
                elif result.status is ApplyStatus.GAP:
                    waiting.append(index)
                    gaps[(index, projection.name)] = result
                else:
                    # Also on a duplicate: heals a checkpoint write lost before.
                    position = event.envelope.position
                    reached[projection.name] = max(reached.get(projection.name, 0), position)
                    if result.status is ApplyStatus.APPLIED:
                        event.applied.append(projection.name)
                    else:
                        event.duplicates.append(projection.name)
            if waiting:
                gapped.append((projection, waiting))
        pending = gapped
        if not pending:
            break
        if attempt < gap_policy.attempts:
            log.info(
                "events_wait_for_gap",
                projections=[projection.name for projection, _ in pending],
                events=sum(len(indexes) for _, indexes in pending),
                attempt=attempt,
            )
            await asyncio.sleep(gap_policy.delay_seconds)
    still: dict[int, list[str]] = {}
    for projection, indexes in pending:
        for index in indexes:
            still.setdefault(index, []).append(projection.name)
    for index, names in sorted(still.items()):
        envelope = envelopes[index]
        events[index].reject(
            "; ".join(_gap_reason(name, gaps[(index, name)], envelope) for name in names)
        )
    for name, position in reached.items():
        await checkpoints.advance(name, position)
    for index, reason in shadow_failures.items():
        events[index].reject(reason)
    return [event.outcome() for event in events]


async def _project_shadows(
    envelopes: Sequence[EventEnvelope], targets: Sequence[Targets]
) -> dict[int, str]:
    """The batch into each generation being rebuilt, whatever the live outcome (see `Shadow`);
    returns the events a shadow failed on, with the reason to park them."""
    failures: dict[int, str] = {}
    shadows: dict[int, tuple[Shadow, list[int]]] = {}
    for index, target in enumerate(targets):
        for shadow in target.shadows:
            if shadow.projection.handles(envelopes[index]):
                shadows.setdefault(id(shadow.projection), (shadow, []))[1].append(index)
    for shadow, indexes in shadows.values():
        results = await _apply_all(shadow.projection, [envelopes[i] for i in indexes])
        skipped = 0
        for index, result in zip(indexes, results, strict=True):
            if isinstance(result, _Failed):
                failures.setdefault(index, _failure_reason(result.error))
            elif isinstance(result, ApplyResult) and result.status is ApplyStatus.GAP:
                skipped = max(skipped, envelopes[index].position)
            # an invalid event: the live projection parks it; the replay skips it the same way
        if skipped:
            log.debug("events_skipped_for_rebuild", projection=shadow.projection.name)
            await shadow.on_skip(skipped)
    return failures


class TargetResolver(Protocol):
    """Says where an event goes, from the generation pointers as they are now."""

    async def targets(self, envelope: EventEnvelope) -> Targets: ...

    async def targets_of(self, envelopes: Sequence[EventEnvelope]) -> list[Targets]:
        """Where each of `envelopes` goes, from one read of the pointers."""
        ...


class Projector:
    """The projector use case: route an event to its generations and project it there."""

    def __init__(
        self,
        resolver: TargetResolver,
        *,
        checkpoints: CheckpointStore,
        gap_policy: GapPolicy = DEFAULT_GAP_POLICY,
    ) -> None:
        self._resolver = resolver
        self._checkpoints = checkpoints
        self._gap_policy = gap_policy

    async def __call__(self, envelope: EventEnvelope) -> Outcome:
        targets = await self._resolver.targets(envelope)
        return await project(
            envelope,
            projections=targets.live,
            shadows=targets.shadows,
            checkpoints=self._checkpoints,
            gap_policy=self._gap_policy,
        )

    async def project_batch(self, envelopes: Sequence[EventEnvelope]) -> list[Outcome]:
        """A batch of events, each with its own outcome (see `project_batch`)."""
        if not envelopes:
            return []
        return await project_batch(
            envelopes,
            await self._resolver.targets_of(envelopes),
            checkpoints=self._checkpoints,
            gap_policy=self._gap_policy,
        )
