"""Names, attributes and limits of Pub/Sub: what a message carries, kept within the service's rules.

No I/O here. The emulator enforces none of these limits; the service refuses a publish that
breaks one, so the adapter keeps every message it sends inside them.
"""

from __future__ import annotations

import math
import re

from stalk.errors import ConfigError
from stalk.message import ATTR_ATTEMPT, ATTR_TRACEBACK

#: The due time (epoch seconds) of a parked copy: a retry longer than modack's 600 s, or a
#: ``send --delay``. Delivered early, the copy is hidden again until then.
ATTR_NOT_BEFORE = "stalk-not-before"
#: The id of the first delivery, kept on republished copies so ``Message.id`` stays stable.
ATTR_ID = "stalk-id"
#: The publish time of the first copy (epoch seconds), kept on republished copies.
ATTR_ENQUEUED_AT = "stalk-enqueued-at"
#: Attributes the adapter writes for itself and hides from handlers.
INTERNAL = frozenset({ATTR_NOT_BEFORE, ATTR_ID, ATTR_ENQUEUED_AT, ATTR_ATTEMPT})

#: The service's attribute limits: 100 per message, keys of 256 bytes, values of 1,024 bytes,
#: and no key starting ``goog`` (reserved).
MAX_ATTRIBUTES = 100
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 1024
RESERVED_PREFIX = "goog"
#: The service's message limit: data, attributes and ordering key together.
MAX_MESSAGE_BYTES = 10_000_000

#: A Pub/Sub resource id: starts with a letter, 3-255 of letters, digits and ``-_.~+%``.
ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")
PATH_RE = re.compile(r"^projects/([^/]+)/(topics|subscriptions)/([^/]+)$")


def path_of(name: str, kind: str, project: str | None) -> str:
    """Return ``projects/P/<kind>/NAME`` for an id or a full path of that kind.

    Raises:
        ConfigError: a path of the other kind, an id Pub/Sub would refuse, or an id without a
            project to put it in.
    """
    match = PATH_RE.match(name)
    if match:
        if match.group(2) != kind:
            raise ConfigError(f"pubsub: {name!r} names {match.group(2)}, expected {kind}")
        return name
    if "/" in name or not ID_RE.match(name):
        raise ConfigError(
            f"pubsub: {name!r} is not a {kind[:-1]} id (a letter, then 2-254 of "
            "[A-Za-z0-9-_.~+%]) nor a projects/P/" + kind + "/ID path"
        )
    if not project:
        raise ConfigError(
            f"pubsub: {kind[:-1]} {name!r} needs a project: pass --option project=P, set "
            "GOOGLE_CLOUD_PROJECT, or give the full projects/P/" + kind + "/ID path"
        )
    return f"projects/{project}/{kind}/{name}"


def short(path: str) -> str:
    """Return the id at the end of a resource path (``projects/p/topics/t`` -> ``t``)."""
    return path.rsplit("/", 1)[-1]


def _cut(text: str, max_bytes: int, keep_end: bool = False) -> str:
    """Return ``text`` cut to ``max_bytes`` of UTF-8 on a character boundary."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    if keep_end:
        return "..." + raw[-(max_bytes - 3) :].decode(errors="ignore")
    return raw[: max_bytes - 3].decode(errors="ignore") + "..."


def _short_lines(text: str, width: int = 160) -> str:
    """Cut each line of a traceback to ``width``: a long exception message must not push the
    frames (and its own type) out of the 1 KiB that is kept."""
    return "\n".join(
        line if len(line) <= width else line[: width - 3] + "..." for line in text.splitlines()
    )


def fit_attributes(own: dict[str, str], marks: dict[str, str]) -> dict[str, str]:
    """Return ``own`` (a producer's attributes) with ``marks`` (stalk's) inside the limits.

    stalk's marks win a place first; long values are cut to 1 KiB (a traceback keeps its end,
    where the raising line is). A producer key that is too long or reserved is dropped, and so
    are producer attributes past the 100th.
    """
    out: dict[str, str] = {}
    for key, value in marks.items():
        if key == ATTR_TRACEBACK:
            out[key] = _cut(_short_lines(value), MAX_VALUE_BYTES, keep_end=True)
        else:
            out[key] = _cut(value, MAX_VALUE_BYTES)
    for key, value in own.items():
        if len(out) >= MAX_ATTRIBUTES:
            break
        if key in out or not key or len(key.encode()) > MAX_KEY_BYTES:
            continue
        if key.startswith(RESERVED_PREFIX):
            continue
        out[key] = _cut(value, MAX_VALUE_BYTES)
    return out


def check_attributes(attributes: dict[str, str]) -> None:
    """Refuse, before sending, what the service would refuse (the emulator takes anything).

    Raises:
        ConfigError: too many attributes, a key too long, empty or reserved, a value too long.
    """
    if len(attributes) > MAX_ATTRIBUTES:
        raise ConfigError(f"pubsub: {len(attributes)} attributes, over the limit of 100")
    for key, value in attributes.items():
        if not key or len(key.encode()) > MAX_KEY_BYTES:
            raise ConfigError(f"pubsub: attribute key {key[:40]!r} is empty or over 256 bytes")
        if key.startswith(RESERVED_PREFIX):
            raise ConfigError(f"pubsub: attribute key {key!r}: the 'goog' prefix is reserved")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise ConfigError(f"pubsub: attribute {key!r} is over 1,024 bytes")


def visible(attributes: dict[str, str]) -> dict[str, str]:
    """Return the attributes a handler sees: all but the adapter's own bookkeeping."""
    return {k: v for k, v in attributes.items() if k not in INTERNAL}


def carried_attempt(attributes: dict[str, str]) -> int:
    """Return the attempt a republished copy carries (1 where it carries none or garbage)."""
    try:
        return max(1, int(attributes.get(ATTR_ATTEMPT, "1")))
    except ValueError:
        return 1


def number(attributes: dict[str, str], key: str) -> float | None:
    """Return a numeric attribute, or None when absent, not a number or not finite (an outside
    producer's ``stalk-not-before: inf`` is no time, and would not fit a modack)."""
    try:
        value = float(attributes[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None
