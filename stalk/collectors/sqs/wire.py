"""What stalk puts on the SQS wire and how SQS's failures read: pure helpers for the SQS adapter.

SQS bodies are text (a restricted Unicode set) and a message carries at most ten message
attributes. stalk keeps bodies byte-exact and metadata complete within those limits:

* A body that is valid UTF-8 in SQS's character set travels as is, so outside producers and
  consumers see plain text. Any other body travels base64-encoded with the attribute
  ``stalk-body-encoding=base64``; stalk decodes it on receive.
* stalk's own attributes (failure metadata, the wire markers below) always travel as separate
  attributes. When they and the message's own attributes together pass ten, the message's own
  attributes travel together as one JSON attribute ``stalk-attributes``
  (``{"name": ["String"|"Number"|"Binary", value]}``, binary values base64) which stalk unpacks
  on receive. Nothing is dropped; readers other than stalk see the JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from stalk.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    MessageTooLarge,
    QueueNotFound,
    StalkError,
)
from stalk.message import ATTR_ATTEMPT, ATTR_ERROR, Message

#: SQS MessageAttributes: name -> {"DataType": ..., "StringValue" | "BinaryValue": ...}. Loosely
#: typed because boto3's stubs type the sent and the received shape as two different TypedDicts.
Attributes = dict[str, Any]

#: SQS's limit on message attributes per message.
MAX_ATTRIBUTES = 10
#: Marks a body sent base64-encoded because it was not SQS-safe text.
ATTR_BODY_ENCODING = "stalk-body-encoding"
#: The message's own attributes packed as JSON when they would pass ``MAX_ATTRIBUTES``.
ATTR_PACKED = "stalk-attributes"
#: Epoch seconds before which a parked copy (a delay longer than SQS can hold) is not handled.
ATTR_NOT_BEFORE = "stalk-not-before"
#: Publish-only: the FIFO MessageGroupId / MessageDeduplicationId (never sent as attributes).
ATTR_GROUP_ID = "stalk-group-id"
ATTR_DEDUPLICATION_ID = "stalk-deduplication-id"
#: Wire markers stalk reads on receive and hides from the handler.
INTERNAL = frozenset({ATTR_BODY_ENCODING, ATTR_NOT_BEFORE, ATTR_ATTEMPT})

#: The characters SQS accepts in bodies and attribute values (its docs list these ranges).
_UNSAFE = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_NOT_FOUND = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
_DENIED = {
    "AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "UnrecognizedClientException",
    "SignatureDoesNotMatch", "InvalidSecurity", "ExpiredToken", "MissingAuthenticationToken",
    "IncompleteSignature", "KMS.AccessDeniedException", "AuthFailure",
}  # fmt: skip
_TRANSIENT = {
    "Throttling", "ThrottlingException", "RequestThrottled", "ServiceUnavailable",
    "InternalError", "InternalFailure", "KmsThrottled", "KMS.ThrottlingException",
}  # fmt: skip
#: Per-entry codes meaning the message is no longer ours to settle (already deleted or re-leased).
GONE_CODES = {
    "ReceiptHandleIsInvalid", "AWS.SimpleQueueService.MessageNotInflight", "MessageNotInflight",
    "InvalidParameterValue",
}  # fmt: skip


def encode_body(body: bytes) -> tuple[str, bool]:
    """Return the SQS body text for ``body`` and whether it had to be base64-encoded."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True
    if _UNSAFE.search(text):
        return base64.b64encode(body).decode("ascii"), True
    return text, False


def decode_body(text: str, encoding: str | None) -> bytes:
    """Return the bytes a producer published; plain text for outside producers' messages."""
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass  # an outside producer's attribute that happens to share our name
    return text.encode("utf-8")


def safe_text(value: str) -> str:
    """Return ``value`` with characters SQS refuses replaced by U+FFFD."""
    return _UNSAFE.sub("\ufffd", value)


def string_attributes(values: Mapping[str, str]) -> Attributes:
    """Return ``name -> value`` as SQS String attributes, leaving out empty values (SQS
    refuses them)."""
    return {
        name: {"DataType": "String", "StringValue": safe_text(value)}
        for name, value in values.items()
        if value
    }


def as_text(value: Any) -> str | None:
    """Return an attribute's value as text, or ``None`` for binary that is not UTF-8."""
    if not isinstance(value, Mapping):
        return None
    if "StringValue" in value:
        return str(value["StringValue"])
    raw = value.get("BinaryValue")
    if isinstance(raw, bytes | bytearray):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def pack(own: Attributes, stalk: Attributes) -> Attributes:
    """Merge stalk's attributes with the message's own within SQS's limit of ten.

    stalk's come first and stay separate; if the total passes the limit, the message's own are
    packed into one ``stalk-attributes`` JSON attribute (with any stalk attribute beyond nine).
    """
    own = {k: v for k, v in own.items() if k not in stalk}
    if len(stalk) + len(own) <= MAX_ATTRIBUTES:
        return {**stalk, **own}
    keep = dict(list(stalk.items())[: MAX_ATTRIBUTES - 1])
    folded = {**own, **{k: v for k, v in stalk.items() if k not in keep}}
    packed: dict[str, list[str]] = {}
    for name, value in folded.items():
        data_type = value.get("DataType", "String")
        if "StringValue" in value:
            packed[name] = [data_type, value["StringValue"]]
        elif isinstance(value.get("BinaryValue"), bytes | bytearray):
            packed[name] = [data_type, base64.b64encode(bytes(value["BinaryValue"])).decode()]
    keep[ATTR_PACKED] = {"DataType": "String", "StringValue": json.dumps(packed)}
    return keep


def unpack(received: Mapping[str, Any]) -> Attributes:
    """Return received attributes with a ``stalk-attributes`` pack expanded in place."""
    packed = received.get(ATTR_PACKED)
    if packed is None:
        return dict(received)
    out = {k: v for k, v in received.items() if k != ATTR_PACKED}
    try:
        items = json.loads(packed.get("StringValue", ""))
        for name, (data_type, text) in items.items():
            if str(data_type).startswith("Binary"):
                out.setdefault(name, {"DataType": data_type, "BinaryValue": base64.b64decode(text)})
            else:
                out.setdefault(name, {"DataType": data_type, "StringValue": text})
    except (ValueError, TypeError, AttributeError, binascii.Error):
        out[ATTR_PACKED] = packed  # not ours after all: hand it over untouched
    return out


def attributes_size(body_text: str, attributes: Attributes) -> int:
    """Return the size SQS counts against its message size limit (body plus attributes)."""
    size = len(body_text.encode("utf-8"))
    for name, value in attributes.items():
        size += len(name.encode()) + len(value.get("DataType", "").encode())
        if "StringValue" in value:
            size += len(value["StringValue"].encode("utf-8"))
        elif isinstance(value.get("BinaryValue"), bytes | bytearray):
            size += len(value["BinaryValue"])
    return size


@dataclass(eq=False, slots=True)
class Receipt:
    """What the adapter keeps of one receive: enough to settle it and to copy it intact."""

    handle: str
    text: str  # the body exactly as SQS holds it
    own: Attributes  # the producer's attributes with their SQS types
    encoded: bool  # the body is base64 of bytes that were not SQS text
    group_id: str | None
    first_received_at: float | None  # epoch seconds
    received_at: float  # monotonic


def receipt_of(message: Message) -> Receipt:
    """Return the SQS receipt of ``message``.

    Raises:
        BackendError: the message was not received from SQS by stalk.
    """
    if not isinstance(message.receipt, Receipt):
        raise BackendError(f"message {message.id} was not received by an SQS adapter")
    return message.receipt


def as_int(value: Any, default: int) -> int:
    """Return ``int(value)``, or ``default`` for a missing or malformed value."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def decode(item: Mapping[str, Any], source: str, skips: MutableMapping[str, int]) -> Message:
    """Return the :class:`Message` for one received SQS message.

    ``attempt`` is ApproximateReceiveCount plus ``stalk-attempt - 1`` (a re-sent copy carries
    how many attempts came before), less the receives this process knows were not handled
    (``skips``: releases, FIFO hand-backs). A parked copy keeps its ``stalk-not-before`` in
    ``attributes``; its ``attempt`` is then the one it will have when due.
    """
    own = unpack(item.get("MessageAttributes", {}))
    marks = {k: as_text(own.pop(k)) for k in list(own) if k in INTERNAL}
    system = item.get("Attributes", {})
    text, message_id = item.get("Body", ""), item["MessageId"]
    receipt = Receipt(
        item["ReceiptHandle"], text, own, marks.get(ATTR_BODY_ENCODING) == "base64",
        system.get("MessageGroupId"),
        as_int(system.get("ApproximateFirstReceiveTimestamp"), 0) / 1000 or None, time.monotonic(),
    )  # fmt: skip
    carried = max(1, as_int(marks.get(ATTR_ATTEMPT), 1))
    attributes = {k: v for k, v in ((k, as_text(v)) for k, v in own.items()) if v}
    if ATTR_NOT_BEFORE in marks:
        attributes[ATTR_NOT_BEFORE] = marks[ATTR_NOT_BEFORE] or "0"
        attempt = carried
    else:
        count = as_int(system.get("ApproximateReceiveCount"), 1)
        attempt = max(1, count + carried - 1 - skips.pop(message_id, 0))
    body = decode_body(text, marks.get(ATTR_BODY_ENCODING))
    sent = as_int(system.get("SentTimestamp"), 0) / 1000 or None
    return Message(message_id, body, attributes, attempt, sent, source, receipt)


def copy_attributes(
    receipt: Receipt, marks: Mapping[str, str], max_bytes: int | None = None
) -> Attributes:
    """Return the attributes of a copy of a received message with stalk's ``marks`` added.

    With ``max_bytes``, a too long ``stalk-error`` text is shortened so the copy fits: the body
    is never cut.
    """
    marks = dict(marks)
    if receipt.encoded:
        marks[ATTR_BODY_ENCODING] = "base64"
    attributes = pack(receipt.own, string_attributes(marks))
    over = attributes_size(receipt.text, attributes) + 64 - (max_bytes or 1 << 62)
    if over > 0 and marks.get(ATTR_ERROR):
        marks[ATTR_ERROR] = marks[ATTR_ERROR][: max(0, len(marks[ATTR_ERROR]) - over)]
        attributes = pack(receipt.own, string_attributes(marks))
    return attributes


def translate(exc: BaseException, op: str, queue: str, where: str) -> StalkError:
    """Turn a boto3/botocore failure into stalk's exception tree with one line on what to do.

    Args:
        op: the SQS action, e.g. ``ReceiveMessage`` (named in IAM policies too).
        queue: the queue name or URL as the user gave it.
        where: region and endpoint, for the message.
    """
    if isinstance(exc, NoRegionError):
        return ConfigError("no AWS region for SQS: pass --option region=... or set AWS_REGION")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return BackendError(
            f"no AWS credentials for SQS ({where}): set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "or AWS_PROFILE, or run with an IAM role"
        )
    if isinstance(exc, HTTPClientError | BotoConnectionError):
        return BackendUnavailable(
            f"cannot reach SQS ({where}) for {op}: {exc}; check --option endpoint_url "
            "(or AWS_ENDPOINT_URL), the region and the network"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        text = str(error.get("Message", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND:
            name = queue.rstrip("/").rsplit("/", 1)[-1]
            fifo = " --attributes FifoQueue=true" if name.endswith(".fifo") else ""
            return QueueNotFound(
                f"SQS queue {queue!r} does not exist ({where}): create it with "
                f"'aws sqs create-queue --queue-name {name}{fifo}', or check --option region "
                "and the account"
            )
        if code in _DENIED or status == 403:
            return BackendError(
                f"access denied to SQS queue {queue!r} ({where}, {op}: {code}): check the "
                f"credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID) and that IAM allows sqs:{op}"
            )
        if code in _TRANSIENT or status >= 500:
            return BackendUnavailable(f"SQS busy or failing ({where}, {op}: {code}): {text}")
        if "shorter than" in text or "too long" in text.lower():
            return MessageTooLarge(f"SQS refused the message for {queue!r}: {text}")
        return BackendError(f"SQS {op} on {queue!r} failed ({where}): {code}: {text}")
    if isinstance(exc, BotoCoreError):
        return BackendError(f"SQS {op} on {queue!r} failed ({where}): {exc}")
    return BackendError(f"SQS {op} on {queue!r} failed ({where}): {exc!r}")
