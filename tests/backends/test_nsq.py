"""NSQ specialities beyond the conformance suite, against a real nsqd on loopback.

REQ delays (and pynsq's requeue traps), parking over max-req-timeout, TOUCH heartbeats past the
lease, attempts after a SIGKILLed worker, sleep/wake as RDY seen by nsqd, an nsqd restart
mid-stream, size limits, and the one-line error of an unreachable nsqd. Every wait is for a
condition with a generous limit; no timed assertions beyond "not before the delay".
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, retry
from stalk.collectors.nsq import NSQAdapter, NSQSettings, envelope
from stalk.errors import BackendError, BackendUnavailable, ConfigError, MessageTooLarge
from stalk.testing.harness import Recorder, Running, wait_for
from tests.brokers.nsq import NSQD, Lookupd, NSQHarness, free_port, kill

pytestmark = pytest.mark.broker("nsq")

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 110.0
PATIENCE_S = 45.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT_S))


def options(**overrides: Any) -> CollectorOptions:
    return CollectorOptions(
        **{"retry_interval_s": 0.05, "max_retry_delay_s": 0.2, "shutdown_grace_s": 5.0, **overrides}
    )


def collect(
    harness: NSQHarness, source: str, handler: Callable[..., Any], **opts: Any
) -> BaseCollector:
    return BaseCollector(harness.make_adapter(source, f"{source}-errors"), handler, options(**opts))


async def publish(harness: NSQHarness, source: str, bodies: list[bytes], **kw: Any) -> None:
    adapter = harness.make_adapter(source, f"{source}-errors")
    await adapter.open()
    try:
        for body in bodies:
            await adapter.publish(body, **kw)
    finally:
        await adapter.close()


async def fresh(harness: NSQHarness) -> str:
    source, errors = harness.new_names()
    await harness.prepare(source, errors)
    return source


def stats(server: NSQD, topic: str) -> dict[str, Any]:
    return server.stats(topic)


# ---------------------------------------------------------------------- retry = REQ
def test_retry_is_req_with_delay_in_nsqd_no_backoff(nsq_harness: NSQHarness) -> None:
    """requeue(delay=1.5) would be 90 s x attempts, and a plain requeue() backs the reader off."""
    delay_s = 1.5

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"later"])
        rec = Recorder(lambda b, m: retry("not yet", delay=delay_s) if m.attempt == 1 else None)
        c = collect(nsq_harness, source, rec)
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the first delivery")
            await wait_for(
                lambda: (
                    stats(nsq_harness.server, source).get("deferred_count") == 1
                    or len(rec.done) >= 2
                ),
                PATIENCE_S,
                "the message deferred in nsqd",
            )
            await wait_for(lambda: len(rec.done) >= 2, PATIENCE_S, "the retry")
            adapter: Any = c.adapter
            reader = adapter._reader
            assert reader.backoff_timer.get_interval() == 0, "pynsq backoff engaged"
            assert all(conn.rdy > 0 for conn in reader.conns.values()), "RDY 0 after a retry"
        first, second = rec.deliveries[0], rec.deliveries[1]
        assert (first.attempt, second.attempt) == (1, 2)
        assert first.id == second.id, "a retry must be the same nsq message (REQ), not a copy"
        assert second.at - first.at >= delay_s * 0.9
        assert stats(nsq_harness.server, source).get("requeue_count") == 1

    run(scenario())


def test_attempts_past_pynsq_max_tries_are_delivered(nsq_harness: NSQHarness) -> None:
    """pynsq's max_tries=5 would FIN the 6th delivery silently; stalk's policy decides."""

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"stubborn"])
        rec = Recorder(lambda b, m: retry("again", delay=0) if m.attempt < 8 else None)
        async with Running(collect(nsq_harness, source, rec, max_retries=10)):
            await wait_for(lambda: len(rec.done) >= 8, PATIENCE_S, "8 deliveries")
        assert rec.attempts_of(b"stubborn") == list(range(1, 9))

    run(scenario())


def test_delay_over_max_req_timeout_is_parked(start_nsqd: Callable[..., NSQD]) -> None:
    """nsqd clamps REQ and refuses DPUB over --max-req-timeout: the copy is parked in hops."""
    server = start_nsqd("--max-req-timeout=2s")
    harness = NSQHarness(server, max_req_timeout_s=2.0)
    delay_s = 5.0

    async def scenario() -> None:
        source = await fresh(harness)
        await publish(harness, source, [b"far"], attributes={"trace": "t1"})
        rec = Recorder(lambda b, m: retry("much later", delay=delay_s) if m.attempt == 1 else None)
        c = collect(harness, source, rec)
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 2, PATIENCE_S, "the parked retry")
            await publish(harness, source, [b"sent-late"], delay_s=delay_s)
            sent = time.monotonic()
            await wait_for(lambda: b"sent-late" in rec.done, PATIENCE_S, "the parked send")
            assert time.monotonic() - sent >= delay_s * 0.9
            adapter: Any = c.adapter
            assert adapter._publisher.writer.connected(), (
                "a DPUB over the limit closed the connection"
            )
        first, second = rec.deliveries[0], rec.deliveries[1]
        assert (first.attempt, second.attempt) == (1, 2)
        assert first.id == second.id, "the parked copy keeps the message id"
        assert second.at - first.at >= delay_s * 0.9
        assert second.attributes.get("trace") == "t1"
        assert not set(second.attributes) & envelope.INTERNAL_KEYS, "internal keys leaked"

    run(scenario())


# ---------------------------------------------------------------------- leases
class _NoTouchAdapter(NSQAdapter):
    async def extend(self, message: Any, seconds: float) -> None:
        return None


def test_touch_heartbeat_keeps_a_message_past_msg_timeout(nsq_harness: NSQHarness) -> None:
    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"long"])
        rec = Recorder(lambda b, m: time.sleep(6.0))
        c = collect(nsq_harness, source, rec, visibility_timeout_s=2.0)
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the long handler")
            await wait_for(lambda: c.stats.acked >= 1, PATIENCE_S, "the ack")
        assert rec.attempts_of(b"long") == [1], "the lease lapsed despite TOUCH"
        assert stats(nsq_harness.server, source).get("timeout_count") == 0

    run(scenario())


def test_unextended_message_comes_back_after_msg_timeout(nsq_harness: NSQHarness) -> None:
    """The control for the test above: without TOUCH nsqd gives the message out again."""

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"lapsed"])
        rec = Recorder(lambda b, m: time.sleep(6.0) if m.attempt == 1 else None)
        settings = NSQSettings(nsqd=nsq_harness.server.tcp, nsqd_http=nsq_harness.server.http)
        adapter = _NoTouchAdapter(source, settings=settings)
        c = BaseCollector(adapter, rec, options(visibility_timeout_s=2.0, concurrency=2))
        async with Running(c):
            await wait_for(lambda: 2 in rec.attempts_of(b"lapsed"), PATIENCE_S, "redelivery")
        assert stats(nsq_harness.server, source).get("timeout_count", 0) >= 1

    run(scenario())


WORKER = r"""
import os, sys
from stalk import BaseCollector, CollectorOptions
from stalk.collectors.nsq import NSQAdapter, NSQSettings, envelope
tcp, http, source, log = sys.argv[1:5]

def handler(body, message):
    with open(log, "a") as f:
        f.write(f"{message.attempt}\n")
    os._exit(3)

settings = NSQSettings(nsqd=tcp, nsqd_http=http)
BaseCollector(NSQAdapter(source, settings=settings), handler,
              CollectorOptions(visibility_timeout_s=2.0)).run()
"""


def test_attempt_rises_after_a_killed_worker(nsq_harness: NSQHarness, tmp_path: Path) -> None:
    log = tmp_path / "deliveries"

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"deadly"])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = nsq_harness.server
        args = [sys.executable, "-c", WORKER, server.tcp, server.http, source, str(log)]
        proc = await asyncio.to_thread(subprocess.Popen, args, env=env)
        try:
            await wait_for(lambda: log.exists() and bool(log.read_text()), PATIENCE_S, "the crash")
            await asyncio.to_thread(proc.wait, 30)
        finally:
            if proc.poll() is None:
                kill(proc)
        rec = Recorder()
        async with Running(collect(nsq_harness, source, rec, visibility_timeout_s=2.0)):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the redelivery")
        assert log.read_text().split() == ["1"]
        assert rec.attempts_of(b"deadly") == [2], "nsqd's attempts must count the dead worker"

    run(scenario())


# ---------------------------------------------------------------------- sleep, wake, scale
def _ready_counts(server: NSQD, topic: str) -> list[int]:
    return [int(c.get("ready_count", 0)) for c in stats(server, topic).get("clients") or []]


def test_sleep_is_rdy_0_and_wake_restores_it(nsq_harness: NSQHarness) -> None:
    async def scenario() -> None:
        source = await fresh(nsq_harness)
        recorder = Recorder()
        c = collect(nsq_harness, source, recorder, concurrency=3)
        server = nsq_harness.server
        async with Running(c):
            # The engine starts careful (RDY 1) and raises the limit once a fresh message
            # arrives: a redelivered poison pill must not take several workers with it.
            await wait_for(lambda: _ready_counts(server, source) == [1], PATIENCE_S, "RDY 1")
            await publish(nsq_harness, source, [b"fresh"])
            await wait_for(lambda: len(recorder.done) == 1, PATIENCE_S, "the fresh message")
            await wait_for(lambda: _ready_counts(server, source) == [3], PATIENCE_S, "RDY 3")
            c.sleep()
            await wait_for(lambda: _ready_counts(server, source) == [0], PATIENCE_S, "RDY 0")
            c.scale(5)  # asleep: remembered, not sent
            await asyncio.sleep(0.3)
            assert _ready_counts(server, source) == [0]
            c.wake()
            await wait_for(lambda: _ready_counts(server, source) == [5], PATIENCE_S, "RDY 5")

    run(scenario())


# ---------------------------------------------------------------------- shutdown, reconnect
def test_release_on_stop_is_req_0_not_a_lease_lapse(nsq_harness: NSQHarness) -> None:
    """With a 600 s lease, the second worker gets the message only because it was REQ'd."""

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        await publish(nsq_harness, source, [b"held"])
        gate = asyncio.Event()

        async def stuck(body: bytes) -> None:
            gate.set()
            await asyncio.sleep(60)

        c = collect(nsq_harness, source, stuck, visibility_timeout_s=600.0)
        await c.start()
        c.wake()
        await wait_for(gate.is_set, PATIENCE_S, "the handler to start")
        await c.stop(0.05)
        rec = Recorder()
        async with Running(collect(nsq_harness, source, rec, visibility_timeout_s=600.0)):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "the released message")
        assert rec.bodies() == [b"held"]

    run(scenario())


def test_closed_adapter_never_reconnects_and_closes_quietly(
    nsq_harness: NSQHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """pynsq#196: a closed Reader reconnected 15 s later and consumed a message."""
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        adapter = nsq_harness.make_adapter(source, f"{source}-errors")
        await adapter.open()
        await adapter.start(lambda m: None, 1)
        await wait_for(
            lambda: len(stats(nsq_harness.server, source).get("clients") or []) == 1,
            PATIENCE_S,
            "the reader connected",
        )
        reader, writer = adapter._reader, adapter._publisher.writer
        await adapter.close()
        await publish(nsq_harness, source, [b"after close"])
        await asyncio.sleep(adapter.settings.reconnect_interval_s * 4)
        assert not reader.conns and not writer.conns
        assert stats(nsq_harness.server, source).get("clients") in (None, [])
        assert stats(nsq_harness.server, source).get("depth") == 1

    run(scenario())
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and "nsq" in r.name]
    assert not loud, [r.getMessage() for r in loud]


def test_nsqd_restart_mid_stream_loses_nothing(start_nsqd: Callable[..., NSQD]) -> None:
    server = start_nsqd("--mem-queue-size=0")
    harness = NSQHarness(server)
    bodies = [f"m{i}".encode() for i in range(300)]

    async def scenario() -> None:
        source = await fresh(harness)
        adapter = harness.make_adapter(source, f"{source}-errors")
        await adapter.open()
        await adapter.publish_batch(bodies)
        await adapter.close()
        rec = Recorder(lambda b, m: time.sleep(0.005))
        async with Running(collect(harness, source, rec, concurrency=4, visibility_timeout_s=3)):
            await wait_for(lambda: len(rec.done) >= 50, PATIENCE_S, "50 handled")
            await asyncio.to_thread(server.restart)
            await wait_for(lambda: set(rec.done) >= set(bodies), PATIENCE_S * 2, "all handled")
            await wait_for(
                lambda: (
                    stats(server, source).get("depth") == 0
                    and stats(server, source).get("in_flight_count") == 0
                ),
                PATIENCE_S,
                "nsqd empty",
            )

    run(scenario())


def test_sigkilled_nsqd_with_mem_queue_size_0_loses_nothing(
    start_nsqd: Callable[..., NSQD],
) -> None:
    """What docs/nsq.md recommends for durability (the default memory queue loses them).

    nsqd persists a disk queue's depth on its sync (``--sync-timeout``, 2 s by default): the
    test waits for the channel's metadata file to count all 100 before the SIGKILL.
    """
    server = start_nsqd("--mem-queue-size=0", "--sync-timeout=200ms")
    harness = NSQHarness(server)
    bodies = [f"k{i}".encode() for i in range(100)]

    async def scenario() -> None:
        source = await fresh(harness)
        adapter = harness.make_adapter(source, f"{source}-errors")
        await adapter.open()
        await adapter.publish_batch(bodies)
        await adapter.close()
        meta = Path(server.data) / f"{source}:stalk.diskqueue.meta.dat"
        await wait_for(
            lambda: meta.exists() and meta.read_text().split("\n")[0] == "100",
            PATIENCE_S,
            "nsqd to sync the channel's disk queue",
        )
        await asyncio.to_thread(server.stop, signal.SIGKILL)
        await asyncio.to_thread(server.start)
        rec = Recorder()
        async with Running(collect(harness, source, rec, concurrency=8)):
            await wait_for(lambda: set(rec.done) >= set(bodies), PATIENCE_S, "all after SIGKILL")

    run(scenario())


def test_lookupd_only_discovers_nsqd(lookupd: tuple[Lookupd, NSQD]) -> None:
    registry, server = lookupd

    async def scenario() -> None:
        source = f"stalk-test-{os.urandom(6).hex()}"
        await asyncio.to_thread(server.create_channel, source)
        settings = NSQSettings(lookupd=registry.http, lookupd_poll_interval_s=1.0)
        producer = NSQAdapter(source, settings=settings)
        await wait_for(lambda: _registered(registry, source), PATIENCE_S, "topic in lookupd")
        await producer.open()
        await producer.publish(b"found")
        await producer.close()
        rec = Recorder()
        c = BaseCollector(NSQAdapter(source, settings=settings), rec, options())
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "delivery via lookupd")
        assert rec.bodies() == [b"found"]

    run(scenario())


def _registered(registry: Lookupd, topic: str) -> bool:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{registry.http}/lookup?topic={topic}") as resp:
            return bool(json.loads(resp.read()).get("producers"))
    except OSError:
        return False


# ---------------------------------------------------------------------- publishing
def test_max_message_size_is_checked_before_publishing(nsq_harness: NSQHarness) -> None:
    async def scenario() -> None:
        source = await fresh(nsq_harness)
        adapter = nsq_harness.make_adapter(source, f"{source}-errors")
        await adapter.open()
        try:
            limit = adapter.settings.max_message_bytes
            await adapter.publish(b"x" * limit)  # exactly the limit: accepted
            with pytest.raises(MessageTooLarge, match="max-msg-size"):
                await adapter.publish(b"x" * (limit + 1))
            with pytest.raises(MessageTooLarge):
                await adapter.publish(b"x" * limit, attributes={"k": "v"})  # envelope counts
            await adapter.publish(b"still connected")
        finally:
            await adapter.close()
        # nsqd copies a topic's messages to its channel in its own goroutine: wait for both
        await wait_for(
            lambda: stats(nsq_harness.server, source).get("depth") == 2, 10, "two published"
        )

    run(scenario())


def test_unreachable_nsqd_is_one_line_backend_unavailable() -> None:
    async def scenario() -> None:
        port = free_port()
        adapter = NSQAdapter("t", settings=NSQSettings(nsqd=f"127.0.0.1:{port}"))
        with pytest.raises(BackendUnavailable) as info:
            await adapter.open()
        assert "\n" not in str(info.value)
        assert f"127.0.0.1:{port}" in str(info.value)
        await adapter.close()

    run(scenario())


def test_lease_shorter_than_the_heartbeat_is_a_config_error() -> None:
    """visibility_timeout_s over nsqd's max-msg-timeout would lapse between two TOUCHes."""

    async def scenario() -> None:
        adapter = NSQAdapter("t", settings=NSQSettings(nsqd=f"127.0.0.1:{free_port()}"))
        adapter.bind(None, None, 3600.0)
        with pytest.raises(ConfigError, match="max-msg-timeout"):
            await adapter.open()

    run(scenario())


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args], input=stdin, capture_output=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip


def test_cli_send_batch_stats_and_unreachable_exit_1(nsq_harness: NSQHarness) -> None:
    server = nsq_harness.server
    source, _ = nsq_harness.new_names()
    server.create_channel(source)
    opts = ["--option", f"nsqd={server.tcp}", "--option", f"nsqd_http={server.http}"]
    sent = _cli("send", "--backend", "nsq", "--source", source, *opts, "a", "b", "c")
    assert sent.returncode == 0, sent.stderr
    assert stats(server, source).get("message_count") == 3
    shown = _cli("stats", "--backend", "nsq", "--source", source, "--json", *opts)
    assert shown.returncode == 0, shown.stderr
    assert b'"ready": 3' in shown.stdout
    dead = f"127.0.0.1:{free_port()}"
    down = _cli("send", "--backend", "nsq", "--source", source, "--option", f"nsqd={dead}", "x")
    assert down.returncode == 1
    assert dead.encode() in down.stderr and len(down.stderr.strip().splitlines()) == 1


def test_cli_run_until_empty_drains_the_readme_example(nsq_harness: NSQHarness) -> None:
    """The README's two commands on nsq: send, then run --until-empty exits 3 with all settled
    (3: "not json" went to the error topic)."""
    server = nsq_harness.server
    source, errors = nsq_harness.new_names()
    server.create_channel(source)
    server.create_channel(errors)
    opts = ["--option", f"nsqd={server.tcp}", "--option", f"nsqd_http={server.http}"]
    bodies = ['{"order": 1}', '{"order": 2, "flaky": true}', "not json"]
    sent = _cli("send", "--backend", "nsq", "--source", source, *opts, *bodies)
    assert sent.returncode == 0, sent.stderr
    ran = _cli("run", "workers.app:handler", "--backend", "nsq", "--source", source, *opts,
               "--until-empty")  # fmt: skip
    assert ran.returncode == 3, ran.stderr
    assert stats(server, source).get("depth") == 0
    assert stats(server, source).get("deferred_count") == 0
    assert stats(server, errors).get("depth") == 1, "the undecodable body is on the error topic"


def test_writer_error_frame_fails_that_publish_and_recovers(nsq_harness: NSQHarness) -> None:
    """nsqd closes the connection on E_BAD_TOPIC; pynsq would pair later OKs wrongly."""

    async def scenario() -> None:
        source = await fresh(nsq_harness)
        adapter: Any = nsq_harness.make_adapter(source, f"{source}-errors")
        await adapter.open()
        try:
            with pytest.raises(BackendError, match="E_BAD_TOPIC"):
                await adapter._publisher.send("pub", "bad$topic", b"x")
            await adapter.publish(b"after the error")  # waits for the redial
        finally:
            await adapter.close()
        assert stats(nsq_harness.server, source).get("depth") == 1

    run(scenario())


def test_cli_peek_and_redrive_read_the_error_topic(nsq_harness: NSQHarness) -> None:
    """peek shows the error copies (unwrapped: body and stalk-* attributes) and gives them back;
    redrive --dry-run moves nothing, redrive --limit 2 moves two back to the source."""
    server = nsq_harness.server
    source, errors = nsq_harness.new_names()
    server.create_channel(source)
    server.create_channel(errors)
    opts = ["--backend", "nsq", "--option", f"nsqd={server.tcp}",
            "--option", f"nsqd_http={server.http}"]  # fmt: skip
    assert _cli("send", "--source", source, *opts, "a", "b", "c").returncode == 0
    ran = _cli("run", "tests.unit.cli_handlers:refuse", "--source", source, *opts,
               "--until-empty")  # fmt: skip
    assert ran.returncode == 3, ran.stderr
    peeked = _cli("peek", "--source", errors, "--json", *opts)
    assert peeked.returncode == 0, peeked.stderr
    shown = [json.loads(line) for line in peeked.stdout.splitlines()]
    assert sorted(m["body"] for m in shown) == ["a", "b", "c"]
    assert {m["attributes"]["stalk-reason"] for m in shown} == {"fatal"}
    again = _cli("peek", "--source", errors, "--json", *opts)
    assert len(again.stdout.splitlines()) == 3, again.stderr
    dry = _cli("redrive", "--from", errors, "--to", source, "--dry-run", *opts)
    assert b"would move 3" in dry.stdout, dry.stderr
    moved = _cli("redrive", "--from", errors, "--to", source, "--limit", "2", *opts)
    assert b"moved 2 message(s)" in moved.stdout, moved.stderr
    deadline = time.monotonic() + 30
    while (stats(server, source).get("depth"), stats(server, errors).get("depth")) != (2, 1):
        assert time.monotonic() < deadline, (stats(server, source), stats(server, errors))
        time.sleep(0.1)
