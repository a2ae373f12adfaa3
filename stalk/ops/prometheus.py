"""Prometheus exposition of collectors' counters, written by prometheus-client.

The engine only bumps plain ints (:class:`stalk.engine.stats.CollectorStats`); nothing here runs per
message. At scrape time :func:`families` turns snapshots into metric families once, and
prometheus-client writes them (:class:`StalkMetrics` is its custom collector) from a private
registry per exporter, with the process metrics. Nothing registers into a global registry, so two
collectors in one process never clash (the Go Stalk panicked there): give each its own
:class:`MetricsExporter`, or one exporter several snapshots, whose families are then written once
with one sample set per collector.

prometheus-client is imported when an exporter is made, not with this module: a ``stalk run``
without ``--http-port`` does not pay for its import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stalk.engine.stats import DURATION_BUCKETS_S
from stalk.ops.status import Snapshot

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: Error reasons exported at 0 before they happen, so ``rate()`` sees them from the start.
KNOWN_REASONS = ("fatal", "retries_exhausted", "error", "too_large", "expired", "poison")

#: (name without ``_total``, help, CollectorStats attribute) of the plain counters.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("stalk_messages_received", "Messages taken from the broker.", "received"),
    # the counts' one vocabulary (CollectorStats.outcomes): error copies and drops apart
    ("stalk_messages_acked", "Messages handled and deleted.", "acked"),
    ("stalk_messages_retried", "Messages handed back to the broker with a delay.", "retried"),
    ("stalk_messages_dropped", "Unflagged errors dropped (unflagged_error=drop).", "dropped"),
    ("stalk_messages_released", "Messages given back unprocessed (shutdown).", "released"),
    (
        "stalk_settle_failures",
        "Acks, retries or error publishes the broker refused.",
        "failed_settles",
    ),
    ("stalk_broker_errors", "Failed polls or connects.", "broker_errors"),
)

Labels = dict[str, str]


@dataclass(slots=True)
class Family:
    """One metric family: ``samples`` are (full sample name, labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _bound(value: float) -> str:
    """Write a bucket bound as Prometheus' Go clients do (``+Inf``, ``0.005``, ``1.0``)."""
    return "+Inf" if math.isinf(value) else repr(float(value))


def families(snapshots: Sequence[Snapshot]) -> list[Family]:
    """Return every family with one sample set per snapshot, labelled by backend and source."""
    out = [Family(name, "counter", text) for name, text, _ in COUNTERS]
    errored = Family("stalk_messages_errored", "counter", "Messages sent to the error topic.")
    duration = Family(
        "stalk_handler_duration_seconds", "histogram", "Time the handler took per message."
    )
    gauges = {
        "in_flight": Family("stalk_in_flight", "gauge", "Messages received and not yet settled."),
        "concurrency": Family("stalk_concurrency", "gauge", "Handlers allowed to run at once."),
        "healthy": Family("stalk_healthy", "gauge", "1 when connected and the loop is alive."),
        "awake": Family("stalk_awake", "gauge", "1 while taking messages, 0 asleep or stopping."),
        "backlog": Family("stalk_backlog_messages", "gauge", "Broker-side counts by state."),
        "oldest": Family(
            "stalk_backlog_oldest_age_seconds", "gauge", "Age of the oldest waiting message."
        ),
    }
    for snap in snapshots:
        labels = {"backend": snap.backend, "source": snap.source}
        stats = snap.stats
        outcomes = stats.outcomes()
        for family, (_, _, attr) in zip(out, COUNTERS, strict=True):
            value = outcomes[attr] if attr == "acked" else getattr(stats, attr)
            family.samples.append((family.name + "_total", labels, value))
        for reason in sorted(set(KNOWN_REASONS) | set(stats.errored)):
            errored.samples.append(
                (errored.name + "_total", {**labels, "reason": reason}, stats.errored[reason])
            )
        running = 0
        for bound, count in zip(
            (*DURATION_BUCKETS_S, math.inf), stats.duration_counts, strict=True
        ):
            running += count
            duration.samples.append(
                (duration.name + "_bucket", {**labels, "le": _bound(bound)}, running)
            )
        duration.samples.append((duration.name + "_count", labels, stats.handled))
        duration.samples.append((duration.name + "_sum", labels, stats.handler_seconds))
        for key, value in (
            ("in_flight", snap.in_flight),
            ("concurrency", snap.concurrency),
            ("healthy", int(snap.healthy)),
            ("awake", int(snap.state == "awake")),
        ):
            gauges[key].samples.append((gauges[key].name, labels, value))
        backlog = stats.backlog
        if backlog is not None:
            for state in ("ready", "delayed", "in_flight", "errors"):
                count = getattr(backlog, state)
                if count is not None:
                    gauges["backlog"].samples.append(
                        (gauges["backlog"].name, {**labels, "state": state}, count)
                    )
            if backlog.oldest_age_s is not None:
                gauges["oldest"].samples.append(
                    (gauges["oldest"].name, labels, backlog.oldest_age_s)
                )
    return [*out, errored, duration, *gauges.values()]


class StalkMetrics:
    """A prometheus-client custom collector reading stalk snapshots when scraped.

    Register it in a registry you own (never the global one unless you choose to)::

        registry.register(StalkMetrics(lambda: [Snapshot.of(a), Snapshot.of(b)]))
    """

    def __init__(
        self,
        snapshots: Callable[[], Sequence[Snapshot]],
        extra: Callable[[], Sequence[Family]] | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.extra = extra

    def families(self) -> list[Family]:
        """Return stalk's families and the ``extra`` ones (a supervisor's worker counts)."""
        return families(self.snapshots()) + list(self.extra() if self.extra else ())

    def collect(self) -> Iterator[Any]:
        """Yield prometheus-client metric families (the registry calls this on each scrape)."""
        from prometheus_client.metrics_core import Metric

        for family in self.families():
            metric = Metric(family.name, family.help, family.kind)
            for name, labels, value in family.samples:
                metric.add_sample(name, labels, value)
            yield metric


class MetricsExporter:
    """What ``GET /metrics`` serves: one private registry per exporter, no global state.

    Args:
        snapshots: returns the collectors to export (usually one); called on each scrape.
        registry: a prometheus-client registry to register into instead of a private one.
        process_metrics: also export ``process_*`` (CPU, memory, fds) from the private registry.
        extra: more families to export (a supervisor's worker gauges).
    """

    def __init__(
        self,
        snapshots: Callable[[], Sequence[Snapshot]],
        *,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
        extra: Callable[[], Sequence[Family]] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.source = StalkMetrics(snapshots, extra)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.registry.register(self.source)
        if process_metrics and registry is None:
            ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """Return the exposition body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
