"""The projector use case with in-memory projections: dispatch, exactly-once, gaps, checkpoints."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from query_service.projections.base import ApplyResult, InvalidEvent
from query_service.service_layer.projector import GapPolicy, Projected, Rejected, project
from shared.ledger import ACCOUNT, AccountOpened, MoneyDeposited, MoneyWithdrawn
from shared.messages import EventEnvelope
from tests.query_support import envelope, opened_account

FAST_GAPS = GapPolicy(attempts=3, delay_seconds=0.01)


class InMemoryBalances:
    """A fake projection with the same version guard as the MongoDB one: balances by account."""

    def __init__(self, name: str = "balances") -> None:
        self.name = name
        self.versions: dict[UUID, int] = {}
        self.balances: dict[UUID, int] = {}
        self.applied: list[tuple[UUID, int]] = []
        self.attempts = 0

    def handles(self, envelope: EventEnvelope) -> bool:
        return envelope.aggregate_type == ACCOUNT and envelope.type in {
            "AccountOpened",
            "MoneyDeposited",
            "MoneyWithdrawn",
        }

    async def apply(self, envelope: EventEnvelope) -> ApplyResult:
        self.attempts += 1
        stored = self.versions.get(envelope.aggregate_id)
        if stored is not None and envelope.version <= stored:
            return ApplyResult.duplicate(stored)
        if envelope.version != (stored or 0) + 1:
            return ApplyResult.gap(stored)
        amount = envelope.data.get("amount", 0)
        if not isinstance(amount, int):
            raise InvalidEvent("amount must be an integer")
        sign = -1 if envelope.type == "MoneyWithdrawn" else 1
        self.balances[envelope.aggregate_id] = self.balances.get(envelope.aggregate_id, 0) + (
            sign * amount
        )
        self.versions[envelope.aggregate_id] = envelope.version
        self.applied.append((envelope.aggregate_id, envelope.version))
        return ApplyResult.applied(stored)


class InMemoryCheckpoints:
    def __init__(self) -> None:
        self.positions: dict[str, int] = {}

    async def advance(self, projection: str, position: int) -> None:
        self.positions[projection] = max(position, self.positions.get(projection, 0))

    async def position(self, projection: str) -> int | None:
        return self.positions.get(projection)


@pytest.fixture
def balances() -> InMemoryBalances:
    return InMemoryBalances()


@pytest.fixture
def checkpoints() -> InMemoryCheckpoints:
    return InMemoryCheckpoints()


async def run(
    event: EventEnvelope,
    *projections: InMemoryBalances,
    checkpoints: InMemoryCheckpoints,
    gap_policy: GapPolicy = FAST_GAPS,
) -> Projected | Rejected:
    return await project(
        event, projections=projections, checkpoints=checkpoints, gap_policy=gap_policy
    )


async def test_applies_a_stream_in_order_and_checkpoints_the_highest_position(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    stream = [
        *opened_account(account, deposit=100),
        envelope(account, 3, MoneyWithdrawn(amount=30)),
    ]
    outcomes = [await run(event, balances, checkpoints=checkpoints) for event in stream]

    assert outcomes == [Projected(applied=("balances",), duplicates=())] * 3
    assert balances.balances[account] == 70
    assert checkpoints.positions["balances"] == max(event.position for event in stream)


async def test_a_redelivered_event_changes_nothing(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    stream = opened_account(account, deposit=100)
    for event in stream:
        await run(event, balances, checkpoints=checkpoints)

    outcome = await run(stream[1], balances, checkpoints=checkpoints)

    assert outcome == Projected(applied=(), duplicates=("balances",))
    assert balances.balances[account] == 100
    assert balances.applied == [(account, 1), (account, 2)]


async def test_a_duplicate_never_lowers_the_checkpoint(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    stream = opened_account(account, deposit=100)
    for event in stream:
        await run(event, balances, checkpoints=checkpoints)

    await run(stream[0], balances, checkpoints=checkpoints)

    assert checkpoints.positions["balances"] == stream[1].position


async def test_an_event_after_a_gap_is_retried_then_rejected_unapplied(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    await run(opened_account(account)[0], balances, checkpoints=checkpoints)
    balances.attempts = 0

    outcome = await run(
        envelope(account, 3, MoneyDeposited(amount=5)), balances, checkpoints=checkpoints
    )

    assert isinstance(outcome, Rejected)
    assert "version gap in projection balances" in outcome.reason
    assert "at version 1, event MoneyDeposited has version 3 (expected 2)" in outcome.reason
    assert balances.attempts == FAST_GAPS.attempts
    assert balances.applied == [(account, 1)]
    assert balances.balances[account] == 0


async def test_an_event_for_an_unknown_aggregate_is_a_gap(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    outcome = await run(
        envelope(uuid4(), 2, MoneyDeposited(amount=5)), balances, checkpoints=checkpoints
    )

    assert isinstance(outcome, Rejected)
    assert "is unknown, event MoneyDeposited has version 2" in outcome.reason
    assert balances.applied == []
    assert checkpoints.positions == {}


async def test_a_gap_that_closes_while_waiting_is_applied_in_order(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    opening, deposit = opened_account(account, deposit=10)
    await run(opening, balances, checkpoints=checkpoints)
    later = envelope(account, 3, MoneyDeposited(amount=5))
    patient = GapPolicy(attempts=50, delay_seconds=0.01)

    waiting = asyncio.create_task(run(later, balances, checkpoints=checkpoints, gap_policy=patient))
    await asyncio.sleep(0.03)
    assert not waiting.done()
    await run(deposit, balances, checkpoints=checkpoints)

    assert await waiting == Projected(applied=("balances",), duplicates=())
    assert balances.applied == [(account, 1), (account, 2), (account, 3)]
    assert balances.balances[account] == 15


async def test_an_event_no_projection_handles_is_acknowledged_without_effect(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    event = envelope(uuid4(), 1, MoneyDeposited(amount=1), event_type="AccountRenamed")

    outcome = await run(event, balances, checkpoints=checkpoints)

    assert outcome == Projected(applied=(), duplicates=())
    assert balances.attempts == 0


async def test_invalid_data_is_rejected_naming_the_projection(
    balances: InMemoryBalances, checkpoints: InMemoryCheckpoints
) -> None:
    account = uuid4()
    await run(opened_account(account)[0], balances, checkpoints=checkpoints)
    bad = envelope(account, 2, MoneyDeposited(amount=1)).model_copy(
        update={"data": {"amount": "ten"}}
    )

    outcome = await run(bad, balances, checkpoints=checkpoints)

    assert outcome == Rejected("invalid event for projection balances: amount must be an integer")
    assert balances.versions[account] == 1


async def test_every_projection_that_handles_the_event_gets_it_once(
    checkpoints: InMemoryCheckpoints,
) -> None:
    first, second = InMemoryBalances("first"), InMemoryBalances("second")
    account = uuid4()
    opening = envelope(account, 1, AccountOpened(owner_id="alice", currency="EUR"))
    await run(opening, first, checkpoints=checkpoints)

    outcome = await run(opening, first, second, checkpoints=checkpoints)

    assert outcome == Projected(applied=("second",), duplicates=("first",))
    assert first.applied == second.applied == [(account, 1)]
    assert checkpoints.positions == {"first": opening.position, "second": opening.position}
