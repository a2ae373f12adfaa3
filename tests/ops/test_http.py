"""The control server over real HTTP on loopback, around in-process memory collectors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stalk import BaseCollector, CollectorOptions, Message, retry
from stalk.collectors.base import Backlog
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.engine.stats import DURATION_BUCKETS_S
from stalk.errors import BackendUnavailable
from stalk.ops.http import CollectorControl, ControlServer
from stalk.ops.prometheus import KNOWN_REASONS, MetricsExporter, StalkMetrics
from stalk.ops.status import Snapshot
from stalk.options import MAX_CONCURRENCY
from stalk.testing.harness import FAST_OPTIONS, wait_for
from tests.ops._proc import http

Scenario = Callable[[], Awaitable[None]]


def run(scenario: Scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


async def get(port: int, path: str, method: str = "GET", **kw: Any) -> tuple[int, bytes, Any]:
    return await asyncio.to_thread(http, port, path, method, **kw)


def make(broker: MemoryBroker, source: str, handler: Any = None, **options: Any) -> BaseCollector:
    return BaseCollector(
        MemoryAdapter(source, broker=broker),
        handler or (lambda body: None),
        CollectorOptions(**{**FAST_OPTIONS, **options}),
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_status_sleep_wake_scale_over_http() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        for i in range(5):
            broker.put("orders", f"m{i}".encode(), {}, 0)
        collector = make(broker, "orders")
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        collector.wake()
        try:
            await wait_for(lambda: collector.stats.acked == 5, 10, "five acks")
            code, body, headers = await get(server.port, "/status")
            status = json.loads(body)
            assert code == 200 and headers["Content-Type"] == "application/json"
            assert status["state"] == "awake"
            assert (status["backend"], status["source"]) == ("memory", "orders")
            assert (status["concurrency"], status["in_flight"]) == (1, 0)
            assert status["counts"]["acked"] == 5 and status["counts"]["received"] == 5
            assert (await get(server.port, "/healthz"))[:2] == (200, b"ok\n")

            code, body, _ = await get(server.port, "/sleep", "POST")
            assert code == 200 and json.loads(body)["state"] == "asleep"
            assert (await get(server.port, "/healthz"))[:2] == (200, b"ok (asleep)\n")
            broker.put("orders", b"later", {}, 0)
            await asyncio.sleep(0.2)
            assert collector.stats.received == 5
            code, body, _ = await get(server.port, "/wake", "POST")
            assert code == 200 and json.loads(body)["state"] == "awake"
            await wait_for(lambda: collector.stats.acked == 6, 10, "the message sent asleep")

            code, body, _ = await get(server.port, "/scale?concurrency=7", "POST")
            assert code == 200 and json.loads(body)["concurrency"] == 7
            assert collector.concurrency == 7
            for bad in ("0", "x", "100000"):
                code, body, _ = await get(server.port, f"/scale?concurrency={bad}", "POST")
                assert code == 400 and "concurrency must be" in json.loads(body)["error"]
            assert (await get(server.port, "/scale", "POST"))[0] == 400
        finally:
            await collector.stop(2)
            await server.close()

    run(scenario)


def test_scale_over_http_has_the_collectors_cap() -> None:
    """Hole 9 of issue 14: /scale had its own cap (10,000) over the collector's (1024), so
    ``/scale?concurrency=2000`` passed the server and failed in ``scale()``: one cap, a 400."""

    async def scenario() -> None:
        async def handler(body: bytes) -> None:
            return None

        collector = make(MemoryBroker(), "q", handler)
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        try:
            code, body, _ = await get(
                server.port, f"/scale?concurrency={MAX_CONCURRENCY + 1}", "POST"
            )
            assert code == 400, body
            assert f"from 1 to {MAX_CONCURRENCY}" in json.loads(body)["error"]
            assert collector.concurrency == 1
            code, body, _ = await get(server.port, f"/scale?concurrency={MAX_CONCURRENCY}", "POST")
            assert code == 200 and json.loads(body)["concurrency"] == MAX_CONCURRENCY
        finally:
            await collector.stop(2)
            await server.close()

    run(scenario)


def test_wrong_method_unknown_path_and_cross_origin_post() -> None:
    async def scenario() -> None:
        collector = make(MemoryBroker(), "q")
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        try:
            code, _, headers = await get(server.port, "/sleep")
            assert code == 405 and headers["Allow"] == "POST"
            assert (await get(server.port, "/metrics", "POST"))[0] == 405
            assert (await get(server.port, "/nope"))[0] == 404
            origin = {"Origin": "http://evil.example"}
            assert (await get(server.port, "/sleep", "POST", headers=origin))[0] == 403
            code, body, _ = await get(server.port, "/healthz")
            assert (code, body) == (503, b"not started\n")
        finally:
            await server.close()

    run(scenario)


class FlakyAdapter(MemoryAdapter):
    """A memory adapter whose broker goes away on demand, with a password in its error."""

    down = False

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        if self.down:
            raise BackendUnavailable("cannot connect to amqp://stalk:hunter2@broker:5672/")
        return await super().get_messages(max_messages, wait_s)


def test_healthz_503_with_reason_when_the_broker_is_down_and_no_password_leaks() -> None:
    async def scenario() -> None:
        adapter = FlakyAdapter("q")
        collector = BaseCollector(adapter, lambda body: None, CollectorOptions(**FAST_OPTIONS))
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        collector.wake()
        try:
            assert (await get(server.port, "/healthz"))[0] == 200
            adapter.down = True
            await wait_for(lambda: not collector.healthy, 10, "the failed poll")
            code, body, _ = await get(server.port, "/healthz")
            assert code == 503
            assert body.decode().startswith("poll failed: cannot connect to amqp://stalk:***@")
            _, status, _ = await get(server.port, "/status")
            _, metrics, _ = await get(server.port, "/metrics")
            assert b"hunter2" not in body + status + metrics
            adapter.down = False
            await wait_for(lambda: collector.healthy, 10, "the broker back")
            assert (await get(server.port, "/healthz"))[0] == 200
        finally:
            await collector.stop(2)
            await server.close()

    run(scenario)


def test_metrics_parse_with_prometheus_client_parser() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        for body in (b"ok", b"ok", b"fatal", b"retry"):
            broker.put("jobs", body, {}, 0)

        def handler(body: bytes, message: Message) -> Any:
            if body == b"fatal":
                raise ValueError("bad")  # a raise is a retry; max_retries=0 exhausts it
            if body == b"retry":
                return retry("later", delay=0)
            return None

        collector = make(broker, "jobs", handler, max_retries=0)
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        collector.wake()
        try:
            await wait_for(lambda: collector.stats.acked == 4, 10, "four settled")
            code, body, headers = await get(server.port, "/metrics")
            assert code == 200 and headers["Content-Type"].startswith("text/plain")
            got = samples(body.decode())
            labels = (("backend", "memory"), ("source", "jobs"))
            assert got[("stalk_messages_received_total", labels)] == 4
            # the summary's vocabulary: 2 acked, 2 to the error topic (not 4 "acked")
            assert got[("stalk_messages_acked_total", labels)] == 2
            exhausted = tuple(sorted((*labels, ("reason", "retries_exhausted"))))
            assert got[("stalk_messages_errored_total", exhausted)] == 2
            assert got[("stalk_handler_duration_seconds_count", labels)] == 4
            inf = tuple(sorted((*labels, ("le", "+Inf"))))
            assert got[("stalk_handler_duration_seconds_bucket", inf)] == 4
            assert got[("stalk_concurrency", labels)] == 1
            assert got[("stalk_in_flight", labels)] == 0
            assert got[("stalk_healthy", labels)] == 1
            assert any(name.startswith("process_") for name, _ in got)  # prometheus-client's
        finally:
            await collector.stop(2)
            await server.close()

    run(scenario)


#: Every family /metrics writes for one collector: (name, type, {sample name: label names}).
#: The names and labels dashboards and alerts rely on; a change here is a breaking change.
METRIC_SHAPE = [
    ("stalk_awake", "gauge", {"stalk_awake": ("backend", "source")}),
    ("stalk_backlog_messages", "gauge", {"stalk_backlog_messages": ("backend", "source", "state")}),
    (
        "stalk_backlog_oldest_age_seconds",
        "gauge",
        {"stalk_backlog_oldest_age_seconds": ("backend", "source")},
    ),
    ("stalk_broker_errors", "counter", {"stalk_broker_errors_total": ("backend", "source")}),
    ("stalk_concurrency", "gauge", {"stalk_concurrency": ("backend", "source")}),
    (
        "stalk_handler_duration_seconds",
        "histogram",
        {
            "stalk_handler_duration_seconds_bucket": ("backend", "le", "source"),
            "stalk_handler_duration_seconds_count": ("backend", "source"),
            "stalk_handler_duration_seconds_sum": ("backend", "source"),
        },
    ),
    ("stalk_healthy", "gauge", {"stalk_healthy": ("backend", "source")}),
    ("stalk_in_flight", "gauge", {"stalk_in_flight": ("backend", "source")}),
    ("stalk_messages_acked", "counter", {"stalk_messages_acked_total": ("backend", "source")}),
    ("stalk_messages_dropped", "counter", {"stalk_messages_dropped_total": ("backend", "source")}),
    (
        "stalk_messages_errored",
        "counter",
        {"stalk_messages_errored_total": ("backend", "reason", "source")},
    ),
    (
        "stalk_messages_received",
        "counter",
        {"stalk_messages_received_total": ("backend", "source")},
    ),
    (
        "stalk_messages_released",
        "counter",
        {"stalk_messages_released_total": ("backend", "source")},
    ),
    ("stalk_messages_retried", "counter", {"stalk_messages_retried_total": ("backend", "source")}),
    ("stalk_settle_failures", "counter", {"stalk_settle_failures_total": ("backend", "source")}),
]


def busy_snapshot(source: str = "q") -> Snapshot:
    collector = make(MemoryBroker(), source)
    collector.stats.received = 3
    collector.stats.observe(0.003)
    collector.stats.observe(7.0)
    collector.stats.errored["fatal"] += 1
    collector.stats.backlog = Backlog(ready=1, delayed=2, in_flight=3, errors=4, oldest_age_s=5.0)
    return Snapshot.of(collector)


def test_metrics_names_and_labels_stay_the_same() -> None:
    body, content_type = MetricsExporter(lambda: [busy_snapshot()], process_metrics=False).render()
    assert content_type.startswith("text/plain")
    parsed = list(text_string_to_metric_families(body.decode()))
    shape = [
        (f.name, f.type, {s.name: tuple(sorted(s.labels)) for s in f.samples})
        for f in sorted(parsed, key=lambda f: f.name)
    ]
    assert shape == METRIC_SHAPE
    got = samples(body.decode())
    values = {
        name: {dict(labels).get(key) for (n, labels) in got if n == name}
        for name, key in (
            ("stalk_handler_duration_seconds_bucket", "le"),
            ("stalk_messages_errored_total", "reason"),
            ("stalk_backlog_messages", "state"),
        )
    }
    assert values["stalk_handler_duration_seconds_bucket"] == {
        *(repr(float(b)) for b in DURATION_BUCKETS_S),
        "+Inf",
    }
    assert values["stalk_messages_errored_total"] == set(KNOWN_REASONS)
    assert values["stalk_backlog_messages"] == {"ready", "delayed", "in_flight", "errors"}


def test_metrics_escape_an_odd_source_name() -> None:
    snapshot = busy_snapshot('odd "name"\\\n')
    got = samples(MetricsExporter(lambda: [snapshot]).render()[0].decode())
    source = (("backend", "memory"), ("source", 'odd "name"\\\n'))
    assert got[("stalk_messages_received_total", source)] == 3
    le = tuple(sorted((*source, ("le", "0.005"))))
    assert got[("stalk_handler_duration_seconds_bucket", le)] == 1
    assert got[("stalk_backlog_oldest_age_seconds", source)] == 5.0


def test_exporter_registers_into_a_given_registry_without_process_metrics() -> None:
    registry = CollectorRegistry(auto_describe=False)
    exporter = MetricsExporter(lambda: [busy_snapshot()], registry=registry)
    assert exporter.registry is registry
    body, _ = exporter.render()
    assert body == generate_latest(registry)
    names = {name for name, _ in samples(body.decode())}
    assert "stalk_messages_received_total" in names
    assert not any(name.startswith("process_") for name in names)


def test_two_collectors_in_one_process() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        for _i in range(3):
            broker.put("a", b"x", {}, 0)
        for _i in range(5):
            broker.put("b", b"y", {}, 0)
        first, second = make(broker, "a"), make(broker, "b")
        servers = [ControlServer(CollectorControl(c), port=0) for c in (first, second)]
        for server, collector in zip(servers, (first, second), strict=True):
            assert await server.start()
            await collector.start()
            collector.wake()
        try:
            await wait_for(lambda: first.stats.acked + second.stats.acked == 8, 10, "all acks")
            for server, source, count in zip(servers, "ab", (3, 5), strict=True):
                got = samples((await get(server.port, "/metrics"))[1].decode())
                key = ("stalk_messages_acked_total", (("backend", "memory"), ("source", source)))
                assert got[key] == count
            shared = CollectorRegistry(auto_describe=False)
            shared.register(StalkMetrics(lambda: [Snapshot.of(first), Snapshot.of(second)]))
            text = generate_latest(shared).decode()
            assert text.count("# TYPE stalk_messages_acked_total counter") == 1
            got = samples(text)
            for source, count in (("a", 3), ("b", 5)):
                key = ("stalk_messages_acked_total", (("backend", "memory"), ("source", source)))
                assert got[key] == count
        finally:
            for server, collector in zip(servers, (first, second), strict=True):
                await collector.stop(2)
                await server.close()

    run(scenario)


def test_port_conflict_logs_one_error_and_returns(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        collector = make(MemoryBroker(), "q")
        first = ControlServer(CollectorControl(collector), port=0)
        assert await first.start()
        second = ControlServer(CollectorControl(collector), port=first.port)
        with caplog.at_level(logging.ERROR, logger="stalk.ops.http"):
            assert not await second.start()
        await first.close()
        await second.close()
        errors = [r for r in caplog.records if r.name == "stalk.ops.http"]
        assert len(errors) == 1
        assert f"cannot listen on 127.0.0.1:{first.port}" in errors[0].getMessage()

    run(scenario)


class Boom(BaseException):
    """Escapes the poll loop's broker-error guard, as a bug would."""


class BrokenLoopAdapter(MemoryAdapter):
    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        raise Boom("bug")


def test_healthz_503_when_the_intake_loop_died(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        collector = BaseCollector(
            BrokenLoopAdapter("q"), lambda body: None, CollectorOptions(**FAST_OPTIONS)
        )
        server = ControlServer(CollectorControl(collector), port=0)
        assert await server.start()
        await collector.start()
        collector.wake()
        try:
            await wait_for(lambda: not collector.intake_alive, 10, "the poll loop to die")
            code, body, _ = await get(server.port, "/healthz")
            assert (code, body) == (503, b"intake loop stopped (see the log)\n")
        finally:
            await collector.stop(1)
            await server.close()

    with caplog.at_level(logging.CRITICAL, logger="stalk.engine.collector"):
        run(scenario)
