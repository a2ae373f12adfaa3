"""Core counters every collector keeps, with no dependency: the source of /metrics and /status.

Everything here is plain ints bumped on the engine's loop thread: no locks, no registry, no
allocation per message. Exporters (``stalk.ops.prometheus``, ``/status``) read them when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stalk.collectors.base import Backlog

#: Upper bounds (seconds, ``le``) of the handler duration histogram: 1 ms to 5 min, plus +Inf.
DURATION_BUCKETS_S: tuple[float, ...] = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)


def _empty_buckets() -> list[int]:
    return [0] * (len(DURATION_BUCKETS_S) + 1)


@dataclass
class CollectorStats:
    """Plain counters, one set per collector (never a global registry).

    Attributes:
        received: messages taken from the broker.
        acked: messages deleted after success (or after their error-topic copy was published).
        retried: retries handed back to the broker with a delay.
        errored: messages published to the error topic, by reason.
        dropped: unflagged errors dropped by explicit choice (``unflagged_error=drop``).
        released: messages given back unprocessed (shutdown, sleep races).
        failed_settles: acks, retries or error publishes the broker refused (left to redelivery).
        broker_errors: failed polls or connects.
        handler_seconds: total time spent in the handler; ``handled`` is the count.
        duration_counts: handler durations per bucket of ``DURATION_BUCKETS_S`` (not
            cumulative; the last slot is over the largest bound).
        backlog: the adapter's last backlog counts, polled in the background, if it tells.
    """

    received: int = 0
    acked: int = 0
    retried: int = 0
    errored: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    released: int = 0
    failed_settles: int = 0
    broker_errors: int = 0
    handled: int = 0
    handler_seconds: float = 0.0
    duration_counts: list[int] = field(default_factory=_empty_buckets)
    backlog: Backlog | None = None
    #: Epoch seconds when ``backlog`` was read (``/status`` shows its age).
    backlog_at: float | None = None

    def observe(self, seconds: float) -> None:
        """Count one finished handler call: a bisect and three adds, cheap enough per message."""
        self.handled += 1
        self.handler_seconds += seconds
        self.duration_counts[bisect_left(DURATION_BUCKETS_S, seconds)] += 1

    def observe_all(self, seconds: Sequence[float]) -> None:
        """:meth:`observe` for a burst of handler calls at once."""
        self.handled += len(seconds)
        self.handler_seconds += sum(seconds)
        counts = self.duration_counts
        for value in seconds:
            counts[bisect_left(DURATION_BUCKETS_S, value)] += 1

    def add(self, other: CollectorStats) -> None:
        """Add ``other``'s counters into these (a supervisor summing its worker processes)."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.handler_seconds += other.handler_seconds
        self.errored.update(other.errored)
        for i, count in enumerate(other.duration_counts):
            self.duration_counts[i] += count

    def to_state(self) -> dict[str, Any]:
        """Return every counter, histogram included, as JSON-ready data (see :meth:`from_state`)."""
        state = self.as_dict()
        state["handler_seconds"] = self.handler_seconds
        state["duration_buckets_s"] = list(DURATION_BUCKETS_S)
        state["duration_counts"] = list(self.duration_counts)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CollectorStats:
        """Rebuild counters from :meth:`to_state` output; unknown or missing keys count as 0."""
        stats = cls()
        for name in _COUNTS:
            setattr(stats, name, int(state.get(name, 0)))
        stats.handler_seconds = float(state.get("handler_seconds", 0.0))
        stats.errored.update({str(k): int(v) for k, v in dict(state.get("errored", {})).items()})
        counts = list(state.get("duration_counts", ()))
        if len(counts) == len(stats.duration_counts):
            stats.duration_counts = [int(c) for c in counts]
        return stats

    def outcomes(self) -> dict[str, Any]:
        """Return the one vocabulary of counts the summary line, the stop log, ``/status`` and
        the progress line share; each message is in one column only.

        ``received``: deliveries taken from the broker (a retry comes back as a new delivery);
        ``attempts``: handler calls; ``acked``: handled and deleted; ``retried``: handed back
        for a later attempt; ``errors``: routed to the error topic, by reason; ``dropped``:
        unflagged errors dropped by choice; ``released``: given back unprocessed (shutdown,
        sleep). ``stalk_messages_acked_total`` on ``/metrics`` is this ``acked``; the raw
        ``acked`` counter also counts the originals of error copies and drops, which leave the
        source the same way.
        """
        errors = dict(self.errored)
        return {
            "received": self.received,
            "attempts": self.handled,
            "acked": max(0, self.acked - sum(errors.values()) - self.dropped),
            "retried": self.retried,
            "errors": errors,
            "dropped": self.dropped,
            "released": self.released,
        }

    def as_dict(self) -> dict[str, object]:
        """Return the counters for ``/status`` and JSON output."""
        return {
            "received": self.received,
            "acked": self.acked,
            "retried": self.retried,
            "errored": dict(self.errored),
            "dropped": self.dropped,
            "released": self.released,
            "failed_settles": self.failed_settles,
            "broker_errors": self.broker_errors,
            "handled": self.handled,
            "handler_seconds": round(self.handler_seconds, 6),
        }


#: The plain integer counters of :class:`CollectorStats`, for summing and rebuilding.
_COUNTS = (
    "received",
    "acked",
    "retried",
    "dropped",
    "released",
    "failed_settles",
    "broker_errors",
    "handled",
)
