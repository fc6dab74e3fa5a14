"""The document-store contract on the real server: the in-memory store's behaviours hold there."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from query_service.adapters.mongo import create_client
from tests.conftest import Services
from tests.document_store_contract import Database, DocumentStoreContract

pytestmark = pytest.mark.integration


class TestMongoServer(DocumentStoreContract):
    @pytest.fixture
    async def database(self, services: Services, mongo_db: str) -> AsyncIterator[Database]:
        client = create_client(services.mongo_url)
        yield client[mongo_db]
        await client.close()
