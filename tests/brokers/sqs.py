"""SQS for the sqs tests: moto's standalone server, started by the fixture (a pytest plugin).

``sqs_endpoint`` starts ``python -m moto.server`` once per session on a free loopback port and
stops it at the end; boto3 talks HTTP to it exactly as to AWS (no in-process ``mock_aws``). Set
``STALK_TEST_SQS_ENDPOINT`` to use a server you run yourself instead. When moto is missing the
tests skip loudly outside CI and fail in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stalk.testing import AdapterHarness, require_broker
from tests.brokers import free_port

#: Region every test queue lives in.
REGION = "us-east-1"
#: Seconds moto may take to start answering.
START_TIMEOUT_S = 60.0
#: Environment that keeps boto3 away from any real AWS account or profile during the tests.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS")


def _answers(endpoint: str) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "sqs", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    try:
        client.list_queues()
        return True
    except ClientError:  # an answer all the same (a server that checks credentials says no)
        return True
    except Exception:
        return False
    finally:
        client.close()


class MotoServer:
    """One ``moto.server`` process on loopback, started and stopped by the test session."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def wait_ready(self) -> str | None:
        """Return None once the server answers, else why it did not."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"moto.server exited with {self.process.returncode}"
            if _answers(self.endpoint):
                return None
            time.sleep(0.1)
        return f"moto.server did not answer within {START_TIMEOUT_S:.0f}s"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def start_moto(log_path: Path, env: dict[str, str] | None = None) -> MotoServer:
    """Start moto's server or stop the test (skip outside CI, fail in CI) saying why."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        require_broker(
            "sqs", f"{exc.name} is not installed: pip install 'stalk[sqs]' 'moto[server]'"
        )
    server = MotoServer(log_path, env)
    problem = server.wait_ready()
    if problem is not None:
        server.stop()
        require_broker("sqs", f"{problem} (log: {log_path})")
    return server


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Fake credentials and region for the session; no real AWS profile is read."""
    patch = pytest.MonkeyPatch()
    for key, value in FAKE_AWS_ENV.items():
        patch.setenv(key, value)
    for key in _UNSET:
        patch.delenv(key, raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def sqs_endpoint(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the URL of a moto server for this session (or ``STALK_TEST_SQS_ENDPOINT``)."""
    given = os.environ.get("STALK_TEST_SQS_ENDPOINT")
    if given:
        if not _answers(given):
            require_broker("sqs", f"STALK_TEST_SQS_ENDPOINT={given} does not answer")
        yield given
        return
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server.endpoint
    finally:
        server.stop()


def sqs_client(endpoint: str, region: str = REGION) -> Any:
    """Return a plain boto3 SQS client on the test server (the test's own, outside stalk)."""
    import boto3

    return boto3.client("sqs", endpoint_url=endpoint, region_name=region)


def create_queue(endpoint: str, name: str, **attributes: str) -> str:
    """Create a queue (FIFO when the name ends ``.fifo``) and return its URL."""
    if name.endswith(".fifo"):
        attributes.setdefault("FifoQueue", "true")
    return str(sqs_client(endpoint).create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


class SQSHarness(AdapterHarness):
    """The sqs adapter on the moto server; queues are created up front by :meth:`prepare`."""

    patience_s = 30.0

    def __init__(self, endpoint: str, **settings: Any) -> None:
        self.endpoint = endpoint
        self.settings = {"region": REGION, "create_queues": True, **settings}

    def make_adapter(self, source: str, error_topic: str) -> Any:
        from stalk.collectors.sqs import SQSAdapter, SQSSettings

        settings = SQSSettings(endpoint_url=self.endpoint, **self.settings)
        return SQSAdapter(source, error_topic=error_topic, settings=settings)

    def new_names(self) -> tuple[str, str]:
        source = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return source, f"{source}-errors"

    async def prepare(self, source: str, error_topic: str) -> None:
        for name in (source, error_topic):
            await asyncio.to_thread(create_queue, self.endpoint, name)

    async def restart(self) -> None:
        """Skip: moto keeps queues in memory, so a restart proves nothing about SQS's own."""
        pytest.skip(
            "moto keeps its queues in process memory and loses them on restart; SQS's "
            "persistence (features.persistent) cannot be shown against it"
        )


@pytest.fixture
def sqs_harness(sqs_endpoint: str) -> SQSHarness:
    """An :class:`SQSHarness` on the session's moto server."""
    return SQSHarness(sqs_endpoint)
