"""OpenTelemetry: one CONSUMER span per message, continuing the producer's trace."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from stalk import BaseCollector, CollectorOptions, Message, fatal
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.ops.tracing import traced
from stalk.testing.harness import FAST_OPTIONS, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize("is_async", [False, True])
def test_span_per_message_with_parent_from_attributes(is_async: bool) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inner: list[Any] = []

    def body_of(body: bytes) -> Any:
        from opentelemetry import trace

        inner.append(trace.get_current_span().get_span_context().trace_id)
        return fatal("no good") if body == b"bad" else None

    async def async_handler(body: bytes) -> Any:
        return body_of(body)

    def sync_handler(body: bytes) -> Any:
        return body_of(body)

    handler = traced(async_handler if is_async else sync_handler, backend="memory",
                     tracer_provider=provider)  # fmt: skip

    async def scenario() -> None:
        broker = MemoryBroker()
        broker.put("orders", b"good", {"traceparent": PARENT}, 0)
        broker.put("orders", b"bad", {}, 0)
        collector = BaseCollector(
            MemoryAdapter("orders", broker=broker), handler, CollectorOptions(**FAST_OPTIONS)
        )
        await collector.start()
        collector.wake()
        await wait_for(lambda: collector.stats.acked == 2, 10, "two settled")
        await collector.stop(2)

    asyncio.run(scenario())
    spans = {
        span.attributes["messaging.message.id"]: span for span in exporter.get_finished_spans()
    }
    assert len(spans) == 2
    good, bad = spans["1"], spans["2"]
    assert good.kind is SpanKind.CONSUMER and good.name == "orders process"
    assert format(good.context.trace_id, "032x") == TRACE_ID  # continues the producer's trace
    assert good.parent is not None and format(good.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert inner[0] == good.context.trace_id  # current while the handler ran
    assert good.attributes["messaging.system"] == "memory"
    assert good.attributes["stalk.attempt"] == 1
    assert good.attributes["stalk.result"] == "ok"
    assert bad.parent is None
    assert bad.attributes["stalk.result"] == "fatal"
    assert bad.status.status_code is StatusCode.ERROR


def test_traced_handler_keeps_its_name_and_message_shape() -> None:
    from stalk.engine.handler import prepare

    def handler(body: bytes, message: Message) -> None:
        return None

    prepared = prepare(traced(handler, backend="memory", tracer_provider=TracerProvider()))
    assert prepared.wants_message and not prepared.is_async
    assert prepared.name.endswith(
        ":test_traced_handler_keeps_its_name_and_message_shape.<locals>.handler"
    )
