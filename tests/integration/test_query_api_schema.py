"""Schemathesis against the query API: requests generated from its own OpenAPI document, valid
and invalid, run against the real app over seeded read models in a real MongoDB server.

Every answer must be documented for its operation (status code, content type, body schema,
headers) and no answer may be a 500. The operator-injection cases that a generator is unlikely
to hit are spelled out in test_query_api_input.py.

Bounded for CI: `MAX_EXAMPLES` per operation and mode, derandomized (the same cases each run),
no example database, no shrinking beyond Hypothesis's default budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pymongo.asynchronous.database import AsyncDatabase
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err, Ok
from schemathesis.generation.case import Case
from schemathesis.schemas import APIOperation

from query_service.adapters.mongo import create_client
from query_service.entrypoints.api.app import create_app
from query_service.projections.store import Document
from query_service.settings import QueryServiceSettings
from shared.ledger import (
    TRANSFER,
    MoneyDebitedForTransfer,
    MoneyWithdrawn,
    TransferCompleted,
    TransferRequested,
)
from tests.conftest import Services
from tests.query_support import envelope, opened_account
from tests.read_model_support import replay_one_by_one

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25
TOKEN = "schema-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Nothing listens there: /readyz answers its documented 503 and a rebuild fails fast with
# 503 instead of starting work against a broker.
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/"
OWNER = "alice"
ACCOUNT = UUID("6a1f3b6e-0000-4000-8000-000000000001")
OTHER = UUID("6a1f3b6e-0000-4000-8000-000000000002")
TRANSFER_ID = UUID("6a1f3b6e-0000-4000-8000-000000000003")
KNOWN: dict[str, list[Any]] = {
    "account_id": [str(ACCOUNT), str(OTHER)],
    "transfer_id": [str(TRANSFER_ID)],
    "owner_id": [OWNER],
    "name": ["accounts", "transfers"],
}


def app_settings(mongo_url: str = "mongodb://127.0.0.1:1", mongo_db: str = "unused") -> Any:
    # No waiting on min_version: a generated version the data hasn't reached is a quick 504.
    return QueryServiceSettings(
        amqp_url=NO_BROKER,
        mongo_url=mongo_url,
        mongo_db=mongo_db,
        api_token=TOKEN,
        read_wait_seconds=0,
    )


# The document as the app serves it (building the app opens nothing).
schema = schemathesis.openapi.from_dict(create_app(app_settings()).openapi())
schema.config.generation.update(deterministic=True, database="none")


def known_ids(
    context: Any, parameters: dict[str, Any] | None
) -> st.SearchStrategy[dict[str, Any] | None]:
    """Half the cases address seeded documents, so the 200 paths are exercised too."""
    if not parameters or not set(parameters) & set(KNOWN):
        return st.just(parameters)
    seeded = {
        name: st.sampled_from(KNOWN[name]) if name in KNOWN else st.just(value)
        for name, value in parameters.items()
    }
    return st.one_of(st.just(parameters), st.fixed_dictionaries(seeded))


schema.hook("flatmap_path_parameters")(known_ids)
schema.hook("flatmap_query")(known_ids)


LIST_FILTERS = ("owner_id", "status", "currency")
Operation = APIOperation[Any, Any, Any, Any]


def loaded(result: Ok[Operation] | Err[Any]) -> Operation:
    if isinstance(result, Err):
        raise result.err()
    return result.ok()


OPERATIONS: list[Operation] = [loaded(result) for result in schema.get_all_operations()]
# Negative cases need something to get wrong: operations without parameters have none.
CASES = [
    pytest.param(operation, mode, id=f"{operation.label} {mode.value}")
    for operation in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE
    or operation.path_parameters
    or operation.query
    or operation.body
]
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def request_of(case: Case[Operation]) -> dict[str, Any]:
    """The case as httpx arguments, with the valid token (tests of the token are elsewhere)."""
    request = case.as_transport_kwargs(base_url="http://api", headers=AUTH)
    request.pop("cookies", None)  # the API reads none
    if isinstance(request.get("data"), bytes | str):
        request["content"] = request.pop("data")
    return request


def seed_events() -> list[Any]:
    return [
        *opened_account(ACCOUNT, owner_id=OWNER, deposit=100),
        envelope(ACCOUNT, 3, MoneyWithdrawn(amount=30)),
        envelope(
            ACCOUNT,
            4,
            MoneyDebitedForTransfer(
                transfer_id=TRANSFER_ID, amount=20, currency="EUR", to_account_id=OTHER
            ),
        ),
        *opened_account(OTHER, owner_id=OWNER, currency="GBP"),
        envelope(
            TRANSFER_ID,
            1,
            TransferRequested(from_account_id=ACCOUNT, to_account_id=OTHER, amount=20),
            aggregate_type=TRANSFER,
        ),
        envelope(TRANSFER_ID, 2, TransferCompleted(), aggregate_type=TRANSFER),
    ]


@pytest.fixture(scope="module")
async def api(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """The app over seeded read models; module-scoped, every operation's cases share it."""
    mongo_db = f"cqrs_test_{uuid4().hex[:12]}"
    client = create_client(services.mongo_url)
    database: AsyncDatabase[Document] = client[mongo_db]
    await replay_one_by_one(database, seed_events())
    app = create_app(app_settings(services.mongo_url, mongo_db), database=database)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api"
            ) as http,
        ):
            yield http
    finally:
        await client.drop_database(mongo_db)
        await client.close()


@pytest.mark.parametrize(("operation", "mode"), CASES)
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    # Failures are reported as first found: shrinking would cost minutes of CI time.
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
async def test_every_answer_is_documented_and_none_is_a_500(
    api: httpx.AsyncClient, operation: Operation, mode: GenerationMode, data: st.DataObject
) -> None:
    case = data.draw(operation.as_strategy(generation_mode=mode))

    response = await api.request(**request_of(case))

    assert response.status_code != 500, f"{case.method} {case.formatted_path}: {response.text}"
    assert response.status_code < 500 or response.status_code in (503, 504), response.text
    case.validate_response(response, checks=CHECKS)
    if operation.label == "GET /accounts" and response.status_code == 200:
        # Whatever was sent, a filter only ever narrows: no value acted as an operator.
        sent = response.request.url.params
        for name in set(LIST_FILTERS) & set(sent):
            wanted = sent.get_list(name)[-1]
            assert all(item[name] == wanted for item in response.json()["items"]), response.text
