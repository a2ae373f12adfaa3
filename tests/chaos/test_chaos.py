"""Issue 14: the chaos suite's short version, one test per backend (``python -m tests.chaos
--short`` prints the same tables; ``python -m tests.chaos`` is the full version).

Each test starts its own broker (a RabbitMQ node, an nsqd, a moto server, a Pub/Sub emulator of
its own), so a missing broker fails in CI through the ``broker`` marker and ``require_broker``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stalk.testing import require_broker
from tests.chaos.driver import Plan, run
from tests.chaos.targets import BACKENDS, RabbitNode


def _check_available(backend: str) -> None:
    if backend == "sqs":
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError as exc:
            require_broker("sqs", f"{exc.name} is not installed: pip install 'moto[server]'")
    elif backend.startswith("amqp"):
        if not RabbitNode.available():
            require_broker("amqp", "no rabbitmq-server to start a node of the chaos suite's own")
    elif backend == "nsq":
        from tests.brokers.nsq import HINT, nsqd_binary

        if nsqd_binary() is None:
            require_broker("nsq", f"no nsqd binary: {HINT}")
    elif backend.startswith("pubsub"):
        import shutil

        from tests.brokers.pubsub import HINT as PUBSUB_HINT
        from tests.brokers.pubsub import emulator_binary

        try:
            import google.pubsub_v1  # noqa: F401
        except ImportError:
            require_broker(
                "pubsub", "google-cloud-pubsub is not installed: pip install 'stalk[pubsub]'"
            )
        if emulator_binary() is None:
            require_broker("pubsub", f"no Pub/Sub emulator: {PUBSUB_HINT}")
        if shutil.which("java") is None:
            require_broker("pubsub", f"no java on PATH for the emulator: {PUBSUB_HINT}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(name, marks=() if name == "local" else pytest.mark.broker(name.split("-")[0]))
        for name in BACKENDS
    ],
)
def test_nothing_is_lost_and_every_pill_is_routed(backend: str, tmp_path: Path) -> None:
    _check_available(backend)
    lines: list[str] = []
    report = run(Plan.short(backend, seed=14), tmp_path, say=lines.append)
    table = report.table()
    print(table)
    assert report.kills >= 5, table
    assert report.lost == [], table
    assert report.pills_routed == report.pills, table
    assert report.pill_deliveries <= report.max_deliveries, table
    assert report.ok, table + "\n" + "\n".join(lines)
