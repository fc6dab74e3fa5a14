"""Project one event: hand it to every projection that wants it, wait out short gaps, checkpoint.

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
    ApplyResult,
    ApplyStatus,
    CheckpointStore,
    InvalidEvent,
    Projection,
)
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


class TargetResolver(Protocol):
    """Says where an event goes, from the generation pointers as they are now."""

    async def targets(self, envelope: EventEnvelope) -> Targets: ...


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
