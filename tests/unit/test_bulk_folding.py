"""Folding a replay batch: merged updates do what the updates did one after the other."""

from __future__ import annotations

from typing import Any

import pytest

from query_service.projections.bulk import (
    CannotMergeError,
    apply_update,
    consecutive_runs,
    fold,
    merge_all,
    merge_updates,
)

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


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"$set": {"a": 1}}, {"$unset": {"a": ""}}),
        ({"$set": {"a": 0}}, {"$inc": {"a": 1}}),
        ({"$set": {"a": {"b": 1}}}, {"$inc": {"a.b": 1}}),
        ({"$inc": {"a.b": 1}}, {"$set": {"a": {}}}),
        ({"$max": {"a": 1}}, {"$max": {"a": "x"}}),
        ({"$set": {"a": 1}}, {"$rename": {"a": "b"}}),
    ],
)
def test_updates_one_update_cannot_hold_in_order_are_not_merged(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    with pytest.raises(CannotMergeError):
        merge_updates(first, second)


def test_a_fold_cuts_where_a_merge_cannot_hold_the_order() -> None:
    updates: list[dict[str, dict[str, Any]]] = [
        {"$inc": {"n": 2}, "$set": {"v": 1}},
        {"$inc": {"n": 3}, "$set": {"v": 2}},
        {"$set": {"n": 0, "v": 3}},
        {"$set": {"tags.a": {"n": 0}}, "$min": {"low": 4}},
        {"$inc": {"tags.a.n": 1}, "$unset": {"gone": ""}, "$min": {"low": 2}},
    ]

    parts = fold(updates)

    assert [start for start, _ in parts] == [0, 2, 4]
    assert parts[0][1] == {"$inc": {"n": 5}, "$set": {"v": 2}}
    assert parts[1][1] == {"$set": {"n": 0, "v": 3, "tags.a": {"n": 0}}, "$min": {"low": 4}}
    one_by_one: dict[str, Any] = {"n": 1, "gone": 1}
    for update in updates:
        one_by_one = apply_update(one_by_one, update)
    folded: dict[str, Any] = {"n": 1, "gone": 1}
    for _, update in parts:
        folded = apply_update(folded, update)
    assert folded == one_by_one == {"n": 0, "v": 3, "tags": {"a": {"n": 1}}, "low": 2}


def test_runs_drop_repeats_and_stop_at_a_gap() -> None:
    items = [("x", 3), ("y", 1), ("x", 4), ("x", 3), ("y", 2), ("x", 5), ("y", 4), ("y", 5)]

    runs = consecutive_runs(items, lambda item: item)

    assert runs == {"x": [("x", 3), ("x", 4), ("x", 5)], "y": [("y", 1), ("y", 2)]}
