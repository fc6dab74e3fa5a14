"""What a read model is to the framework: its collections, indexes, events and projection.

A read model lives in generations: generation n of collection `accounts` is `accounts_vn`. The
live projector writes the current generation (and, during a rebuild, the next one too); a rebuild
fills the next generation from a replay and then makes it current. A definition therefore never
holds collections itself: `bind` makes a projection over one generation's collections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pymongo import IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from query_service.projections.base import BatchProjection
from query_service.projections.store import Document
from shared.messages import EventEnvelope


class ReadModel(Protocol):
    """The definition of one read model."""

    @property
    def name(self) -> str: ...

    @property
    def collections(self) -> tuple[str, ...]:
        """Logical names of the collections of one generation; the first is the one queried."""
        ...

    @property
    def aggregate_types(self) -> frozenset[str]:
        """The aggregate types whose events it needs (a replay asks for only these)."""
        ...

    @property
    def version_collection(self) -> str:
        """The collection whose documents record the version reached per aggregate."""
        ...

    def handles(self, envelope: EventEnvelope) -> bool: ...

    def indexes(self) -> Mapping[str, Sequence[IndexModel]]:
        """Secondary indexes per logical collection: one for every query the API serves."""
        ...

    def bind(self, collections: Mapping[str, AsyncCollection[Document]]) -> BatchProjection:
        """The projection writing into these collections (logical name -> collection)."""
        ...

    def versions(self, document: Document) -> dict[str, int]:
        """Aggregate id -> version recorded in one document of `version_collection`."""
        ...
