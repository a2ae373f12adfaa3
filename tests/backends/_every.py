"""One fixture, ``every_backend``, for tests that must hold on local, sqs, amqp (classic and
quorum), nsq and pubsub alike: a conformance harness to publish and read errors with, and the
``stalk run`` arguments that reach the same broker from a real subprocess."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stalk.collectors.base import Adapter
from stalk.testing import AdapterHarness

BACKENDS = ("local", "sqs", "amqp", "amqp-quorum", "nsq", "pubsub")


class LocalFileHarness(AdapterHarness):
    """The local backend on one SQLite file that every adapter and subprocess shares."""

    def __init__(self, path: Path) -> None:
        from stalk.collectors.local import LocalSettings

        self.path = path
        self.settings = LocalSettings(path=str(path), durability="normal")

    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        from stalk.collectors.local import LocalAdapter

        return LocalAdapter(source, error_topic=error_topic, settings=self.settings)


@dataclass
class Backend:
    """A harness and the matching ``--backend``/``--option`` arguments of the CLI."""

    name: str
    harness: AdapterHarness
    cli: list[str] = field(default_factory=list)
    #: Largest body the backend accepts (the engine's ``max_message_bytes`` aside).
    max_body: int | None = None
    #: Seconds until a dead worker's leases come back where ``--until-empty`` cannot see them
    #: (Pub/Sub: no count of leased messages; its ack deadline is at least 10 s).
    unseen_lease_s: float = 0.0

    def args(self, source: str) -> list[str]:
        return [*self.cli, "--source", source]

    def publish(self, source: str, errors: str, bodies: list[bytes]) -> None:
        """Publish ``bodies`` to ``source``, one by one, through a fresh adapter."""
        adapter = self.harness.make_adapter(source, errors)

        async def go() -> None:
            await adapter.open()
            try:
                for body in bodies:
                    await adapter.publish(body)
            finally:
                await adapter.close()

        asyncio.run(go())

    def names(self) -> tuple[str, str]:
        source, errors = self.harness.new_names()
        asyncio.run(self.harness.prepare(source, errors))
        return source, errors


@pytest.fixture(
    params=[
        pytest.param(name, marks=() if name == "local" else pytest.mark.broker(name.split("-")[0]))
        for name in BACKENDS
    ]
)
def every_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Yield each backend in turn (a missing broker skips, or fails in CI, as its fixture does)."""
    name: str = request.param
    if name == "local":
        from stalk.collectors.local import LocalSettings

        db = tmp_path / "stalk.db"
        yield Backend(
            name,
            LocalFileHarness(db),
            ["--backend", "local", "--option", f"path={db}"],
            max_body=LocalSettings.model_fields["max_message_bytes"].default,
        )
    elif name == "sqs":
        from tests.brokers.sqs import REGION, SQSHarness

        endpoint: str = request.getfixturevalue("sqs_endpoint")
        yield Backend(
            name,
            SQSHarness(endpoint),
            ["--backend", "sqs", "--option", f"endpoint_url={endpoint}",
             "--option", f"region={REGION}"],
            max_body=1024 * 1024,  # SQS's MaximumMessageSize since 2025 (moto's too)
        )  # fmt: skip
    elif name.startswith("amqp"):
        from tests.brokers.amqp import AMQPHarness

        url: str = request.getfixturevalue("amqp_url")
        queue_type = "quorum" if name.endswith("quorum") else "classic"
        harness: Any = AMQPHarness(url, queue_type=queue_type)
        try:
            yield Backend(
                name,
                harness,
                ["--backend", "amqp", "--option", f"url={url}",
                 "--option", f"queue_type={queue_type}"],
            )  # fmt: skip
        finally:
            harness.cleanup()
    elif name == "pubsub":
        from stalk.collectors.pubsub.wire import MAX_MESSAGE_BYTES
        from tests.brokers.pubsub import PROJECT, PubSubHarness

        emulator: Any = request.getfixturevalue("pubsub_emulator")
        yield Backend(
            name,
            PubSubHarness(emulator),
            ["--backend", "pubsub", "--option", f"project={PROJECT}",
             "--option", f"emulator_host={emulator.host}"],
            max_body=MAX_MESSAGE_BYTES,
            unseen_lease_s=10.0,
        )  # fmt: skip
    else:
        from stalk.collectors.nsq.settings import DEFAULT_MAX_MESSAGE_BYTES
        from tests.brokers.nsq import NSQHarness

        nsqd: Any = request.getfixturevalue("nsqd")
        yield Backend(
            name,
            NSQHarness(nsqd),
            ["--backend", "nsq", "--option", f"nsqd={nsqd.tcp}",
             "--option", f"nsqd_http={nsqd.http}"],
            max_body=DEFAULT_MAX_MESSAGE_BYTES,
        )  # fmt: skip
