"""The in-memory document store: the store contract, and what it refuses to imitate."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import ReplaceOne

from query_service.projections.store import Document
from query_service.testing import UnsupportedOperation, memory_database
from tests.document_store_contract import Database, DocumentStoreContract


class TestInMemoryStore(DocumentStoreContract):
    @pytest.fixture
    def database(self) -> Database:
        return memory_database()


@pytest.fixture
def database() -> Database:
    return memory_database()


async def test_an_aggregation_pipeline_is_refused_not_imitated(database: Database) -> None:
    with pytest.raises(UnsupportedOperation, match="aggregation"):
        await database["things"].aggregate([{"$match": {}}])


@pytest.mark.parametrize(
    ("query", "update"),
    [
        ({"name": {"$regex": "^a"}}, {"$set": {"n": 1}}),
        ({"$where": "true"}, {"$set": {"n": 1}}),
        ({"_id": 1}, {"$push": {"tags": "x"}}),
        ({"_id": 1}, {"$rename": {"a": "b"}}),
    ],
)
async def test_an_operator_it_does_not_know_is_refused(
    database: Database, query: dict[str, Any], update: dict[str, Any]
) -> None:
    await database["things"].insert_one({"_id": 1, "name": "a"})

    with pytest.raises(UnsupportedOperation):
        await database["things"].update_one(query, update)

    assert await database["things"].find_one({"_id": 1}) == {"_id": 1, "name": "a"}


async def test_an_update_without_operators_is_refused_as_by_the_driver(
    database: Database,
) -> None:
    with pytest.raises(ValueError, match=r"\$ operators"):
        await database["things"].update_one({"_id": 1}, {"name": "b"})


async def test_options_it_does_not_honour_are_refused(database: Database) -> None:
    with pytest.raises(UnsupportedOperation, match="collation"):
        await database["things"].find_one({}, collation={"locale": "fr"})
    with pytest.raises(UnsupportedOperation, match="ReplaceOne"):
        await database["things"].bulk_write([ReplaceOne({"_id": 1}, {"a": 1})])


async def test_a_method_it_does_not_have_names_itself(database: Database) -> None:
    with pytest.raises(AttributeError, match="watch"):
        await database["things"].watch()


async def test_the_readiness_ping_answers(database: Database) -> None:
    assert await database.command("ping") == {"ok": 1.0}


async def test_a_cursor_is_read_once(database: Database) -> None:
    await database["things"].insert_many([{"_id": i} for i in range(3)])
    cursor = database["things"].find({}).sort("_id", -1)

    first: list[Document] = await cursor.to_list(2)
    rest: list[Document] = await cursor.to_list()

    assert (first, rest) == ([{"_id": 2}, {"_id": 1}], [{"_id": 0}])
