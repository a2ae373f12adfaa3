"""The Pub/Sub emulator for the pubsub tests: started by the fixture on a free port (a plugin).

``pubsub_emulator`` starts one emulator per session from the Google Cloud CLI
(``<sdk root>/platform/pubsub-emulator/bin/cloud-pubsub-emulator``, or ``STALK_PUBSUB_EMULATOR``)
on 127.0.0.1 and stops it by PID at the end; ``start_pubsub_emulator`` starts more (restart
tests). Without the emulator or the SDK the tests skip loudly outside CI and fail in CI.

Every test gets fresh topics and subscriptions: on the emulator a subscription whose streaming
pull was cancelled stalls later unary pulls, and messages near a cancel can return ~120 s late
(stalk's streaming adapter half-closes its streams instead; a test's own raw client may not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stalk.testing import AdapterHarness, require_broker
from tests.brokers import free_port

#: Seconds the emulator may take to answer (a JVM on a loaded 2-core machine).
START_TIMEOUT_S = 60.0
#: The project every test resource lives in (the emulator takes any).
PROJECT = "stalk-test"
#: Deliveries before Pub/Sub dead-letters on the test subscriptions: far above any test's
#: retries, so stalk routes first and ``delivery_attempt`` is filled.
MAX_DELIVERY_ATTEMPTS = 100
HINT = "install the Google Cloud CLI's pubsub-emulator component (and Java 11+)"


def emulator_binary() -> str | None:
    """Return the emulator launcher, or None."""
    given = os.environ.get("STALK_PUBSUB_EMULATOR")
    if given:
        return given if os.access(given, os.X_OK) else None
    roots = [os.environ.get("CLOUDSDK_ROOT_DIR", ""), "/usr/lib/google-cloud-sdk"]
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(str(Path(os.path.realpath(gcloud)).parent.parent))
    for root in filter(None, roots):
        candidate = Path(root) / "platform/pubsub-emulator/bin/cloud-pubsub-emulator"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class Emulator:
    """One emulator process on loopback; can be stopped and started again (state is lost)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkdtemp(prefix="stalk-pubsub-")) / "emulator.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [self.binary, "--host=127.0.0.1", f"--port={self.port}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM by PID (it stops in well under a second), SIGKILL if it does not."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def start_pubsub_emulator() -> Iterator[Callable[[], Emulator]]:
    """Start emulators; every one is stopped at session end."""
    try:
        import google.pubsub_v1  # noqa: F401
    except ImportError:
        require_broker(
            "pubsub", "google-cloud-pubsub is not installed: pip install 'stalk[pubsub]'"
        )
    binary = emulator_binary()
    if binary is None:
        require_broker("pubsub", f"no Pub/Sub emulator: {HINT}")
    if shutil.which("java") is None:
        require_broker("pubsub", f"no java on PATH for the emulator: {HINT}")
    started: list[Emulator] = []

    def start() -> Emulator:
        server = Emulator(binary)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def pubsub_emulator(start_pubsub_emulator: Callable[[], Emulator]) -> Emulator:
    """The session's shared emulator."""
    return start_pubsub_emulator()


async def create(
    host: str,
    topic: str,
    subscription: str | None = None,
    *,
    dead_letter: bool = True,
    ordering: bool = False,
    ack_deadline_s: int = 10,
    max_delivery_attempts: int = MAX_DELIVERY_ATTEMPTS,
) -> None:
    """Create ``topic`` (ids in :data:`PROJECT`) and a subscription of it (same id by default)."""
    import grpc
    from google.api_core import exceptions as gexc
    from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcAsyncIOTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcAsyncIOTransport

    channel = grpc.aio.insecure_channel(host)
    try:
        pub = PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=channel))
        sub = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
        topic_path = f"projects/{PROJECT}/topics/{topic}"
        for path in (topic_path, f"{topic_path}-dead"):
            with contextlib.suppress(gexc.AlreadyExists):
                await pub.create_topic(name=path)
        request: dict[str, Any] = {
            "name": f"projects/{PROJECT}/subscriptions/{subscription or topic}",
            "topic": topic_path,
            "ack_deadline_seconds": ack_deadline_s,
            "enable_message_ordering": ordering,
        }
        if dead_letter:
            request["dead_letter_policy"] = {
                "dead_letter_topic": f"{topic_path}-dead",
                "max_delivery_attempts": max_delivery_attempts,
            }
        with contextlib.suppress(gexc.AlreadyExists):
            await sub.create_subscription(request=request)
    finally:
        await channel.close()


class PubSubHarness(AdapterHarness):
    """The pubsub adapter on the test emulator; fresh topic and subscription per test.

    Args:
        mode: ``pull`` or ``streaming``.
        dead_letter: give subscriptions a dead-letter policy (Pub/Sub then counts deliveries).
    """

    patience_s = 30.0

    def __init__(
        self, emulator: Emulator, mode: str = "pull", dead_letter: bool = True, **settings: Any
    ) -> None:
        self.emulator = emulator
        self.mode = mode
        self.dead_letter = dead_letter
        self.settings = settings

    def make_adapter(self, source: str, error_topic: str) -> Any:
        from stalk.collectors.pubsub import PubSubAdapter, PubSubSettings

        settings = PubSubSettings(
            project=PROJECT, emulator_host=self.emulator.host, mode=self.mode, **self.settings
        )
        return PubSubAdapter(source, error_topic=error_topic, settings=settings)

    def new_names(self) -> tuple[str, str]:
        source = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return source, f"{source}-errors"

    async def prepare(self, source: str, error_topic: str) -> None:
        await create(self.emulator.host, source, dead_letter=self.dead_letter)
        await create(self.emulator.host, error_topic, dead_letter=self.dead_letter)


@pytest.fixture
def pubsub_harness(pubsub_emulator: Emulator) -> PubSubHarness:
    """A pull-mode :class:`PubSubHarness` on the session's emulator."""
    return PubSubHarness(pubsub_emulator)


def run(coro: Any) -> Any:
    """Run a coroutine on a fresh loop (tests written as plain functions)."""
    return asyncio.run(coro)
