"""`cqrs status`: queues, consumers, relay backlog and projection lag at a glance.

Queue depths and consumer counts come from passive declarations (a broker user that may only
read sees them too); the command service's relay from its `GET /status`; the projection from
the query service's `/readyz`. A part that does not answer is shown as unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import aio_pika
import httpx
import typer
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cqrs_cli.common import (
    EXIT_UNREACHABLE,
    UNREACHABLE_ERRORS,
    AmqpOption,
    JsonOption,
    QueryUrlOption,
    amqp_url,
    auth_headers,
    out,
    print_json,
    query_url,
    settings,
)
from shared import topology

PROBE_SECONDS = 3.0
# Partition queues are looked for up to this many when their number is not given.
MAX_PARTITIONS = 256
BROKER_ERRORS: tuple[type[BaseException], ...] = (*UNREACHABLE_ERRORS, TimeoutError)


async def queue_state(channel_of: Any, name: str) -> dict[str, Any] | None:
    """Messages ready and consumers of one queue; None when it does not exist."""
    channel = await channel_of()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return None  # a failed passive declaration closes the channel
    result = queue.declaration_result
    return {
        "name": name,
        "messages": int(result.message_count or 0),
        "consumers": int(result.consumer_count or 0),
    }


async def broker_state(
    url: str, command_partitions: int | None, projector_partitions: int | None
) -> dict[str, Any]:
    """The services' queues; partition queues are counted until one is missing unless given."""
    connection = await aio_pika.connect(url, timeout=PROBE_SECONDS)
    channel: Any = None

    async def channel_of() -> Any:
        nonlocal channel
        if channel is None or channel.is_closed:
            channel = await connection.channel()
        return channel

    async def partitions(name: Any, given: int | None) -> list[dict[str, Any]]:
        found = []
        for index in range(given or MAX_PARTITIONS):
            state = await queue_state(channel_of, name(index))
            if state is None:
                if given is None:
                    break
                state = {"name": name(index), "missing": True, "messages": 0, "consumers": 0}
            found.append(state)
        return found

    try:
        return {
            "ok": True,
            "command_partitions": await partitions(
                topology.command_partition_queue, command_partitions
            ),
            "dead_letters": await queue_state(channel_of, topology.COMMAND_DEAD_LETTER_QUEUE),
            "projector_partitions": await partitions(
                topology.projector_partition_queue, projector_partitions
            ),
            "parked": await queue_state(channel_of, topology.PROJECTOR_PARKED_QUEUE),
            "replay_requests": await queue_state(channel_of, topology.REPLAY_REQUESTS_QUEUE),
        }
    finally:
        await connection.close()


async def http_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """A service's JSON answer, or `{"ok": False, "error": ...}` when it does not give one."""
    try:
        response = await http.get(url, timeout=PROBE_SECONDS)
        body = response.json()
    except (httpx.HTTPError, ValueError) as e:
        return {"ok": False, "error": f"unavailable ({type(e).__name__}: {e})"}
    if not isinstance(body, dict):
        return {"ok": False, "error": f"unexpected answer {response.status_code}"}
    # /readyz answers 503 with its body when not ready: still an answer worth showing.
    if response.status_code >= 400 and "checks" not in body:
        return {"ok": False, "error": f"{response.status_code}: {body.get('detail', body)}"}
    return {"ok": True, **body}


async def snapshot(
    *,
    amqp: str,
    query: str,
    command: str,
    command_partitions: int | None,
    projector_partitions: int | None,
) -> dict[str, Any]:
    """One reading of everything; `taken_at` is a monotonic time for rates between readings."""
    async with httpx.AsyncClient(headers=auth_headers()) as http:
        command_status, readiness = await asyncio.gather(
            http_json(http, f"{command}/status"), http_json(http, f"{query}/readyz")
        )
    try:
        broker = await broker_state(amqp, command_partitions, projector_partitions)
    except BROKER_ERRORS as e:
        broker = {"ok": False, "error": f"unavailable ({type(e).__name__}: {e})"}
    state: dict[str, Any] = {
        "taken_at": time.monotonic(),
        "broker": broker,
        "command_service": command_status,
        "query_service": readiness,
    }
    state["lag"] = lag(state)
    return state


def lag(state: dict[str, Any]) -> dict[str, Any]:
    """Projection lag: events waiting in the partitions, positions behind the relay."""
    readiness = state["query_service"]
    relay = state["command_service"].get("relay") or {}
    checks = readiness.get("checks", {}) if readiness.get("ok") else {}
    checkpoints = (readiness.get("detail") or {}).get("checkpoints") or {}
    events = checks.get("lag", {}).get("events")
    if events is None and state["broker"].get("ok"):
        events = sum(q["messages"] for q in state["broker"]["projector_partitions"])
    projected = max(checkpoints.values(), default=None)
    published = relay.get("published_position")
    return {
        "events": events,
        "projected_position": projected,
        "published_position": published,
        # Behind the relay's published head (an upper bound: a projection sees only its types).
        "positions": None
        if published is None or projected is None
        else max(0, int(published) - int(projected)),
        "relay_backlog": relay.get("backlog"),
        "seconds": 0.0 if events == 0 else None,
    }


def with_rates(state: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Adds projection and relay rates, and the lag in seconds, from an earlier reading."""
    if previous is None:
        return state
    elapsed = state["taken_at"] - previous["taken_at"]
    now, before = state["lag"], previous["lag"]
    if elapsed <= 0:
        return state
    for rate, key in (
        ("projected_per_second", "projected_position"),
        ("published_per_second", "published_position"),
    ):
        if now[key] is not None and before[key] is not None:
            now[rate] = round((now[key] - before[key]) / elapsed, 1)
    projecting = now.get("projected_per_second")
    if now["events"] and projecting:
        now["seconds"] = round(now["events"] / projecting, 1)
    publishing = now.get("published_per_second")
    if now["relay_backlog"] and publishing:
        now["relay_seconds"] = round(now["relay_backlog"] / publishing, 1)
    return state


def status(
    as_json: JsonOption = False,
    watch: Annotated[
        float | None, typer.Option(help="refresh every this many seconds, until Ctrl-C")
    ] = None,
    sample: Annotated[
        float,
        typer.Option(help="with a lag, read again after this many seconds to estimate its time"),
    ] = 1.0,
    partitions: Annotated[
        int | None,
        typer.Option(help="command and projector partitions (default: found by probing)"),
    ] = None,
    amqp: AmqpOption = None,
    url: QueryUrlOption = None,
    command_url: Annotated[
        str | None,
        typer.Option(
            envvar="CQRS_COMMAND_URL",
            help="the command service's HTTP address [default: http://127.0.0.1:8001]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Queue depths and consumers, relay backlog, replicas, projection lag, parked and dead."""
    probe = functools.partial(
        snapshot,
        amqp=amqp_url(amqp),
        query=query_url(url),
        command=(command_url or settings().command_url).rstrip("/"),
        command_partitions=partitions,
        projector_partitions=partitions,
    )
    if watch is not None:
        _watch(probe, max(watch, 0.2), as_json)
        return

    async def once() -> dict[str, Any]:
        state = await probe()
        if state["lag"]["events"] and sample > 0:
            await asyncio.sleep(sample)
            state = with_rates(await probe(), state)
        return state

    state = asyncio.run(once())
    if as_json:
        print_json(_public(state))
    else:
        out().print(render(state))
    if not state["broker"].get("ok"):
        raise typer.Exit(EXIT_UNREACHABLE)


def _watch(probe: Callable[[], Awaitable[dict[str, Any]]], every: float, as_json: bool) -> None:
    async def loop() -> None:
        previous = None
        with Live(console=out(), auto_refresh=False, transient=False) as live:
            while True:
                state = with_rates(await probe(), previous)
                if as_json:
                    print_json(_public(state))
                else:
                    live.update(render(state), refresh=True)
                previous = state
                await asyncio.sleep(every)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(loop())


def _public(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "taken_at"}


# --- rendering -------------------------------------------------------------------------------


def _unavailable(title: str, part: dict[str, Any]) -> Panel:
    return Panel(
        Text(str(part.get("error", "unavailable")), style="red"), title=title, expand=False
    )


def _queue_table(broker: dict[str, Any]) -> Table:
    table = Table(title="queues")
    table.add_column("queue")
    table.add_column("role")
    table.add_column("ready", justify="right")
    table.add_column("consumers", justify="right")

    def row(state: dict[str, Any] | None, name: str, role: str, alarm: bool = False) -> None:
        if state is None or state.get("missing"):
            table.add_row(name, role, Text("missing", style="red"), "-")
            return
        messages = state["messages"]
        style = "red" if alarm and messages else ("yellow" if messages else "")
        consumers = state["consumers"]
        table.add_row(
            name,
            role,
            Text(str(messages), style=style),
            Text(str(consumers), style="" if consumers or alarm else "red"),
        )

    for state in broker["command_partitions"]:
        row(state, state["name"], "commands")
    row(broker["dead_letters"], topology.COMMAND_DEAD_LETTER_QUEUE, "dead letters", alarm=True)
    for state in broker["projector_partitions"]:
        row(state, state["name"], "projector")
    row(broker["parked"], topology.PROJECTOR_PARKED_QUEUE, "parked events", alarm=True)
    return table


def _grid(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value if isinstance(value, Text) else Text(_text(value)))
    return grid


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _command_panel(command: dict[str, Any], lag: dict[str, Any]) -> Panel:
    title = "command service"
    if not command.get("ok"):
        return _unavailable(title, command)
    relay = command.get("relay") or {}
    backlog = relay.get("backlog")
    backlog_text = _text(backlog)
    if lag.get("relay_seconds") is not None:
        backlog_text += f" (~{lag['relay_seconds']} s)"
    return Panel(
        _grid(
            [
                ("replica", command.get("replica")),
                ("replicas seen", command.get("members")),
                ("partitions owned", command.get("partitions_owned")),
                ("commands handled", command.get("handled")),
                ("relay published", relay.get("published_position")),
                ("event store head", relay.get("head_position")),
                ("relay backlog", Text(backlog_text, style="yellow" if backlog else "")),
                ("failing tasks", _failing(command.get("failing_tasks") or [])),
            ]
        ),
        title=title,
        expand=False,
    )


def _failing(tasks: list[dict[str, Any]]) -> Text:
    """Supervised tasks that keep failing, with their reason codes (see the README)."""
    if not tasks:
        return Text("none", style="green")
    return Text(
        ", ".join(
            f"{t.get('task')} ({t.get('reason')}, {t.get('failures')} in a row)" for t in tasks
        ),
        style="red",
    )


def _query_panel(query: dict[str, Any], lag: dict[str, Any]) -> Panel:
    title = "query service"
    if not query.get("ok"):
        return _unavailable(title, query)
    checks = query.get("checks", {})
    detail = query.get("detail", {})
    ready = query.get("status") == "ready"
    failing = [name for name, check in checks.items() if not check.get("ok")]
    lag_check = checks.get("lag", {})
    events = lag.get("events")
    lag_text = f"{_text(events)} events waiting"
    if lag.get("positions") is not None:
        lag_text += f", {lag['positions']} positions behind the relay"
    if lag.get("seconds") is not None:
        lag_text += f", ~{lag['seconds']} s"
    elif events:
        lag_text += ", time unknown (not draining, or no second reading)"
    if lag_check.get("max") is not None:
        lag_text += f" (ready under {lag_check['max']})"
    models = detail.get("read_models") or {}
    generations = ", ".join(
        f"{name} g{state.get('current')}" + (f"→g{state['target']}" if state.get("target") else "")
        for name, state in models.items()
    )
    parked = detail.get("parked") or {}
    checkpoints = detail.get("checkpoints") or {}
    return Panel(
        _grid(
            [
                (
                    "readiness",
                    Text(
                        "ready" if ready else f"not ready ({', '.join(failing)})",
                        style="green" if ready else "red",
                    ),
                ),
                ("projection lag", Text(lag_text, style="yellow" if events else "")),
                ("failing tasks", _failing((checks.get("tasks") or {}).get("failing") or [])),
                ("checkpoints", ", ".join(f"{k} {v}" for k, v in checkpoints.items())),
                ("parked", parked.get("queue")),
                ("read models", generations),
            ]
        ),
        title=title,
        expand=False,
    )


def render(state: dict[str, Any]) -> Group:
    broker = state["broker"]
    lag = state["lag"]
    parts: list[Any] = [
        _queue_table(broker) if broker.get("ok") else _unavailable("broker", broker),
        _command_panel(state["command_service"], lag),
        _query_panel(state["query_service"], lag),
    ]
    if broker.get("ok"):
        dead = (broker.get("dead_letters") or {}).get("messages", 0)
        parked = (broker.get("parked") or {}).get("messages", 0)
        parts.append(
            Text(
                f"{len(broker['command_partitions'])} command partitions, "
                f"{len(broker['projector_partitions'])} projector partitions; "
                f"dead-lettered {dead}, parked {parked}",
                style="red" if dead or parked else "",
            )
        )
    return Group(*parts)
