"""Issue 14, bad input on every backend: odd bodies and misbehaving handlers each take their
defined route (handled, or the error topic with the body byte-identical and a reason), and the
worker stays up and drains.

One real ``stalk run --until-empty`` subprocess per handler kind against the real broker of each
backend, with ``--max-retries 0`` so every failure goes straight to the error topic.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stalk.errors import MessageTooLarge
from stalk.message import ATTR_ERROR, ATTR_REASON
from stalk.testing.harness import read_errors
from tests.backends._every import Backend
from tests.ops._proc import Stalk

#: The engine's default ``--max-message-bytes``: the largest body a worker hands to a handler
#: where the broker takes bigger ones (amqp).
ENGINE_MAX = 1024 * 1024

#: Bodies a handler must receive unchanged, byte for byte.
ODD_BODIES = [b"", b"x", b"\xff\xfe\xfd not utf-8 \xc3", b"\x00bin\x00ary\x00", bytes(range(256))]

#: What each misbehaving body's copy on the error topic says, handler kind by handler kind
#: (``--max-retries 0``: a retry is exhausted at once).
SYNC_ROUTES = {
    b"raise": "retries_exhausted",
    b"hang": "retries_exhausted",
    b"str": "fatal",
    b"int": "fatal",
    b"true": "fatal",
    b"coro": "fatal",
    b"exit": "retries_exhausted",
    b"kbi": "retries_exhausted",
    b"nan": "fatal",
    b"inf": "fatal",
    b"negative": "fatal",
    b"huge": "retries_exhausted",  # finite: capped at --max-retry-delay, then exhausted
}
ASYNC_ROUTES = {**SYNC_ROUTES, b"cancel": "retries_exhausted"}


def handled(log: Path) -> list[bytes]:
    return [bytes.fromhex(line) for line in log.read_text().splitlines()] if log.exists() else []


def drain(backend: Backend, source: str, handler: str, log: Path, *extra: str) -> Stalk:
    worker = Stalk(
        "run", f"tests.ops.handlers:{handler}", *backend.args(source),
        "--max-retries", "0", "--until-empty", "--quiet", "--concurrency", "4",
        "--handler-timeout", "0.5", "--visibility-timeout", "30", "--allow-errors", *extra,
        env={"STALK_TEST_LOG": str(log), "STALK_TEST_SLEEP_S": "3"},
    )  # fmt: skip
    code = worker.wait(90)
    assert code == 0, f"{handler} on {backend.name}: exit {code}\n{worker.stderr}"
    return worker


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_each_misbehaving_handler_has_its_route_and_the_worker_drains(
    every_backend: Backend, tmp_path: Path, kind: str
) -> None:
    backend = every_backend
    source, errors = backend.names()
    routes = SYNC_ROUTES if kind == "sync" else ASYNC_ROUTES
    bad = [word + b" " + bytes([n]) + b"\xff\x00" for n, word in enumerate(routes)]
    backend.publish(source, errors, [*ODD_BODIES, *bad])
    log = tmp_path / "handled.log"
    worker = drain(backend, source, "bad_input" if kind == "sync" else "bad_input_async", log)

    calls = handled(log)
    for body in ODD_BODIES:
        assert calls.count(body) == 1, f"{body!r} handled {calls.count(body)} times: {calls}"
    routed = asyncio.run(read_errors(backend.harness, errors, len(bad)))
    by_body = {d.body: d.attributes for d in routed}
    assert sorted(by_body) == sorted(bad), f"error topic holds {sorted(by_body)}"
    for body in bad:
        word = body.split(b" ", 1)[0]
        attributes = by_body[body]
        assert attributes[ATTR_REASON] == routes[word], (body, attributes)
        assert attributes[ATTR_ERROR], (body, attributes)
    assert "never awaited" not in worker.stderr, worker.stderr


def test_largest_body_is_handled_and_one_byte_more_has_a_defined_route(
    every_backend: Backend, tmp_path: Path
) -> None:
    """The largest body a worker takes (the broker's limit, or the engine's where the broker
    takes more) reaches the handler intact; one byte more is refused at publish with
    ``MessageTooLarge`` (broker limit) or goes to the error topic as ``too_large`` (engine)."""
    backend = every_backend
    source, errors = backend.names()
    largest = min(backend.max_body or ENGINE_MAX, ENGINE_MAX)
    body = b"m" * largest
    over = b"o" * (largest + 1)
    backend.publish(source, errors, [body])
    broker_refuses = backend.max_body is not None and backend.max_body <= ENGINE_MAX
    if broker_refuses:
        with pytest.raises(MessageTooLarge):
            backend.publish(source, errors, [over])
    else:
        backend.publish(source, errors, [over])
    log = tmp_path / "handled.log"
    drain(backend, source, "bad_input", log, "--max-message-bytes", str(ENGINE_MAX))

    assert handled(log) == [body]
    if not broker_refuses:
        routed = asyncio.run(read_errors(backend.harness, errors, 1))
        assert [d.body for d in routed] == [over]
        assert routed[0].attributes[ATTR_REASON] == "too_large", routed[0].attributes


def test_a_failing_body_at_the_limit_still_reaches_the_error_topic_intact(
    every_backend: Backend, tmp_path: Path
) -> None:
    """The error copy carries failure metadata as attributes; a body at the limit must still
    land on the error topic byte-identical (the metadata gives way, not the body)."""
    backend = every_backend
    source, errors = backend.names()
    largest = min(backend.max_body or ENGINE_MAX, ENGINE_MAX)
    body = b"raise " + b"r" * (largest - 6)
    backend.publish(source, errors, [body])
    worker = drain(backend, source, "bad_input", tmp_path / "handled.log")

    routed = asyncio.run(read_errors(backend.harness, errors, 1))
    assert [d.body for d in routed] == [body]
    reason = routed[0].attributes.get(ATTR_REASON)
    if reason is None:  # no metadata fits beside the body: the log says what it lost
        assert backend.max_body == largest, routed[0].attributes
        assert "kept no metadata" in worker.stderr, worker.stderr
    else:
        assert reason == "retries_exhausted", routed[0].attributes
