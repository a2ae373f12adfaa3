"""The envelope that carries attributes next to an NSQ body, which has no headers of its own.

Layout (all of it one NSQ message body)::

    MAGIC (8 bytes: 0x1f 's' 't' 'a' 'l' 'k' 0x00 0x01)
    header length N (4 bytes, unsigned big-endian)
    header (N bytes: a JSON object of string -> string, UTF-8)
    body (the rest: the original bytes, byte for byte)

Why this and not JSON with a base64 body: the body stays byte-identical and at its place (the
tail), so a reader in any language takes ``data[12 + N:]``; no base64 growth (a 1 MiB body would
not fit nsqd's default 1 MiB limit at 4/3 its size); and the header is readable with
``head -c``. Only messages that carry attributes are wrapped: a plain ``stalk send`` without
``--attribute`` publishes the raw body, so outside consumers see what they always saw. A body
that does not start with MAGIC, or whose header does not parse, is a plain body (an outside
producer's bytes are never rejected).

Keys stalk adds for itself (never shown to a handler):
    ``stalk-attempt``: the attempt the copy's first delivery is (parked retries).
    ``stalk-due-at``: epoch seconds a parked copy becomes due (delays over max-req-timeout).
    ``stalk-id``: the original message id, kept by parked copies.
    ``stalk-enqueued-at``: when the original was first published (epoch seconds).
The failure metadata (``stalk-reason``, ``stalk-error``, ...) of error-topic copies is shown:
that is what an error-topic handler is for.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

#: First bytes of a wrapped body; 0x1f and 0x00 make a collision with text bodies impossible.
MAGIC = b"\x1fstalk\x00\x01"
_LEN = struct.Struct(">I")
HEADER_OFFSET = len(MAGIC) + _LEN.size

#: Attempt of a parked copy's first delivery.
KEY_ATTEMPT = "stalk-attempt"
#: Epoch seconds a parked copy is due.
KEY_DUE_AT = "stalk-due-at"
#: Id of the message a parked copy stands for.
KEY_ID = "stalk-id"
#: Epoch seconds the original was first published.
KEY_ENQUEUED_AT = "stalk-enqueued-at"
#: Keys the adapter consumes itself; a handler never sees them.
INTERNAL_KEYS = frozenset({KEY_ATTEMPT, KEY_DUE_AT, KEY_ID, KEY_ENQUEUED_AT})


def wrap(body: bytes, attributes: Mapping[str, str]) -> bytes:
    """Return ``body`` with ``attributes`` in front; ``body`` itself when there are none.

    An empty body is always wrapped (with ``{}`` when there are no attributes): nsqd refuses a
    message of 0 bytes, and the envelope lets an empty body round-trip as one.
    """
    if not attributes and body:
        return body
    header = json.dumps(dict(attributes), separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join((MAGIC, _LEN.pack(len(header)), header, body))


def unwrap(data: bytes) -> tuple[bytes, dict[str, str]]:
    """Return the body and attributes of ``data``; ``(data, {})`` when it is not wrapped."""
    if not data.startswith(MAGIC) or len(data) < HEADER_OFFSET:
        return data, {}
    (size,) = _LEN.unpack_from(data, len(MAGIC))
    end = HEADER_OFFSET + size
    if end > len(data):
        return data, {}
    try:
        header = json.loads(data[HEADER_OFFSET:end].decode())
    except (UnicodeDecodeError, ValueError):
        return data, {}
    if not isinstance(header, dict):
        return data, {}
    return data[end:], {str(k): str(v) for k, v in header.items()}


def number(attributes: Mapping[str, str], key: str) -> float | None:
    """Return ``attributes[key]`` as a float, ``None`` when absent or not a number."""
    try:
        return float(attributes[key])
    except (KeyError, ValueError):
        return None
