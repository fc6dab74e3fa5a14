"""`cqrs rebuild <read-model>`: a blue-green rebuild through the query service's admin API.

Starts it with `POST /admin/rebuilds` and follows `GET /admin/read-models/{name}` until every
read model is switched and the replaced generation dropped (done), or the rebuild failed.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cqrs_cli.common import (
    EXIT_ERROR,
    EXIT_UNREACHABLE,
    JsonOption,
    QueryUrlOption,
    auth_headers,
    expect_ok,
    fail,
    http_get,
    out,
    print_json,
    query_url,
)

FINAL_STATES = {"done", "failed"}
STATE_TEXT = {
    "starting": "starting",
    "waiting_for_replay": "waiting for the replay",
    "replaying": "replaying",
    "verifying": "verifying",
    "switched": "switched",
    "retiring": "switched; dropping the old generation",
    "done": "done",
    "failed": "failed",
}


def rebuild(
    read_models: Annotated[
        list[str] | None,
        typer.Argument(
            help="read models by name (none named: the query service's are listed)",
            show_default=False,
        ),
    ] = None,
    all_models: Annotated[bool, typer.Option("--all", help="rebuild every read model")] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="seconds between polls")] = 0.5,
    timeout: Annotated[
        float | None, typer.Option(help="give up following after this many seconds")
    ] = None,
    as_json: JsonOption = False,
    url: QueryUrlOption = None,
) -> None:
    """Rebuild read models from a replay of the event store, without stopping queries.

    The read models are those of the domains the query service runs (`GET /admin/read-models`;
    `cqrs rebuild` alone names them). Shows events done / total, rate and ETA while it runs.
    Exit 0: done; 1: failed (the current generation is untouched), refused, or no or unknown
    read models named; 2: the query service does not answer.
    """
    base = query_url(url)
    if all_models or not read_models:
        listed = expect_ok(http_get(base, "/admin/read-models"), "read models")
        known = [str(model["name"]) for model in listed]
        if not read_models and not all_models:
            fail(
                "name at least one read model, or pass --all; the query service has: "
                + (", ".join(known) or "none")
            )
        if not known:
            fail("the query service has no read models")
        read_models = known
    try:
        response = httpx.post(
            f"{base}/admin/rebuilds",
            json={"read_models": read_models},
            headers=auth_headers(),
            timeout=30,
        )
    except httpx.TransportError as e:
        fail(f"{base} does not answer: {e!r}", EXIT_UNREACHABLE)
    started = expect_ok(response, "rebuild refused")
    rebuild_id = str(started["rebuild_id"])
    follow = _Follower(base, rebuild_id, read_models)
    deadline = None if timeout is None else time.monotonic() + timeout
    if as_json:
        states = follow.until_final(interval, deadline, on_poll=None)
    else:
        states = _with_progress(follow, interval, deadline)
    failed = [s for s in states if (s.get("rebuild") or {}).get("state") != "done"]
    if as_json:
        print_json({"rebuild_id": rebuild_id, "read_models": states})
    else:
        out().print(_summary(rebuild_id, states))
    if failed:
        raise typer.Exit(EXIT_ERROR)


class _Follower:
    """Polls the read models of one rebuild."""

    def __init__(self, base: str, rebuild_id: str, read_models: list[str]) -> None:
        self.base = base
        self.rebuild_id = rebuild_id
        self.read_models = list(dict.fromkeys(read_models))

    def poll(self) -> list[dict[str, Any]]:
        states = []
        for name in self.read_models:
            state = expect_ok(http_get(self.base, f"/admin/read-models/{name}"), name)
            rebuild = state.get("rebuild") or {}
            if rebuild.get("id") != self.rebuild_id:
                # Another rebuild took the read model over: ours is over.
                state["rebuild"] = {
                    "id": self.rebuild_id,
                    "state": "failed",
                    "error": f"taken over by rebuild {rebuild.get('id')}",
                }
            states.append(state)
        return states

    def until_final(
        self, interval: float, deadline: float | None, on_poll: Any
    ) -> list[dict[str, Any]]:
        while True:
            states = self.poll()
            if on_poll is not None:
                on_poll(states)
            if all((s.get("rebuild") or {}).get("state") in FINAL_STATES for s in states):
                return states
            if deadline is not None and time.monotonic() > deadline:
                fail(
                    f"rebuild {self.rebuild_id} still running after the timeout; it goes on: "
                    f"see GET {self.base}/admin/read-models/{self.read_models[0]}"
                )
            time.sleep(interval)


def _with_progress(
    follow: _Follower, interval: float, deadline: float | None
) -> list[dict[str, Any]]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[state]}"),
        console=out(),
    )
    task = progress.add_task(
        ", ".join(follow.read_models), total=None, rate="", eta="", state="starting"
    )

    def show(states: list[dict[str, Any]]) -> None:
        # Every read model of one rebuild records the same progress; the first one speaks.
        rebuild = states[0].get("rebuild") or {}
        state = str(rebuild.get("state", "starting"))
        total = rebuild.get("total")
        done = int(rebuild.get("done") or 0)
        if state in ("done", "retiring", "switched") and total is not None:
            done = int(total)
        rate = rebuild.get("rate")
        eta = rebuild.get("eta_seconds")
        progress.update(
            task,
            total=total,
            completed=done,
            rate=f"{rate:.0f} events/s" if rate else "",
            eta=f"ETA {eta:.0f}s" if eta is not None and state == "replaying" else "",
            state=f"round {rebuild.get('round', 0)}: {STATE_TEXT.get(state, state)}",
        )

    with progress:
        return follow.until_final(interval, deadline, on_poll=show)


def _summary(rebuild_id: str, states: list[dict[str, Any]]) -> Table:
    table = Table(title=f"rebuild {rebuild_id}")
    for column in ("read model", "state", "generation", "events", "rounds", "events/s", "error"):
        table.add_column(column)
    for state in states:
        rebuild = state.get("rebuild") or {}
        outcome = str(rebuild.get("state"))
        table.add_row(
            str(state.get("name")),
            Text(outcome, style="green" if outcome == "done" else "red"),
            str(state.get("current")),
            str(rebuild.get("events", "-")),
            str(rebuild.get("round", "-")),
            str(rebuild.get("events_per_second", "-")),
            Text(str(rebuild.get("error") or "")),
        )
    return table
