"""The SQS adapter's calls: boto3 on its own thread pool, batched, failures in stalk's terms.

Kept apart from the adapter so that ``sqs.py`` reads as the mapping of stalk's operations onto
SQS, and this file as the mechanics: threads, chunks of ten, partial batch failures, a receive
that gives its messages back if the engine stopped waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from stalk.collectors.sqs import wire as wire
from stalk.errors import BackendError, ConfigError
from stalk.redaction import add_secrets

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import MessageTypeDef

    from stalk.collectors.sqs.settings import SQSSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Most entries one ReceiveMessage or *Batch call takes.
MAX_BATCH = 10
#: System attributes asked for on every receive. They go in MessageSystemAttributeNames and
#: again in the deprecated AttributeNames, which AWS still takes, for SQS emulators that read
#: only the old name (without ApproximateReceiveCount, attempts could not be counted).
SYSTEM_ATTRIBUTES: Any = [
    "ApproximateReceiveCount",
    "SentTimestamp",
    "ApproximateFirstReceiveTimestamp",
    "MessageGroupId",
]
#: Queue attributes read when a queue is resolved.
QUEUE_ATTRIBUTES: Any = ["FifoQueue", "MaximumMessageSize", "RedrivePolicy"]
#: Queue attributes behind ``backlog()``.
COUNT_ATTRIBUTES: Any = [
    "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed",
    "ApproximateNumberOfMessagesNotVisible",
]  # fmt: skip
_REGION_IN_URL = re.compile(r"://[^/]*?\b([a-z]{2}(?:-[a-z]+)+-\d+)\.")

#: One settle entry: (message id for logs, receipt handle, visibility seconds or None to delete).
Entry = tuple[str, str, int | None]


def region_for(source: str, configured: str | None) -> str | None:
    """Return the region to use: the configured one, else the one in an AWS queue URL.

    Raises:
        ConfigError: the URL names another region than the configured one.
    """
    found = _REGION_IN_URL.search(source) if source.startswith("http") else None
    if found and configured and found.group(1) != configured:
        raise ConfigError(
            f"queue URL {source} is in region {found.group(1)} but --option region={configured}; "
            "drop the option or use that region"
        )
    return configured or (found.group(1) if found else None)


class SQSCalls:
    """One boto3 client and the thread pool its blocking calls run on."""

    def __init__(self, settings: SQSSettings) -> None:
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.max_connections, "stalk-sqs")
        self._client: SQSClient | None = None

    @property
    def client(self) -> SQSClient:
        if self._client is None:
            raise BackendError("SQS adapter used before open()")
        return self._client

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def region(self) -> str | None:
        return self._client.meta.region_name if self._client else self.settings.region

    def where(self) -> str:
        """Return region and endpoint for error messages (no credentials in them)."""
        if self._client is None:
            return f"region {self.settings.region or 'default'}"
        return f"region {self._client.meta.region_name}, endpoint {self._client.meta.endpoint_url}"

    async def call(self, op: str, queue: str, fn: Callable[[], T]) -> T:
        """Run one blocking boto3 call on the pool; translate its failure into stalk's tree."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn)
        except (BotoCoreError, ClientError) as exc:
            raise wire.translate(exc, op, queue, self.where()) from exc

    async def connect(self, source: str) -> None:
        """Build the client from settings plus boto3's chain (env, profile, AWS_ENDPOINT_URL)."""
        # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is what the AWS SDKs for other
        # languages, the CLI v2 and the README say, so it works here too.
        region = region_for(source, self.settings.region) or os.environ.get("AWS_REGION") or None
        s = self.settings
        config = Config(
            connect_timeout=s.connect_timeout_s,
            read_timeout=max(60, s.wait_time_s + 30),  # a long poll must not look like a hang
            retries={"mode": "standard", "max_attempts": s.max_attempts},
            max_pool_connections=s.max_connections,
        )

        def make() -> SQSClient:
            session = boto3.session.Session(profile_name=s.profile, region_name=region)
            client = session.client("sqs", endpoint_url=s.endpoint_url, config=config)
            # Credentials from a profile file or a role are not in the environment, where the
            # log redaction looks for secret values: tell it (defence behind SDK log levels).
            with contextlib.suppress(BotoCoreError):  # the first call reports it in one line
                found = session.get_credentials()
                if found is not None:
                    frozen = found.get_frozen_credentials()
                    add_secrets(frozen.secret_key, frozen.token)
            return client

        self._client = await self.call("connect", source, make)

    async def resolve(self, queue: str, create: bool) -> tuple[str, dict[str, str]]:
        """Return a queue's URL and attributes; create it when ``create``.

        Raises:
            QueueNotFound: the queue does not exist (and ``create`` is off).
        """
        client = self.client
        url = queue
        if not queue.startswith(("http://", "https://")):
            try:
                got = await self.call(
                    "GetQueueUrl", queue, lambda: client.get_queue_url(QueueName=queue)
                )
                url = got["QueueUrl"]
            except BackendError as exc:
                if not create or "does not exist" not in str(exc):
                    raise
                fifo: Any = {"FifoQueue": "true"} if queue.endswith(".fifo") else {}
                made = await self.call(
                    "CreateQueue",
                    queue,
                    lambda: client.create_queue(QueueName=queue, Attributes=fifo),
                )
                url = made["QueueUrl"]
        attributes = await self.call(
            "GetQueueAttributes",
            queue,
            lambda: client.get_queue_attributes(QueueUrl=url, AttributeNames=QUEUE_ATTRIBUTES),
        )
        return url, {str(k): v for k, v in attributes.get("Attributes", {}).items()}

    async def counts(self, url: str, queue: str) -> dict[str, int]:
        """Return a queue's approximate counts by attribute name."""
        client = self.client
        got = await self.call(
            "GetQueueAttributes",
            queue,
            lambda: client.get_queue_attributes(QueueUrl=url, AttributeNames=COUNT_ATTRIBUTES),
        )
        return {k: int(v) for k, v in got.get("Attributes", {}).items()}

    async def receive(
        self, url: str, queue: str, count: int, wait_s: int, lease_s: int, fifo: bool
    ) -> list[MessageTypeDef]:
        """ReceiveMessage; if the caller is cancelled meanwhile, what arrives is given back.

        Cancelling the await cannot stop boto3's thread; without this, the messages it then
        receives would stay invisible for their whole lease while no one handles them.
        """
        client, lock = self.client, threading.Lock()
        state = {"cancelled": False, "delivered": False}
        extra: Any = {"ReceiveRequestAttemptId": uuid.uuid4().hex} if fifo else {}

        def work() -> list[MessageTypeDef]:
            got = client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=count, WaitTimeSeconds=wait_s,
                VisibilityTimeout=lease_s, MessageSystemAttributeNames=SYSTEM_ATTRIBUTES,
                AttributeNames=SYSTEM_ATTRIBUTES,
                MessageAttributeNames=["All"], **extra,
            ).get("Messages", [])  # fmt: skip
            with lock:
                if state["cancelled"]:
                    self._give_back_now(url, got)
                    return []
                state["delivered"] = True
            return got

        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with lock:
                state["cancelled"] = True
                delivered = state["delivered"]
            if delivered:  # the thread returned them just before we were cancelled
                future.add_done_callback(lambda f: self._give_back_later(url, f))
            raise
        except (BotoCoreError, ClientError) as exc:
            raise wire.translate(exc, "ReceiveMessage", queue, self.where()) from exc

    def _give_back_later(self, url: str, future: asyncio.Future[list[MessageTypeDef]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with contextlib.suppress(RuntimeError):  # pool shut down: they return after their lease
            self.pool.submit(self._give_back_now, url, future.result())

    def _give_back_now(self, url: str, messages: Sequence[MessageTypeDef]) -> None:
        entries: Any = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
            for i, m in enumerate(messages)
        ]
        if entries:
            try:
                self.client.change_message_visibility_batch(QueueUrl=url, Entries=entries)
            except (BotoCoreError, ClientError, BackendError) as exc:
                logger.warning("could not give back %d received messages (%s)", len(entries), exc)

    async def send(
        self, url: str, queue: str, text: str, attributes: wire.Attributes, **extra: Any
    ) -> str:
        """SendMessage; return the new message id once SQS has accepted it."""
        client = self.client
        if attributes:
            extra["MessageAttributes"] = attributes
        got = await self.call(
            "SendMessage",
            queue,
            lambda: client.send_message(QueueUrl=url, MessageBody=text, **extra),
        )
        return got["MessageId"]

    async def settle(self, url: str, queue: str, entries: Sequence[Entry]) -> list[str]:
        """Delete (visibility ``None``) or change visibility in chunks of ten sent at once.

        Returns:
            the ids of entries SQS refused (logged; such a message is delivered again).

        Raises:
            BackendError: a whole chunk failed (the first such error; the others were sent).
        """
        deletes = [e for e in entries if e[2] is None]
        changes = [e for e in entries if e[2] is not None]
        chunks = [(True, deletes[i : i + MAX_BATCH]) for i in range(0, len(deletes), MAX_BATCH)]
        chunks += [(False, changes[i : i + MAX_BATCH]) for i in range(0, len(changes), MAX_BATCH)]
        results = await asyncio.gather(
            *(self._chunk(url, queue, delete, chunk) for delete, chunk in chunks),
            return_exceptions=True,
        )
        refused: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            refused += result
        return refused

    async def _chunk(self, url: str, queue: str, delete: bool, chunk: Sequence[Entry]) -> list[str]:
        client = self.client
        if delete:
            op = "DeleteMessageBatch"
            ids: Any = [{"Id": str(i), "ReceiptHandle": h} for i, (_, h, _) in enumerate(chunk)]
            got = await self.call(
                op, queue, lambda: client.delete_message_batch(QueueUrl=url, Entries=ids)
            )
        else:
            op = "ChangeMessageVisibilityBatch"
            ids = [{"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": s}
                   for i, (_, h, s) in enumerate(chunk)]  # fmt: skip
            got = await self.call(
                op, queue, lambda: client.change_message_visibility_batch(QueueUrl=url, Entries=ids)
            )
        refused: list[str] = []
        for failed in got.get("Failed", []):
            message_id = chunk[int(failed["Id"])][0]
            refused.append(message_id)
            gone = failed.get("Code") in wire.GONE_CODES
            logger.log(
                logging.DEBUG if gone and not delete else logging.WARNING,
                "SQS %s refused message %s (%s: %s)%s", op, message_id, failed.get("Code"),
                failed.get("Message"), "; it will be delivered again" if delete else "",
                extra={"message_id": message_id, "backend": "sqs", "source": queue},
            )  # fmt: skip
        return refused

    def close(self) -> None:
        """Wait for calls under way (a cancelled poll gives back its messages), then close."""
        self.pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
            self._client = None
