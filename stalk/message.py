"""The message a handler may see, and the failure record that goes with it to the error topic."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from stalk.redaction import redact

#: Attribute names stalk writes. Prefixed so they never collide with a producer's own.
ATTR_PREFIX = "stalk-"
ATTR_REASON = "stalk-reason"
ATTR_ERROR = "stalk-error"
ATTR_ERROR_TYPE = "stalk-error-type"
ATTR_ATTEMPTS = "stalk-attempts"
ATTR_SOURCE = "stalk-source"
ATTR_ORIGINAL_ID = "stalk-original-id"
ATTR_FIRST_FAILURE_AT = "stalk-first-failure-at"
ATTR_LAST_FAILURE_AT = "stalk-last-failure-at"
#: The handler's traceback, last ``TRACEBACK_FRAMES`` frames, at most ``MAX_TRACEBACK_TEXT``.
ATTR_TRACEBACK = "stalk-traceback"
#: Attempt number carried by adapters whose broker does not count deliveries itself.
ATTR_ATTEMPT = "stalk-attempt"

#: Longest error text put into metadata; brokers limit attribute sizes (SQS: 1 MiB in all).
MAX_ERROR_TEXT = 2000
#: Error text kept on a copy whose full metadata did not fit beside its body.
SHORT_ERROR_TEXT = 200
#: Frames and characters of the traceback kept on an error copy: enough to find the line, small
#: enough for every backend's attribute limits (SQS: 1 MiB for body and attributes together).
TRACEBACK_FRAMES = 8
MAX_TRACEBACK_TEXT = 4000

#: ``stalk-error-type`` of a failure given as text (``fatal("bad input")``) or found before the
#: handler ran: what happened, named like an exception class, not ``str``.
TEXT_ERROR_TYPES = {
    "fatal": "Fatal",
    "retries_exhausted": "RetriesExhausted",
    "error": "UnflaggedError",
    "poison": "Poison",
    "too_large": "MessageTooLarge",
    "expired": "Expired",
}


def format_traceback(error: BaseException | str | None) -> str:
    """Return the last frames of ``error``'s traceback (type and message included), bounded;
    ``""`` for a text or an exception never raised."""
    if not isinstance(error, BaseException) or error.__traceback__ is None:
        return ""
    import traceback

    text = redact("".join(traceback.format_exception(error, limit=-TRACEBACK_FRAMES)).rstrip())
    if len(text) > MAX_TRACEBACK_TEXT:
        text = "...\n" + text[-(MAX_TRACEBACK_TEXT - 4) :]
    return text


@dataclass(eq=False, slots=True)
class Message:
    """One delivery of a message.

    Identity, not value, makes two messages equal: the engine tracks each delivery by object.

    Attributes:
        id: the broker's message id (stable across redeliveries where the broker allows).
        body: the payload, untouched.
        attributes: string metadata (SQS message attributes, AMQP headers, Pub/Sub attributes).
        attempt: 1 on first delivery, 2 on the first retry, and so on.
        enqueued_at: epoch seconds when the broker first accepted it, if known.
        source: the queue or subscription it came from.
        receipt: the adapter's own handle for ack/retry (receipt handle, delivery tag, lease).
        redelivered: the broker delivered it before and that delivery was never settled (its
            worker died or lost the connection), as AMQP's ``redelivered`` flag says.
        deliveries_counted: ``attempt`` counts every delivery, including ones whose worker
            died (SQS receive count, quorum ``x-delivery-count``, NSQ ``attempts``). False where
            the broker cannot count (AMQP classic queues): the engine then has a redelivered
            message's count raised in the broker before the handler may run again.
        expires_at: epoch seconds after which it must not be handled (the broker's TTL), if any.

    Adapters report these facts; the engine's policy (:func:`stalk.engine.policy.admit`) decides
    what follows from them.
    """

    id: str
    body: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    attempt: int = 1
    enqueued_at: float | None = None
    source: str = ""
    receipt: Any = None
    redelivered: bool = False
    deliveries_counted: bool = True
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a message is on the error topic; adapters write it as attributes or headers.

    Attributes:
        reason: ``fatal``, ``retries_exhausted``, ``error`` (unflagged), ``too_large``,
            ``expired`` or ``poison`` (delivered more than ``max_retries + 1`` times).
        error: the error text (credentials redacted as in the logs, truncated to
            ``MAX_ERROR_TEXT``).
        error_type: the exception class name; for a plain text, the reason as a class-like
            name (``Fatal`` for ``fatal("...")``, see ``TEXT_ERROR_TYPES``).
        traceback: where a raised exception came from (``format_traceback``, redacted too),
            or ``""``.
        detail: how much of it :meth:`to_attributes` writes: ``full``; ``reason`` alone; or
            ``none``, for a body at the broker's limit that no metadata fits beside
            (:meth:`smaller`).
    """

    reason: str
    error: str
    error_type: str
    attempts: int
    source: str
    original_id: str
    first_failure_at: float
    last_failure_at: float
    traceback: str = ""
    detail: Literal["full", "reason", "none"] = "full"

    @classmethod
    def build(cls, message: Message, reason: str, error: BaseException | str | None) -> Failure:
        """Describe the failure of ``message`` now, keeping the first failure time it carries."""
        now = time.time()
        first = message.attributes.get(ATTR_FIRST_FAILURE_AT)
        try:
            first_at = float(first) if first is not None else now
        except ValueError:
            first_at = now
        if error is None:
            text, kind = "", "None"
        elif isinstance(error, BaseException):
            text, kind = str(error) or repr(error), type(error).__name__
        else:
            text, kind = str(error), TEXT_ERROR_TYPES.get(reason, "Error")
        return cls(
            reason=reason,
            # Redacted as the logs are: the error topic keeps this longer, for more readers.
            error=redact(text)[:MAX_ERROR_TEXT],
            error_type=kind,
            attempts=message.attempt,
            source=message.source,
            original_id=message.id,
            first_failure_at=first_at,
            last_failure_at=now,
            traceback=format_traceback(error),
        )

    def smaller(self) -> Iterator[Failure]:
        """Yield ever smaller versions of this failure, for a copy the broker refused as too
        large: the body never gives way, the metadata does (no traceback and a short error,
        then the reason alone, then nothing). The engine logs what the copy lost."""
        yield dataclasses.replace(self, traceback="", error=self.error[:SHORT_ERROR_TEXT])
        yield dataclasses.replace(self, detail="reason")
        yield dataclasses.replace(self, detail="none")

    def to_attributes(self) -> dict[str, str]:
        """Return the failure as string attributes, all prefixed ``stalk-``: eight, and
        ``stalk-traceback`` when a raised exception has one (fewer as ``detail`` says)."""
        if self.detail == "none":
            return {}
        if self.detail == "reason":
            return {ATTR_REASON: self.reason}
        attributes = {
            ATTR_REASON: self.reason,
            ATTR_ERROR: self.error,
            ATTR_ERROR_TYPE: self.error_type,
            ATTR_ATTEMPTS: str(self.attempts),
            ATTR_SOURCE: self.source,
            ATTR_ORIGINAL_ID: self.original_id,
            ATTR_FIRST_FAILURE_AT: f"{self.first_failure_at:.6f}",
            ATTR_LAST_FAILURE_AT: f"{self.last_failure_at:.6f}",
        }
        if self.traceback:
            attributes[ATTR_TRACEBACK] = self.traceback
        return attributes
