"""The printed table: medians over runs (min-max), ratios taken within each run, the targets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import median

Run = dict[str, Any]
Extract = Callable[[Run], float | None]

# Soak growth below this, after warm-up, counts as bounded (5 MiB over the 5 minutes).
BOUNDED_MIB_PER_MIN = 1.0


def _get(data: Any, *path: str | int) -> Any:
    for key in path:
        if data is None:
            return None
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def project(replicas: int, *path: str | int) -> Extract:
    return lambda run: _num(_get(run, "project", str(replicas), *path))


def reference(*path: str | int) -> Extract:
    return lambda run: _num(_get(run, *path))


def ratio(numerator: Extract, denominator: Extract) -> Extract:
    return lambda run: _ratio(numerator(run), denominator(run))


@dataclass(frozen=True)
class Summary:
    median: float | None
    low: float | None
    high: float | None
    values: list[float | None]


def summarize(runs: Sequence[Run], extract: Extract) -> Summary:
    values = [extract(run) for run in runs]
    present = [v for v in values if v is not None]
    return Summary(
        median(present),
        min(present) if present else None,
        max(present) if present else None,
        values,
    )


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "ms":
        return f"{value:.1f}"
    if kind == "s":
        return f"{value:.2f}"
    if kind == "mib":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def cell(summary: Summary, kind: str, spread: bool) -> str:
    text = fmt(summary.median, kind)
    if (
        spread
        and summary.low is not None
        and summary.high is not None
        and summary.low != summary.high
    ):
        text += f" ({fmt(summary.low, kind)}-{fmt(summary.high, kind)})"
    return text


def raw_amqp(run: Run) -> float | None:
    return _num(_get(run, "raw", "amqp", "round_trips_per_s"))


def raw_pipelined(run: Run) -> float | None:
    return _num(_get(run, "raw", "amqp_pipelined", "moved_per_s"))


def baseline_commands_only(run: Run) -> float | None:
    return _num(_get(run, "baseline", "commands_only", "accepted_per_s"))


def naive_commands(run: Run) -> float | None:
    return _num(_get(run, "naive", "commands", "accepted_per_s"))


def naive_projection(run: Run) -> float | None:
    return _num(_get(run, "naive", "projection", "events_per_s"))


BASELINE_ROWS: list[tuple[str, Extract, str]] = [
    (
        "baseline (--baseline): accepted commands/s",
        reference("baseline", "max", "accepted_per_s"),
        "n",
    ),
    ("  command side alone", baseline_commands_only, "n"),
    (
        "  CPU s per 1,000 commands: command_service",
        reference("baseline", "cpu_per_1000_commands", "command_service"),
        "s",
    ),
    ("  query_service", reference("baseline", "cpu_per_1000_commands", "query_service"), "s"),
    (
        "  one GET p99 at half load, ms",
        reference("baseline", "half_load", "api_request_ms", "p99"),
        "ms",
    ),
]
BASELINE_EXTRACTS = [extract for _, extract, _ in BASELINE_ROWS]

REFERENCE_ROWS: list[tuple[str, Extract, str]] = [
    ("raw AMQP round trip (consume, confirmed publish, reply)/s", raw_amqp, "n"),
    ("raw AMQP pipelined (confirms in flight, ack multiple) msg/s", raw_pipelined, "n"),
    (
        "  CPU s per 1,000 messages: RabbitMQ",
        reference("raw", "amqp_pipelined", "cpu_per_1000", "rabbitmq"),
        "s",
    ),
    (
        "raw asyncpg append, event store's statements, appends/s",
        reference("raw", "append", "appends_per_s"),
        "n",
    ),
    ("  events/s", reference("raw", "append", "events_per_s"), "n"),
    (
        "raw asyncpg append, one statement, appends/s",
        reference("raw", "append_one_statement", "appends_per_s"),
        "n",
    ),
    (
        "raw MongoDB guarded update_one, 64 in flight, /s",
        reference("raw", "mongo", "single_updates_per_s"),
        "n",
    ),
    (
        "raw MongoDB guarded bulk_write of 64, updates/s",
        reference("raw", "mongo", "bulk_64_updates_per_s"),
        "n",
    ),
    (
        "raw MongoDB guarded bulk_write of 500, updates/s",
        reference("raw", "mongo", "bulk_500_updates_per_s"),
        "n",
    ),
    ("naive pipeline: accepted commands/s", naive_commands, "n"),
    ("naive pipeline: events projected/s", naive_projection, "n"),
    *BASELINE_ROWS,
]


def project_rows(replicas: int) -> list[tuple[str, Extract, str]]:
    def p(*path: str | int) -> Extract:
        return project(replicas, *path)

    return [
        ("accepted commands/s, closed loop (max)", p("max", "accepted_per_s"), "n"),
        ("  all replies/s (accepted + rejected)", p("max", "replies_per_s"), "n"),
        ("  ÷ raw AMQP round trip", ratio(p("max", "accepted_per_s"), raw_amqp), "pct"),
        ("  ÷ raw AMQP pipelined", ratio(p("max", "accepted_per_s"), raw_pipelined), "pct"),
        (
            "  ÷ naive commands (target >= 2.5x)",
            ratio(p("max", "accepted_per_s"), naive_commands),
            "x",
        ),
        ("  reply latency p50 / p99 at max, ms", p("max", "reply_ms", "p50"), "ms"),
        ("", p("max", "reply_ms", "p99"), "ms"),
        (
            "  machine CPU busy at max",
            lambda r: _ratio(p("max", "machine_busy_pct")(r), 100.0),
            "pct",
        ),
        (
            "  with the query service stopped (command side alone)",
            p("commands_only", "accepted_per_s"),
            "n",
        ),
        (
            "    ÷ the baseline's (target >= 5x)",
            ratio(p("commands_only", "accepted_per_s"), baseline_commands_only),
            "x",
        ),
        ("  pipeline idle again after max, s", p("idle_after_max_s"), "s"),
        (
            "  MongoDB writes per event projected: read models",
            p("max", "mongo_writes", "read_model_writes_per_event"),
            "s",
        ),
        (
            "    server write commands (serverStatus)",
            p("max", "mongo_writes", "server_write_ops_per_event"),
            "s",
        ),
        ("events projected/s (backlog drain)", p("projection", "events_per_s"), "n"),
        (
            "  ÷ naive projection (target >= 3x)",
            ratio(p("projection", "events_per_s"), naive_projection),
            "x",
        ),
        ("  ÷ raw AMQP pipelined", ratio(p("projection", "events_per_s"), raw_pipelined), "pct"),
        ("half load: offered commands/s", p("half_load", "offered_per_s"), "n"),
        ("  command -> read model p50, ms", p("half_load", "visible_ms", "p50"), "ms"),
        ("  command -> read model p95, ms", p("half_load", "visible_ms", "p95"), "ms"),
        (
            "  command -> read model p99, ms (target <= 50)",
            p("half_load", "visible_ms", "p99"),
            "ms",
        ),
        ("  command -> reply p50 / p99, ms", p("half_load", "reply_ms", "p50"), "ms"),
        ("", p("half_load", "reply_ms", "p99"), "ms"),
        (
            "  command -> event on the bus p50 / p99, ms",
            p("half_load", "stages", "publish_to_event_on_bus_ms", "p50"),
            "ms",
        ),
        ("", p("half_load", "stages", "publish_to_event_on_bus_ms", "p99"), "ms"),
        (
            "  event on the bus -> read model p50 / p99, ms",
            p("half_load", "stages", "event_on_bus_to_visible_ms", "p50"),
            "ms",
        ),
        ("", p("half_load", "stages", "event_on_bus_to_visible_ms", "p99"), "ms"),
        (
            "  one GET /accounts/{id} p50 / p99, ms (p99 target <= 20)",
            p("half_load", "api_request_ms", "p50"),
            "ms",
        ),
        ("", p("half_load", "api_request_ms", "p99"), "ms"),
        (
            "rebuild, every read model, events/s (target >= 5,000)",
            p("rebuild", "events_per_s"),
            "n",
        ),
        ("  the replay stream alone, events/s", p("replay", "events_per_s"), "n"),
        (
            "CPU s per 1,000 commands: command_service (target <= 0.7)",
            p("cpu_per_1000_commands", "command_service"),
            "s",
        ),
        ("  query_service (target <= 1.0)", p("cpu_per_1000_commands", "query_service"), "s"),
        ("  rabbitmq", p("cpu_per_1000_commands", "rabbitmq"), "s"),
        ("  postgres", p("cpu_per_1000_commands", "postgres"), "s"),
        ("  mongo (SecantusDB)", p("cpu_per_1000_commands", "mongo"), "s"),
        ("  bench client", p("cpu_per_1000_commands", "bench"), "s"),
        ("  other processes (noise)", p("cpu_per_1000_commands", "other"), "s"),
        (
            "peak RSS MiB: command_service (max of replicas)",
            p("peak_rss_mib", "command_service"),
            "mib",
        ),
        ("  query_service (max of replicas)", p("peak_rss_mib", "query_service"), "mib"),
    ]


def _merge_pairs(rows: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """A row with an empty label continues the one before it: `p50 / p99` in one cell."""
    merged: list[tuple[str, list[str]]] = []
    for label, cells in rows:
        if not label and merged:
            previous_label, previous = merged[-1]
            merged[-1] = (
                previous_label,
                [f"{a} / {b}" for a, b in zip(previous, cells, strict=True)],
            )
        else:
            merged.append((label, cells))
    return merged


def render(result: dict[str, Any]) -> str:
    runs: list[Run] = result["runs"]
    replicas: list[int] = result["plan"]["replicas"]
    spread = len(runs) > 1
    meta = result["meta"]
    lines = [
        f"cqrs-ledger benchmark, {meta['date']}: {len(runs)} run(s), "
        + ("medians (min-max)" if spread else "one run")
        + (" -- QUICK SMOKE, numbers mean nothing" if result["plan"]["quick"] else ""),
        f"machine: {meta['nproc']} cores, {meta['cpu_model']}, {meta['memory']} RAM; "
        f"load average at start {meta['loadavg']}",
        f"servers: RabbitMQ {meta['rabbitmq']}, PostgreSQL {meta['postgres']}, "
        f"MongoDB-compatible {meta['mongo']}; commit {meta['commit']}; "
        f"service log level {result['plan']['log_level']}",
    ]
    quiet = [q for run in runs for q in (run.get("quiet") or {}).values()]
    if quiet:
        lines.append(
            "machine busy when a measurement started (other work, waited out up to "
            f"{result['plan']['quiet_wait_seconds']:.0f} s): "
            f"max {max(q['busy_before'] for q in quiet):.0%}, "
            f"waited {sum(q['waited_s'] for q in quiet):.0f} s in all"
        )
    lines.append("")
    width = 62
    baseline = result["plan"].get("baseline")
    references = result["plan"].get("references", True)
    if references or baseline is not None:
        lines.append(f"{'references (measured in the same run)':<{width}} value")
    if baseline is not None:
        lines.append(f"  baseline: {meta.get('baseline') or baseline}")
    for label, extract, kind in REFERENCE_ROWS:
        shown = baseline is not None if extract in BASELINE_EXTRACTS else references
        if not shown:
            continue
        lines.append(f"  {label:<{width - 2}} {cell(summarize(runs, extract), kind, spread)}")
    lines.append("")
    header = f"{'the project':<{width}} " + " ".join(
        f"{f'{n} replica' + ('s' if n > 1 else ''):<26}" for n in replicas
    )
    lines.append(header.rstrip())
    table: list[tuple[str, list[str]]] = []
    per_replica = [project_rows(n) for n in replicas]
    labels = [label for label, _, _ in per_replica[0]]
    for index, label in enumerate(labels):
        # A pair shown as `p50 / p99` in one cell shows medians only, or it would not fit.
        paired = not label or (index + 1 < len(labels) and not labels[index + 1])
        cells = [
            cell(summarize(runs, rows[index][1]), rows[index][2], spread and not paired)
            for rows in per_replica
        ]
        table.append((label, cells))
    for label, cells in _merge_pairs(table):
        lines.append(f"  {label:<{width - 2}} " + " ".join(f"{c:<26}" for c in cells).rstrip())
    lines.append("")
    lines.append("targets (medians; not asserted)")
    for verdict in targets(result):
        lines.append(f"  {verdict}")
    for service, top in (result.get("profile") or {}).items():
        lines.append("")
        lines.append(
            f"py-spy profile of {service} at max load ({top['samples']} samples, busy time)"
        )
        lines.append(
            "  self time by package: "
            + ", ".join(f"{n} {s}%" for n, s in top["self_by_package"][:8])
        )
        lines.append("  top frames by self time:")
        for name, share in top["self"][:12]:
            lines.append(f"  {share:5.1f}%  {name}")
        lines.append("  the project's own frames by inclusive time:")
        for name, share in top["inclusive_project"][:12]:
            lines.append(f"  {share:5.1f}%  {name}")
    return "\n".join(lines)


def _check(value: float | None, ok: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a "
    return "PASS" if ok(value) else "FAIL"


def _cpu_total(replicas: int) -> Extract:
    """CPU s per 1,000 commands of both services together."""

    def total(run: Run) -> float | None:
        command = project(replicas, "cpu_per_1000_commands", "command_service")(run)
        query = project(replicas, "cpu_per_1000_commands", "query_service")(run)
        return None if command is None or query is None else command + query

    return total


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets, each with its median; reported, never asserted."""
    runs: list[Run] = result["runs"]
    verdicts = []
    first = result["plan"]["replicas"][0]
    for n in result["plan"]["replicas"]:
        checks: list[tuple[str, Extract, str, Callable[[float], bool]]] = []
        if n == first:
            checks.append(
                (
                    "command side alone >= 5x the baseline's (--baseline DIR)",
                    ratio(project(n, "commands_only", "accepted_per_s"), baseline_commands_only),
                    "x",
                    lambda v: v >= 5,
                )
            )
        checks += [
            (
                "command-service CPU <= 0.7 s per 1,000 commands",
                project(n, "cpu_per_1000_commands", "command_service"),
                "s",
                lambda v: v <= 0.7,
            ),
            (
                "events projected/s >= 3x naive",
                ratio(project(n, "projection", "events_per_s"), naive_projection),
                "x",
                lambda v: v >= 3,
            ),
            (
                "query-service CPU <= 1.0 s per 1,000 commands",
                project(n, "cpu_per_1000_commands", "query_service"),
                "s",
                lambda v: v <= 1.0,
            ),
            (
                "<= 1.5 MongoDB read-model writes per event at max load",
                project(n, "max", "mongo_writes", "read_model_writes_per_event"),
                "s",
                lambda v: v <= 1.5,
            ),
            (
                "accepted commands/s end to end >= 2.5x naive",
                ratio(project(n, "max", "accepted_per_s"), naive_commands),
                "x",
                lambda v: v >= 2.5,
            ),
            (
                "p99 command -> read model <= 50 ms at half load",
                project(n, "half_load", "visible_ms", "p99"),
                "ms",
                lambda v: v <= 50,
            ),
            (
                "p99 GET /accounts/{id} <= 20 ms at half load",
                project(n, "half_load", "api_request_ms", "p99"),
                "ms",
                lambda v: v <= 20,
            ),
        ]
        if n == first:
            checks.append(
                (
                    "rebuild >= 5,000 events/s",
                    project(n, "rebuild", "events_per_s"),
                    "n",
                    lambda v: v >= 5000,
                )
            )
        else:
            checks.append(
                (
                    f"CPU per command within 10% of {first} replica(s)",
                    ratio(_cpu_total(n), _cpu_total(first)),
                    "x",
                    lambda v: v <= 1.1,
                )
            )
        for label, extract, kind, ok in checks:
            value = summarize(runs, extract).median
            verdicts.append(f"[{_check(value, ok)}] {n} replica(s): {label}: {fmt(value, kind)}")
    soak = result.get("soak")
    if soak and "growth" in soak:
        for service, growth in soak["growth"].items():
            slope = growth["slope_mib_per_min"]
            verdicts.append(
                f"[{_check(slope, lambda v: abs(v) < BOUNDED_MIB_PER_MIN)}] memory bounded, "
                f"{service}: {growth['first_mib']} -> {growth['last_mib']} MiB over "
                f"{soak['seconds']:.0f} s at {soak['rate']:.0f} commands/s, "
                f"slope {slope} MiB/min after warm-up"
            )
    else:
        verdicts.append(
            "[n/a ] memory bounded: no soak in this run (python -m bench --soak 300; the burst: "
            "scripts/bench --burst)"
        )
    return verdicts
