"""The names, arguments and headers it uses: no I/O.

Kept apart from ``amqp.py`` so the topology (what stalk declares on the broker) reads in one
place and is unit-testable without a server.

Per source queue ``Q`` stalk uses:

``Q``
    the source, durable, ``x-queue-type`` classic or quorum; optionally bound to an exchange.
``<error_topic>`` (default ``Q-errors``)
    a durable queue of the same type; failed messages, body intact, failure metadata in headers.
``Q.stalk-delay.<ms>``
    one queue per delay bucket: ``x-message-ttl`` = the bucket, dead-lettering through the
    default exchange back to ``Q``. Nobody consumes it, so every message waits exactly its TTL
    at the head of a FIFO and then reappears in ``Q``. Buckets round a delay *up* to a ladder of
    round numbers (1, 1.1, 1.2, 1.4 … 9 times 10^k ms), so a retry is at most 20% late, never
    early, ``retry(delay=5)`` waits exactly 5 s, and the number of delay queues stays small.
    Each has ``x-expires`` well past its TTL and is re-declared before that lease can lapse, so
    an unused bucket disappears by itself but never while it holds a message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from stalk.collectors.amqp.settings import QueueType
from stalk.errors import ConfigError
from stalk.message import ATTR_ATTEMPT, ATTR_PREFIX

#: Bucket mantissas per decade: round numbers people pass as delays, adjacent ones <= 20% apart.
LADDER = (1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0)
#: Delays below this go straight back to the source: a TTL queue cannot do better.
MIN_DELAY_MS = 10
#: Largest bucket: a ladder value under 2^31 ms, well inside RabbitMQ's x-message-ttl range.
MAX_DELAY_MS = 1_800_000_000  # 20.8 days
#: Extra life of an idle delay queue beyond its TTL; it is re-declared every half of this.
DELAY_QUEUE_SLACK_MS = 600_000
#: RabbitMQ's upper bound for x-expires.
MAX_EXPIRES_MS = 2**32 - 1
#: Header a quorum queue adds with the number of earlier failed deliveries.
X_DELIVERY_COUNT = "x-delivery-count"
#: Headers the broker writes when it dead-letters or redelivers; never copied to a republish.
BROKER_HEADERS = ("x-death", X_DELIVERY_COUNT)
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


#: What pamqp (and so aio-pika) accepts in a queue name, and AMQP's short-string limit.
QUEUE_NAME_CHARS = re.compile(r"^[a-zA-Z0-9\-_.:@#,/+ ]*$")
MAX_NAME_BYTES = 255
#: The longest suffix stalk adds to a source for its delay queues.
LONGEST_SUFFIX = len(f".stalk-delay.{MAX_DELAY_MS}")


def check_queue_name(name: str, flag: str) -> None:
    """Refuse a queue name the AMQP client cannot send, in one line, before connecting.

    Raises:
        ConfigError: characters outside ``[a-zA-Z0-9-_.:@#,/+ ]`` or a name too long (delay
            queues add up to ``LONGEST_SUFFIX`` characters to the source).
    """
    if not QUEUE_NAME_CHARS.match(name):
        bad = sorted({c for c in name if not QUEUE_NAME_CHARS.match(c)})
        shown = ", ".join(repr(c) for c in bad[:5])
        raise ConfigError(
            f"amqp {flag} {name!r} has characters RabbitMQ clients cannot send ({shown}); use "
            "letters, digits and - _ . : @ # , / + space"
        )
    limit = MAX_NAME_BYTES - (LONGEST_SUFFIX if flag == "--source" else 0)
    if len(name) > limit:
        raise ConfigError(
            f"amqp {flag} is {len(name)} characters; at most {limit} fit (AMQP names are at most "
            f"{MAX_NAME_BYTES}, and delay queues add {LONGEST_SUFFIX})"
        )


def bucket_ms(delay_s: float) -> int:
    """Return the delay bucket (ms) for ``delay_s``: the next ladder value up, 0 for no delay."""
    ms = delay_s * 1000.0
    if ms < MIN_DELAY_MS:
        return 0
    if ms >= MAX_DELAY_MS:
        return MAX_DELAY_MS
    exponent = math.floor(math.log10(ms))
    for _ in range(2):  # float error may put ms just under 10^exponent
        for mantissa in LADDER:
            value = round(mantissa * 10.0**exponent)
            if value >= ms:
                return value
        exponent += 1
    return MAX_DELAY_MS  # pragma: no cover - unreachable


def all_buckets() -> tuple[int, ...]:
    """Return every delay bucket (ms) :func:`bucket_ms` can give, smallest first.

    The ladder makes it a short, fixed list (about 150), so the delay queues of a source can be
    found by name, which AMQP cannot list without the management plugin.
    """
    found = {MAX_DELAY_MS}
    for exponent in range(1, 10):
        for mantissa in LADDER:
            value = round(mantissa * 10.0**exponent)
            if MIN_DELAY_MS <= value < MAX_DELAY_MS:
                found.add(value)
    return tuple(sorted(found))


def delay_queue_name(source: str, ms: int) -> str:
    """Name the delay bucket queue of ``source``."""
    return f"{source}.stalk-delay.{ms}"


def queue_arguments(queue_type: QueueType) -> dict[str, Any]:
    """Return declare arguments of the source and error queues."""
    return {"x-queue-type": queue_type}


def delay_expires_ms(ms: int) -> int:
    """Return the idle lifetime of a delay queue: far past its TTL, within RabbitMQ's bound."""
    return min(MAX_EXPIRES_MS, 2 * ms + DELAY_QUEUE_SLACK_MS)


def redeclare_every_s(ms: int) -> float:
    """Return how often a delay queue in use must be re-declared so its lease never lapses.

    A message published right after a declare at ``t`` leaves at ``t + ttl``; the queue lives to
    at least ``last_declare + expires``. Re-declaring every ``(expires - ttl) / 2`` keeps a
    margin of half the slack.
    """
    return (delay_expires_ms(ms) - ms) / 2000.0


def delay_marker_name(source: str) -> str:
    """Name the empty queue that says a source has (or had) delay buckets.

    Declared before any bucket of the source, with the longest bucket's expiry and again at
    each bucket's re-declare, so it outlives every bucket. ``--until-empty`` probes this one name
    first and scans the ~150 bucket names only where it exists: an empty queue that never
    retried ends without 150 passive declares (and 150 ``not_found`` lines in RabbitMQ's log).
    """
    return f"{source}.stalk-delays"


def delay_marker_arguments() -> dict[str, Any]:
    """Return the marker's arguments: the expiry of the longest delay bucket, never less."""
    return {"x-expires": delay_expires_ms(MAX_DELAY_MS)}


def delay_queue_arguments(source: str, ms: int, queue_type: QueueType) -> dict[str, Any]:
    """Return the arguments of a delay bucket: TTL, dead-letter back to the source, expiry.

    On quorum queues dead-lettering is at-most-once unless the strategy says otherwise;
    ``at-least-once`` needs ``x-overflow=reject-publish``, which never triggers without a length
    limit.
    """
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": source,
        "x-expires": delay_expires_ms(ms),
    }
    if queue_type == "quorum":
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


def header_int(value: object, default: int) -> int:
    """Read an integer header written by stalk or by anyone else (int, str or bytes)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def is_broker_header(key: str) -> bool:
    """True for headers RabbitMQ owns (dead-letter history, quorum delivery count)."""
    return key in BROKER_HEADERS or key.startswith(BROKER_HEADER_PREFIXES)


def republish_headers(
    raw: Mapping[str, Any] | None,
    attributes: Mapping[str, str],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Build headers for a copy of a delivered message (retry, poison count, error topic).

    Keeps the producer's headers with their original types, drops the broker's own (from the raw
    headers and from the attributes, which show them to handlers: an error copy that kept the
    original's ``x-delivery-count`` made its reader count deliveries it never had), adds the
    ``stalk-`` attributes the engine set on the message and attributes the headers lacked, then
    ``extra`` (attempt number, failure metadata) on top.
    """
    headers = {k: v for k, v in (raw or {}).items() if not is_broker_header(k)}
    for key, value in attributes.items():
        if is_broker_header(key):  # a message's attributes show them; a copy must not carry them
            continue
        if key.startswith(ATTR_PREFIX) or key not in headers:
            headers[key] = value
    headers.update(extra)
    return headers


def attempt_header(attempt: int) -> dict[str, int]:
    """Return the header that makes the next delivery of a copy count as ``attempt``."""
    return {ATTR_ATTEMPT: attempt}


def safe_url(url: str) -> str:
    """Return ``host:port vhost`` of an AMQP URL, without user or password (for logs)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        return "<unparsable url>"
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return f"{parts.scheme}://{host}:{port} vhost {vhost}"
