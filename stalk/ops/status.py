"""The status snapshot: one collector as /metrics, /status and the progress line show it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stalk.engine.collector import BaseCollector
from stalk.engine.stats import CollectorStats
from stalk.ops.logs import redact


def counts(stats: CollectorStats) -> dict[str, Any]:
    """Return the one vocabulary of counts the summary line, ``/status`` and the docs share.

    ``received``: deliveries taken from the broker (a retry comes back as a new delivery);
    ``attempts``: handler calls; ``acked``: messages done and deleted; ``retried``: handed back
    for a later attempt; ``errors``: routed to the error topic, by reason; ``dropped``: unflagged
    errors dropped by choice; ``released``: given back unprocessed (shutdown, sleep). The
    engine's own ``acked`` counter also counts the originals of error copies and drops (each
    leaves the source the same way); here each message is in one column only.
    """
    errors = dict(stats.errored)
    return {
        "received": stats.received,
        "attempts": stats.handled,
        "acked": max(0, stats.acked - sum(errors.values()) - stats.dropped),
        "retried": stats.retried,
        "errors": errors,
        "dropped": stats.dropped,
        "released": stats.released,
    }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One collector as /metrics, /status and the progress line show it, credentials removed.

    ``stats`` is the live object, read on the collector's loop, so one scrape is consistent.
    """

    backend: str
    source: str
    description: str
    state: str
    healthy: bool
    health_reason: str
    concurrency: int
    in_flight: int
    stats: CollectorStats

    @classmethod
    def of(cls, collector: BaseCollector) -> Snapshot:
        """Read ``collector`` now."""
        adapter = collector.adapter
        return cls(
            backend=adapter.name,
            source=redact(str(adapter.source or collector.options.source or "")),
            description=redact(adapter.describe()),
            state=collector.state,
            healthy=collector.healthy,
            health_reason=redact(collector.health_reason),
            concurrency=collector.concurrency,
            in_flight=collector.in_flight,
            stats=collector.stats,
        )

    def as_dict(self) -> dict[str, Any]:
        """Return the ``/status`` document (counts with the histogram, backlog when known)."""
        backlog = self.stats.backlog
        return {
            "state": self.state,
            "backend": self.backend,
            "source": self.source,
            "description": self.description,
            "healthy": self.healthy,
            "health_reason": self.health_reason,
            "concurrency": self.concurrency,
            "in_flight": self.in_flight,
            "messages": counts(self.stats),
            "counts": self.stats.to_state(),
            "backlog": None if backlog is None else backlog.as_dict(),
        }
