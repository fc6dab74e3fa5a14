"""`cqrs get` shows any route's answer as tables, whatever the domain."""

from __future__ import annotations

import pytest
from rich.console import Console

from cqrs_cli import get_command
from cqrs_cli.get_command import NEXT_CURSOR, show


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Console:
    recorded = Console(record=True, width=160, highlight=False)
    monkeypatch.setattr(get_command, "out", lambda: recorded)
    return recorded


def lines(console: Console) -> list[str]:
    text = console.export_text(clear=False)
    return [" ".join(line.strip(" │").split()) for line in text.splitlines()]


def test_an_object_is_a_panel_of_rows_with_nested_objects_flattened(console: Console) -> None:
    show(
        {
            "id": "c1",
            "status": "failed",
            "failure": {"code": "insufficient_funds", "reason": "balance 3"},
            "tags": ["a", "b"],
            "note": None,
            "gift": True,
        },
        title="cart c1",
    )
    shown = lines(console)
    assert any("cart c1" in line for line in shown)
    for row in (
        "id c1",
        "failure.code insufficient_funds",
        "failure.reason balance 3",
        'tags ["a", "b"]',
        "note -",
        "gift true",
    ):
        assert row in shown


def test_each_list_of_objects_is_a_table_with_its_count(console: Console) -> None:
    show(
        {
            "cart_id": "c1",
            "lines": [{"sku": "42", "quantity": 2}, {"sku": "7", "quantity": 1, "gift": True}],
            "empty": [],
            NEXT_CURSOR: "abc",
        },
        title="cart c1",
        next_page=NEXT_CURSOR,
    )
    text = console.export_text(clear=False)
    shown = lines(console)
    assert "lines (2)" in text
    assert "sku ┃ quantity ┃ gift" in " ".join(text.split())
    assert "42 │ 2 │ -" in shown and "7 │ 1 │ true" in shown
    assert "empty (none)" in shown
    assert "more: cursor=abc" in shown
    assert not any(line.startswith(NEXT_CURSOR) for line in shown)


def test_the_next_cursor_is_a_plain_field_of_a_route_that_does_not_page(
    console: Console,
) -> None:
    show({"id": "c1", NEXT_CURSOR: "abc"}, title="cart c1")
    shown = lines(console)
    assert f"{NEXT_CURSOR} abc" in shown and "more: cursor=abc" not in shown


def test_a_list_is_one_table(console: Console) -> None:
    show([{"name": "carts", "current": 2}, {"name": "orders", "current": 1}], title="models")
    shown = lines(console)
    assert "models (2)" in " ".join(shown)
    assert "carts │ 2" in shown and "orders │ 1" in shown
