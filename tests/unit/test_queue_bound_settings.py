"""The bounds of the dead-letter and parked queues: every message that may go there fits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from command_service.settings import CommandServiceSettings
from query_service.projections.envelope import MAX_BODY_BYTES
from query_service.settings import QueryServiceSettings


def test_a_dead_letter_byte_bound_below_the_command_limit_is_refused() -> None:
    with pytest.raises(ValidationError, match="CQRS_DEAD_LETTER_MAX_BYTES"):
        CommandServiceSettings(max_message_bytes=200_000, dead_letter_max_bytes=100_000)
    fits = CommandServiceSettings(max_message_bytes=100_000, dead_letter_max_bytes=100_000)
    assert fits.dead_letter_max_bytes == 100_000


def test_the_parked_byte_bound_holds_the_largest_event_the_projector_reads() -> None:
    with pytest.raises(ValidationError, match="parked_max_bytes"):
        QueryServiceSettings(parked_max_bytes=MAX_BODY_BYTES - 1)
    assert QueryServiceSettings(parked_max_bytes=MAX_BODY_BYTES).parked_max_bytes == MAX_BODY_BYTES


def test_the_defaults_are_consistent() -> None:
    command = CommandServiceSettings()
    assert command.dead_letter_max_bytes >= command.max_message_bytes
    assert QueryServiceSettings().parked_max_bytes >= MAX_BODY_BYTES
