"""Read models of one document per aggregate: a creating event inserts it, later events update it.

The account-detail and transfer read models have this shape. Each states its rules (which
aggregate type, which events, which event creates the document and how each event changes it)
in a `DocumentRules`; the version-guarded single writes, the batch writes of a rebuild and the
read-model definition are the same for all and live here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from query_service.projections.base import Applied, ApplyResult, InvalidEvent, event_data
from query_service.projections.bulk import Step, plan, skip_invalid, stored_versions, write_steps
from query_service.projections.store import Document, VersionedCollection
from shared.messages import Event, EventEnvelope

C = TypeVar("C", bound=Event)


@dataclass(frozen=True)
class DocumentRules(Generic[C]):
    """How the events of one aggregate type make and change its document."""

    name: str  # the read model's name, and its collection's unless `collection` says otherwise
    aggregate_type: str
    events: Sequence[type[Event]]
    creating: type[C]
    created: Callable[[C, EventEnvelope], dict[str, Any]]  # the new document's fields
    updated: Callable[[Event, EventEnvelope], dict[str, Any]]  # a MongoDB update
    indexes: Sequence[IndexModel] = ()
    collection: str = ""  # the collection's logical name, when it is not the read model's
    event_types: Mapping[str, type[Event]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "event_types", {e.type_name(): e for e in self.events})
        if not self.collection:
            object.__setattr__(self, "collection", self.name)

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == self.aggregate_type and envelope.type in self.event_types


class DocumentProjection(Generic[C]):
    """Projects one aggregate type's events into its documents, one version at a time."""

    def __init__(self, rules: DocumentRules[C], documents: VersionedCollection) -> None:
        self._rules = rules
        self._documents = documents

    @property
    def name(self) -> str:
        return self._rules.name

    def handles(self, envelope: EventEnvelope) -> bool:
        return self._rules.handles(envelope)

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        event = event_data(self._rules.event_types[envelope.type], envelope)
        aggregate_id = str(envelope.aggregate_id)
        if isinstance(event, self._rules.creating):
            return await self._documents.create(
                aggregate_id,
                version=envelope.version,
                position=envelope.position,
                fields=self._rules.created(event, envelope),
            )
        return await self._documents.advance(
            aggregate_id,
            version=envelope.version,
            position=envelope.position,
            update=self._rules.updated(event, envelope),
        )

    async def apply_many(self, envelopes: Sequence[EventEnvelope]) -> list[Applied]:
        """The live projector's batch: the versions read in one round trip, then each
        document's events folded into one write."""
        collection = self._documents.collection
        stored = await stored_versions(collection, (str(e.aggregate_id) for e in envelopes))
        results, steps = plan(envelopes, stored, self._step)
        await write_steps(collection, steps)
        return results

    async def apply_batch(self, envelopes: Sequence[EventEnvelope]) -> None:
        steps = [
            step
            for envelope in envelopes
            if self.handles(envelope) and (step := skip_invalid(self._step, envelope)) is not None
        ]
        await write_steps(self._documents.collection, steps)

    def _step(self, envelope: EventEnvelope) -> Step:
        event = event_data(self._rules.event_types[envelope.type], envelope)
        aggregate_id = str(envelope.aggregate_id)
        if isinstance(event, self._rules.creating):
            if envelope.version != 1:
                raise InvalidEvent(f"a creating event must have version 1, not {envelope.version}")
            return Step(
                aggregate_id,
                envelope.version,
                envelope.position,
                fields=self._rules.created(event, envelope),
            )
        return Step(
            aggregate_id,
            envelope.version,
            envelope.position,
            update=self._rules.updated(event, envelope),
        )


class DocumentReadModel(Generic[C]):
    """The read-model definition of a `DocumentRules`: one collection, one document each."""

    def __init__(self, rules: DocumentRules[C]) -> None:
        self.rules = rules

    @property
    def name(self) -> str:
        return self.rules.name

    @property
    def collections(self) -> tuple[str, ...]:
        return (self.rules.collection,)

    @property
    def aggregate_types(self) -> frozenset[str]:
        return frozenset({self.rules.aggregate_type})

    @property
    def version_collection(self) -> str:
        return self.rules.collection

    def handles(self, envelope: EventEnvelope) -> bool:
        return self.rules.handles(envelope)

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        return {self.rules.collection: list(self.rules.indexes)} if self.rules.indexes else {}

    def bind(self, collections: Mapping[str, AsyncCollection[Document]]) -> DocumentProjection[C]:
        return DocumentProjection(
            self.rules, VersionedCollection(collections[self.rules.collection])
        )

    def versions(self, document: Document) -> dict[str, int]:
        return {str(document["_id"]): int(document["version"])}
