"""Tracing turned on for a test, with the spans kept in memory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cqrs_runtime import tracing
from cqrs_runtime.settings import CommonSettings


@contextmanager
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """Tracing on (through `configure_tracing`, as the services do it) until the block ends."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure_tracing(
        "tests", CommonSettings(tracing_enabled=True), provider=provider
    )
    try:
        yield provider, exporter
    finally:
        tracing.shutdown_tracing()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]
