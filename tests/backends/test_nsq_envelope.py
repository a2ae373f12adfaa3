"""The error-topic envelope: bodies stay byte-identical, outside bytes are never rejected."""

from __future__ import annotations

import asyncio
import struct

import pytest

from stalk.collectors.nsq import envelope
from stalk.message import ATTR_REASON
from stalk.result import fatal
from stalk.testing.harness import Recorder, Running, read_errors, wait_for
from tests.backends.test_nsq import collect
from tests.brokers.nsq import NSQHarness

BODIES = [b"", bytes(range(256)), envelope.MAGIC, envelope.MAGIC + b"\xff" * 3, b"\x00" * 10]


@pytest.mark.parametrize("body", BODIES)
def test_wrap_unwrap_round_trip_binary(body: bytes) -> None:
    attrs = {"stalk-reason": "fatal", "k": "é\n\x00"}
    data = envelope.wrap(body, attrs)
    assert data.endswith(body), "the body must be the byte-identical tail"
    assert envelope.unwrap(data) == (body, attrs)


def test_no_attributes_means_the_raw_body() -> None:
    assert envelope.wrap(b"plain", {}) == b"plain"


@pytest.mark.parametrize(
    "data",
    [
        envelope.MAGIC,  # too short for a length
        envelope.MAGIC + struct.pack(">I", 99) + b"{}",  # length past the end
        envelope.MAGIC + struct.pack(">I", 2) + b"[]",  # not an object
        envelope.MAGIC + struct.pack(">I", 2) + b"\xff\xfe",  # not UTF-8 JSON
        b"outside producer bytes",
    ],
)
def test_anything_else_is_a_plain_body(data: bytes) -> None:
    assert envelope.unwrap(data) == (data, {})


def test_readme_reader_decodes_the_layout() -> None:
    """The reader docs/nsq.md gives, in a few lines of any language."""
    data = envelope.wrap(b"\x00body\xff", {"stalk-reason": "fatal"})
    import json

    assert data[:8] == b"\x1fstalk\x00\x01"
    (n,) = struct.unpack(">I", data[8:12])
    assert json.loads(data[12 : 12 + n]) == {"stalk-reason": "fatal"}
    assert data[12 + n :] == b"\x00body\xff"


@pytest.mark.broker("nsq")
def test_error_topic_round_trip_with_binary_body(nsq_harness: NSQHarness) -> None:
    body = bytes(range(256)) * 4 + envelope.MAGIC

    async def scenario() -> None:
        source, errors = nsq_harness.new_names()
        await nsq_harness.prepare(source, errors)
        adapter = nsq_harness.make_adapter(source, errors)
        await adapter.open()
        await adapter.publish(body, {"trace": "x1"})
        await adapter.close()
        rec = Recorder(lambda b, m: fatal(ValueError("bad bytes")))
        async with Running(collect(nsq_harness, source, rec)):
            await wait_for(lambda: len(rec.done) >= 1, 30, "the delivery")
            dead = await read_errors(nsq_harness, errors, 1)
        assert dead[0].body == body
        assert dead[0].attributes["trace"] == "x1"
        assert dead[0].attributes[ATTR_REASON] == "fatal"

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_an_empty_body_is_wrapped_so_nsqd_takes_it_and_it_round_trips() -> None:
    data = envelope.wrap(b"", {})
    assert data  # nsqd refuses a 0-byte message
    assert envelope.unwrap(data) == (b"", {})
