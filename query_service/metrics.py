"""The query service's Prometheus metrics, in a registry of the service's own.

The projector counts in `ProjectorMetrics`, plain integers on the hot path; `ProjectorCollector`
turns them into Prometheus families when scraped, so `/metrics` and `/readyz` read one source.
Each app gets its own `CollectorRegistry`, so several services in one process never clash.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cqrs_runtime.supervision import Supervisor, TaskFailuresCollector

# Label value of a request no route matched, so stray paths cannot grow the label set.
UNMATCHED_ROUTE = "<unmatched>"


@dataclass
class ProjectorMetrics:
    """Counters of this process's projector consumer; `parked` is the alert signal."""

    projected_by_type: collections.Counter[str] = field(default_factory=collections.Counter)
    duplicates: int = 0
    parked: int = 0
    # Parks the full parked queue refused; each such event went back to its partition.
    park_refused: int = 0
    requeued: int = 0
    last_parked_reason: str | None = None
    newest_recorded_at: datetime | None = None
    # MongoDB write round trips of this process, by collection (its generation left out).
    writes: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def projected(self) -> int:
        return sum(self.projected_by_type.values())

    def count_projected(self, event_type: str, recorded_at: datetime) -> None:
        self.projected_by_type[event_type] += 1
        if self.newest_recorded_at is None or recorded_at > self.newest_recorded_at:
            self.newest_recorded_at = recorded_at

    def lag_seconds(self) -> float:
        """Now minus `recorded_at` of the newest projected event (NaN before the first)."""
        if self.newest_recorded_at is None:
            return math.nan
        return max(time.time() - self.newest_recorded_at.timestamp(), 0.0)


class ProjectorCollector(Collector):
    """Exposes a `ProjectorMetrics` in the Prometheus format when scraped."""

    def __init__(self, metrics: ProjectorMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        projected = CounterMetricFamily(
            "cqrs_events_projected",
            "Events written into at least one read model, by event type",
            labels=["event_type"],
        )
        for event_type, count in sorted(metrics.projected_by_type.items()):
            projected.add_metric([event_type], count)
        yield projected
        yield CounterMetricFamily(
            "cqrs_duplicates_suppressed",
            "Redelivered or duplicated events every read model already had",
            value=metrics.duplicates,
        )
        yield CounterMetricFamily(
            "cqrs_parked_events",
            "Events set aside in the parked queue with the reason they cannot be projected",
            value=metrics.parked,
        )
        yield CounterMetricFamily(
            "cqrs_park_refused",
            "Parks refused by the full parked queue; the event stays in its partition and is "
            "retried",
            value=metrics.park_refused,
        )
        writes = CounterMetricFamily(
            "cqrs_read_model_writes",
            "MongoDB write round trips (insert, update, delete commands) by collection, the "
            "generation left out; with cqrs_events_projected, the writes per event",
            labels=["collection"],
        )
        for collection, count in sorted(metrics.writes.items()):
            writes.add_metric([collection], count)
        yield writes
        yield GaugeMetricFamily(
            "cqrs_projection_lag_seconds",
            "Now minus recorded_at of the newest event this process projected",
            value=metrics.lag_seconds(),
        )


class QueryMetrics:
    """The metrics one query-service app serves at `/metrics`."""

    def __init__(
        self,
        projector: ProjectorMetrics | None = None,
        supervisor: Supervisor | None = None,
        *,
        task_failures_elsewhere: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        if projector is not None:
            self.registry.register(ProjectorCollector(projector))
        if supervisor is not None:
            self.registry.register(TaskFailuresCollector(supervisor, task_failures_elsewhere))
        self.projection_lag_events = Gauge(
            "cqrs_projection_lag_events",
            "Events waiting in the projector's partition queues (refreshed when scraped)",
            registry=self.registry,
        )
        self.projection_lag_events.set(math.nan)
        self.http_request_seconds = Histogram(
            "cqrs_http_request_seconds",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_requests_in_flight = Gauge(
            "cqrs_http_requests_in_flight",
            "Requests being served, the probes left out (refused beyond CQRS_HTTP_MAX_CONCURRENCY)",
            registry=self.registry,
        )
        self.read_waits = Gauge(
            "cqrs_http_read_waits",
            "Reads waiting for min_version / min_position (refused beyond "
            "CQRS_READ_WAIT_MAX_WAITERS)",
            registry=self.registry,
        )
        self.http_refused = Counter(
            "cqrs_http_refused",
            "Requests the API's limits refused, by reason code",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
