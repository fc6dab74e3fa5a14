"""What a string that travels may hold (`shared.text`), and the envelope applying it."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from shared.messages import CommandEnvelope, CommandMetadata
from shared.text import (
    AMQP_SHORT_STRING_BYTES,
    IDENTIFIER_MAX_BYTES,
    PAYLOAD_MAX_DEPTH,
    TEXT_MAX_BYTES,
    TextError,
    check_identifier,
    check_payload,
    check_text,
    is_identifier,
)


def test_identifiers_fit_every_amqp_short_string() -> None:
    assert IDENTIFIER_MAX_BYTES <= AMQP_SHORT_STRING_BYTES
    longest = "x" * IDENTIFIER_MAX_BYTES
    assert check_identifier(longest) == longest
    assert len(longest.encode()) <= AMQP_SHORT_STRING_BYTES


@pytest.mark.parametrize(
    "value",
    ["", " ", "a b", "x" * (IDENTIFIER_MAX_BYTES + 1), "€", "x\x00", "x\n", "\ud800", "é"],
)
def test_identifiers_are_printable_ascii_without_spaces(value: str) -> None:
    assert not is_identifier(value)
    with pytest.raises(TextError):
        check_identifier(value)


@pytest.mark.parametrize(
    "value",
    [
        "x\x00",  # PostgreSQL's jsonb refuses NUL
        "line\nforged",
        "\x7f",
        "\x85",  # C1
        "\ud800",  # a lone surrogate is not UTF-8
        "abc\udfff",
        "\u202eevil",  # right-to-left override
        "\u2066isolate",
        "\ufffe",
        "\U0010ffff",
    ],
)
def test_free_text_refuses_what_breaks_a_later_stage(value: str) -> None:
    with pytest.raises(TextError) as refused:
        check_text(value)
    assert value not in str(refused.value)  # the reason names the rule, never echoes the value


def test_free_text_limits_are_in_bytes_not_characters() -> None:
    euros = "€" * (TEXT_MAX_BYTES // 3)  # three bytes each
    assert check_text(euros) == euros
    with pytest.raises(TextError, match="bytes"):
        check_text(euros + "€")
    assert check_text("Grüße, 日本, emoji 🙂, mark\u200f") == "Grüße, 日本, emoji 🙂, mark\u200f"


def test_payload_keys_and_depth_are_bounded() -> None:
    check_payload({"amount": 1, "nested": {"list": ["a", {"b": "c"}]}})
    with pytest.raises(TextError):
        check_payload({"$set": 1})
    with pytest.raises(TextError):
        check_payload({"a.b": 1})
    with pytest.raises(TextError):
        check_payload({"note": "x\x00"})
    deep: dict[str, object] = {}
    inner = deep
    for _ in range(PAYLOAD_MAX_DEPTH + 1):
        inner["n"] = {}
        inner = inner["n"]  # type: ignore[assignment]
    with pytest.raises(TextError, match="deeper"):
        check_payload(deep)


@pytest.mark.parametrize(
    "metadata",
    [
        {"correlation_id": "€" * 100},  # 100 characters, 300 bytes: no AMQP property holds it
        {"correlation_id": "x\u0000"},
        {"causation_id": "a b"},
        {"user": "x" * 200},
    ],
)
def test_command_metadata_holds_identifiers_only(metadata: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        CommandMetadata.model_validate(metadata)


def test_envelope_checks_every_string_of_its_payload() -> None:
    with pytest.raises(ValidationError) as refused:
        CommandEnvelope.model_validate(
            {"type": "OpenAccount", "aggregate_id": str(uuid.uuid4()), "payload": {"x": "a\0"}}
        )
    assert refused.value.errors()[0]["loc"][0] == "payload"
    with pytest.raises(ValidationError):
        CommandEnvelope.model_validate(
            {"type": "X", "aggregate_id": str(uuid.uuid4()), "expected_version": 2**63}
        )
