"""nsqd's and nsqlookupd's HTTP APIs, with the standard library (no second SDK).

Used off the hot path only: ``/stats`` for ``stalk stats`` and ``--until-empty``, ``/nodes`` to
find where to publish when only lookupd is given, ``/channel/create`` for tests. Calls block, so
the adapter runs them in a thread.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from stalk.errors import BackendUnavailable


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """What nsqd tells of one topic's channel (or of the topic, before it has channels)."""

    depth: int
    in_flight: int
    deferred: int


def _url(address: str, path: str, query: dict[str, str]) -> str:
    base = address if "://" in address else f"http://{address}"
    return f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(query)}"


def call(
    address: str, path: str, query: dict[str, str], timeout_s: float, post: bool = False
) -> Any:
    """GET (or POST) ``path`` and return the decoded JSON (``None`` for an empty body).

    Raises:
        BackendUnavailable: no answer, or an HTTP error, in one line.
    """
    request = urllib.request.Request(
        _url(address, path, query), method="POST" if post else "GET", data=b"" if post else None
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise BackendUnavailable(f"nsq HTTP {address}{path}: {exc}") from None
    return json.loads(raw) if raw.strip() else None


def stats(address: str, topic: str, channel: str, timeout_s: float) -> ChannelStats | None:
    """Return the counts of ``topic``/``channel``; ``None`` when nsqd has no such topic.

    A topic without the channel yet counts as the channel would: the topic's depth is what the
    channel gets when it is created.
    """
    data = call(address, "/stats", {"format": "json", "topic": topic}, timeout_s)
    for entry in data.get("topics") or []:
        if entry.get("topic_name") != topic:
            continue
        for chan in entry.get("channels") or []:
            if chan.get("channel_name") == channel:
                return ChannelStats(
                    depth=int(chan.get("depth", 0)),
                    in_flight=int(chan.get("in_flight_count", 0)),
                    deferred=int(chan.get("deferred_count", 0)),
                )
        return ChannelStats(depth=int(entry.get("depth", 0)), in_flight=0, deferred=0)
    return None


def topic_depth(address: str, topic: str, timeout_s: float) -> int | None:
    """Return the deepest of ``topic`` and its channels (the error topic's count)."""
    data = call(address, "/stats", {"format": "json", "topic": topic}, timeout_s)
    for entry in data.get("topics") or []:
        if entry.get("topic_name") == topic:
            depths = [int(c.get("depth", 0)) for c in entry.get("channels") or []]
            return max([int(entry.get("depth", 0)), *depths])
    return None


def lookupd_nodes(address: str, timeout_s: float) -> list[str]:
    """Return the TCP addresses of the nsqd nodes lookupd knows."""
    data = call(address, "/nodes", {}, timeout_s) or {}
    return [
        f"{p.get('broadcast_address') or p.get('hostname')}:{p['tcp_port']}"
        for p in data.get("producers") or []
    ]


def create_channel(address: str, topic: str, channel: str, timeout_s: float) -> None:
    """Create ``topic`` and ``channel`` now, so nsqd's 5 s queue scan starts counting now."""
    call(address, "/topic/create", {"topic": topic}, timeout_s, post=True)
    call(address, "/channel/create", {"topic": topic, "channel": channel}, timeout_s, post=True)
