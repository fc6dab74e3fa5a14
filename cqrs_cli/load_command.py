"""`cqrs load`: drive a command mix through the command service and summarise the replies.

The commands come from `cqrs_cli.workload.Workload` (the benchmark's mix); they are sent at a fixed
rate through `CommandClient`, with at most `--max-in-flight` awaiting their replies. A command
whose slot comes after the end of the run is not sent (it counts as "not sent").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cqrs_cli.common import EXIT_ERROR, AmqpOption, JsonOption, amqp_url, out, print_json, run
from cqrs_cli.workload import Cmd, Mix, Workload, latency_summary_ms
from shared.client import CommandClient, CommandClientError, CommandTimeoutError

DEFAULT_MIX = "open=1,deposit=4,withdraw=3,transfer=2"


@dataclass
class Tally:
    """What came back so far."""

    sent: int = 0
    not_sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def replied(self) -> int:
        return sum(self.statuses.values())

    def line(self) -> str:
        return (
            f"accepted {self.statuses['accepted']}  rejected {self.statuses['rejected']}  "
            f"timeouts {self.statuses['timeout']}"
        )


async def drive(
    client: CommandClient,
    workload: Workload,
    *,
    rate: float,
    duration: float,
    max_in_flight: int,
    timeout: float,
    on_reply: Any = None,
) -> tuple[Tally, float]:
    """Offer `rate` commands a second for `duration` seconds; returns the tally and the time."""
    tally = Tally()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    deadline = started + duration

    async def one(cmd: Cmd) -> None:
        sent_at = time.perf_counter()
        try:
            reply = await client.send_body(
                cmd.body,
                command_id=cmd.command_id,
                command_type=cmd.type,
                aggregate_id=cmd.aggregate_id,
                routing_key=cmd.routing_key,
                timeout=timeout,
            )
        except CommandTimeoutError:
            tally.statuses["timeout"] += 1
        except CommandClientError as e:  # broker unavailable or refusing: counted by kind
            tally.errors[type(e).__name__] += 1
        else:
            tally.latencies.append(time.perf_counter() - sent_at)
            tally.statuses[reply.status] += 1
            if reply.error is not None:
                tally.reasons[reply.error.code] += 1
            if reply.status == "accepted":
                workload.opened(cmd)
        finally:
            slots.release()
            if on_reply is not None:
                on_reply(tally)

    planned = max(1, round(rate * duration))
    for index in range(planned):
        due = started + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # bounded in flight: a full window holds the schedule back
        if time.perf_counter() >= deadline:
            slots.release()
            tally.not_sent = planned - index
            break
        tally.sent += 1
        task = asyncio.create_task(one(workload.next()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return tally, time.perf_counter() - started


def summary(tally: Tally, elapsed: float, *, rate: float, duration: float) -> dict[str, Any]:
    return {
        "offered_rate": rate,
        "duration_seconds": duration,
        "elapsed_seconds": round(elapsed, 2),
        "sent": tally.sent,
        "not_sent": tally.not_sent,
        "accepted": tally.statuses["accepted"],
        "rejected": tally.statuses["rejected"],
        "rejected_by_reason": dict(tally.reasons.most_common()),
        "duplicates": tally.statuses["duplicate"],
        "timeouts": tally.statuses["timeout"],
        "errors": dict(tally.errors),
        "throughput_per_second": round(tally.replied / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": latency_summary_ms(tally.latencies),
    }


def _table(result: dict[str, Any]) -> Table:
    table = Table(title="load summary", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    latency = result["latency_ms"]
    rows: list[tuple[str, Any]] = [
        ("offered", f"{result['offered_rate']}/s for {result['duration_seconds']} s"),
        ("sent", result["sent"]),
        ("not sent (in-flight window full)", result["not_sent"]),
        ("accepted", result["accepted"]),
        ("rejected", result["rejected"]),
        *((f"  {reason}", n) for reason, n in result["rejected_by_reason"].items()),
        ("duplicates", result["duplicates"]),
        ("timeouts", result["timeouts"]),
        *((f"error {name}", n) for name, n in result["errors"].items()),
        ("throughput (replies/s)", result["throughput_per_second"]),
        *((f"latency {q} (ms)", latency[q]) for q in ("p50", "p95", "p99", "max")),
    ]
    for name, value in rows:
        table.add_row(name, "-" if value is None else str(value))
    return table


def load(
    rate: Annotated[float, typer.Option(min=0.1, help="commands offered per second")] = 50.0,
    duration: Annotated[float, typer.Option(min=0.1, help="seconds of load")] = 10.0,
    mix: Annotated[
        str, typer.Option(help="weights: open, deposit, withdraw, transfer, invalid")
    ] = DEFAULT_MIX,
    max_in_flight: Annotated[
        int, typer.Option(min=1, max=10_000, help="commands awaiting a reply at most")
    ] = 64,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each reply")] = 10.0,
    hot_accounts: Annotated[int, typer.Option(min=0, help="accounts many commands hit")] = 5,
    seed: Annotated[int | None, typer.Option(help="for a repeatable mix")] = None,
    as_json: JsonOption = False,
    amqp: AmqpOption = None,
) -> None:
    """Drive a command mix at a fixed rate and print what came back.

    e.g. `cqrs load --rate 200 --duration 30 --mix open=1,deposit=5,withdraw=3,invalid=0.1`.
    Invalid commands are rejected and dead-lettered (see `cqrs dlq list`). Exit 1 when no
    command was accepted.
    """
    try:
        parsed = Mix.parse(mix)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mix") from e
    workload = Workload(seed if seed is not None else random.randrange(2**31), hot_accounts, parsed)

    async def go() -> tuple[Tally, float]:
        async with await CommandClient.connect(amqp_url(amqp)) as client:
            progress = Progress(
                TextColumn("[bold]load"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[tally]}"),
                TimeElapsedColumn(),
                console=out(),
                disable=as_json,  # --json prints the summary only
            )
            task = progress.add_task("load", total=max(1, round(rate * duration)), tally="")

            def on_reply(tally: Tally) -> None:
                progress.update(task, completed=tally.replied, tally=tally.line())

            with progress:
                return await drive(
                    client,
                    workload,
                    rate=rate,
                    duration=duration,
                    max_in_flight=max_in_flight,
                    timeout=timeout,
                    on_reply=on_reply,
                )

    tally, elapsed = run(go())
    result = summary(tally, elapsed, rate=rate, duration=duration)
    if as_json:
        print_json(result)
    else:
        out().print(_table(result))
    if not result["accepted"]:
        raise typer.Exit(EXIT_ERROR)
