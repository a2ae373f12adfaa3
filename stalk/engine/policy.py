"""The pure decisions of the engine: whether a delivery may reach the handler (:func:`admit`),
and what its Result means (:func:`decide`).

No I/O, no broker, and the clock only as an argument: every backend gets the same decision for
the same facts, and every outcome, including a message never handled, is counted and logged by
the engine in the same place.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stalk.backoff import full_jitter
from stalk.message import Message
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


@dataclass(frozen=True, slots=True)
class Admit:
    """Hand the message to the handler."""


@dataclass(frozen=True, slots=True)
class Recount:
    """Have the broker count this redelivery before the handler may run (``retry_later`` with no
    delay): where the broker cannot count deliveries, a worker that dies on a message would
    otherwise see it again at the same attempt, forever."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Route the message to the error topic without handling it; ``why`` is the error text."""

    reason: str
    why: str


Action = Ack | Drop | RetryLater | RouteToError
Admission = Admit | Recount | Reject

ACK = Ack()
DROP = Drop()
ADMIT = Admit()
RECOUNT = Recount()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The options the decision reads, copied out of CollectorOptions."""

    max_retries: int
    retry_interval_s: float
    max_retry_delay_s: float
    unflagged_error: UnflaggedError = "error_topic"
    #: Largest body handed to the handler; larger ones go to the error topic as ``too_large``.
    max_message_bytes: int | None = None
    #: Oldest message (by ``enqueued_at``) handed to the handler; older ones are ``expired``.
    message_ttl_s: float | None = None
    #: Longest delay a handler may name; longer ones are shortened to it.
    max_named_delay_s: float = 7 * 86400.0


def admit(message: Message, now: float, policy: RetryPolicy) -> Admission:
    """Decide whether a fresh delivery may reach the handler.

    Args:
        message: the delivery with the facts its adapter reported (size, ``attempt``,
            ``redelivered``, ``deliveries_counted``, ``enqueued_at``, ``expires_at``).
        now: epoch seconds.
        policy: the limits.

    Returns:
        Admit; Reject(reason) for ``too_large``, ``expired`` or ``poison`` (delivered more than
        ``max_retries + 1`` times: a message whose handler kills its worker never yields a
        Result, so only the delivery count can stop it); or Recount where the broker cannot
        count a redelivery itself.
    """
    limit = policy.max_message_bytes
    if limit is not None and len(message.body) > limit:
        return Reject(
            "too_large", f"body of {len(message.body)} bytes is over max_message_bytes={limit}"
        )
    if message.expires_at is not None and message.expires_at <= now:
        return Reject("expired", "its time to live elapsed before it was handled")
    ttl_s = policy.message_ttl_s
    if ttl_s is not None and message.enqueued_at is not None and now - message.enqueued_at > ttl_s:
        return Reject("expired", f"older than message_ttl_s={ttl_s}")
    deliveries = message.attempt
    if message.redelivered and not message.deliveries_counted:
        deliveries += 1  # the broker did not count the delivery whose worker died
        if deliveries <= policy.max_retries + 1:
            return RECOUNT
    if deliveries > policy.max_retries + 1:
        return Reject(
            "poison",
            f"delivered {deliveries} times without a result: its handler kills or hangs the "
            f"worker, or the worker lost its connection holding it "
            f"(max_retries={policy.max_retries})",
        )
    return ADMIT


def admit_all(
    messages: Sequence[Message], now: float, policy: RetryPolicy
) -> tuple[list[Message], list[tuple[Message, Recount | Reject]]]:
    """:func:`admit` for a delivered batch: (admitted, the rest with their verdicts).

    A message no limit can concern (no size or age limit set, no TTL, a first-hand delivery
    within the retry count) is admitted without the call; the rest go through :func:`admit`.
    """
    plain = policy.max_message_bytes is None and policy.message_ttl_s is None
    most = policy.max_retries + 1
    admitted: list[Message] = []
    others: list[tuple[Message, Recount | Reject]] = []
    for message in messages:
        fresh = message.attempt <= most and not message.redelivered
        if plain and fresh and message.expires_at is None:
            admitted.append(message)
            continue
        verdict = admit(message, now, policy)
        if isinstance(verdict, Admit):
            admitted.append(message)
        else:
            others.append((message, verdict))
    return admitted, others


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
    if result.delay is not None:  # finite and >= 0: Result checked it when it was made
        return RetryLater(min(result.delay, policy.max_named_delay_s))
    return RetryLater(full_jitter(policy.retry_interval_s, attempt, policy.max_retry_delay_s, rand))
