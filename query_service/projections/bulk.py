"""Writing a run of replayed events in few round trips, with the effect of one at a time.

A rebuild hands projections hundreds of events at once. Per aggregate, the consecutive events of
a batch fold into one write: a new document built in memory for an aggregate the batch creates,
or one update merging the events' updates, guarded by the version before the first of them.
Where one update cannot say what two events do in order (a path both touch with different
operators, a path and its parent, as `$set` of `count` then `$inc` of it: MongoDB refuses such
an update), the run is cut there and its parts follow one another, each guarded.
When a guard does not hold (the live projector or an earlier attempt got there first) or an
insert collides, the batch is written again event by event with per-event guards, which skips
what is already there; both ways end in the state applying the events one by one gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from query_service.projections.base import Applied, ApplyResult, ApplyStatus, InvalidEvent
from query_service.projections.store import (
    VERSION_FIELD,
    Document,
    VersionedCollection,
    is_duplicate_only,
)
from shared.messages import EventEnvelope

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

T = TypeVar("T")
Update = Mapping[str, Mapping[str, Any]]


def skip_invalid(build: Callable[[EventEnvelope], T], envelope: EventEnvelope) -> T | None:
    """`build(envelope)`, or `None` for an event that can never be applied.

    The live projector parked such an event, so its aggregate stopped there; here the version
    guard of the aggregate's later events stops it at the same place.
    """
    try:
        return build(envelope)
    except InvalidEvent as e:
        log.warning(
            "replayed_event_not_applicable",
            event_id=str(envelope.event_id),
            position=envelope.position,
            reason=str(e),
        )
        return None


class CannotMergeError(ValueError):
    """Two updates one MongoDB update cannot hold with their effect in order."""


MERGED_OPERATORS = ("$set", "$unset", "$inc", "$min", "$max")


def _clash(first: str, second: str) -> bool:
    return first == second or second.startswith(f"{first}.") or first.startswith(f"{second}.")


def merge_updates(first: Update, second: Update) -> dict[str, dict[str, Any]]:
    """One update with the effect of `first` then `second` (`$set`, `$unset`, `$inc`, `$min`,
    `$max`); `CannotMergeError` when one update cannot say that: a path the two touch with
    different operators, a path and its parent, or values `$min`/`$max` cannot order here."""
    merged = {operator: dict(fields) for operator, fields in first.items()}
    touched = {path: operator for operator, fields in first.items() for path in fields}
    for operator, fields in second.items():
        if operator not in MERGED_OPERATORS:
            raise CannotMergeError(f"cannot merge {operator}")
        target = merged.setdefault(operator, {})
        for path, value in fields.items():
            for other, by in touched.items():
                if _clash(other, path) and (other, by) != (path, operator):
                    raise CannotMergeError(
                        f"cannot merge {operator} of {path!r} after {by} of {other!r}"
                    )
            if operator in ("$set", "$unset") or path not in target:
                target[path] = value
            elif operator == "$inc":
                target[path] = target[path] + value
            elif type(value) is not type(target[path]):
                raise CannotMergeError(f"cannot order {target[path]!r} and {value!r}")
            else:
                pick = max if operator == "$max" else min
                target[path] = pick(target[path], value)
            touched[path] = operator
    return merged


def merge_all(updates: Iterable[Update]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for update in updates:
        merged = merge_updates(merged, update)
    return merged


def fold(updates: Sequence[Update]) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """`updates` merged into as few as have their effect in order: (index of the first of
    each part, the part's update)."""
    parts: list[tuple[int, dict[str, dict[str, Any]]]] = []
    for index, update in enumerate(updates):
        if parts:
            start, merged = parts[-1]
            try:
                parts[-1] = (start, merge_updates(merged, update))
                continue
            except CannotMergeError:
                pass
        parts.append((index, merge_all([update])))
    return parts


def apply_update(document: Mapping[str, Any], update: Update) -> dict[str, Any]:
    """`update` (`$set`, `$unset`, `$inc`, `$min`, `$max`, dotted paths) applied in memory to a
    copy of `document`."""
    result: dict[str, Any] = copy.deepcopy(dict(document))
    update_in_place(result, update)
    return result


def update_in_place(result: dict[str, Any], update: Update) -> None:
    """`apply_update` without the copy: `result` is changed (a document of the caller's own)."""
    for operator, fields in update.items():
        for path, value in fields.items():
            *parents, key = path.split(".")
            target = result
            for part in parents:
                target = target.setdefault(part, {})
            if operator == "$set":
                target[key] = copy.deepcopy(value)
            elif operator == "$unset":
                target.pop(key, None)
            elif operator == "$inc":
                target[key] = target.get(key, 0) + value
            elif operator == "$max":
                if key not in target or value > target[key]:
                    target[key] = value
            elif operator == "$min":
                if key not in target or value < target[key]:
                    target[key] = value
            else:
                raise ValueError(f"cannot apply {operator}")


def consecutive_runs(items: Iterable[T], key: Callable[[T], tuple[str, int]]) -> dict[str, list[T]]:
    """Items grouped by aggregate, in order, without repeats, each cut at its first version gap.

    What is left out would change nothing one by one either: a repeat is a duplicate, and what
    follows a gap finds the gap.
    """
    runs: dict[str, list[T]] = {}
    cut: set[str] = set()
    for item in items:
        aggregate, version = key(item)
        run = runs.setdefault(aggregate, [])
        if aggregate in cut or (run and version <= key(run[-1])[1]):
            continue
        if run and version != key(run[-1])[1] + 1:
            cut.add(aggregate)
            continue
        run.append(item)
    return runs


@dataclass(frozen=True)
class Step:
    """One event as a change to its aggregate's document in a `VersionedCollection`."""

    aggregate_id: str
    version: int
    position: int
    fields: Mapping[str, Any] | None = None  # a creating event: the new document's fields
    update: Update | None = None  # a later event: its update

    def guarded_update(self) -> Update:
        assert self.update is not None
        return VersionedCollection.guarded(
            self.aggregate_id, version=self.version, position=self.position, update=self.update
        )[1]

    def per_event(self) -> UpdateOne:
        if self.fields is not None:
            return VersionedCollection.create_op(
                self.aggregate_id, version=self.version, position=self.position, fields=self.fields
            )
        assert self.update is not None
        return VersionedCollection.advance_op(
            self.aggregate_id, version=self.version, position=self.position, update=self.update
        )


async def stored_versions(
    collection: AsyncCollection[Document], aggregate_ids: Iterable[str]
) -> dict[str, int]:
    """The version each of `aggregate_ids` has in `collection` (absent: unknown), in one read."""
    ids = list(dict.fromkeys(aggregate_ids))
    if not ids:
        return {}
    return {
        str(found["_id"]): int(found[VERSION_FIELD])
        async for found in collection.find({"_id": {"$in": ids}}, {VERSION_FIELD: 1})
    }


def plan(
    envelopes: Sequence[EventEnvelope],
    stored: Mapping[str, int],
    build: Callable[[EventEnvelope], Step],
) -> tuple[list[Applied], list[Step]]:
    """What applying `envelopes` one by one to documents at the `stored` versions does: each
    event's result, and the steps of those it applies (to write with `write_steps`).

    `build` raises `InvalidEvent` for an event that can never be applied; a step with `fields`
    creates its document.
    """
    current = dict(stored)
    results: list[Applied] = []
    steps: list[Step] = []
    for envelope in envelopes:
        try:
            step = build(envelope)
        except InvalidEvent as e:
            results.append(e)
            continue
        reached = current.get(step.aggregate_id)
        if step.fields is not None:
            created = reached is None
            result = ApplyResult.applied(None) if created else ApplyResult.duplicate(reached)
        elif reached is None:
            result = ApplyResult.gap(None)
        elif step.version <= reached:
            result = ApplyResult.duplicate(reached)
        elif step.version == reached + 1:
            result = ApplyResult.applied(reached)
        else:
            result = ApplyResult.gap(reached)
        if result.status is ApplyStatus.APPLIED:
            current[step.aggregate_id] = step.version
            steps.append(step)
        results.append(result)
    return results, steps


async def write_steps(collection: AsyncCollection[Document], steps: Sequence[Step]) -> bool:
    """Write `steps` folded per aggregate; event by event where a guard or an insert fails.

    Returns whether the folded writes took (`False`: something else wrote some of these
    documents meanwhile, and the event-by-event writes skipped what it had written).
    """
    if not steps:
        return True
    inserts: list[InsertOne[Document]] = []
    updates: list[UpdateOne] = []
    later: list[UpdateOne] = []  # an aggregate's parts after its first, in order
    for aggregate, run in consecutive_runs(steps, lambda s: (s.aggregate_id, s.version)).items():
        if not run:
            continue
        first = run[0]
        if first.fields is not None:
            document = copy.deepcopy(
                VersionedCollection.new_document(
                    aggregate, version=first.version, position=first.position, fields=first.fields
                )
            )
            for step in run[1:]:
                update_in_place(document, step.guarded_update())
            inserts.append(InsertOne(document))
            continue
        for part, (start, combined) in enumerate(fold([s.guarded_update() for s in run])):
            guard = {"_id": aggregate, "version": run[start].version - 1}
            (later if part else updates).append(UpdateOne(guard, combined))
    complete = await write_all_or_report(collection, inserts, updates)
    if complete and later:
        result = await collection.bulk_write(later, ordered=True)
        complete = result.matched_count == len(later)
    if not complete:
        await collection.bulk_write([step.per_event() for step in steps], ordered=True)
    return complete


async def write_all_or_report(
    collection: AsyncCollection[Document],
    inserts: Sequence[InsertOne[Document]],
    updates: Sequence[UpdateOne],
) -> bool:
    """Unordered bulk writes of independent inserts and guarded updates; whether all took."""
    complete = True
    if inserts:
        try:
            await collection.bulk_write(list(inserts), ordered=False)
        except BulkWriteError as e:
            if not is_duplicate_only(e):
                raise
            complete = False
    if updates:
        result = await collection.bulk_write(list(updates), ordered=False)
        complete = complete and result.matched_count == len(updates)
    return complete


async def insert_ignoring_duplicates(
    collection: AsyncCollection[Document], documents: Sequence[Document]
) -> None:
    """Insert documents whose content follows from their id; one already there is the same."""
    if not documents:
        return
    try:
        await collection.insert_many(list(documents), ordered=False)
    except BulkWriteError as e:
        if not is_duplicate_only(e):
            raise
