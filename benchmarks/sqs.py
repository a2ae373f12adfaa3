"""SQS drain rate: stalk's sqs adapter vs a raw boto3 loop, on the same moto server, same run.

Usage: ``python -m benchmarks.sqs [--messages N] [--repeat R] [--endpoint URL]``

Without ``--endpoint`` it starts ``python -m moto.server`` on a free loopback port and stops it
at the end (needs ``pip install 'moto[server]'``). Each run fills a fresh queue with N messages,
then drains it: the raw loop is ReceiveMessage (10) + a no-op handler inline + DeleteMessageBatch,
one call after the other; stalk is ``BaseCollector(SQSAdapter, no-op, concurrency C)`` served with
``until_empty``. Rates count from the first receive to the last delete on both sides.

moto is the ceiling here, not SQS: moto answers every received message with work proportional to
the queue's length, so both loops spend most of their time inside moto (on 2 cores, moto's server
and the client share the CPU). The figures compare stalk with the raw loop; they say nothing of
SQS's own throughput, which is far higher and scales with concurrent pollers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.sqs import SQSAdapter, SQSSettings
from stalk.message import Message

REGION = "us-east-1"
#: Engine options for a drain: short polls, prompt end of ``until_empty``.
OPTIONS = {"polling_period_s": 0.01, "max_polling_period_s": 0.05, "batch_size": 10}


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's standalone server on a free loopback port; return it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client(endpoint).list_queues()
            return process, endpoint
        except Exception:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise SystemExit("moto.server did not start: pip install 'moto[server]'")


def client(endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=endpoint, region_name=REGION)


def fill(endpoint: str, n: int) -> tuple[str, str]:
    """Create a fresh queue (and its error queue) holding ``n`` messages; return name and URL."""
    sqs = client(endpoint)
    name = f"bench-{uuid.uuid4().hex[:10]}"
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.create_queue(QueueName=f"{name}-errors")

    def send(start: int) -> None:
        count = min(10, n - start)
        entries = [{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(count)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(0, n, 10)))
    return name, url


def noop(body: bytes) -> None:
    return None


async def async_noop(body: bytes) -> None:
    return None


def raw_loop(endpoint: str, n: int) -> float:
    """Seconds for the hand-written loop to receive, handle and delete ``n`` messages."""
    _, url = fill(endpoint, n)
    sqs = client(endpoint)
    done = 0
    start = time.perf_counter()
    while done < n:
        messages = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
        for message in messages:
            noop(message["Body"].encode())
        if messages:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                       for i, m in enumerate(messages)]  # fmt: skip
            sqs.delete_message_batch(QueueUrl=url, Entries=entries)
            done += len(messages)
    return time.perf_counter() - start


class TimedSQSAdapter(SQSAdapter):
    """The real adapter, noting when its first receive started and its last delete returned.

    The raw loop's clock also starts after its client exists, so neither side counts boto3's
    client creation (a few hundred ms of loading service models) or resolving the queue.
    """

    first_poll = 0.0
    last_ack = 0.0

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        if not self.first_poll:
            self.first_poll = time.perf_counter()
        return await super().get_messages(max_messages, wait_s)

    async def ack(self, messages: Sequence[Message]) -> None:
        await super().ack(messages)
        self.last_ack = time.perf_counter()


def stalk_loop(endpoint: str, n: int, handler: Callable[[bytes], Any], concurrency: int) -> float:
    """Seconds for stalk to drain the same kind of queue: first receive to the last delete."""
    name, _ = fill(endpoint, n)
    adapter = TimedSQSAdapter(name, settings=SQSSettings(endpoint_url=endpoint, region=REGION))
    options = CollectorOptions(concurrency=concurrency, **OPTIONS)  # type: ignore[arg-type]
    collector = BaseCollector(adapter, handler, options)
    asyncio.run(collector.serve(until_empty=True))
    if collector.stats.acked != n:
        raise SystemExit(f"stalk acked {collector.stats.acked} of {n}: {collector.stats}")
    return adapter.last_ack - adapter.first_poll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--endpoint", help="an SQS endpoint already running (default: start moto)")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    process, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    n, repeat = args.messages, args.repeat
    try:
        configs = [("async no-op", async_noop, 8), ("async no-op", async_noop, 16),
                   ("sync no-op", noop, 8), ("sync no-op", noop, 16)]  # fmt: skip
        raw_runs: list[float] = []
        stalk_runs: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        for _ in range(repeat):  # interleaved, so drift in moto or the machine hits all alike
            raw_runs.append(raw_loop(endpoint, n))
            for i, (_, handler, concurrency) in enumerate(configs):
                stalk_runs[i].append(stalk_loop(endpoint, n, handler, concurrency))
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
    raw_rate = n / statistics.median(raw_runs)
    print(f"SQS on moto's standalone server (the ceiling, not SQS): {n} messages per run, "
          f"fresh queue each run, median of {repeat} runs\n")  # fmt: skip
    print("| loop | handler | concurrency | msg/s | vs raw |")
    print("|---|---|---|---|---|")
    print(f"| raw boto3 (receive 10 + delete batch) | no-op | 1 | {raw_rate:,.1f} | 1.00x |")
    for i, (label, _, concurrency) in enumerate(configs):
        rate = n / statistics.median(stalk_runs[i])
        print(f"| stalk sqs | {label} | {concurrency} | {rate:,.1f} | {rate / raw_rate:.2f}x |")


if __name__ == "__main__":
    main()
