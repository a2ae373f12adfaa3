"""Engine options: one pydantic model, validated once, with the unit in every name."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: What to do with ``Result(error=e)`` that sets neither flag. The Go Stalk acked and dropped it.
UnflaggedError = Literal["error_topic", "retry", "drop"]

#: Most handlers one collector runs at once: past this, threads and memory are the limit, not
#: the broker (``scale()`` and ``/scale`` refuse more; run more processes instead).
MAX_CONCURRENCY = 1024


class CollectorOptions(BaseModel):
    """Everything the engine decides with; adapters have their own settings models.

    Defaults follow what Celery and Dramatiq users expect of a worker, scaled to seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Queue or subscription to consume; adapters may also be built with it.
    source: str | None = None
    #: Where failed messages go; ``None`` lets the adapter name it ``<source>-errors``.
    error_topic: str | None = None
    #: First wait after an empty poll or a broker error; doubles up to ``max_polling_period_s``.
    polling_period_s: float = Field(default=0.1, gt=0)
    #: Longest wait between polls when the source stays empty or the broker stays down.
    max_polling_period_s: float = Field(default=5.0, gt=0)
    #: Retries after the first attempt: total attempts = max_retries + 1.
    max_retries: int = Field(default=5, ge=0)
    #: Base of the exponential retry backoff (full jitter) when a retry names no delay.
    retry_interval_s: float = Field(default=1.0, ge=0)
    #: Cap of the retry backoff (retries that name no delay).
    max_retry_delay_s: float = Field(default=300.0, ge=0)
    #: Longest delay a handler may name (``retry(delay=...)``); a longer one is shortened to
    #: this, so a bug (``1e12``) cannot park a message for years. Separate from the backoff
    #: cap: as in Celery and Dramatiq, a named delay of an hour is kept, not cut to the backoff's.
    max_named_delay_s: float = Field(default=7 * 86400.0, ge=0)
    #: Handlers running at once (async tasks, or threads for sync handlers).
    concurrency: int = Field(default=1, ge=1, le=MAX_CONCURRENCY)
    #: Most messages asked of the broker in one lease; ``None`` = the backend's largest
    #: (``features.max_batch``: local 100, sqs 10).
    batch_size: int | None = Field(default=None, ge=1, le=10_000)
    #: Leased messages a worker holds beyond the ones its handlers run, so a lease and an ack
    #: are paid per batch and a sync handler's thread rarely waits. ``None`` = ``max(2 *
    #: running slots, batch)``; ``0`` = lease only for free slots. Prefetched messages are in
    #: flight for every purpose (heartbeats, release on sleep and shutdown, ``/status``) and are
    #: never handed to the handler after their lease lapsed; the cost is that other workers
    #: cannot take them meanwhile (Celery's prefetch multiplier, in messages). Polling backends
    #: only: a push broker buffers on its side (AMQP's ``prefetch`` option, NSQ's RDY).
    prefetch: int | None = Field(default=None, ge=0, le=100_000)
    #: A handler running longer is abandoned and the message retried; ``None`` = no limit.
    handler_timeout_s: float | None = Field(default=300.0, gt=0)
    #: Lease the engine keeps alive with heartbeats while a message is in flight.
    visibility_timeout_s: float = Field(default=30.0, gt=0)
    #: How long ``stop()`` waits for in-flight handlers before releasing their messages.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    #: Bodies over this size go to the error topic (reason ``too_large``) unhandled.
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)
    #: Adapters that enforce a lifetime route older messages to the error topic (``expired``).
    message_ttl_s: float | None = Field(default=None, gt=0)
    #: Exception class names (``module.Class`` or ``Class``) a handler may raise to mean fatal.
    fatal_exceptions: tuple[str, ...] = ()
    #: Policy for an error Result with neither ``retry`` nor ``fatal`` set.
    unflagged_error: UnflaggedError = "error_topic"

    @model_validator(mode="after")
    def _check_ranges(self) -> CollectorOptions:
        if self.max_polling_period_s < self.polling_period_s:
            raise ValueError(
                f"max_polling_period_s ({self.max_polling_period_s}) must be >= "
                f"polling_period_s ({self.polling_period_s})"
            )
        if self.max_retry_delay_s < self.retry_interval_s:
            raise ValueError(
                f"max_retry_delay_s ({self.max_retry_delay_s}) must be >= "
                f"retry_interval_s ({self.retry_interval_s})"
            )
        return self
