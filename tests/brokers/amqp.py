"""RabbitMQ for the amqp tests (a pytest plugin loaded by tests/conftest.py).

``amqp_url`` checks once per session that the broker answers on loopback; when it does not, the
tests skip loudly outside CI and fail in CI (``CI=true``). ``AMQPHarness`` builds adapters for
the conformance suite and deletes the queues a test created.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from stalk.testing import AdapterHarness, require_broker

#: Where the tests look for RabbitMQ; scripts/start-rabbitmq.sh starts one there.
AMQP_URL = os.environ.get("STALK_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def _probe(url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    await connection.close()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """Return the URL of a RabbitMQ that answers, or skip (fail in CI) saying how to start one."""
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        require_broker("amqp", "aio-pika is not installed: pip install 'stalk[amqp]'")
    try:
        asyncio.run(_probe(AMQP_URL))
    except Exception as exc:
        from stalk.collectors.amqp.topology import safe_url

        require_broker(
            "amqp",
            f"RabbitMQ not reachable at {safe_url(AMQP_URL)} ({exc or type(exc).__name__}); "
            "start it with scripts/start-rabbitmq.sh",
        )
    return AMQP_URL


def control_path() -> str:
    """Return the rabbitmqctl path when this user may control the node, else skip (fail in CI)."""
    path = shutil.which("rabbitmqctl")
    if path is None:
        require_broker("amqp", "rabbitmqctl is not on PATH (scripts/start-rabbitmq.sh installs it)")
    ping = subprocess.run([path, "-q", "ping"], capture_output=True, timeout=60, check=False)
    if ping.returncode != 0:
        require_broker("amqp", "rabbitmqctl cannot reach the node (run the tests as root in CI)")
    return path


def restart_rabbitmq(ctl: str) -> None:
    """Stop and start the RabbitMQ application, returning once it accepts work again."""
    for step in ("stop_app", "start_app", "await_startup"):
        subprocess.run([ctl, "-q", step], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def rabbitmqctl(amqp_url: str) -> str:
    """Return the rabbitmqctl path when this user may control the node (restart tests)."""
    return control_path()


class AMQPHarness(AdapterHarness):
    """The amqp adapter against the test broker; remembers queues to delete afterwards."""

    patience_s = 30.0

    def __init__(self, url: str, **settings: Any) -> None:
        self.url = url
        self.settings = settings
        self.queues: list[str] = []
        self.adapters: list[Any] = []
        self.exchanges: list[str] = [settings["exchange"]] if settings.get("exchange") else []

    def make_adapter(self, source: str, error_topic: str) -> Any:
        from stalk.collectors.amqp import AMQPAdapter, AMQPSettings

        self.queues += [source, error_topic]
        settings = AMQPSettings(url=self.url, **self.settings)
        adapter = AMQPAdapter(source, error_topic=error_topic, settings=settings)
        self.adapters.append(adapter)
        return adapter

    def features(self) -> Any:
        """The adapter's features; on a quorum queue, no promise that attempts stay put.

        stalk's own release keeps the attempt on both queue types, but on a quorum queue a
        prefetch change (the careful start raises it after the first fresh delivery) cancels
        and re-consumes, and a delivery RabbitMQ sends to the old consumer while its cancel is
        under way is returned by the broker with ``x-delivery-count`` + 1: an attempt nobody
        handled, which the kit's release check would blame on the release.
        """
        features = super().features()
        if self.settings.get("queue_type") == "quorum":
            return dataclasses.replace(features, release_keeps_attempt=False)
        return features

    def new_names(self) -> tuple[str, str]:
        source = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return source, f"{source}-errors"

    async def restart(self) -> None:
        """Restart the RabbitMQ application (``rabbitmqctl stop_app``/``start_app``)."""
        await asyncio.to_thread(restart_rabbitmq, control_path())

    def cleanup(self) -> None:
        """Delete every queue this harness's adapters used (delay buckets expire by themselves)."""
        from stalk.collectors.amqp.topology import delay_queue_name

        for adapter in self.adapters:
            self.queues += [delay_queue_name(adapter.source, ms) for ms in adapter._buckets]
        if self.queues or self.exchanges:
            asyncio.run(delete_topology(self.url, sorted(set(self.queues)), self.exchanges))


async def delete_topology(url: str, queues: list[str], exchanges: Sequence[str] = ()) -> None:
    """Delete queues and exchanges by name, ignoring ones already gone."""
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    finally:
        await connection.close()


@pytest.fixture
def amqp_harness(amqp_url: str) -> Iterator[AMQPHarness]:
    """An :class:`AMQPHarness` on classic queues, cleaned up after the test."""
    harness = AMQPHarness(amqp_url)
    yield harness
    harness.cleanup()
