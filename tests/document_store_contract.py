"""What the read side needs of a document store, as one set of tests run against the in-memory
store (tests/unit/test_memory_store.py) and the real server
(tests/integration/test_memory_store_contract.py): whatever passes offline passes there too.

A subclass provides the `database` fixture: a fresh, empty database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from pymongo import DESCENDING, IndexModel, InsertOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteError

from query_service.adapters.mongo import CHECKPOINTS_COLLECTION, MongoCheckpoints
from query_service.projections.base import ApplyStatus
from query_service.projections.document import DocumentReadModel, DocumentRules
from query_service.projections.store import Document, VersionedCollection
from query_service.testing import EventStream
from shared.messages import Event, EventEnvelope

Database = AsyncDatabase[Document]


# A small read model of its own, so the contract depends on no domain.
class Opened(Event):
    name: str


class Counted(Event):
    by: int


class Renamed(Event):
    name: str


class Reset(Event):
    pass


class Unnamed(Event):
    pass


class Tagged(Event):
    tag: str


def _counted(event: Event, envelope: EventEnvelope) -> dict[str, Any]:
    match event:
        case Counted(by=by):
            return {"$inc": {"count": by}, "$max": {"largest": by}}
        case Renamed(name=name):
            return {"$set": {"name": name}}
        case Reset():
            return {"$set": {"count": 0}}
        case Unnamed():
            return {"$unset": {"name": ""}}
        case Tagged(tag=tag):
            return {"$set": {f"tags.{tag}": {"count": 0}}, "$inc": {"tagged": 1}}
    raise AssertionError(event)


RULES = DocumentRules(
    name="counters",
    aggregate_type="counter",
    events=(Opened, Counted, Renamed, Reset, Unnamed, Tagged),
    creating=Opened,
    created=lambda event, envelope: {"name": event.name, "count": 0},
    updated=_counted,
)


async def _all(database: Database, name: str) -> list[Document]:
    return await database[name].find({}).sort("_id", 1).to_list()


class DocumentStoreContract:
    """The behaviours of MongoDB the framework's read side and plain views rely on."""

    async def test_a_document_comes_back_as_stored_and_apart_from_the_callers(
        self, database: Database
    ) -> None:
        mine: Document = {"name": "a", "tags": ["x"]}
        await database["things"].insert_one(mine)

        assert "_id" in mine  # the driver gives the caller's document its generated id
        found = await database["things"].find_one({"_id": mine["_id"]})
        assert found == mine
        assert found is not None
        found["tags"].append("y")
        mine["name"] = "changed"
        assert await database["things"].find_one({"_id": mine["_id"]}) == {
            "_id": mine["_id"],
            "name": "a",
            "tags": ["x"],
        }

    async def test_datetimes_come_back_in_utc_to_the_millisecond(self, database: Database) -> None:
        await database["things"].insert_one(
            {"_id": 1, "at": datetime(2025, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)}
        )

        found = await database["things"].find_one({"_id": 1})

        assert found is not None
        assert found["at"] == datetime(2025, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
        assert found["at"].utcoffset().total_seconds() == 0

    async def test_what_bson_cannot_hold_is_refused(self, database: Database) -> None:
        with pytest.raises(ValueError, match="uuid"):
            await database["things"].insert_one({"_id": 1, "id": uuid4()})
        with pytest.raises(OverflowError):
            await database["things"].insert_one({"_id": 2, "n": 2**63})
        assert await _all(database, "things") == []

    async def test_a_second_document_with_an_id_is_a_duplicate_key(
        self, database: Database
    ) -> None:
        await database["things"].insert_one({"_id": "a", "n": 1})

        with pytest.raises(DuplicateKeyError) as caught:
            await database["things"].insert_one({"_id": "a", "n": 2})

        assert caught.value.code == 11000
        assert await _all(database, "things") == [{"_id": "a", "n": 1}]

    async def test_finds_by_equality_and_comparison_sorted_paged_and_projected(
        self, database: Database
    ) -> None:
        things = database["things"]
        await things.insert_many(
            [
                {"_id": "a", "owner": "x", "n": 3, "tags": ["red"], "sub": {"k": 1}},
                {"_id": "b", "owner": "y", "n": 1, "tags": [], "sub": {"k": 2}},
                {"_id": "c", "owner": "x", "n": 2, "tags": ["red", "blue"], "sub": {"k": 2}},
                {"_id": "d", "owner": "x", "n": 2, "sub": None},
            ]
        )

        async def ids(query: dict[str, Any], **options: Any) -> list[str]:
            return [d["_id"] for d in await things.find(query, **options).to_list()]

        assert await ids({"owner": "x"}, sort=[("n", 1), ("_id", DESCENDING)]) == ["d", "c", "a"]
        assert await ids({"n": {"$gt": 1, "$lte": 3}}, sort=[("_id", 1)]) == ["a", "c", "d"]
        assert await ids({"_id": {"$in": ["b", "d", "z"]}}, sort=[("_id", 1)]) == ["b", "d"]
        assert await ids({"tags": "red"}, sort=[("_id", 1)]) == ["a", "c"]
        assert await ids({"sub.k": 2}, sort=[("_id", 1)]) == ["b", "c"]
        assert await ids({"tags": {"$exists": False}}) == ["d"]
        assert await ids({"sub": None}) == ["d"]
        assert await ids({"sub": {"$ne": None}}, sort=[("_id", 1)]) == ["a", "b", "c"]
        assert await ids({"n": {"$gt": "1"}}) == []  # a string is no number
        assert await ids({"$or": [{"owner": "y"}, {"n": 3}]}, sort=[("_id", 1)]) == ["a", "b"]
        page = await things.find({}).sort("n", -1).skip(1).limit(2).to_list()
        assert [d["_id"] for d in page] == ["c", "d"]
        assert await things.find_one({"_id": "a"}, {"n": 1, "sub.k": 1}) == {
            "_id": "a",
            "n": 3,
            "sub": {"k": 1},
        }
        assert await things.find_one({"_id": "b"}, {"_id": 0, "tags": 0, "sub": 0}) == {
            "owner": "y",
            "n": 1,
        }
        assert [d async for d in things.find({"owner": "y"}, {"_id": 1})] == [{"_id": "b"}]
        assert await things.count_documents({"owner": "x"}) == 3

    async def test_update_operators_change_what_they_name(self, database: Database) -> None:
        things = database["things"]
        await things.insert_one({"_id": 1, "n": 5, "low": 5, "high": 5, "gone": 1, "items": {}})

        result = await things.update_one(
            {"_id": 1},
            {
                "$set": {"items.a.quantity": 2, "name": "x"},
                "$inc": {"n": -2, "fresh": 1},
                "$min": {"low": 3},
                "$max": {"high": 3},
                "$unset": {"gone": ""},
            },
        )

        assert (result.matched_count, result.modified_count) == (1, 1)
        assert await things.find_one({"_id": 1}) == {
            "_id": 1,
            "n": 3,
            "low": 3,
            "high": 5,
            "items": {"a": {"quantity": 2}},
            "name": "x",
            "fresh": 1,
        }
        unchanged = await things.update_one({"_id": 1}, {"$set": {"name": "x"}})
        assert (unchanged.matched_count, unchanged.modified_count) == (1, 0)
        missing = await things.update_one({"_id": 2}, {"$set": {"name": "x"}})
        assert (missing.matched_count, missing.modified_count) == (0, 0)

    @pytest.mark.parametrize(
        "update",
        [
            {"$set": {"n": 0}, "$inc": {"n": 1}},
            {"$set": {"items.a": {"quantity": 1}}, "$inc": {"items.a.quantity": 1}},
            {"$unset": {"items": ""}, "$set": {"items.b": 1}},
        ],
    )
    async def test_an_update_touching_a_path_twice_is_refused(
        self, database: Database, update: dict[str, Any]
    ) -> None:
        await database["things"].insert_one({"_id": 1, "n": 1, "items": {"a": {"quantity": 1}}})

        with pytest.raises(WriteError) as caught:
            await database["things"].update_one({"_id": 1}, update)

        assert caught.value.code == 40
        assert await database["things"].find_one({"_id": 1}) == {
            "_id": 1,
            "n": 1,
            "items": {"a": {"quantity": 1}},
        }

    async def test_an_increment_of_a_string_is_refused(self, database: Database) -> None:
        await database["things"].insert_one({"_id": 1, "name": "x"})

        with pytest.raises(WriteError) as caught:
            await database["things"].update_one({"_id": 1}, {"$inc": {"name": 1}})

        assert caught.value.code == 14

    async def test_an_upsert_starts_from_the_filters_equalities(self, database: Database) -> None:
        things = database["things"]

        result = await things.update_one(
            {"_id": "a", "version": 0, "n": {"$gt": 5}},
            {"$set": {"m": 1}, "$setOnInsert": {"created": True}},
            upsert=True,
        )
        again = await things.update_one(
            {"_id": "a"}, {"$set": {"m": 2}, "$setOnInsert": {"created": False}}, upsert=True
        )

        assert (result.upserted_id, result.matched_count) == ("a", 0)
        assert (again.upserted_id, again.matched_count) == (None, 1)
        assert await things.find_one({"_id": "a"}) == {
            "_id": "a",
            "version": 0,
            "m": 2,
            "created": True,
        }
        # The guard does not hold, and the id is taken: the insert of the upsert collides.
        with pytest.raises(DuplicateKeyError):
            await things.update_one({"_id": "a", "version": 7}, {"$set": {"m": 3}}, upsert=True)

    async def test_an_unordered_bulk_write_goes_on_after_a_duplicate(
        self, database: Database
    ) -> None:
        things = database["things"]
        await things.insert_one({"_id": "b", "n": 0})

        with pytest.raises(BulkWriteError) as caught:
            await things.bulk_write(
                [InsertOne({"_id": "a"}), InsertOne({"_id": "b"}), InsertOne({"_id": "c"})],
                ordered=False,
            )

        details = caught.value.details
        assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, 11000)]
        assert details["nInserted"] == 2
        assert [d["_id"] for d in await _all(database, "things")] == ["a", "b", "c"]

    async def test_an_ordered_bulk_write_stops_at_the_first_failure(
        self, database: Database
    ) -> None:
        things = database["things"]
        await things.insert_one({"_id": "b"})

        with pytest.raises(BulkWriteError) as caught:
            await things.bulk_write(
                [InsertOne({"_id": "a"}), InsertOne({"_id": "b"}), InsertOne({"_id": "c"})]
            )

        assert caught.value.details["nInserted"] == 1
        assert [d["_id"] for d in await _all(database, "things")] == ["a", "b"]

    async def test_a_bulk_write_counts_matches_and_upserts(self, database: Database) -> None:
        things = database["things"]
        await things.insert_many([{"_id": "a", "v": 1}, {"_id": "b", "v": 1}])

        result = await things.bulk_write(
            [
                UpdateOne({"_id": "a", "v": 1}, {"$set": {"v": 2}}),
                UpdateOne({"_id": "b", "v": 5}, {"$set": {"v": 6}}),
                UpdateOne({"_id": "c"}, {"$setOnInsert": {"v": 1}}, upsert=True),
            ],
            ordered=False,
        )

        assert (result.matched_count, result.modified_count, result.upserted_count) == (1, 1, 1)
        assert await _all(database, "things") == [
            {"_id": "a", "v": 2},
            {"_id": "b", "v": 1},
            {"_id": "c", "v": 1},
        ]

    async def test_a_unique_index_refuses_a_second_key(self, database: Database) -> None:
        things = database["things"]
        await things.create_indexes([IndexModel([("sku", 1)], name="sku", unique=True)])
        await things.insert_one({"_id": 1, "sku": "A"})

        with pytest.raises(DuplicateKeyError):
            await things.insert_one({"_id": 2, "sku": "A"})
        await things.insert_one({"_id": 3, "sku": "B"})
        with pytest.raises(DuplicateKeyError):
            await things.update_one({"_id": 3}, {"$set": {"sku": "A"}})

    async def test_collections_are_listed_once_written_and_gone_once_dropped(
        self, database: Database
    ) -> None:
        await database["one_v1"].insert_one({"_id": 1})
        await database["two_v1"].create_indexes([IndexModel([("a", 1)], name="a")])

        assert {"one_v1", "two_v1"} <= set(await database.list_collection_names())
        await database.drop_collection("one_v1")
        assert "one_v1" not in await database.list_collection_names()
        assert await database["one_v1"].find_one({}) is None

    async def test_a_checkpoint_only_moves_forward(self, database: Database) -> None:
        checkpoints = MongoCheckpoints(database[CHECKPOINTS_COLLECTION])

        await checkpoints.advance("counters", 7)
        await checkpoints.advance("counters", 3)

        assert await checkpoints.position("counters") == 7

    # The version guard: each event changes its document once, and only in version order.

    async def test_each_version_is_applied_exactly_once_and_in_order(
        self, database: Database
    ) -> None:
        documents = VersionedCollection(database["counters_v1"])
        aggregate = str(uuid4())

        created = await documents.create(aggregate, version=1, position=10, fields={"count": 0})
        again = await documents.create(aggregate, version=1, position=10, fields={"count": 0})
        second = await documents.advance(
            aggregate, version=2, position=11, update={"$inc": {"count": 1}}
        )
        redelivered = await documents.advance(
            aggregate, version=2, position=11, update={"$inc": {"count": 1}}
        )
        ahead = await documents.advance(
            aggregate, version=4, position=13, update={"$inc": {"count": 100}}
        )

        assert [r.status for r in (created, again, second, redelivered, ahead)] == [
            ApplyStatus.APPLIED,
            ApplyStatus.DUPLICATE,
            ApplyStatus.APPLIED,
            ApplyStatus.DUPLICATE,
            ApplyStatus.GAP,
        ]
        assert (again.stored_version, redelivered.stored_version, ahead.stored_version) == (1, 2, 2)
        assert await database["counters_v1"].find_one({"_id": aggregate}) == {
            "_id": aggregate,
            "count": 1,
            "version": 2,
            "last_position": 11,
        }

        third = await documents.advance(
            aggregate, version=3, position=12, update={"$inc": {"count": 10}}
        )
        fourth = await documents.advance(
            aggregate, version=4, position=13, update={"$inc": {"count": 100}}
        )

        assert (third.status, fourth.status) == (ApplyStatus.APPLIED, ApplyStatus.APPLIED)
        found = await database["counters_v1"].find_one({"_id": aggregate})
        assert found is not None
        assert (found["count"], found["version"], found["last_position"]) == (111, 4, 13)

    async def test_an_event_of_an_unknown_aggregate_is_a_gap(self, database: Database) -> None:
        documents = VersionedCollection(database["counters_v1"])

        result = await documents.advance(
            str(uuid4()), version=2, position=5, update={"$inc": {"count": 1}}
        )

        assert (result.status, result.stored_version) == (ApplyStatus.GAP, None)
        assert await _all(database, "counters_v1") == []

    async def test_a_batch_equals_the_events_one_by_one_whatever_was_there(
        self, database: Database
    ) -> None:
        model = DocumentReadModel(RULES)
        streams = [EventStream("counter") for _ in range(3)]
        events = {
            stream.aggregate_id: stream.record(
                Opened(name="n"), Counted(by=2), Renamed(name="m"), Counted(by=5), Counted(by=1)
            )
            for stream in streams
        }
        everything = sorted(
            (e for stream in events.values() for e in stream), key=lambda e: e.position
        )
        one_by_one = model.bind({"counters": database["one_v1"]})
        for envelope in everything:
            await one_by_one.apply(envelope)
        batched = model.bind({"counters": database["batch_v1"]})
        # The live projector got ahead: the first aggregate is at version 3, the second at 1.
        first, second, _ = (events[s.aggregate_id] for s in streams)
        for envelope in [*first[:3], second[0]]:
            await batched.apply(envelope)

        await batched.apply_batch(everything)
        await batched.apply_batch(everything)  # a replay round again changes nothing

        assert await _all(database, "batch_v1") == await _all(database, "one_v1")
        found = await database["batch_v1"].find_one({"_id": str(first[0].aggregate_id)})
        assert found is not None
        assert (found["count"], found["largest"], found["name"], found["version"]) == (
            8,
            5,
            "m",
            5,
        )

    async def test_a_batch_of_updates_no_single_update_can_hold_equals_one_by_one(
        self, database: Database
    ) -> None:
        model = DocumentReadModel(RULES)
        stream = EventStream("counter")
        opened = stream.record(Opened(name="n"))
        # Two operators on one path, a path and its parent, an $unset: in one update MongoDB
        # refuses the first two, and the order of the three matters.
        later = stream.record(
            Counted(by=2),
            Reset(),
            Counted(by=5),
            Tagged(tag="a"),
            Renamed(name="m"),
            Unnamed(),
            Tagged(tag="b"),
        )
        one_by_one = model.bind({"counters": database["one_v1"]})
        for envelope in [*opened, *later]:
            await one_by_one.apply(envelope)
        batched = model.bind({"counters": database["batch_v1"]})
        await batched.apply(opened[0])  # the live projector has the document

        await batched.apply_batch(later)

        assert await _all(database, "batch_v1") == await _all(database, "one_v1")
        found = await database["batch_v1"].find_one({"_id": str(stream.aggregate_id)})
        assert found is not None
        assert (found["count"], found["tags"], "name" in found, found["version"]) == (
            5,
            {"a": {"count": 0}, "b": {"count": 0}},
            False,
            8,
        )
