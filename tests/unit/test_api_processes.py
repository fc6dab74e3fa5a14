"""The projector's report to its API processes: every counter crosses, and staleness shows."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from prometheus_client import generate_latest

from cqrs_runtime.supervision import Failure, Supervisor
from query_service.entrypoints.api_processes import (
    STALE_AFTER_SECONDS,
    ProjectorReports,
    metrics_report,
)
from query_service.metrics import ProjectorMetrics, QueryMetrics


def projector_metrics() -> ProjectorMetrics:
    metrics = ProjectorMetrics()
    metrics.count_projected("MoneyDeposited", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    metrics.count_projected("MoneyDeposited", datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    metrics.duplicates, metrics.parked, metrics.requeued = 2, 1, 3
    metrics.last_parked_reason = "unknown_event_type"
    return metrics


def test_every_counter_of_the_projector_crosses_as_json() -> None:
    sent = projector_metrics()
    reports = ProjectorReports()
    reports.apply(json.loads(json.dumps({"metrics": metrics_report(sent)})))
    assert reports.metrics == sent


async def test_the_api_process_renders_the_projectors_counters_and_failures() -> None:
    reports = ProjectorReports()
    reports.apply(
        {
            "metrics": metrics_report(projector_metrics()),
            "failures_total": {"api-process-0": 2},
            "failing": [],
        }
    )
    supervisor = Supervisor()
    supervisor.outcome("http-api", Failure("x", "y"))
    prometheus = QueryMetrics(
        reports.metrics, supervisor, task_failures_elsewhere=lambda: reports.failures_total
    )
    text = generate_latest(prometheus.registry).decode()
    assert 'cqrs_events_projected_total{event_type="MoneyDeposited"} 2.0' in text
    assert 'cqrs_task_failures_total{task="api-process-0"} 2.0' in text
    assert 'cqrs_task_failures_total{task="http-api"} 1.0' in text


def test_a_projector_that_stopped_reporting_is_not_ready() -> None:
    reports = ProjectorReports()
    assert reports.readiness() == {"ok": False, "reason": "projector_not_reporting"}
    reports.apply({"metrics": {}})
    assert reports.readiness()["ok"] is True
    assert reports.received_at is not None
    reports.received_at = time.monotonic() - STALE_AFTER_SECONDS - 1
    assert reports.readiness()["reason"] == "projector_not_reporting"
