"""The one pure function that turns a Result into what happens to the message.

No I/O, no clock, no broker: every backend gets the same decision for the same inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from stalk.backoff import full_jitter
from stalk.options import UnflaggedError
from stalk.result import Result


@dataclass(frozen=True, slots=True)
class Ack:
    """The message is done: delete it."""


@dataclass(frozen=True, slots=True)
class Drop:
    """An unflagged error the user chose to drop: ack it, and log at warning."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Give the message back to be delivered again after ``delay_s``."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class RouteToError:
    """Publish the message to the error topic, then ack it."""

    reason: str


Action = Ack | Drop | RetryLater | RouteToError

ACK = Ack()
DROP = Drop()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The options the decision reads, copied out of CollectorOptions."""

    max_retries: int
    retry_interval_s: float
    max_retry_delay_s: float
    unflagged_error: UnflaggedError = "error_topic"


def decide(
    result: Result,
    attempt: int,
    policy: RetryPolicy,
    rand: Callable[[], float] = random.random,
) -> Action:
    """Decide what happens to a message whose handler returned ``result`` on ``attempt``.

    Args:
        result: the handler's outcome (exceptions already turned into Results).
        attempt: 1 on first delivery.
        policy: retry limits and the unflagged-error choice.
        rand: source of jitter in [0, 1); tests pass a constant.

    Returns:
        Ack, Drop, RetryLater(delay_s) or RouteToError(reason).
    """
    if result.fatal:
        return RouteToError("fatal")
    wants_retry = result.retry
    if not wants_retry and result.error is not None:
        if policy.unflagged_error == "error_topic":
            return RouteToError("error")
        if policy.unflagged_error == "drop":
            return DROP
        wants_retry = True
    if not wants_retry:
        return ACK
    if attempt > policy.max_retries:
        return RouteToError("retries_exhausted")
    if result.delay is not None:
        return RetryLater(result.delay)
    return RetryLater(full_jitter(policy.retry_interval_s, attempt, policy.max_retry_delay_s, rand))
