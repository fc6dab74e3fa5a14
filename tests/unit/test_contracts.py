"""The message contracts reject what the system cannot process."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from shared.ledger import DepositMoney, OpenAccount
from shared.messages import CommandEnvelope


@pytest.mark.parametrize("amount", [0, -5, 10**13, 1.5, "10", True, None])
def test_amounts_are_positive_integers_in_range(amount: object) -> None:
    with pytest.raises(ValidationError):
        DepositMoney.model_validate({"amount": amount})


@pytest.mark.parametrize("currency", ["eur", "EURO", "XXX", "", "€"])
def test_currency_must_be_an_iso_4217_code(currency: str) -> None:
    with pytest.raises(ValidationError):
        OpenAccount.model_validate({"owner_id": "alice", "currency": currency})


def test_unknown_payload_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        DepositMoney.model_validate({"amount": 1, "note": "x"})


def test_envelope_round_trips_through_json() -> None:
    envelope = CommandEnvelope(
        type="DepositMoney", aggregate_id=uuid.uuid4(), payload={"amount": 3}
    )
    assert CommandEnvelope.model_validate_json(envelope.model_dump_json()) == envelope


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"type": "DepositMoney", "aggregate_id": "not-a-uuid"}',
        b'{"type": "Deposit Money", "aggregate_id": "' + str(uuid.uuid4()).encode() + b'"}',
        b'{"type": "DepositMoney", "aggregate_id": "'
        + str(uuid.uuid4()).encode()
        + b'", "expected_version": -1}',
    ],
)
def test_malformed_envelopes_are_rejected(body: bytes) -> None:
    with pytest.raises(ValidationError):
        CommandEnvelope.model_validate_json(body)
