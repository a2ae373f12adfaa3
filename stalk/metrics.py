"""Core counters every collector keeps, with no dependency: the source of /metrics and /status."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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
