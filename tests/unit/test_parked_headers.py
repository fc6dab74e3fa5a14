"""`cqrs parked` reads where a parked event came from in the headers the projector sets."""

from __future__ import annotations

from query_service.adapters import broker
from shared import topology


def test_the_tool_and_the_projector_name_the_original_routing_key_alike() -> None:
    assert broker.ORIGINAL_ROUTING_KEY_HEADER == topology.ORIGINAL_ROUTING_KEY_HEADER
    assert broker.ORIGINAL_EXCHANGE_HEADER == topology.ORIGINAL_EXCHANGE_HEADER
