"""Tracing: off by default and then invisible; on, the trace context rides the messages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from command_service.adapters.broker import event_message
from command_service.domains import ledger
from command_service.model.authorization import Actor
from command_service.service_layer.event_store import StoredEvent
from command_service.service_layer.handlers import handle_command
from command_service.service_layer.registry import CommandRegistry
from cqrs_runtime import tracing
from cqrs_runtime.settings import CommonSettings
from shared.client import CommandClient, envelope_for
from shared.ledger import OpenAccount
from shared.messages import EventEnvelope
from shared.topology import AGGREGATE_ID_HEADER
from tests.tracing_support import named, traced
from tests.unit.fakes import FakeEventStore

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def ids(traceparent: str) -> tuple[int, int]:
    """The trace id and parent span id a `traceparent` names."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


class RecordingExchange:
    """Keeps what would have been published."""

    def __init__(self) -> None:
        self.published: list[aio_pika.Message] = []

    async def publish(self, message: aio_pika.Message, routing_key: str, **_: Any) -> None:
        self.published.append(message)


def client_on(exchange: RecordingExchange) -> CommandClient:
    return CommandClient(
        cast(AbstractRobustConnection, None),
        cast(AbstractRobustChannel, None),
        cast(AbstractExchange, exchange),
        cast(AbstractQueue, None),
    )


async def publish_one(exchange: RecordingExchange) -> aio_pika.Message:
    envelope = envelope_for(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4())
    await client_on(exchange).publish(envelope, "account", reply=False)
    return exchange.published[-1]


async def open_account(store: FakeEventStore) -> None:
    envelope = envelope_for(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4())
    reply = await handle_command(
        envelope,
        store=store,
        actor=Actor.anonymous(),
        registry=CommandRegistry.from_domains([ledger.domain]),
        concurrency_retries=0,
    )
    assert reply.status == "accepted"


def stored_event(metadata: dict[str, Any]) -> StoredEvent:
    return StoredEvent(
        position=1,
        event_id=uuid.uuid4(),
        stream_id=uuid.uuid4(),
        aggregate_type="account",
        version=1,
        type="AccountOpened",
        schema_version=1,
        data={"owner_id": "o", "currency": "EUR"},
        metadata=metadata,
        recorded_at=datetime.now(UTC),
    )


class TestTracingOff:
    def test_is_off_by_default(self) -> None:
        assert CommonSettings().tracing_enabled is False
        assert tracing.configure_tracing("tests", CommonSettings()) is False
        assert not tracing.enabled()

    def test_reads_the_setting_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CQRS_TRACING_ENABLED", "true")
        assert CommonSettings().tracing_enabled is True

    async def test_the_client_adds_no_trace_headers(self) -> None:
        message = await publish_one(RecordingExchange())
        assert set(message.headers) == {AGGREGATE_ID_HEADER}

    def test_helpers_do_nothing(self) -> None:
        headers: dict[str, Any] = {}
        tracing.inject(headers)
        assert headers == {}
        assert tracing.current_traceparent() is None
        assert tracing.extract({"traceparent": TRACEPARENT}) is None
        with tracing.span("command X", attributes={"a": 1}) as span:
            span.set("b", 2)
            span.rename("command Y")

    async def test_stays_off_inside_a_trace_someone_else_started(self) -> None:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("caller").start_as_current_span("caller"):
            assert tracing.current_traceparent() is None
            with tracing.span("command X"):
                pass
        assert [span.name for span in exporter.get_finished_spans()] == ["caller"]

    async def test_stored_events_and_published_messages_are_as_before(self) -> None:
        store = FakeEventStore()
        await open_account(store)
        # The metadata without tracing: no trace context (the sender, `user`, is always kept).
        assert {tuple(event.metadata) for event in store.events} == {
            ("correlation_id", "causation_id", "user")
        }
        message = event_message(store.events[0].to_envelope())
        assert "traceparent" not in json.loads(message.body)["metadata"]
        assert "traceparent" not in (message.headers or {})

    def test_services_run_without_the_sdk_installed(self) -> None:
        # A fresh interpreter where the SDK and the exporter cannot be imported.
        script = textwrap.dedent(
            """
            import importlib.abc, sys

            class Missing(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
                        raise ImportError(f"No module named {name!r}")
                    return None

            sys.meta_path.insert(0, Missing())
            import command_service.bootstrap, query_service.bootstrap
            from cqrs_runtime import tracing
            from cqrs_runtime.settings import CommonSettings

            assert tracing.configure_tracing("x", CommonSettings(tracing_enabled=True)) is False
            headers = {}
            tracing.inject(headers)
            assert headers == {}
            with tracing.span("command X") as span:
                span.set("cqrs.outcome", "accepted")
            print("ok")
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "ok"
        assert "tracing_unavailable" in done.stdout + done.stderr


class TestClientTraceContext:
    """The client SDK passes on its caller's trace context as the caller's OpenTelemetry set-up
    propagates it, whether or not the services' tracing is configured in that process."""

    async def test_continues_the_callers_trace(self) -> None:
        provider = TracerProvider()
        with provider.get_tracer("caller").start_as_current_span("caller") as caller:
            message = await publish_one(RecordingExchange())
        assert not tracing.enabled()
        context = caller.get_span_context()
        assert ids(str((message.headers or {})["traceparent"])) == (
            context.trace_id,
            context.span_id,
        )

    async def test_uses_the_global_propagator(self) -> None:
        class Marker(TextMapPropagator):
            """Writes one header of its own, whatever the context."""

            def inject(
                self, carrier: Any, context: Context | None = None, setter: Any = None
            ) -> None:
                carrier["x-marker"] = "set"

            def extract(
                self, carrier: Any, context: Context | None = None, getter: Any = None
            ) -> Context:
                return context if context is not None else Context()

            @property
            def fields(self) -> set[str]:
                return {"x-marker"}

        previous = propagate.get_global_textmap()
        propagate.set_global_textmap(Marker())
        try:
            message = await publish_one(RecordingExchange())
        finally:
            propagate.set_global_textmap(previous)
        assert message.headers == {
            AGGREGATE_ID_HEADER: message.headers[AGGREGATE_ID_HEADER],
            "x-marker": "set",
        }

    def test_runs_without_opentelemetry_and_without_the_services_runtime(self) -> None:
        # A fresh interpreter where no part of OpenTelemetry can be imported.
        script = textwrap.dedent(
            """
            import asyncio, importlib.abc, sys, uuid

            class Missing(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if name == "opentelemetry" or name.startswith("opentelemetry."):
                        raise ImportError(f"No module named {name!r}")
                    return None

            sys.meta_path.insert(0, Missing())
            from shared.client import CommandClient, envelope_for
            from shared.ledger import OpenAccount

            class Exchange:
                async def publish(self, message, routing_key, **_):
                    self.message = message

            exchange = Exchange()
            client = CommandClient(None, None, exchange, None)
            envelope = envelope_for(OpenAccount(owner_id="o", currency="EUR"), uuid.uuid4())
            asyncio.run(client.publish(envelope, "account", reply=False))
            assert set(exchange.message.headers) == {"aggregate_id"}, exchange.message.headers
            loaded = sorted(m for m in sys.modules if m.split(".")[0] == "cqrs_runtime")
            print("ok", loaded)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == "ok []"


class TestTracingOn:
    async def test_the_client_injects_the_current_context(self) -> None:
        with traced() as (provider, _):
            with provider.get_tracer("t").start_as_current_span("caller") as caller:
                message = await publish_one(RecordingExchange())
            context = caller.get_span_context()
        assert ids(str((message.headers or {})["traceparent"])) == (
            context.trace_id,
            context.span_id,
        )

    async def test_the_client_adds_nothing_outside_a_span(self) -> None:
        with traced():
            message = await publish_one(RecordingExchange())
        assert set(message.headers) == {AGGREGATE_ID_HEADER}

    async def test_events_keep_the_traceparent_of_the_command_span(self) -> None:
        store = FakeEventStore()
        with traced() as (_, exporter), tracing.span("command OpenAccount"):
            await open_account(store)
        (span,) = named(exporter.get_finished_spans(), "command OpenAccount")
        context = span.get_span_context()
        assert context is not None
        (expected,) = [event.metadata["traceparent"] for event in store.events]
        assert ids(expected) == (context.trace_id, context.span_id)
        envelope = store.events[0].to_envelope()
        assert envelope.metadata.traceparent == expected
        message = event_message(envelope)
        assert (message.headers or {})["traceparent"] == expected
        assert EventEnvelope.model_validate_json(message.body) == envelope

    def test_extract_continues_the_trace_of_the_headers(self) -> None:
        with traced() as (_, exporter):
            # AMQP may hand header strings back as bytes.
            parent = tracing.extract({"traceparent": TRACEPARENT.encode()})
            with tracing.span("project AccountOpened", parent=parent, kind="consumer") as span:
                span.set("cqrs.outcome", "projected")
                span.set("cqrs.ignored", None)
        (finished,) = exporter.get_finished_spans()
        assert finished.parent is not None
        assert (finished.context.trace_id, finished.parent.span_id) == ids(TRACEPARENT)
        assert dict(finished.attributes or {}) == {"cqrs.outcome": "projected"}

    def test_headers_without_a_trace_give_no_parent(self) -> None:
        with traced():
            assert tracing.extract(None) is None
            assert tracing.extract({AGGREGATE_ID_HEADER: "x"}) is None

    def test_a_failure_is_recorded_on_the_span(self) -> None:
        with traced() as (_, exporter), pytest.raises(LookupError), tracing.span("command X"):
            raise LookupError("boom")
        (finished,) = exporter.get_finished_spans()
        assert not finished.status.is_ok
        assert [event.name for event in finished.events] == ["exception"]


def test_an_event_stored_without_traceparent_still_loads() -> None:
    envelope = stored_event({"correlation_id": "c", "causation_id": "x"}).to_envelope()
    assert envelope.metadata.traceparent is None
    # And a body from before the field existed still parses on the query side.
    body = json.loads(event_message(envelope).body)
    assert "traceparent" not in body["metadata"]
    assert EventEnvelope.model_validate(body) == envelope
