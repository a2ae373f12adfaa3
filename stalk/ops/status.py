"""The status snapshot: one collector as /metrics, /status and the progress line show it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stalk.engine.collector import BaseCollector
from stalk.engine.stats import CollectorStats
from stalk.ops.logs import redact


def counts(stats: CollectorStats) -> dict[str, Any]:
    """Return the counts' one vocabulary (see :meth:`CollectorStats.outcomes`)."""
    return stats.outcomes()


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
            "backlog_age_s": (
                None
                if self.stats.backlog_at is None
                else round(max(0.0, time.time() - self.stats.backlog_at), 3)
            ),
        }
