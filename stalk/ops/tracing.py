"""Optional OpenTelemetry: one CONSUMER span per handled message (extra ``stalk[otel]``).

Tracing wraps the user's handler instead of hooking the engine, so with tracing off the engine
runs exactly as without this module. The span is *current* while the handler runs, so spans the
handler opens (HTTP calls, database queries) become its children; when the message carries W3C
trace context in its attributes or headers (``traceparent``, ``tracestate``, ``baggage``), the span
continues the producer's trace. A Result with an error marks the span as failed.

``stalk run`` turns tracing on when a tracer provider has been configured, the way
``opentelemetry-instrument stalk run ...`` does, unless ``STALK_TRACING=off``; ``STALK_TRACING=on``
also installs the SDK with the exporter ``OTEL_TRACES_EXPORTER`` names (``console`` or ``otlp``).
Library users call :func:`traced` themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from stalk.engine.handler import prepare
from stalk.message import Message
from stalk.result import Result

logger = logging.getLogger(__name__)

#: Environment switch: ``on`` / ``off``; unset means "on when a tracer provider is configured".
ENV_SWITCH = "STALK_TRACING"


def available() -> bool:
    """Return True when the OpenTelemetry API is installed."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def wanted_tracing() -> bool:
    """Decide whether ``stalk run`` traces, from ``STALK_TRACING`` and the global provider."""
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "off", "false", "no") or not available():
        if switch in ("1", "on", "true", "yes"):
            logger.warning(
                "%s=on but opentelemetry is missing: pip install 'stalk[otel]'", ENV_SWITCH
            )
        return False
    from opentelemetry import trace

    if switch in ("1", "on", "true", "yes"):
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _install_sdk()
        return True
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _install_sdk() -> None:
    """Configure the SDK with the exporter ``OTEL_TRACES_EXPORTER`` names (default otlp)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        logger.warning("tracing needs opentelemetry-sdk: pip install 'stalk[otel]'")
        return
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    exporter: SpanExporter
    if name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            logger.warning(
                "OTLP exporter missing: pip install opentelemetry-exporter-otlp-proto-http"
            )
            return
        exporter = OTLPSpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def traced(
    handler: Callable[..., Any],
    *,
    backend: str,
    tracer_provider: Any = None,
) -> Callable[..., Any]:
    """Return ``handler`` wrapped so that each call runs inside a span.

    Args:
        handler: a handler of either shape, sync or async.
        backend: the ``messaging.system`` attribute (``sqs``, ``amqp``, ...).
        tracer_provider: a provider to use instead of the global one (tests, several apps).
    """
    from opentelemetry import propagate, trace

    prepared = prepare(handler)
    func, wants_message = prepared.func, prepared.wants_message
    tracer = trace.get_tracer("stalk", tracer_provider=tracer_provider)

    @contextmanager
    def span_for(message: Message) -> Iterator[Any]:
        parent = propagate.extract(message.attributes) if message.attributes else None
        with tracer.start_as_current_span(
            f"{message.source} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": backend,
                "messaging.operation.type": "process",
                "messaging.destination.name": message.source,
                "messaging.message.id": message.id,
                "messaging.message.body.size": len(message.body),
                "stalk.attempt": message.attempt,
            },
        ) as span:
            yield span

    def record(span: Any, value: object) -> None:
        if not isinstance(value, Result) or value.error is None:
            span.set_attribute("stalk.result", "ok")
            return
        kind = "fatal" if value.fatal else "retry" if value.retry else "error"
        span.set_attribute("stalk.result", kind)
        if isinstance(value.error, BaseException):
            span.record_exception(value.error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(value.error)[:200]))

    if prepared.is_async:

        async def wrapper(body: bytes, message: Message) -> Any:
            with span_for(message) as span:
                value = await (func(body, message) if wants_message else func(body))
                record(span, value)
                return value

    else:

        def wrapper(body: bytes, message: Message) -> Any:  # type: ignore[misc]
            with span_for(message) as span:
                value = func(body, message) if wants_message else func(body)
                record(span, value)
                return value

    # Name the wrapper after the handler for log lines; no functools.wraps, whose __wrapped__
    # would make prepare() read the handler's one-argument signature.
    wrapper.__module__ = getattr(handler, "__module__", None) or wrapper.__module__
    wrapper.__qualname__ = getattr(handler, "__qualname__", None) or type(handler).__name__
    return wrapper
