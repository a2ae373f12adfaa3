"""Issue 14, hole 1: a message whose handler kills its worker (``os._exit``) reaches the error
topic as ``poison`` within ``max_retries + 1`` deliveries on every backend, and the rest drains.

Real ``stalk run`` subprocesses, started again after each death as a supervisor would, against
the real broker of each backend.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from stalk.message import ATTR_REASON
from stalk.testing.harness import read_errors
from tests.backends._every import Backend
from tests.ops._proc import Stalk

MAX_RETRIES = 2
#: More runs than a correct engine needs (max_retries + 1 deaths, then a draining run).
MAX_RUNS = 8


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_pill_that_kills_its_worker_reaches_the_error_topic_as_poison(
    every_backend: Backend, tmp_path: Path, concurrency: int
) -> None:
    backend = every_backend
    source, errors = backend.names()
    bodies = [b"ok-0", b"ok-1", b"pill", b"ok-2", b"ok-3"]
    backend.publish(source, errors, bodies)
    log = tmp_path / "calls.log"
    codes: list[int] = []
    routed_by_now = False
    for _ in range(MAX_RUNS):
        worker = Stalk(
            "run", "tests.ops.handlers:poison_pill", *backend.args(source),
            "--max-retries", str(MAX_RETRIES), "--until-empty", "--quiet",
            "--visibility-timeout", "2", "--retry-interval", "0.1", "--max-retry-delay", "0.5",
            "--shutdown-grace", "2", "--concurrency", str(concurrency),
            env={"STALK_TEST_LOG": str(log)},
        )  # fmt: skip
        codes.append(worker.wait(120))
        calls = log.read_bytes().split() if log.exists() else []
        routed_by_now = routed_by_now or "(poison)" in worker.stderr
        # Drained, every healthy body handled and the pill routed: Pub/Sub's --until-empty sees
        # only empty pulls, not what a dead worker leased until its ack deadline passes.
        if codes[-1] == 0 and routed_by_now and all(b in calls for b in bodies if b != b"pill"):
            break
        if codes[-1] == 0:  # drained as far as it could see: wait for the dead worker's leases
            time.sleep(backend.unseen_lease_s)
    assert codes[-1] == 0, f"never drained: exit codes {codes}, calls {calls}\n{worker.stderr}"
    assert calls.count(b"pill") <= MAX_RETRIES + 1, f"pill handled {calls.count(b'pill')} times"
    for body in bodies:
        if body != b"pill":
            assert body in calls, f"{body!r} never handled: {calls}"
    routed = asyncio.run(read_errors(backend.harness, errors, 1))
    assert [d.body for d in routed] == [b"pill"]
    assert routed[0].attributes[ATTR_REASON] == "poison", routed[0].attributes
