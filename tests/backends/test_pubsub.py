"""Pub/Sub specialities beyond the conformance suite, against the real emulator on loopback.

Modack delay timing, attempts without a dead-letter policy (the carried attribute), error-topic
attributes within the service's limits and binary bodies, Pub/Sub's own dead-lettering by
``delivery_attempt``, an emulator restart (all state lost) without a hung worker, a streaming
shutdown holding messages, and the CLI (send, stats, one-line errors). Every wait is for a
condition with a generous limit; no timed assertion beyond "not before the delay".
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, retry
from stalk.collectors.pubsub import PubSubAdapter, PubSubSettings, wire
from stalk.collectors.pubsub.client import PubSubCalls
from stalk.errors import BackendUnavailable, ConfigError, QueueNotFound
from stalk.message import ATTR_ATTEMPTS, ATTR_ERROR, ATTR_REASON, ATTR_TRACEBACK
from stalk.testing.harness import Recorder, Running, wait_for
from tests.brokers.pubsub import PROJECT, Emulator, PubSubHarness, create, free_port

pytestmark = pytest.mark.broker("pubsub")

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 110.0
PATIENCE_S = 45.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT_S))


def options(**overrides: Any) -> CollectorOptions:
    return CollectorOptions(
        **{"polling_period_s": 0.02, "max_polling_period_s": 0.25, "retry_interval_s": 0.05,
           "max_retry_delay_s": 0.2, "shutdown_grace_s": 5.0, **overrides}
    )  # fmt: skip


def collect(
    harness: PubSubHarness, source: str, handler: Callable[..., Any], **opts: Any
) -> BaseCollector:
    return BaseCollector(harness.make_adapter(source, f"{source}-errors"), handler, options(**opts))


async def publish(
    harness: PubSubHarness, source: str, bodies: list[bytes], **attributes: str
) -> None:
    adapter = harness.make_adapter(source, f"{source}-errors")
    await adapter.open()
    try:
        await adapter.publish_batch(bodies, attributes or None)
    finally:
        await adapter.close()


async def read_all(harness: PubSubHarness, subscription: str, count: int) -> Recorder:
    rec = Recorder()
    async with Running(collect(harness, subscription, rec, concurrency=4)):
        await wait_for(lambda: len(rec.done) >= count, PATIENCE_S, f"{count} on {subscription}")
    return rec


# ---------------------------------------------------------------------- delays and attempts
@pytest.mark.parametrize("dead_letter", [True, False], ids=["modack", "republished"])
def test_retry_waits_its_delay_and_counts(pubsub_emulator: Emulator, dead_letter: bool) -> None:
    """With a dead-letter policy a retry is a modack (same message, delivery_attempt counts);
    without one it is a copy carrying stalk-attempt, parked until due. Never early."""
    harness = PubSubHarness(pubsub_emulator, dead_letter=dead_letter)
    delay_s = 3.0

    async def scenario() -> None:
        source, errors = harness.new_names()
        await harness.prepare(source, errors)
        await publish(harness, source, [b"later"])
        rec = Recorder(lambda b, m: retry("not yet", delay=delay_s) if m.attempt < 3 else None)
        async with Running(collect(harness, source, rec)):
            await wait_for(lambda: len(rec.done) >= 3, PATIENCE_S + 2 * delay_s, "two retries")
        times = [d.at for d in rec.deliveries]
        assert [d.attempt for d in rec.deliveries] == [1, 2, 3]
        assert len({d.id for d in rec.deliveries}) == 1, "the id changed across retries"
        assert times[1] - times[0] >= delay_s * 0.95 and times[2] - times[1] >= delay_s * 0.95
        assert all(wire.ATTR_NOT_BEFORE not in d.attributes for d in rec.deliveries)

    run(scenario())


def test_send_delay_is_held_and_long_retry_is_parked(pubsub_emulator: Emulator) -> None:
    """``publish(delay_s=...)`` rides as a not-before attribute; a retry past 600 s is parked
    (republished with it) and stays hidden."""
    harness = PubSubHarness(pubsub_emulator)

    async def scenario() -> None:
        source, errors = harness.new_names()
        await harness.prepare(source, errors)
        adapter = harness.make_adapter(source, errors)
        await adapter.open()
        try:
            await adapter.publish(b"delayed", None, 2.0)
            await adapter.publish(b"distant")
        finally:
            await adapter.close()
        sent_at = time.monotonic()
        rec = Recorder(lambda b, m: retry("much later", delay=7200) if b == b"distant" else None)
        c = collect(harness, source, rec)
        async with Running(c):
            await wait_for(lambda: b"delayed" in rec.done, PATIENCE_S, "the delayed message")
            await wait_for(lambda: c.stats.retried >= 1, PATIENCE_S, "the long retry")
            await asyncio.sleep(3.0)
        delayed = next(d for d in rec.deliveries if d.body == b"delayed")
        assert delayed.at - sent_at >= 1.9, "a send --delay came early"
        assert rec.attempts_of(b"distant") == [1], "a 2 h retry came back"
        assert c.stats.failed_settles == 0

    run(scenario())


# ---------------------------------------------------------------------- error topic
def test_error_copy_keeps_binary_body_and_fits_the_attribute_limits(
    pubsub_emulator: Emulator,
) -> None:
    harness = PubSubHarness(pubsub_emulator)
    body = bytes(range(256)) * 4
    own = {f"k{i:03d}": "v" * 10 for i in range(120)}
    own["goog-reserved"] = "x"
    own["long"] = "é" * 800  # 1,600 bytes

    def handler(b: bytes, m: Any) -> Any:
        raise ValueError("e" * 1500)

    async def scenario() -> None:
        source, errors = harness.new_names()
        await harness.prepare(source, errors)
        adapter = harness.make_adapter(source, errors)
        await adapter.open()
        try:  # past the producer-side check: the emulator takes what the service would refuse
            await adapter.calls.publish(adapter._topic, [wire_message(body, own)])
        finally:
            await adapter.close()
        rec = Recorder(handler)
        async with Running(collect(harness, source, rec, max_retries=0)):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "a delivery")
        dead = (await read_all(harness, errors, 1)).deliveries[0]
        assert dead.body == body
        meta = dead.attributes
        assert len(meta) <= wire.MAX_ATTRIBUTES
        assert all(len(k.encode()) <= 256 and len(v.encode()) <= 1024 for k, v in meta.items())
        assert not any(k.startswith("goog") for k in meta)
        assert meta[ATTR_REASON] == "retries_exhausted"
        assert meta[ATTR_ATTEMPTS] == "1"
        assert meta[ATTR_ERROR].startswith("eee") and meta[ATTR_ERROR].endswith("...")
        assert "ValueError" in meta[ATTR_TRACEBACK]

    run(scenario())


def wire_message(body: bytes, attributes: dict[str, str]) -> Any:
    from google.pubsub_v1 import types

    return types.PubsubMessage(data=body, attributes=attributes)


def test_fit_attributes_keeps_stalk_marks_first() -> None:
    own = {f"a{i}": "x" for i in range(150)} | {"googx": "y", "k" * 300: "z"}
    marks = {ATTR_REASON: "fatal", ATTR_TRACEBACK: "frame\n" * 400 + "ValueError: last"}
    out = wire.fit_attributes(own, marks)
    assert len(out) == 100 and out[ATTR_REASON] == "fatal"
    assert out[ATTR_TRACEBACK].endswith("ValueError: last"), "the traceback lost its last line"
    assert "googx" not in out and "k" * 300 not in out
    with pytest.raises(ConfigError, match="goog"):
        wire.check_attributes({"goog-x": "1"})


# ---------------------------------------------------------------------- dead-letter policy
def test_dead_letter_policy_counts_delivery_attempt(pubsub_emulator: Emulator) -> None:
    """``delivery_attempt`` is the attempt; Pub/Sub's own dead-lettering takes over at its
    ``max_delivery_attempts`` (5 here) when stalk's ``max_retries`` is higher."""
    harness = PubSubHarness(pubsub_emulator)

    async def scenario() -> None:
        source, errors = harness.new_names()
        host = pubsub_emulator.host
        await create(host, source, max_delivery_attempts=5)
        await create(host, f"{source}-dead", dead_letter=False)
        await create(host, errors)
        await publish(harness, source, [b"doomed"])
        rec = Recorder(lambda b, m: retry("again", delay=0))
        async with Running(collect(harness, source, rec, max_retries=20)):
            await wait_for(lambda: len(rec.done) >= 5, PATIENCE_S, "5 deliveries")
            dead = await read_all(harness, f"{source}-dead", 1)
        assert rec.attempts_of(b"doomed")[:5] == [1, 2, 3, 4, 5]
        assert dead.deliveries[0].body == b"doomed"

    run(scenario())


# ---------------------------------------------------------------------- ordering keys
@pytest.mark.parametrize("mode", ["pull", "streaming"])
def test_ordering_key_order_is_kept_across_a_retry(pubsub_emulator: Emulator, mode: str) -> None:
    """Pub/Sub alone redelivers a retried message after later ones of its key (0..9,3); the
    gate holds the later ones, and never runs two messages of one key at once."""
    harness = PubSubHarness(pubsub_emulator, mode=mode)
    bodies = [f"o{i}".encode() for i in range(10)]
    finished: list[bytes] = []

    def handler(body: bytes, message: Any) -> Any:
        if body == b"o3" and message.attempt == 1:
            return retry("once more", delay=1.0)
        time.sleep(0.05)
        finished.append(body)
        return None

    async def scenario() -> None:
        source, errors = harness.new_names()
        await create(pubsub_emulator.host, source, ordering=True)
        await create(pubsub_emulator.host, errors)
        await publish(harness, source, bodies, **{"stalk-ordering-key": "k"})
        await publish(harness, source, [b"free"])
        rec = Recorder(handler)
        async with Running(collect(harness, source, rec, concurrency=4)):
            await wait_for(lambda: len(finished) >= 11, PATIENCE_S, "every message")
        keyed = [b for b in finished if b != b"free"]
        assert keyed == bodies, f"order of key k: {keyed}"
        assert rec.attempts_of(b"o3") == [1, 2]
        assert all(d.attributes.get("stalk-ordering-key") is None for d in rec.deliveries)

    run(scenario())


# ---------------------------------------------------------------------- restart, shutdown
@pytest.mark.parametrize("mode", ["pull", "streaming"])
def test_emulator_restart_keeps_the_worker_alive(
    start_pubsub_emulator: Callable[[], Emulator], mode: str
) -> None:
    """A restart loses every topic and subscription: the worker logs, keeps running, and takes
    messages again once they exist; ``stop`` returns."""
    emulator = start_pubsub_emulator()
    harness = PubSubHarness(emulator, mode=mode)

    async def scenario() -> None:
        source, errors = harness.new_names()
        await harness.prepare(source, errors)
        await publish(harness, source, [b"before"])
        rec = Recorder()
        c = collect(harness, source, rec)
        async with Running(c):
            await wait_for(lambda: b"before" in rec.done, PATIENCE_S, "a delivery")
            await asyncio.to_thread(emulator.restart)
            await asyncio.sleep(2.0)
            await harness.prepare(source, errors)
            await publish(harness, source, [b"after"])
            await wait_for(lambda: b"after" in rec.done, PATIENCE_S, "a delivery after restart")
            assert c.state == "awake"
        assert c.state == "stopped"

    run(scenario())
    emulator.stop()


def test_streaming_shutdown_with_held_messages_loses_nothing(
    pubsub_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handlers running, more waiting in the adapter past the local limit: ``stop(0)`` gives
    every one back with unary calls (none depends on the closed stream) and acks none.

    What was given back is checked on the wire (no acknowledge, a modack 0 for what was held),
    then a second worker gets every message within the usual patience: the stream was ended
    with a half-close, so none went to a dead stream (a cancelled one made them ~120 s late).
    """
    harness = PubSubHarness(pubsub_emulator, mode="streaming")
    bodies = [f"held-{i}".encode() for i in range(8)]
    never = asyncio.Event()
    acked: list[str] = []
    given_back: list[str] = []
    acknowledge, modify = PubSubCalls.acknowledge, PubSubCalls.modify

    async def spy_ack(self: PubSubCalls, path: str, ack_ids: Any) -> None:
        acked.extend(ack_ids)
        await acknowledge(self, path, ack_ids)

    async def spy_modify(self: PubSubCalls, path: str, ack_ids: Any, seconds: int) -> None:
        if seconds == 0:
            given_back.extend(ack_ids)
        await modify(self, path, ack_ids, seconds)

    async def stuck(body: bytes) -> None:
        await never.wait()

    async def scenario() -> None:
        source, errors = harness.new_names()
        await harness.prepare(source, errors)
        await publish(harness, source, bodies)
        monkeypatch.setattr(PubSubCalls, "acknowledge", spy_ack)
        monkeypatch.setattr(PubSubCalls, "modify", spy_modify)
        c = collect(harness, source, stuck, concurrency=2)
        await c.start()
        c.wake()
        await wait_for(lambda: c.in_flight >= 2, PATIENCE_S, "2 handlers holding")
        await asyncio.sleep(0.5)
        await c.stop(0)
        assert c.stats.released >= 2
        assert acked == [], "a message no handler finished was acked"
        assert len(set(given_back)) >= c.stats.released
        monkeypatch.undo()
        rec = Recorder()  # a second streaming worker (unary pulls stall after a stream cancel)
        async with Running(collect(harness, source, rec, concurrency=4)):
            await wait_for(lambda: set(rec.done) >= set(bodies), PATIENCE_S, "every message back")

    run(scenario())


# ---------------------------------------------------------------------- errors and the CLI
def test_missing_subscription_and_unreachable_emulator_are_one_line(
    pubsub_emulator: Emulator,
) -> None:
    async def scenario() -> None:
        settings = PubSubSettings(project=PROJECT, emulator_host=pubsub_emulator.host)
        with pytest.raises(QueueNotFound, match=r"neither subscription .* nor topic"):
            await PubSubAdapter("no-such-thing", settings=settings).open()
        down = PubSubSettings(
            project=PROJECT, emulator_host=f"127.0.0.1:{free_port()}", connect_timeout_s=2.0
        )
        with pytest.raises(BackendUnavailable, match="did not answer"):
            await PubSubAdapter("anything", settings=down).open()
        no_project = PubSubSettings(emulator_host=pubsub_emulator.host)
        with pytest.raises(ConfigError, match="needs a project"):  # the emulator never asks ADC
            await PubSubAdapter("sub-id", settings=no_project).open()

    if os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("STALK_PUBSUB_PROJECT"):
        pytest.skip("GOOGLE_CLOUD_PROJECT is set: ids get a project")
    run(scenario())


def stalk(emulator: Emulator, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": emulator.host, "PYTHONPATH": str(ROOT),
           "STALK_PUBSUB_PROJECT": PROJECT}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "stalk", *args], env=env, capture_output=True, text=True,
        timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


def test_cli_send_run_stats_and_not_found(pubsub_emulator: Emulator) -> None:
    harness = PubSubHarness(pubsub_emulator)
    source, errors = harness.new_names()
    asyncio.run(harness.prepare(source, errors))
    sent = stalk(pubsub_emulator, "send", "--backend", "pubsub", "--source", source,
                 '{"order": 1}', "not json")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert len(sent.stdout.split()) == 2, "one message id per body"
    ran = stalk(pubsub_emulator, "run", "workers.app:handler", "--backend", "pubsub",
                "--source", source, "--until-empty", "--polling-period", "0.1",
                "--max-polling-period", "1")  # fmt: skip
    assert ran.returncode in (0, 3), ran.stderr
    stats = stalk(pubsub_emulator, "stats", "--backend", "pubsub", "--source", source, "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["ready"] is None
    assert "no backlog counts" in stats.stderr
    missing = stalk(pubsub_emulator, "run", "workers.app:handler", "--backend", "pubsub",
                    "--source", "projects/stalk-test/subscriptions/nope-nope")  # fmt: skip
    assert missing.returncode != 0
    lines = [
        line for line in missing.stderr.splitlines() if "not found" in line or "neither" in line
    ]
    assert lines, missing.stderr


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_service_account_credentials_never_reach_the_output(tmp_path: Path, fmt: str) -> None:
    """Issue 14's security list: a worker with a service-account key file (Application Default
    Credentials, no emulator) that cannot reach Pub/Sub says so in one line, at DEBUG, and
    neither the private key nor its id appears in what it prints."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    key_id = "keyid0123456789abcdefSECRET"
    account = tmp_path / "sa.json"
    account.write_text(json.dumps({
        "type": "service_account", "project_id": "p1", "private_key_id": key_id,
        "private_key": pem, "client_email": "w@p1.iam.gserviceaccount.com", "client_id": "1",
        # nothing answers here: the token exchange fails at once, offline
        "token_uri": "http://127.0.0.1:9/token",
    }))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "STALK_"))}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(account)
    ran = subprocess.run(
        [sys.executable, "-m", "stalk", "run", "workers.app:handler", "--backend", "pubsub",
         "--source", "sub-one", "--option", "project=p1", "--option", "connect_timeout_s=3",
         "--log-level", "debug", "--log-format", fmt, "--until-empty"],
        env=env, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    output = ran.stdout + ran.stderr
    assert ran.returncode != 0, output
    assert ran.stderr.strip().splitlines()[-1].startswith("stalk: pubsub:"), ran.stderr
    secret_line = pem.splitlines()[1]
    assert secret_line not in output and key_id not in output


def test_a_time_attribute_that_is_not_finite_is_no_time() -> None:
    """An outside producer's ``stalk-not-before: inf`` would overflow the modack that hides a
    parked copy (and, streamed, end the stream on every delivery): it is read as no time."""
    for text in ("inf", "-inf", "nan", "1e999"):
        assert wire.number({wire.ATTR_NOT_BEFORE: text}, wire.ATTR_NOT_BEFORE) is None
    assert wire.number({wire.ATTR_NOT_BEFORE: "12.5"}, wire.ATTR_NOT_BEFORE) == 12.5
