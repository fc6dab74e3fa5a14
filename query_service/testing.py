"""Testing a domain's read side offline: an in-memory document store, events as the relay
publishes them, and the API over both. No server, no network; use them in your domain's unit
tests (the given/when/then fixtures of the command side are `command_service.testing`).

    database = memory_database()
    catalog = build_catalog(database, domain.read_models)
    cart = EventStream("cart")
    await project_events(catalog, *cart.record(CartOpened(), ItemAdded(sku="A-1", ...)))
    async with api_client([domain], catalog) as http:
        response = await http.get(f"/carts/{cart.aggregate_id}?min_version=2")

The store imitates the part of PyMongo's asyncio API that the framework's read side uses (the
version guard, one document per aggregate, the batch writes of a rebuild, the generation
pointers, checkpoints) and that plain views use: `find_one` / `find` with equality and
comparison filters (`$eq $ne $gt $gte $lt $lte $in $nin $exists $and $or`), projections,
`sort`, `skip`, `limit`; `insert_one` / `insert_many`; `update_one` / `update_many` with
`$set $unset $inc $min $max $setOnInsert` and upserts; `delete_one` / `delete_many`;
`bulk_write` of `InsertOne`, `UpdateOne`, `UpdateMany`, `DeleteOne`, `DeleteMany`; unique
indexes. It answers as the server does where it matters to a projection: a document passes
through BSON on the way in (what MongoDB cannot store fails here too, a `uuid.UUID` or an
integer past 64 bits; datetimes come back in UTC, to the millisecond), a duplicate `_id` or
unique key is a `DuplicateKeyError` (in a bulk write a `BulkWriteError` with code 11000), an
update whose paths conflict (`$set` of `items.a` with `$inc` of `items.a.quantity`) is a
`WriteError` with code 40, and matched and modified counts are the server's. What it does not
imitate (aggregation pipelines, other operators, collations, array filters, transactions)
raises `UnsupportedOperation` instead of answering differently: test that against the server.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self, cast
from uuid import UUID, uuid4

import bson
import httpx
from bson import ObjectId
from bson.codec_options import CodecOptions
from bson.decimal128 import Decimal128
from bson.timestamp import Timestamp
from pymongo import DeleteMany, DeleteOne, IndexModel, InsertOne, UpdateMany, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    DuplicateKeyError,
    InvalidOperation,
    WriteError,
)
from pymongo.results import (
    BulkWriteResult,
    DeleteResult,
    InsertManyResult,
    InsertOneResult,
    UpdateResult,
)

from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints
from query_service.domain import QueryDomain
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.service_layer.catalog import ReadModelCatalog
from query_service.service_layer.projector import GapPolicy, Outcome, Projector
from query_service.settings import QueryServiceSettings
from shared.messages import Event, EventEnvelope, EventMetadata

# As `create_client` reads: timezone-aware datetimes, in UTC.
_CODEC: CodecOptions[Document] = CodecOptions(document_class=dict, tz_aware=True)

DUPLICATE_KEY = 11000
CONFLICTING_UPDATE = 40
TYPE_MISMATCH = 14
PATH_NOT_VIABLE = 28
IMMUTABLE_FIELD = 66


class UnsupportedOperation(NotImplementedError):
    """Something the in-memory store does not imitate: test it against a real server."""


class _WriteFailure(Exception):
    """One write the server would refuse; raised as PyMongo raises it by the caller."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- BSON values: what the server stores, and how it orders them ------------------------------


def _through_bson(document: Mapping[str, Any]) -> Document:
    """`document` as the server would store and return it."""
    return bson.decode(bson.encode(document, codec_options=_CODEC), codec_options=_CODEC)


def _bson_value(value: Any) -> Any:
    return _through_bson({"v": value})["v"]


def _rank(value: Any) -> int:
    """The BSON type bracket of a value: values of different brackets never compare equal."""
    match value:
        case None:
            return 1
        case bool():
            return 8
        case int() | float() | Decimal128():
            return 2
        case str():
            return 3
        case dict():
            return 4
        case list():
            return 5
        case bytes():
            return 6
        case ObjectId():
            return 7
        case datetime():
            return 9
        case Timestamp():
            return 10
    raise UnsupportedOperation(f"comparing values of type {type(value).__name__}")


def _number(value: Any) -> Any:
    return value.to_decimal() if isinstance(value, Decimal128) else value


def _compare(a: Any, b: Any) -> int:
    """-1, 0 or 1, in MongoDB's order of BSON values."""
    rank_a, rank_b = _rank(a), _rank(b)
    if rank_a != rank_b:
        return -1 if rank_a < rank_b else 1
    if rank_a == 1:
        return 0
    if rank_a == 2:
        a, b = _number(a), _number(b)
    elif rank_a == 4:
        for (key_a, item_a), (key_b, item_b) in zip(a.items(), b.items(), strict=False):
            order = _compare(_rank(item_a), _rank(item_b)) or _compare(key_a, key_b)
            order = order or _compare(item_a, item_b)
            if order:
                return order
        return _compare(len(a), len(b))
    elif rank_a == 5:
        for item_a, item_b in zip(a, b, strict=False):
            if order := _compare(item_a, item_b):
                return order
        return _compare(len(a), len(b))
    return -1 if a < b else (1 if a > b else 0)


# --- paths, filters, projections ------------------------------------------------------------


_MISSING = object()


def _values_at(document: Mapping[str, Any], path: str) -> list[Any]:
    """The values a dotted path reaches (through arrays too); empty when it reaches none."""
    found: list[Any] = [document]
    for part in path.split("."):
        reached: list[Any] = []
        for value in found:
            if isinstance(value, dict):
                if part in value:
                    reached.append(value[part])
            elif isinstance(value, list):
                if part.isdigit() and int(part) < len(value):
                    reached.append(value[int(part)])
                else:
                    reached.extend(
                        item[part] for item in value if isinstance(item, dict) and part in item
                    )
        found = reached
    return found


def _candidates(document: Mapping[str, Any], path: str) -> list[Any]:
    """What a condition on `path` is tested against: each value, and each element of an array."""
    candidates: list[Any] = []
    for value in _values_at(document, path):
        candidates.append(value)
        if isinstance(value, list):
            candidates.extend(value)
    return candidates


def _is_operator_map(condition: Any) -> bool:
    if not isinstance(condition, dict) or not condition:
        return False
    operators = [key.startswith("$") for key in condition]
    if any(operators) and not all(operators):
        raise UnsupportedOperation(f"a condition mixing operators and fields: {condition!r}")
    return all(operators)


def _equals_any(candidates: list[Any], value: Any) -> bool:
    if not candidates:
        return value is None
    return any(_rank(c) == _rank(value) and _compare(c, value) == 0 for c in candidates)


def _test(operator: str, candidates: list[Any], argument: Any) -> bool:
    match operator:
        case "$eq":
            return _equals_any(candidates, argument)
        case "$ne":
            return not _equals_any(candidates, argument)
        case "$in" | "$nin":
            if not isinstance(argument, list):
                raise UnsupportedOperation(f"{operator} needs an array")
            found = any(_equals_any(candidates, value) for value in argument)
            return found if operator == "$in" else not found
        case "$exists":
            return bool(candidates) == bool(argument)
        case "$gt" | "$gte" | "$lt" | "$lte":
            # Type bracketing: {"$gt": 5} matches numbers only.
            return any(
                _rank(c) == _rank(argument) and _in_order(operator, _compare(c, argument))
                for c in candidates
            )
    raise UnsupportedOperation(f"query operator {operator}")


def _in_order(operator: str, order: int) -> bool:
    if operator == "$gt":
        return order > 0
    if operator == "$gte":
        return order >= 0
    if operator == "$lt":
        return order < 0
    return order <= 0


def _matches(document: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    for key, condition in query.items():
        if key in ("$and", "$or", "$nor"):
            results = [_matches(document, part) for part in condition]
            met = all(results) if key == "$and" else any(results)
            if met == (key == "$nor"):
                return False
        elif key.startswith("$"):
            raise UnsupportedOperation(f"query operator {key}")
        elif _is_operator_map(condition):
            candidates = _candidates(document, key)
            if not all(_test(op, candidates, arg) for op, arg in condition.items()):
                return False
        elif not _equals_any(_candidates(document, key), condition):
            return False
    return True


def _projected(document: Document, projection: Any) -> Document:
    if projection is None:
        return document
    if not isinstance(projection, Mapping):
        projection = dict.fromkeys(projection, 1)
    for value in projection.values():
        if isinstance(value, dict) or not isinstance(value, (bool, int, float)):
            raise UnsupportedOperation(f"a projection of {value!r}")
    fields = {path: bool(value) for path, value in projection.items() if path != "_id"}
    with_id = bool(projection.get("_id", True))
    if fields and len(set(fields.values())) > 1:
        raise UnsupportedOperation("a projection mixing inclusion and exclusion")
    including = all(fields.values()) if fields else with_id and "_id" in projection
    if not including:
        result = copy.deepcopy(document)
        for path in [*fields, *([] if with_id else ["_id"])]:
            _unset(result, path)
        return result
    paths = [path.split(".") for path in fields]
    if with_id:
        paths.append(["_id"])
    return _include(document, paths)


def _include(document: Mapping[str, Any], paths: list[list[str]]) -> Document:
    result: Document = {}
    for key, value in document.items():
        below = [path[1:] for path in paths if path[0] == key]
        if not below:
            continue
        if any(not rest for rest in below):
            result[key] = copy.deepcopy(value)
        elif isinstance(value, dict):
            result[key] = _include(value, below)
        elif isinstance(value, list):
            result[key] = [_include(item, below) for item in value if isinstance(item, dict)]
    return result


# --- updates ---------------------------------------------------------------------------------

_UPDATE_OPERATORS = ("$set", "$unset", "$inc", "$min", "$max", "$setOnInsert")


def _check_update(update: Mapping[str, Any]) -> None:
    if isinstance(update, list):
        raise UnsupportedOperation("an update pipeline")
    if not update or not all(key.startswith("$") for key in update):
        # What PyMongo says before anything is sent.
        raise ValueError("update only works with $ operators")
    for operator in update:
        if operator not in _UPDATE_OPERATORS:
            raise UnsupportedOperation(f"update operator {operator}")
    paths = [path for fields in update.values() for path in fields]
    for i, first in enumerate(paths):
        for second in paths[i + 1 :]:
            if first == second or second.startswith(f"{first}.") or first.startswith(f"{second}."):
                raise _WriteFailure(
                    CONFLICTING_UPDATE,
                    f"Updating the path '{second}' would create a conflict at '{first}'",
                )


def _parent(document: Document, path: str, *, create: bool) -> tuple[Any, str]:
    *parents, key = path.split(".")
    target: Any = document
    for part in parents:
        if isinstance(target, dict):
            if part not in target:
                if not create:
                    return None, key
                target[part] = {}
            target = target[part]
        elif isinstance(target, list) and part.isdigit():
            if int(part) >= len(target):
                if not create:
                    return None, key
                raise UnsupportedOperation(f"extending an array through {path!r}")
            target = target[int(part)]
        else:
            if not create:
                return None, key
            raise _WriteFailure(PATH_NOT_VIABLE, f"Cannot create field {part!r} in {target!r}")
    if isinstance(target, list):
        raise UnsupportedOperation(f"updating array elements through {path!r}")
    if target is not None and not isinstance(target, dict):
        if not create:
            return None, key
        raise _WriteFailure(PATH_NOT_VIABLE, f"Cannot create field {key!r} in {target!r}")
    return target, key


def _unset(document: Document, path: str) -> None:
    target, key = _parent(document, path, create=False)
    if isinstance(target, dict):
        target.pop(key, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal128)) and not isinstance(value, bool)


def _updated(document: Document, update: Mapping[str, Any], *, inserting: bool) -> Document:
    result = copy.deepcopy(document)
    for operator, fields in update.items():
        if operator == "$setOnInsert" and not inserting:
            continue
        for path, value in fields.items():
            if path.split(".")[0] == "_id" and (
                operator == "$unset" or ("_id" in result and _bson_value(value) != result["_id"])
            ):
                raise _WriteFailure(IMMUTABLE_FIELD, "Performing an update on the path '_id'")
            if operator == "$unset":
                _unset(result, path)
                continue
            target, key = _parent(result, path, create=True)
            current = target.get(key, _MISSING)
            if operator in ("$set", "$setOnInsert"):
                target[key] = copy.deepcopy(value)
            elif operator == "$inc":
                if not _is_number(value):
                    raise _WriteFailure(
                        TYPE_MISMATCH, f"Cannot increment with non-numeric {value!r}"
                    )
                if current is _MISSING:
                    target[key] = value
                elif not _is_number(current):
                    raise _WriteFailure(TYPE_MISMATCH, f"Cannot apply $inc to {current!r}")
                else:
                    total = _number(current) + _number(value)
                    target[key] = Decimal128(total) if isinstance(total, Decimal) else total
            elif current is _MISSING or (
                _compare(value, current) > 0 if operator == "$max" else _compare(value, current) < 0
            ):
                target[key] = copy.deepcopy(value)
    return result


def _upserted(query: Mapping[str, Any]) -> Document:
    """The document an upsert starts from: the query's equality conditions."""
    seed: Document = {}
    for key, condition in query.items():
        if key.startswith("$"):
            continue
        if _is_operator_map(condition):
            if "$eq" not in condition:
                continue
            condition = condition["$eq"]
        target, last = _parent(seed, key, create=True)
        target[last] = copy.deepcopy(condition)
    return seed


# --- the store --------------------------------------------------------------------------------


def _id_key(value: Any) -> bytes:
    return bson.encode({"_id": value}, codec_options=_CODEC)


def _sort_spec(key_or_list: Any, direction: Any) -> list[tuple[str, int]]:
    if isinstance(key_or_list, str):
        spec = [(key_or_list, 1 if direction is None else direction)]
    elif isinstance(key_or_list, Mapping):
        spec = list(key_or_list.items())
    else:
        spec = [(key, value) for key, value in key_or_list]
    for _, order in spec:
        if order not in (1, -1):
            raise UnsupportedOperation(f"sorting by {order!r}")
    return spec


def _sort_value(document: Mapping[str, Any], path: str, order: int) -> Any:
    values = _values_at(document, path)
    if not values:
        return None
    value = values[0]
    if isinstance(value, list) and value:
        # An array sorts by its least element ascending, its greatest descending.
        pick = min if order == 1 else max
        return pick(value, key=functools.cmp_to_key(_compare))
    return value


def _sort_key(path: str, order: int) -> Callable[[Document], Any]:
    def compare(a: Document, b: Document) -> int:
        return _compare(_sort_value(a, path, order), _sort_value(b, path, order))

    return functools.cmp_to_key(compare)


class InMemoryCursor:
    """What `find` returns: runs the query when first read, like PyMongo's cursor."""

    def __init__(
        self, run: Callable[[], list[Document]], projection: Any, *, skip: int, limit: int
    ) -> None:
        self._run = run
        self._projection = projection
        self._sort: list[tuple[str, int]] = []
        self._skip = skip
        self._limit = limit
        self._results: list[Document] | None = None

    def _not_started(self) -> None:
        if self._results is not None:
            raise InvalidOperation("cannot set options after executing query")

    def sort(self, key_or_list: Any, direction: Any = None) -> Self:
        self._not_started()
        self._sort = _sort_spec(key_or_list, direction)
        return self

    def skip(self, skip: int) -> Self:
        self._not_started()
        self._skip = skip
        return self

    def limit(self, limit: int) -> Self:
        self._not_started()
        self._limit = abs(limit)
        return self

    def _fetch(self) -> list[Document]:
        if self._results is None:
            found = self._run()
            for path, order in reversed(self._sort):
                found.sort(key=_sort_key(path, order), reverse=order == -1)
            found = found[self._skip :]
            if self._limit:
                found = found[: self._limit]
            self._results = [_projected(document, self._projection) for document in found]
        return self._results

    async def to_list(self, length: int | None = None) -> list[Document]:
        found = self._fetch()
        taken, self._results = (found, []) if length is None else (found[:length], found[length:])
        return taken

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Document:
        found = self._fetch()
        if not found:
            raise StopAsyncIteration
        return found.pop(0)

    async def close(self) -> None:
        self._results = []


@dataclass
class _UniqueIndex:
    name: str
    keys: list[str]


class InMemoryCollection:
    """One collection of an `InMemoryDatabase` (see the module for what it imitates)."""

    def __init__(self, database: InMemoryDatabase, name: str) -> None:
        self.database = database
        self.name = name
        self.created = False
        self._documents: dict[bytes, Document] = {}
        self._indexes: dict[str, _UniqueIndex | None] = {}

    @property
    def full_name(self) -> str:
        return f"{self.database.name}.{self.name}"

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{name!r}: not imitated by the in-memory store; test it against a real server"
        )

    def _drop(self) -> None:
        self.created = False
        self._documents.clear()
        self._indexes.clear()

    # reading

    def _select(self, query: Mapping[str, Any] | None) -> list[Document]:
        query = _through_bson(query or {})
        return [copy.deepcopy(d) for d in self._documents.values() if _matches(d, query)]

    def find(
        self,
        filter: Mapping[str, Any] | None = None,
        projection: Any = None,
        *,
        sort: Any = None,
        skip: int = 0,
        limit: int = 0,
        **options: Any,
    ) -> InMemoryCursor:
        _refuse(options)
        cursor = InMemoryCursor(
            functools.partial(self._select, filter), projection, skip=skip, limit=abs(limit)
        )
        if sort is None:
            return cursor
        if not isinstance(sort, (list, tuple, Mapping)):
            # As PyMongo: here, unlike in `.sort()`, a bare field name is refused.
            raise TypeError(f"must use a dictionary or a list of (key, direction) pairs: {sort!r}")
        return cursor.sort(sort)

    async def find_one(
        self, filter: Any = None, projection: Any = None, **options: Any
    ) -> Document | None:
        if filter is not None and not isinstance(filter, Mapping):
            filter = {"_id": filter}
        found = await self.find(filter, projection, limit=1, **options).to_list()
        return found[0] if found else None

    async def count_documents(self, filter: Mapping[str, Any], **options: Any) -> int:
        _refuse(options)
        return len(self._select(filter))

    async def estimated_document_count(self) -> int:
        return len(self._documents)

    async def aggregate(self, pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        raise UnsupportedOperation(
            "aggregation pipelines are not imitated: test this view against a real server"
        )

    # writing

    def _check_unique(self, document: Document, replacing: bytes | None) -> None:
        for index in self._indexes.values():
            if index is None:
                continue
            for key, other in self._documents.items():
                if key != replacing:
                    self._check_pair(index, document, other)

    def _check_pair(self, index: _UniqueIndex, document: Document, other: Document) -> None:
        mine = [_sort_value(document, path, 1) for path in index.keys]
        theirs = [_sort_value(other, path, 1) for path in index.keys]
        if all(_compare(a, b) == 0 for a, b in zip(mine, theirs, strict=True)):
            raise _WriteFailure(
                DUPLICATE_KEY,
                f"E11000 duplicate key error collection: {self.full_name} "
                f"index: {index.name} dup key: {dict(zip(index.keys, mine, strict=True))}",
            )

    def _insert(self, document: Mapping[str, Any]) -> Any:
        if "_id" not in document:
            raise _WriteFailure(2, "a document to insert needs an _id")
        stored = _through_bson({"_id": document["_id"], **document})
        key = _id_key(stored["_id"])
        if key in self._documents:
            raise _WriteFailure(
                DUPLICATE_KEY,
                f"E11000 duplicate key error collection: {self.full_name} index: _id_ "
                f"dup key: {{ _id: {stored['_id']!r} }}",
            )
        self._check_unique(stored, None)
        self._documents[key] = stored
        self.created = True
        return stored["_id"]

    def _update(
        self, query: Mapping[str, Any], update: Mapping[str, Any], *, upsert: bool, many: bool
    ) -> dict[str, Any]:
        _check_update(update)
        query = _through_bson(query)
        matched = [key for key, d in self._documents.items() if _matches(d, query)]
        if not many:
            matched = matched[:1]
        if not matched:
            if not upsert:
                return {"n": 0, "nModified": 0}
            document = _updated(_upserted(query), update, inserting=True)
            document.setdefault("_id", ObjectId())
            return {"n": 1, "nModified": 0, "upserted": self._insert(document)}
        modified = 0
        for key in matched:
            before = self._documents[key]
            after = _through_bson(_updated(before, update, inserting=False))
            self._check_unique(after, key)
            if bson.encode(after) != bson.encode(before):
                self._documents[key] = after
                modified += 1
        return {"n": len(matched), "nModified": modified}

    def _delete(self, query: Mapping[str, Any], *, many: bool) -> int:
        query = _through_bson(query)
        matched = [key for key, d in self._documents.items() if _matches(d, query)]
        for key in matched if many else matched[:1]:
            del self._documents[key]
        return len(matched) if many else len(matched[:1])

    async def insert_one(self, document: Document, **options: Any) -> InsertOneResult:
        _refuse(options)
        # PyMongo adds the `_id` it generates to the caller's document.
        document.setdefault("_id", ObjectId())
        try:
            return InsertOneResult(self._insert(document), True)
        except _WriteFailure as e:
            raise _single_error(e) from None

    async def insert_many(
        self, documents: Iterable[Document], ordered: bool = True, **options: Any
    ) -> InsertManyResult:
        documents = list(documents)
        for document in documents:
            document.setdefault("_id", ObjectId())
        await self.bulk_write([InsertOne(d) for d in documents], ordered=ordered, **options)
        return InsertManyResult([d["_id"] for d in documents], True)

    async def update_one(
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any],
        upsert: bool = False,
        **options: Any,
    ) -> UpdateResult:
        _refuse(options)
        try:
            return UpdateResult(self._update(filter, update, upsert=upsert, many=False), True)
        except _WriteFailure as e:
            raise _single_error(e) from None

    async def update_many(
        self,
        filter: Mapping[str, Any],
        update: Mapping[str, Any],
        upsert: bool = False,
        **options: Any,
    ) -> UpdateResult:
        _refuse(options)
        try:
            return UpdateResult(self._update(filter, update, upsert=upsert, many=True), True)
        except _WriteFailure as e:
            raise _single_error(e) from None

    async def delete_one(self, filter: Mapping[str, Any], **options: Any) -> DeleteResult:
        _refuse(options)
        return DeleteResult({"n": self._delete(filter, many=False)}, True)

    async def delete_many(self, filter: Mapping[str, Any], **options: Any) -> DeleteResult:
        _refuse(options)
        return DeleteResult({"n": self._delete(filter, many=True)}, True)

    async def bulk_write(
        self, requests: Sequence[Any], ordered: bool = True, **options: Any
    ) -> BulkWriteResult:
        """The requests one after the other; unordered ones go on after a failed one."""
        _refuse(options)
        if not requests:
            raise InvalidOperation("No operations to execute")
        result: dict[str, Any] = {
            "writeErrors": [],
            "writeConcernErrors": [],
            "nInserted": 0,
            "nUpserted": 0,
            "nMatched": 0,
            "nModified": 0,
            "nRemoved": 0,
            "upserted": [],
        }
        for index, request in enumerate(requests):
            try:
                self._bulk_one(request, index, result)
            except _WriteFailure as e:
                result["writeErrors"].append(
                    {"index": index, "code": e.code, "errmsg": e.message, "op": repr(request)}
                )
                if ordered:
                    break
        if result["writeErrors"]:
            raise BulkWriteError(result)
        return BulkWriteResult(result, True)

    def _bulk_one(self, request: Any, index: int, result: dict[str, Any]) -> None:
        # PyMongo's operation classes keep their arguments in these attributes.
        if isinstance(request, InsertOne):
            document = request._doc
            if "_id" not in document:
                document["_id"] = ObjectId()
            self._insert(document)
            result["nInserted"] += 1
        elif isinstance(request, (UpdateOne, UpdateMany)):
            if request._array_filters or request._collation or request._hint or request._sort:
                raise UnsupportedOperation("array filters, collations, hints or sorts in updates")
            raw = self._update(
                request._filter,
                cast(Mapping[str, Any], request._doc),
                upsert=bool(request._upsert),
                many=isinstance(request, UpdateMany),
            )
            if "upserted" in raw:
                result["nUpserted"] += 1
                result["upserted"].append({"index": index, "_id": raw["upserted"]})
            else:
                result["nMatched"] += raw["n"]
                result["nModified"] += raw["nModified"]
        elif isinstance(request, (DeleteOne, DeleteMany)):
            if request._collation or request._hint:
                raise UnsupportedOperation("collations or hints in deletes")
            result["nRemoved"] += self._delete(
                request._filter, many=isinstance(request, DeleteMany)
            )
        else:
            raise UnsupportedOperation(f"bulk operation {type(request).__name__}")

    # indexes

    async def create_indexes(self, indexes: Sequence[IndexModel], **options: Any) -> list[str]:
        _refuse(options)
        return [self._create_index(model.document) for model in indexes]

    async def create_index(self, keys: Any, **options: Any) -> str:
        return self._create_index({**IndexModel(keys, **options).document})

    def _create_index(self, spec: Mapping[str, Any]) -> str:
        unknown = set(spec) - {"key", "name", "unique", "background"}
        if unknown:
            raise UnsupportedOperation(f"index options {sorted(unknown)}")
        name = str(spec["name"])
        index = _UniqueIndex(name, list(spec["key"])) if spec.get("unique") else None
        if index is not None:
            documents = list(self._documents.values())
            for i, document in enumerate(documents):
                for other in documents[:i]:
                    try:
                        self._check_pair(index, document, other)
                    except _WriteFailure as e:
                        raise _single_error(e) from None
        self._indexes[name] = index
        self.created = True
        return name

    async def index_information(self) -> dict[str, Any]:
        found: dict[str, Any] = {"_id_": {"key": [("_id", 1)]}}
        for name, index in self._indexes.items():
            found[name] = {"unique": True} if index is not None else {}
        return found

    async def drop(self) -> None:
        self._drop()


def _refuse(options: Mapping[str, Any]) -> None:
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise UnsupportedOperation(f"options {given}")


def _single_error(failure: _WriteFailure) -> WriteError:
    details = {"index": 0, "code": failure.code, "errmsg": failure.message}
    if failure.code == DUPLICATE_KEY:
        return DuplicateKeyError(failure.message, failure.code, details)
    return WriteError(failure.message, failure.code, details)


class InMemoryDatabase:
    """An in-memory stand-in for a PyMongo `AsyncDatabase` (see the module)."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._collections: dict[str, InMemoryCollection] = {}

    def __getitem__(self, name: str) -> InMemoryCollection:
        return self.get_collection(name)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{name!r}: not imitated by the in-memory store; test it against a real server"
        )

    def get_collection(self, name: str, **options: Any) -> InMemoryCollection:
        _refuse(options)
        collection = self._collections.get(name)
        if collection is None:
            collection = self._collections[name] = InMemoryCollection(self, name)
        return collection

    async def create_collection(self, name: str, **options: Any) -> InMemoryCollection:
        collection = self.get_collection(name, **options)
        if collection.created:
            raise CollectionInvalid(f"collection {name} already exists")
        collection.created = True
        return collection

    async def list_collection_names(self, **options: Any) -> list[str]:
        _refuse(options)
        return sorted(name for name, c in self._collections.items() if c.created)

    async def drop_collection(self, name_or_collection: str | InMemoryCollection) -> None:
        name = getattr(name_or_collection, "name", name_or_collection)
        if name in self._collections:
            self._collections[str(name)]._drop()

    async def command(self, command: str | Mapping[str, Any], **options: Any) -> Document:
        if command == "ping" or (isinstance(command, Mapping) and list(command) == ["ping"]):
            return {"ok": 1.0}
        raise UnsupportedOperation(f"database command {command!r}")


def memory_database(name: str = "memory") -> AsyncDatabase[Document]:
    """A fresh in-memory database, typed as what the framework takes (`build_catalog`,
    `create_app`, a `VersionedCollection` over one of its collections)."""
    return cast(AsyncDatabase[Document], InMemoryDatabase(name))


# --- events, projection, the API --------------------------------------------------------------

_positions = itertools.count(1)


@dataclass
class EventStream:
    """One aggregate's events as the relay publishes them: versions 1, 2, ... in order, global
    positions growing across every stream of the process."""

    aggregate_type: str
    aggregate_id: UUID = field(default_factory=uuid4)
    version: int = 0

    def record(self, *events: Event) -> list[EventEnvelope]:
        """The envelopes of `events`, as the next versions of this aggregate."""
        envelopes = []
        for event in events:
            self.version += 1
            envelopes.append(
                EventEnvelope(
                    event_id=uuid4(),
                    type=event.type_name(),
                    aggregate_type=self.aggregate_type,
                    aggregate_id=self.aggregate_id,
                    version=self.version,
                    position=next(_positions),
                    recorded_at=datetime.now(UTC),
                    data=event.model_dump(mode="json"),
                    metadata=EventMetadata(schema_version=event.schema_version),
                )
            )
        return envelopes


async def project_events(catalog: ReadModelCatalog, *envelopes: EventEnvelope) -> list[Outcome]:
    """Each envelope through the live projector's use case, into the current generations of
    `catalog`'s read models: exactly once, in version order; an event after a gap, or one
    that can never be applied, is `Rejected` (parked by the real projector), not waited for."""
    projector = Projector(
        catalog,
        checkpoints=MongoCheckpoints(catalog.database[CHECKPOINTS_COLLECTION]),
        gap_policy=GapPolicy(attempts=1, delay_seconds=0),
    )
    return [await projector(envelope) for envelope in envelopes]


@asynccontextmanager
async def api_client(
    domains: Sequence[QueryDomain],
    catalog: ReadModelCatalog,
    *,
    settings: QueryServiceSettings | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the API over `domains`' routes and `catalog`, in this process (its
    base URL is `http://api`). `settings` default to the environment's; a read waiting for a
    version (`min_version`) waits up to `read_wait_seconds` of them."""
    app = create_app(
        settings if settings is not None else QueryServiceSettings(),
        domains=domains,
        catalog=catalog,
    )
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as http,
    ):
        yield http
