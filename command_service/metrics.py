"""The command service's Prometheus metrics, in a registry of the service's own.

One `CommandMetrics` is built by the composition root and handed to the parts that count (the
consumer, the event store, the relay); `GET /metrics` renders its registry. A registry per
service, not the process-wide default, so several services started in one process never clash.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cqrs_runtime.supervision import Supervisor, TaskFailuresCollector

# `failed`: the handling raised something unexpected; the command was dead-lettered.
OUTCOMES = ("accepted", "rejected", "duplicate", "dead_lettered", "requeued", "failed")
# The `type` label of a message that names no registered command: what a client sends must not
# grow the number of series.
UNKNOWN_TYPE = "unknown"

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_HANDLING = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class CommandMetrics:
    """Every metric the command service exposes."""

    def __init__(self, command_types: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self._types = frozenset(command_types)
        self.commands = Counter(
            "cqrs_commands",
            "Command messages settled, by command type and outcome",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.command_handling_seconds = Histogram(
            "cqrs_command_handling_seconds",
            "From a command message's delivery to its ack (or nack)",
            ["type"],
            buckets=_HANDLING,
            registry=self.registry,
        )
        self.command_batch_size = Histogram(
            "cqrs_command_batch_size",
            "Command messages of one partition taken together (those delivered already)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.command_batch_splits = Counter(
            "cqrs_command_batch_splits",
            "Batches handled again one command at a time: another writer came first, or a "
            "command's handling raised",
            registry=self.registry,
        )
        self.event_append_seconds = Histogram(
            "cqrs_event_append_seconds",
            "The event store's append transaction (events, command records, notify), of one "
            "command or of a batch",
            buckets=_FAST,
            registry=self.registry,
        )
        self.relay_backlog_events = Gauge(
            "cqrs_relay_backlog_events",
            "Events committed but not yet published by the relay (refreshed when scraped)",
            registry=self.registry,
        )
        self.relay_publish_seconds = Histogram(
            "cqrs_relay_publish_seconds",
            "Publishing one relay batch until the broker confirmed all of it",
            buckets=_FAST,
            registry=self.registry,
        )
        self.events_published = Counter(
            "cqrs_events_published",
            "Events the relay published with a broker confirm (a re-published event counts again)",
            registry=self.registry,
        )
        self.partitions_owned = Gauge(
            "cqrs_partitions_owned",
            "Command partitions this replica holds the lease of and consumes",
            registry=self.registry,
        )
        self.replies_refused = Counter(
            "cqrs_replies_refused",
            "Replies not sent because the command's reply_to is not a reply queue",
            registry=self.registry,
        )
        # Every series exists from the start, so rates and dashboards see zeros, not gaps.
        for command_type in (*sorted(self._types), UNKNOWN_TYPE):
            self.command_handling_seconds.labels(command_type)
            for outcome in OUTCOMES:
                self.commands.labels(command_type, outcome)

    def watch(self, supervisor: Supervisor) -> None:
        """Expose the supervisor's task failures (`cqrs_task_failures_total`) here."""
        self.registry.register(TaskFailuresCollector(supervisor))

    def type_label(self, command_type: str | None) -> str:
        return command_type if command_type in self._types else UNKNOWN_TYPE

    def settled(self, command_type: str | None, outcome: str, seconds: float) -> None:
        """Count one command message settled with `outcome` after `seconds` in hand."""
        label = self.type_label(command_type)
        self.commands.labels(label, outcome).inc()
        self.command_handling_seconds.labels(label).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
