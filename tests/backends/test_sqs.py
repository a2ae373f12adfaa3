"""SQS specialities beyond the conformance suite, on moto's standalone server over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest

from stalk import BaseCollector, CollectorOptions, fatal, retry
from stalk.collectors.sqs import SQSAdapter, SQSSettings
from stalk.collectors.sqs.wire import ATTR_BODY_ENCODING, ATTR_PACKED
from stalk.message import ATTR_ATTEMPTS, ATTR_REASON, Message
from stalk.testing.harness import Recorder, Running, wait_for
from tests.brokers.sqs import REGION, create_queue, sqs_client

pytestmark = pytest.mark.broker("sqs")

PATIENCE_S = 30.0
FAST = {"polling_period_s": 0.05, "max_polling_period_s": 0.25, "shutdown_grace_s": 5.0}


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 90))


def names() -> tuple[str, str]:
    source = f"sqs-{uuid.uuid4().hex[:10]}"
    return source, f"{source}-errors"


def adapter(endpoint: str, source: str, errors: str | None = None, **settings: Any) -> SQSAdapter:
    config = SQSSettings(endpoint_url=endpoint, region=REGION, **settings)
    return SQSAdapter(source, error_topic=errors, settings=config)


def queues(endpoint: str, *names_: str) -> list[str]:
    return [create_queue(endpoint, name) for name in names_]


def engine(a: SQSAdapter, handler: Any, **options: Any) -> BaseCollector:
    return BaseCollector(a, handler, CollectorOptions(**{**FAST, **options}))


def raw_receive(endpoint: str, url: str, wait_s: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    got = sqs_client(endpoint).receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_s,
        MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"], **kwargs,
    )  # fmt: skip
    return list(got.get("Messages", []))


async def opened(a: SQSAdapter, visibility_s: float = 30.0) -> SQSAdapter:
    a.bind(None, None, visibility_s)
    await a.open()
    return a


# ---------------------------------------------------------------------- retries and attempts
def test_retry_result_changes_visibility(sqs_endpoint: str) -> None:
    """A retry hides the same SQS message (same id, receive count + 1) for its delay."""
    source, errors = names()
    url, _ = queues(sqs_endpoint, source, errors)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await a.publish(b"later")
        await a.close()
        rec = Recorder(lambda b, m: retry("not yet", delay=2) if m.attempt == 1 else None)
        c = engine(adapter(sqs_endpoint, source, errors), rec)
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 1, PATIENCE_S, "first delivery")
            await wait_for(lambda: c.stats.retried >= 1, PATIENCE_S, "the retry")
            counts = sqs_client(sqs_endpoint).get_queue_attributes(
                QueueUrl=url, AttributeNames=["All"])["Attributes"]  # fmt: skip
            assert counts["ApproximateNumberOfMessagesNotVisible"] == "1"
            assert counts["ApproximateNumberOfMessages"] == "0"
            await wait_for(lambda: len(rec.done) >= 2, PATIENCE_S, "the redelivery")
        first, second = rec.deliveries
        assert first.id == second.id, "a visibility retry keeps the SQS message id"
        assert (first.attempt, second.attempt) == (1, 2)
        assert second.at - first.at >= 2 * 0.9

    run(scenario())


def test_attempt_comes_from_approximate_receive_count(sqs_endpoint: str) -> None:
    source, _ = names()
    (url,) = queues(sqs_endpoint, source)
    sqs_client(sqs_endpoint).send_message(QueueUrl=url, MessageBody="counted")
    for _ in range(2):  # someone else received it twice and let it go
        assert raw_receive(sqs_endpoint, url, VisibilityTimeout=0)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source))
        try:
            got = await a.get_messages(10, 1)
            assert [m.attempt for m in got] == [3]
            await a.ack(got)
        finally:
            await a.close()

    run(scenario())


def test_long_retry_is_parked_and_chained(sqs_endpoint: str) -> None:
    """Past the visibility limit a retry becomes a parked copy that hops until due."""

    class ShortLimits(SQSAdapter):
        max_visibility_s = 2
        max_send_delay_s = 1
        visibility_margin_s = 0

    source, errors = names()
    queues(sqs_endpoint, source, errors)

    async def scenario() -> None:
        a = await opened(ShortLimits(source, settings=SQSSettings(
            endpoint_url=sqs_endpoint, region=REGION)))  # fmt: skip
        await a.publish(b"long", {"trace": "t-1"})
        await a.close()
        rec = Recorder(lambda b, m: retry("much later", delay=4) if m.attempt == 1 else None)
        c = engine(ShortLimits(source, error_topic=errors, settings=SQSSettings(
            endpoint_url=sqs_endpoint, region=REGION)), rec)  # fmt: skip
        async with Running(c):
            await wait_for(lambda: len(rec.done) >= 2, PATIENCE_S, "the parked retry")
            await asyncio.sleep(0.5)
        first, second = rec.deliveries
        assert (first.attempt, second.attempt) == (1, 2)
        assert second.body == b"long" and second.attributes == {"trace": "t-1"}
        assert second.at - first.at >= 4 * 0.9
        assert len(rec.deliveries) == 2, "a parked copy reached the handler early"

    run(scenario())


def test_publish_delay_beyond_send_limit_is_parked(sqs_endpoint: str) -> None:
    class ShortLimits(SQSAdapter):
        max_send_delay_s = 1

    source, _ = names()
    queues(sqs_endpoint, source)

    async def scenario() -> None:
        a = await opened(ShortLimits(source, settings=SQSSettings(
            endpoint_url=sqs_endpoint, region=REGION)))  # fmt: skip
        try:
            sent = time.monotonic()
            await a.publish(b"patient", delay_s=3)
            got: list[Message] = []
            while not got:
                got = await a.get_messages(10, 1)
            assert time.monotonic() - sent >= 3 * 0.9
            assert [(m.body, m.attempt) for m in got] == [(b"patient", 1)]
            await a.ack(got)
        finally:
            await a.close()

    run(scenario())


# ---------------------------------------------------------------------- acks
def test_batch_delete_partial_failure_is_logged_not_raised(
    sqs_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, _ = names()
    (url,) = queues(sqs_endpoint, source)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source), visibility_s=1)
        try:
            for i in range(3):
                await a.publish(f"m{i}".encode())
            got: list[Message] = []
            while len(got) < 3:
                got += await a.get_messages(3 - len(got), 1)
            bad = got[1]
            bad.receipt.handle = "not-a-receipt-handle"
            with caplog.at_level(logging.WARNING, logger="stalk.collectors.sqs.calls"):
                await a.ack(got)
            assert bad.id in caplog.text and "ReceiptHandleIsInvalid" in caplog.text
            again: list[Message] = []
            deadline = time.monotonic() + PATIENCE_S
            while not again and time.monotonic() < deadline:
                again = await a.get_messages(10, 1)
            assert [m.body for m in again] == [bad.body], "only the refused one comes back"
            await a.ack(again)
        finally:
            await a.close()
        assert raw_receive(sqs_endpoint, url) == []

    run(scenario())


def test_ack_of_more_than_ten_goes_in_chunks(sqs_endpoint: str) -> None:
    source, _ = names()
    (url,) = queues(sqs_endpoint, source)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source))
        calls: list[int] = []
        try:
            await asyncio.gather(*(a.publish(f"n{i}".encode()) for i in range(25)))
            got: list[Message] = []
            while len(got) < 25:
                got += await a.get_messages(10, 1)
            a.sqs.client.meta.events.register(
                "before-parameter-build.sqs.DeleteMessageBatch",
                lambda params, **_: calls.append(len(params["Entries"])),
            )
            await a.ack(got)
        finally:
            await a.close()
        assert sorted(calls) == [5, 10, 10]
        assert raw_receive(sqs_endpoint, url) == []

    run(scenario())


# ---------------------------------------------------------------------- heartbeat, shutdown
def test_heartbeat_keeps_long_handlers_invisible_in_batches(sqs_endpoint: str) -> None:
    source, errors = names()
    url, _ = queues(sqs_endpoint, source, errors)
    batches: list[int] = []
    seen_by_other: list[dict[str, Any]] = []

    async def slow(body: bytes) -> None:
        await asyncio.sleep(6)  # twice the lease: without heartbeats it would lapse

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await asyncio.gather(*(a.publish(f"h{i}".encode()) for i in range(3)))
        await a.close()
        sqs = adapter(sqs_endpoint, source, errors)
        c = engine(sqs, slow, concurrency=3, visibility_timeout_s=3)
        async with Running(c):
            sqs.sqs.client.meta.events.register(
                "before-parameter-build.sqs.ChangeMessageVisibilityBatch",
                lambda params, **_: batches.append(len(params["Entries"])),
            )
            await wait_for(lambda: c.in_flight == 3, PATIENCE_S, "3 in flight")
            for _ in range(10):  # a rival consumer polls all through the 6 s handlers
                seen_by_other.extend(await asyncio.to_thread(raw_receive, sqs_endpoint, url))
                await asyncio.sleep(0.5)
            await wait_for(lambda: c.stats.acked >= 3, PATIENCE_S, "the acks")

    run(scenario())
    assert seen_by_other == [], "a message's lease lapsed while its handler ran"
    assert batches and max(batches) == 3, f"heartbeats not batched: {batches}"


def test_shutdown_releases_unfinished_messages_at_once(sqs_endpoint: str) -> None:
    source, errors = names()
    url, _ = queues(sqs_endpoint, source, errors)

    async def stuck(body: bytes) -> None:
        await asyncio.sleep(30)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await a.publish(b"a")
        await a.publish(b"b")
        await a.close()
        c = engine(adapter(sqs_endpoint, source, errors), stuck, concurrency=2,
                   visibility_timeout_s=300)  # fmt: skip
        await c.start()
        c.wake()
        await wait_for(lambda: c.in_flight == 2, PATIENCE_S, "2 in flight")
        await c.stop(0.05)
        assert c.stats.released == 2

    run(scenario())
    got = raw_receive(sqs_endpoint, url, wait_s=1)
    assert sorted(m["Body"] for m in got) == ["a", "b"], "released messages stayed invisible"


def test_cancelled_long_poll_gives_back_what_it_received(sqs_endpoint: str) -> None:
    source, _ = names()
    (url,) = queues(sqs_endpoint, source)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source), visibility_s=300)
        try:
            poll = asyncio.create_task(a.get_messages(10, 5))
            await asyncio.sleep(0.5)
            poll.cancel()
            await asyncio.to_thread(
                sqs_client(sqs_endpoint).send_message, QueueUrl=url, MessageBody="orphan"
            )
        finally:
            await a.close()  # waits for the poll's thread, which gives the message back

    run(scenario())
    got = raw_receive(sqs_endpoint, url, wait_s=1)
    assert [m["Body"] for m in got] == ["orphan"]


# ---------------------------------------------------------------------- outside producers, bodies
def test_outside_producer_message_works_and_error_copy_is_intact(sqs_endpoint: str) -> None:
    source, errors = names()
    url, error_url = queues(sqs_endpoint, source, errors)
    text = '{"naïve": "日本", "n": 1}'
    sqs_client(sqs_endpoint).send_message(
        QueueUrl=url, MessageBody=text, MessageAttributes={
            "kind": {"DataType": "String", "StringValue": "order"},
            "count": {"DataType": "Number", "StringValue": "7"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\xff\x00"},
        },
    )  # fmt: skip
    rec = Recorder(lambda b, m: fatal("unknown kind"))

    async def scenario() -> None:
        c = engine(adapter(sqs_endpoint, source, errors), rec)
        async with Running(c):
            await wait_for(lambda: c.stats.acked >= 1, PATIENCE_S, "the error route")

    run(scenario())
    seen = rec.deliveries[0]
    assert seen.body == text.encode() and seen.attempt == 1
    assert seen.attributes == {"kind": "order", "count": "7"}
    (copy,) = raw_receive(sqs_endpoint, error_url)
    assert copy["Body"] == text
    attrs = copy["MessageAttributes"]
    assert attrs[ATTR_REASON]["StringValue"] == "fatal"
    # 8 failure attributes + 3 of the producer's pass SQS's 10: the producer's travel packed
    packed = json.loads(attrs[ATTR_PACKED]["StringValue"])
    assert packed["blob"] == ["Binary", base64.b64encode(b"\xff\x00").decode()]
    assert packed["count"] == ["Number", "7"] and packed["kind"] == ["String", "order"]


def test_binary_body_travels_base64_with_marker(sqs_endpoint: str) -> None:
    source, _ = names()
    (url,) = queues(sqs_endpoint, source)
    body = bytes(range(256))

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source))
        try:
            await a.publish(body)
            (raw,) = await asyncio.to_thread(raw_receive, sqs_endpoint, url, 0, VisibilityTimeout=0)
            assert base64.b64decode(raw["Body"]) == body
            assert raw["MessageAttributes"][ATTR_BODY_ENCODING]["StringValue"] == "base64"
            got: list[Message] = []
            while not got:
                got = await a.get_messages(1, 1)
            assert got[0].body == body and ATTR_BODY_ENCODING not in got[0].attributes
            await a.ack(got)
        finally:
            await a.close()

    run(scenario())


def test_attributes_over_the_limit_are_packed_not_dropped(sqs_endpoint: str) -> None:
    source, errors = names()
    _, error_url = queues(sqs_endpoint, source, errors)
    own = {f"a{i}": f"v{i}" for i in range(9)}

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await a.publish(b"crowded", own)
        await a.close()
        c = engine(adapter(sqs_endpoint, source, errors), lambda b: fatal("no"))
        async with Running(c):
            await wait_for(lambda: c.stats.acked >= 1, PATIENCE_S, "the error route")
        (copy,) = await asyncio.to_thread(raw_receive, sqs_endpoint, error_url, 0,
                                          VisibilityTimeout=0)  # fmt: skip
        assert len(copy["MessageAttributes"]) <= 10
        assert set(json.loads(copy["MessageAttributes"][ATTR_PACKED]["StringValue"])) == set(own)
        reader = await opened(adapter(sqs_endpoint, errors))
        try:
            got: list[Message] = []
            while not got:
                got = await reader.get_messages(1, 1)
            assert got[0].attributes.items() >= own.items()
            assert got[0].attributes[ATTR_ATTEMPTS] == "1"
            await reader.ack(got)
        finally:
            await reader.close()

    run(scenario())


# ---------------------------------------------------------------------- drain, counts, redrive
def test_until_empty_drains_and_backlog_counts(sqs_endpoint: str) -> None:
    source, errors = names()
    queues(sqs_endpoint, source, errors)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await asyncio.gather(*(a.publish(f"d{i}".encode()) for i in range(30)))
        backlog = await a.backlog()
        assert backlog is not None and (backlog.ready, backlog.errors) == (30, 0)
        await a.close()
        rec = Recorder(
            lambda b, m: retry("once", delay=1) if b == b"d7" and m.attempt == 1 else None
        )
        c = engine(adapter(sqs_endpoint, source, errors), rec, concurrency=8)
        await c.serve(until_empty=True)
        assert sorted(set(rec.done)) == sorted(f"d{i}".encode() for i in range(30))
        assert rec.attempts_of(b"d7") == [1, 2], "until_empty left before the retry was due"

    run(scenario())


def test_native_redrive_policy_below_max_retries_wins(sqs_endpoint: str) -> None:
    """Documented interaction: a low maxReceiveCount moves the message before stalk routes it."""
    source, errors = names()
    dlq_url = create_queue(sqs_endpoint, f"{source}-dlq")
    dlq_arn = sqs_client(sqs_endpoint).get_queue_attributes(
        QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]  # fmt: skip
    policy = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2})
    create_queue(sqs_endpoint, source, RedrivePolicy=policy)
    (error_url,) = queues(sqs_endpoint, errors)
    rec = Recorder(lambda b, m: retry("broken", delay=0))

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        await a.publish(b"doomed")
        await a.close()
        c = engine(adapter(sqs_endpoint, source, errors), rec, max_retries=5)
        async with Running(c):
            await wait_for(lambda: bool(raw_receive(sqs_endpoint, dlq_url, VisibilityTimeout=0)),
                           PATIENCE_S, "the native DLQ move")  # fmt: skip

    run(scenario())
    assert rec.attempts_of(b"doomed") == [1, 2]
    assert raw_receive(sqs_endpoint, error_url) == []
