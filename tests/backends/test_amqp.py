"""RabbitMQ specialities beyond the conformance suite, against the real broker on loopback.

Delay kept in the broker across a worker crash, confirms gating the ack, poison messages that
kill the worker, a broker restart mid-stream, quorum delivery counts, exchange binding, and the
one-line error of an unreachable broker. Worker crashes are real processes killed with SIGKILL
or ``os._exit``. Every wait is for a condition, with a generous limit: no timed assertions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from stalk import BaseCollector, CollectorOptions, fatal
from stalk.collectors.amqp import AMQPAdapter, AMQPSettings
from stalk.collectors.amqp.topology import bucket_ms, delay_queue_name
from stalk.errors import BackendUnavailable
from stalk.message import ATTR_ATTEMPTS, ATTR_REASON, ATTR_SOURCE
from stalk.testing.harness import Recorder, Running, read_errors, wait_for
from tests.brokers.amqp import AMQPHarness

pytestmark = pytest.mark.broker("amqp")

ROOT = Path(__file__).resolve().parents[2]
#: Longest any one scenario may take before it fails instead of hanging.
SCENARIO_TIMEOUT_S = 110.0
PATIENCE_S = 60.0

#: A worker process: runs a collector whose handler logs each delivery to a file and then
#: returns a retry (mode "retry") or kills its own process (mode "crash").
WORKER = r"""
import asyncio, os, sys
from stalk import BaseCollector, CollectorOptions, retry
from stalk.collectors.amqp import AMQPAdapter, AMQPSettings
url, source, mode, log, queue_type, max_retries = sys.argv[1:7]

def handler(body, message):
    with open(log, "a") as f:
        f.write(f"{body.hex()} {message.attempt}\n")
    if mode == "crash":
        os._exit(3)
    return retry("later", delay=4.0)

settings = AMQPSettings(url=url, queue_type=queue_type)
adapter = AMQPAdapter(source, settings=settings)
BaseCollector(adapter, handler, CollectorOptions(max_retries=int(max_retries))).run()
"""


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT_S))


def options(**overrides: Any) -> CollectorOptions:
    return CollectorOptions(
        **{"retry_interval_s": 0.05, "max_retry_delay_s": 0.2, "shutdown_grace_s": 5.0, **overrides}
    )


async def queue_count(url: str, name: str) -> int | None:
    """Ready messages in ``name`` (None when the queue does not exist)."""
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        await connection.close()


async def wait_count(url: str, name: str, check: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while True:
        count = await queue_count(url, name)
        if count is not None and check(count):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (count {count})")
        await asyncio.sleep(0.05)


def start_worker(url: str, source: str, mode: str, log: Path, queue_type: str, max_retries: int):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [url, source, mode, str(log), queue_type, str(max_retries)]
    with open(log.with_suffix(".err"), "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# ---------------------------------------------------------------------------- delay in broker
def test_retry_delay_survives_worker_kill(amqp_harness: AMQPHarness, tmp_path: Path) -> None:
    """A retry waiting in its delay queue is delivered after the worker that made it was killed."""
    harness = amqp_harness
    log = tmp_path / "worker.log"

    async def scenario() -> None:
        source, errors = harness.new_names()
        bucket = delay_queue_name(source, bucket_ms(4.0))
        harness.queues.append(bucket)
        publisher = harness.make_adapter(source, errors)
        await publisher.open()
        await publisher.publish(b"job", {"trace": "t1"})
        await publisher.close()
        worker = start_worker(harness.url, source, "retry", log, "classic", 5)
        try:
            await wait_count(harness.url, bucket, lambda n: n == 1, "the retry in its delay queue")
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        assert log_lines(log) == [f"{b'job'.hex()} 1"]
        rec = Recorder()
        c = BaseCollector(harness.make_adapter(source, errors), rec, options())
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the delayed retry")
        later = rec.deliveries[0]
        assert later.body == b"job"
        assert later.attempt == 2
        assert later.attributes["trace"] == "t1"
        assert later.attributes["x-first-death-queue"] == bucket, "did not come from the delay"

    run(scenario())


# ---------------------------------------------------------------------------- confirms
def test_original_is_not_acked_when_error_publish_is_refused(amqp_harness: AMQPHarness) -> None:
    """A nacked error-topic publish leaves the original in the source; nothing is lost."""
    harness = amqp_harness

    async def scenario() -> None:
        source, errors = harness.new_names()
        harness.queues += [source, errors]
        connection = await aio_pika.connect(harness.url)
        channel = await connection.channel()
        await channel.declare_queue(source, durable=True)
        full = {"x-max-length": 1, "x-overflow": "reject-publish"}
        error_queue = await channel.declare_queue(errors, durable=True, arguments=full)
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=errors)
        await channel.default_exchange.publish(aio_pika.Message(b"doomed"), routing_key=source)

        def make() -> AMQPAdapter:
            settings = AMQPSettings(url=harness.url, declare="passive", reconnect_interval_s=0.2)
            return AMQPAdapter(source, error_topic=errors, settings=settings)

        c = BaseCollector(make(), lambda b: fatal("bad"), options())
        async with Running(c):
            await wait_for(lambda: c.stats.failed_settles >= 1, PATIENCE_S, "a refused publish")
        assert await queue_count(harness.url, errors) == 1, "the nacked copy reached the queue"
        assert (await queue_count(harness.url, source) or 0) >= 1, "original lost after a nack"
        await error_queue.purge()
        c = BaseCollector(make(), lambda b: fatal("bad"), options())
        async with Running(c):
            await wait_count(harness.url, errors, lambda n: n == 1, "the error copy")
        dead = await error_queue.get(no_ack=True)
        await connection.close()
        assert dead is not None and dead.body == b"doomed"
        # Each refused cycle was released and redelivered, which spends an attempt (poison
        # counting), so by now the copy may have gone as poison rather than as fatal.
        assert dead.headers[ATTR_REASON] in ("fatal", "poison")

    run(scenario())


def test_publish_returns_after_confirm(amqp_harness: AMQPHarness) -> None:
    """``publish`` (stalk send) returns once the broker has the message, delayed or not."""
    harness = amqp_harness

    async def scenario() -> None:
        source, errors = harness.new_names()
        bucket = delay_queue_name(source, bucket_ms(60.0))
        harness.queues.append(bucket)
        adapter = harness.make_adapter(source, errors)
        await adapter.open()
        try:
            ids = [await adapter.publish(f"m{i}".encode()) for i in range(20)]
            await adapter.publish(b"later", delay_s=60.0)
            assert len(set(ids)) == 20
            assert await queue_count(harness.url, source) == 20
            assert await queue_count(harness.url, bucket) == 1
            backlog = await adapter.backlog()
            assert backlog is not None
            assert (backlog.ready, backlog.delayed, backlog.errors) == (20, 1, 0)
        finally:
            await adapter.close()

    run(scenario())


# ---------------------------------------------------------------------------- poison
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_message_killing_the_worker_goes_to_error_topic(
    amqp_url: str, tmp_path: Path, queue_type: str
) -> None:
    """A handler that kills its process runs max_retries + 1 times, then the message is parked."""
    harness = AMQPHarness(amqp_url, queue_type=queue_type)
    log = tmp_path / "worker.log"
    max_retries = 2

    async def scenario() -> None:
        source, errors = harness.new_names()
        publisher = harness.make_adapter(source, errors)
        await publisher.open()
        await publisher.publish(b"\x00killer\xff", {"k": "v"})
        await publisher.close()
        for _ in range(max_retries + 3):
            worker = start_worker(amqp_url, source, "crash", log, queue_type, max_retries)
            try:
                while worker.poll() is None and not await queue_count(amqp_url, errors):
                    await asyncio.sleep(0.05)
            finally:
                if worker.poll() is None:
                    worker.terminate()
                worker.wait(timeout=30)
            if await queue_count(amqp_url, errors):
                break
        attempts = [int(line.rsplit(" ", 1)[1]) for line in log_lines(log)]
        assert attempts == [1, 2, 3], "handler runs are not max_retries + 1 counted attempts"
        dead = await read_errors(harness, errors, 1)
        assert dead[0].body == b"\x00killer\xff"
        assert dead[0].attributes[ATTR_REASON] == "poison"
        assert dead[0].attributes[ATTR_ATTEMPTS] == "3"
        assert dead[0].attributes[ATTR_SOURCE] == source
        assert dead[0].attributes["k"] == "v"

    try:
        run(scenario())
    finally:
        harness.cleanup()


# ---------------------------------------------------------------------------- broker restart
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_broker_restart_mid_stream_loses_nothing(
    amqp_url: str, rabbitmqctl: str, queue_type: str
) -> None:
    """stop_app/start_app under load: the collector reconnects and every message is handled."""
    harness = AMQPHarness(amqp_url, queue_type=queue_type, reconnect_interval_s=0.5)
    bodies = {f"m{i}".encode() for i in range(600)}
    handled: set[bytes] = set()
    deliveries: list[bytes] = []
    restarted = asyncio.Event()

    async def handler(body: bytes) -> None:
        deliveries.append(body)
        if len(deliveries) > 100:  # hold the in-flight ones across the restart
            await restarted.wait()
        handled.add(body)

    def ctl(*args: str) -> None:
        subprocess.run([rabbitmqctl, "-q", *args], check=True, capture_output=True, timeout=120)

    async def scenario() -> None:
        source, errors = harness.new_names()
        publisher = harness.make_adapter(source, errors)
        await publisher.open()
        for body in sorted(bodies):
            await publisher.publish(body)
        await publisher.close()
        c = BaseCollector(harness.make_adapter(source, errors), handler, options(concurrency=8))
        async with Running(c):
            await wait_for(lambda: len(deliveries) >= 108, PATIENCE_S, "100 handled, 8 held")
            await asyncio.to_thread(ctl, "stop_app")
            await asyncio.to_thread(ctl, "start_app")
            await asyncio.to_thread(ctl, "await_startup")
            restarted.set()
            await wait_for(lambda: handled >= bodies, PATIENCE_S, "every message after restart")
            # the held ones' acks died with the old channel: their redeliveries (duplicates,
            # which at-least-once allows) must be handled too before the queue is empty
            deadline = asyncio.get_running_loop().time() + PATIENCE_S
            while await queue_count(amqp_url, source) or c.in_flight:
                assert asyncio.get_running_loop().time() < deadline, "redeliveries never drained"
                await asyncio.sleep(0.2)
        assert await queue_count(amqp_url, source) == 0
        assert len(deliveries) > len(bodies), "nothing was in flight across the restart"

    try:
        run(scenario())
    finally:
        harness.cleanup()


# ---------------------------------------------------------------------------- quorum, flow
def test_quorum_delivery_count_is_the_attempt(amqp_url: str) -> None:
    """On a quorum queue a redelivery is counted by RabbitMQ (x-delivery-count), not republished."""
    harness = AMQPHarness(amqp_url, queue_type="quorum")

    async def scenario() -> None:
        source, errors = harness.new_names()
        publisher = harness.make_adapter(source, errors)
        await publisher.open()
        sent_id = await publisher.publish(b"q")
        await publisher.close()
        connection = await aio_pika.connect(amqp_url)
        channel = await connection.channel()
        queue = await channel.declare_queue(source, passive=True)
        got = await queue.get(no_ack=False)
        assert got is not None and got.body == b"q"
        await connection.close()  # unacked: RabbitMQ requeues and counts it
        rec = Recorder()
        c = BaseCollector(harness.make_adapter(source, errors), rec, options())
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the redelivery")
        assert rec.deliveries[0].attempt == 2
        assert rec.deliveries[0].id == sent_id, "redelivery was republished, not counted natively"

    try:
        run(scenario())
    finally:
        harness.cleanup()


def test_message_in_flight_is_acked_after_sleep(amqp_harness: AMQPHarness) -> None:
    """sleep() cancels the consumer, but a message already delivered is still acked afterwards."""
    harness = amqp_harness
    gate = threading.Event()

    async def scenario() -> None:
        source, errors = harness.new_names()
        rec = Recorder(lambda b, m: gate.wait(PATIENCE_S))
        c = BaseCollector(harness.make_adapter(source, errors), rec, options())
        async with Running(c):
            adapter = c.adapter
            assert isinstance(adapter, AMQPAdapter)
            await adapter.publish(b"held")
            await wait_for(lambda: rec.active == 1, PATIENCE_S, "the handler running")
            c.sleep()
            consumer = adapter._consumer
            assert consumer is not None
            await wait_for(lambda: not consumer.consuming, PATIENCE_S, "the consumer cancelled")
            gate.set()
            await wait_for(lambda: c.stats.acked == 1, PATIENCE_S, "the ack")
        assert await queue_count(harness.url, source) == 0

    run(scenario())


def test_exchange_binding_delivers_routed_messages(amqp_url: str) -> None:
    harness = AMQPHarness(
        amqp_url, exchange="stalk-test-x", exchange_type="topic", routing_key="o.*"
    )

    async def scenario() -> None:
        source, errors = harness.new_names()
        rec = Recorder()
        c = BaseCollector(harness.make_adapter(source, errors), rec, options())
        async with Running(c):
            connection = await aio_pika.connect(amqp_url)
            channel = await connection.channel()
            exchange = await channel.get_exchange("stalk-test-x")
            await exchange.publish(aio_pika.Message(b"routed"), routing_key="o.created")
            await exchange.publish(aio_pika.Message(b"other"), routing_key="p.created")
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the routed message")
            await connection.close()
        assert rec.bodies() == [b"routed"]

    try:
        run(scenario())
    finally:
        harness.cleanup()


# ---------------------------------------------------------------------------- configuration
def test_unreachable_broker_is_one_clear_line_without_password() -> None:
    adapter = AMQPAdapter.from_options(
        "q", None, {"url": "amqp://alice:s3cret@127.0.0.1:1/", "connect_timeout_s": "2"}
    )
    with pytest.raises(BackendUnavailable) as caught:
        asyncio.run(adapter.open())
    text = str(caught.value)
    assert "\n" not in text
    assert "127.0.0.1:1" in text and "rabbitmqctl" in text
    assert "s3cret" not in text and "alice" not in text
    assert "s3cret" not in adapter.describe() and "alice" not in adapter.describe()


def test_until_empty_on_a_queue_that_never_delayed_probes_no_delay_bucket(
    amqp_harness: AMQPHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket names are scanned only where the source's marker queue says some exist: an
    empty queue that never retried ends ``--until-empty`` without ~150 passive declares. With a
    retry pending, the marker exists and the drain waits for it (hole 8 of issue 14)."""
    from stalk.collectors.amqp import broker

    harness = amqp_harness
    probed: list[str] = []
    count = broker.count

    async def spy(connection: Any, queue: str) -> int | None:
        probed.append(queue)
        return await count(connection, queue)

    monkeypatch.setattr(broker, "count", spy)

    async def scenario() -> None:
        source, errors = harness.new_names()
        await asyncio.wait_for(BaseCollector(
            harness.make_adapter(source, errors), Recorder(), options()
        ).serve(until_empty=True), PATIENCE_S)  # fmt: skip
        buckets = [q for q in probed if ".stalk-delay." in q]
        assert buckets == [] and f"{source}.stalk-delays" in probed, probed

        probed.clear()
        adapter = harness.make_adapter(source, errors)
        await adapter.open()
        try:
            await adapter.publish(b"later", delay_s=1.0)
        finally:
            await adapter.close()
        recorder = Recorder()
        await asyncio.wait_for(BaseCollector(
            harness.make_adapter(source, errors), recorder, options()
        ).serve(until_empty=True), PATIENCE_S)  # fmt: skip
        assert recorder.done == [b"later"]
        assert delay_queue_name(source, bucket_ms(1.0)) in probed

    run(scenario())
