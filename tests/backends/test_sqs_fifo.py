"""SQS FIFO queues: group ids on publish, in-group order kept through retries at concurrency > 1."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import pytest

from stalk import retry
from stalk.errors import BackendError
from stalk.message import ATTR_REASON, Message
from stalk.testing.harness import Running, wait_for
from tests.backends.test_sqs import PATIENCE_S, adapter, engine, opened, raw_receive, run
from tests.brokers.sqs import create_queue

pytestmark = pytest.mark.broker("sqs")


def fifo_names() -> tuple[str, str]:
    stem = f"sqs-{uuid.uuid4().hex[:10]}"
    return f"{stem}.fifo", f"{stem}-errors.fifo"


def test_default_error_queue_of_a_fifo_queue_is_fifo() -> None:
    a = adapter("http://127.0.0.1:1", "orders.fifo")
    assert a.default_error_topic("orders.fifo") == "orders-errors.fifo"
    assert a.default_error_topic("orders") == "orders-errors"


def test_group_order_is_kept_through_a_retry(sqs_endpoint: str) -> None:
    """A retried message keeps the rest of its group behind it; other groups go on meanwhile."""
    source, errors = fifo_names()
    create_queue(sqs_endpoint, source)
    create_queue(sqs_endpoint, errors)
    order: dict[str, list[tuple[str, int]]] = defaultdict(list)
    lock = threading.Lock()
    failed_once: set[str] = set()

    def handler(body: bytes, message: Message) -> Any:
        group, _, n = body.decode().partition(":")
        if n == "1":  # without the gate, "2" of the same receive would finish first
            time.sleep(0.3)
        with lock:
            order[group].append((n, message.attempt))
            if body in (b"A:2", b"B:4") and body.decode() not in failed_once:
                failed_once.add(body.decode())
                return retry("try again", delay=1)
        return None

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        for n in range(1, 6):
            for group in ("A", "B", "C"):
                await a.publish(f"{group}:{n}".encode(), {"stalk-group-id": group})
        await a.close()
        c = engine(adapter(sqs_endpoint, source, errors), handler, concurrency=4)
        async with Running(c):
            await wait_for(lambda: c.stats.acked >= 15, PATIENCE_S, "15 acks")

    run(scenario())
    assert order["A"] == [("1", 1), ("2", 1), ("2", 2), ("3", 1), ("4", 1), ("5", 1)]
    assert order["B"] == [("1", 1), ("2", 1), ("3", 1), ("4", 1), ("4", 2), ("5", 1)]
    assert [n for n, _ in order["C"]] == ["1", "2", "3", "4", "5"]


def test_publish_sets_group_and_dedup_and_error_copy_keeps_group(sqs_endpoint: str) -> None:
    source, errors = fifo_names()
    url = create_queue(sqs_endpoint, source)
    error_url = create_queue(sqs_endpoint, errors)

    async def scenario() -> None:
        a = await opened(adapter(sqs_endpoint, source, errors))
        try:
            attrs = {"stalk-group-id": "g-7", "stalk-deduplication-id": "d-1", "k": "v"}
            await a.publish(b"once", attrs)
            await a.publish(b"once", attrs)  # same deduplication id: SQS drops it
            (raw,) = await asyncio.to_thread(raw_receive, sqs_endpoint, url, 0, VisibilityTimeout=0)
            assert raw["Attributes"]["MessageGroupId"] == "g-7"
            assert set(raw["MessageAttributes"]) == {"k"}
            with pytest.raises(BackendError, match="no per-message delay"):
                await a.publish(b"later", delay_s=5)
            got: list[Message] = []
            while not got:
                got = await a.get_messages(10, 1)
            from stalk.message import Failure

            await a.publish_error(got[0], Failure.build(got[0], "fatal", "bad"))
            await a.ack(got)
        finally:
            await a.close()
        (copy,) = await asyncio.to_thread(raw_receive, sqs_endpoint, error_url)
        assert copy["Body"] == "once"
        assert copy["Attributes"]["MessageGroupId"] == "g-7"
        assert copy["MessageAttributes"][ATTR_REASON]["StringValue"] == "fatal"

    run(scenario())
