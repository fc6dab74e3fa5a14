"""Optional OpenTelemetry tracing: W3C trace context in AMQP headers, spans around handling.

Off by default. `configure_tracing` turns it on when `CQRS_TRACING_ENABLED` is true and the
OpenTelemetry SDK and OTLP exporter are installed (`pip install 'cqrs-ledger[tracing]'`); the
exporter reads the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) and the
resource the standard `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`. Until then every function
here is a no-op: no header is added, no span is made, and the SDK is never imported.

The trace context travels as `traceparent` / `tracestate` message headers from the client to the
command consumer; the events a command appends keep its `traceparent` in their metadata, because
the relay publishes them later, from another task, and the projector continues the trace there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import structlog

from cqrs_runtime.settings import CommonSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace import SpanKind as OtelSpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)

# W3C trace context, version 00: what may travel as a `traceparent` header or be stored.
_TRACEPARENT_FORMAT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

SpanKind = Literal["consumer", "producer", "internal"]
AttributeValue = str | int | float | bool


class _Tracing:
    """What `configure_tracing` set up; `tracer is None` means tracing is off."""

    tracer: Tracer | None = None
    provider: TracerProvider | None = None
    propagator: TraceContextTextMapPropagator | None = None


_state = _Tracing()


def enabled() -> bool:
    return _state.tracer is not None


def configure_tracing(
    service_name: str, settings: CommonSettings, *, provider: TracerProvider | None = None
) -> bool:
    """Turn tracing on when the settings ask for it and OpenTelemetry is installed.

    `provider` replaces the OTLP exporter set-up (tests pass one with an in-memory exporter).
    Returns whether tracing is on. Call it once per process, like `configure_logging`.
    """
    if not settings.tracing_enabled:
        return False
    if provider is None:
        try:
            provider = _otlp_provider(service_name)
        except ImportError as e:
            log.warning(
                "tracing_unavailable",
                error=str(e),
                hint="install the tracing extra: pip install 'cqrs-ledger[tracing]'",
            )
            return False
        from opentelemetry import trace

        trace.set_tracer_provider(provider)
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _state.propagator = TraceContextTextMapPropagator()
    _state.provider = provider
    _state.tracer = provider.get_tracer("cqrs-ledger")
    log.info("tracing_enabled", service=provider.resource.attributes.get("service.name"))
    return True


def _otlp_provider(service_name: str) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME, when set, names the service; Resource.create reads it.
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def shutdown_tracing() -> None:
    """Export what is still buffered and turn tracing off (at shutdown; tests)."""
    provider, _state.provider, _state.tracer, _state.propagator = _state.provider, None, None, None
    if provider is not None:
        provider.shutdown()


def inject(headers: MutableMapping[str, Any]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to message headers, if any."""
    if _state.propagator is None:
        return
    _state.propagator.inject(headers)


def is_traceparent(value: object) -> bool:
    """Whether `value` has the W3C `traceparent` format (and so fits a message header)."""
    return isinstance(value, str) and _TRACEPARENT_FORMAT.match(value) is not None


def current_traceparent() -> str | None:
    """The current span's `traceparent`, to keep with what it produces (stored events)."""
    if _state.propagator is None:
        return None
    carrier: dict[str, str] = {}
    _state.propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def extract(headers: Mapping[str, Any] | None) -> Context | None:
    """The trace context in message headers (`None` when off or when they carry none)."""
    if _state.propagator is None or not headers:
        return None
    carrier = {name: text for name in TRACE_HEADERS if (text := _text(headers.get(name)))}
    if TRACEPARENT not in carrier:
        return None
    return _state.propagator.extract(carrier)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else None


class SpanHandle:
    """The span in hand; does nothing when tracing is off."""

    __slots__ = ("_span",)

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def set(self, key: str, value: AttributeValue | None) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def set_all(self, attributes: Mapping[str, AttributeValue | None]) -> None:
        for key, value in attributes.items():
            self.set(key, value)

    def rename(self, name: str) -> None:
        if self._span is not None:
            self._span.update_name(name)

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make this span the current one for the block (its children's parent); an exception
        escaping the block is recorded on it and marks it as failed. It does not end it."""
        if self._span is None:
            yield
            return
        from opentelemetry.trace import use_span

        with use_span(
            self._span, end_on_exit=False, record_exception=True, set_status_on_exception=True
        ):
            yield

    def fail(self, error: BaseException) -> None:
        """Record `error` on the span and mark it as failed, as an escaping exception would."""
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def end(self) -> None:
        if self._span is not None:
            self._span.end()


_NOOP = SpanHandle(None)


def start_span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue | None] | None = None,
) -> SpanHandle:
    """Start a span (child of `parent`, else of the current span) without making it current:
    for work that enters and leaves it several times (`SpanHandle.current`) and ends it itself
    (`SpanHandle.end`). A no-op handle when tracing is off."""
    tracer = _state.tracer
    if tracer is None:
        return _NOOP
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    return SpanHandle(
        tracer.start_span(name, context=parent, kind=_otel_kind(kind), attributes=clean)
    )


def _otel_kind(kind: SpanKind) -> OtelSpanKind:
    from opentelemetry.trace import SpanKind as OtelSpanKind

    kinds = {
        "consumer": OtelSpanKind.CONSUMER,
        "producer": OtelSpanKind.PRODUCER,
        "internal": OtelSpanKind.INTERNAL,
    }
    return kinds[kind]


@contextmanager
def span(
    name: str,
    *,
    parent: Context | None = None,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue | None] | None = None,
) -> Iterator[SpanHandle]:
    """Run the block in a span (child of `parent`, else of the current span); no-op when off.

    An exception escaping the block is recorded on the span and marks it as failed.
    """
    tracer = _state.tracer
    if tracer is None:
        yield _NOOP
        return
    clean = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer.start_as_current_span(
        name, context=parent, kind=_otel_kind(kind), attributes=clean
    ) as current:
        yield SpanHandle(current)
