"""The value a handler returns, and the three constructors that build it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from stalk.errors import InvalidResult


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one message, as the handler sees it.

    The fields are the Go Stalk's three (``error``, ``retry``, ``fatal``) plus ``delay``. Prefer
    the constructors :func:`ok`, :func:`retry` and :func:`fatal`; the plain form is accepted so
    that code ported from Stalk keeps working. ``fatal`` wins over ``retry`` when both are set,
    because the handler has said the message can never succeed.

    Args:
        error: why the message failed (an exception or a text), or ``None``.
        retry: try again later, up to ``max_retries`` times.
        fatal: never try again; route to the error topic.
        delay: seconds before the retry; ``None`` lets the engine back off. A finite number
            >= 0, else :class:`~stalk.errors.InvalidResult` here (the message then goes to the
            error topic as ``fatal``); the engine caps it at ``max_retry_delay_s``.
    """

    error: BaseException | str | None = None
    retry: bool = False
    fatal: bool = False
    delay: float | None = None

    def __post_init__(self) -> None:
        delay = self.delay
        if delay is None:
            return
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise InvalidResult(
                f"Result.delay must be a number of seconds, got {type(delay).__name__} {delay!r}"
            )
        if not math.isfinite(delay) or delay < 0:
            raise InvalidResult(f"Result.delay must be finite and >= 0 seconds, got {delay!r}")

    @property
    def is_ok(self) -> bool:
        """True when the message was handled: no error and no flag."""
        return self.error is None and not self.retry and not self.fatal


#: The one ok value; ``ok()`` returns it so the hot path allocates nothing.
OK = Result()


def ok() -> Result:
    """Return the Result that acks the message."""
    return OK


def retry(error: BaseException | str | None = None, delay: float | None = None) -> Result:
    """Return a Result that retries the message after ``delay`` seconds (engine backoff if None)."""
    return Result(error=error, retry=True, delay=delay)


def fatal(error: BaseException | str | None = None) -> Result:
    """Return a Result that sends the message straight to the error topic."""
    return Result(error=error, fatal=True)
