"""Folding a replay batch: merged updates do what the updates did one after the other."""

from __future__ import annotations

from typing import Any

import pytest

from query_service.projections.bulk import apply_update, consecutive_runs, merge_all, merge_updates

DOCUMENT: dict[str, Any] = {
    "balance": 10,
    "status": "open",
    "seen": 3,
    "accounts": {"a": {"balance": 1}},
}
UPDATES: list[dict[str, dict[str, Any]]] = [
    {"$inc": {"balance": 5, "accounts.a.balance": 2}, "$set": {"status": "frozen"}},
    {"$inc": {"balance": -3}, "$max": {"seen": 2}, "$set": {"accounts.b": {"balance": 0}}},
    {"$set": {"status": "open", "version": 9}, "$max": {"seen": 7}, "$inc": {"totals.EUR": 4}},
]


def test_a_merged_update_equals_the_updates_in_order() -> None:
    one_by_one = DOCUMENT
    for update in UPDATES:
        one_by_one = apply_update(one_by_one, update)

    assert apply_update(DOCUMENT, merge_all(UPDATES)) == one_by_one
    assert one_by_one == {
        "balance": 12,
        "status": "open",
        "seen": 7,
        "version": 9,
        "accounts": {"a": {"balance": 3}, "b": {"balance": 0}},
        "totals": {"EUR": 4},
    }


def test_apply_update_leaves_its_input_alone() -> None:
    before = {"accounts": {"a": {"balance": 1}}}

    apply_update(before, {"$inc": {"accounts.a.balance": 1}})

    assert before == {"accounts": {"a": {"balance": 1}}}


def test_only_set_inc_and_max_are_merged() -> None:
    with pytest.raises(ValueError, match=r"\$unset"):
        merge_updates({"$set": {"a": 1}}, {"$unset": {"a": ""}})


def test_runs_drop_repeats_and_stop_at_a_gap() -> None:
    items = [("x", 3), ("y", 1), ("x", 4), ("x", 3), ("y", 2), ("x", 5), ("y", 4), ("y", 5)]

    runs = consecutive_runs(items, lambda item: item)

    assert runs == {"x": [("x", 3), ("x", 4), ("x", 5)], "y": [("y", 1), ("y", 2)]}
