from __future__ import annotations

import pytest

from stalk import Result, fatal, ok, retry
from stalk.backoff import Backoff, exponential_ceiling, full_jitter
from stalk.engine.policy import (
    ACK,
    ADMIT,
    DROP,
    RECOUNT,
    Reject,
    RetryLater,
    RetryPolicy,
    RouteToError,
    admit,
    admit_all,
    decide,
)
from stalk.message import Message

POLICY = RetryPolicy(max_retries=3, retry_interval_s=1.0, max_retry_delay_s=10.0)


def test_policy_ok_acks() -> None:
    assert decide(ok(), 1, POLICY) == ACK
    assert decide(Result(), 7, POLICY) == ACK


def test_policy_fatal_routes_even_with_retry_flag() -> None:
    assert decide(fatal("x"), 1, POLICY) == RouteToError("fatal")
    assert decide(Result(error="x", retry=True, fatal=True), 1, POLICY) == RouteToError("fatal")


def test_policy_retry_uses_result_delay() -> None:
    assert decide(retry("x", delay=4.5), 1, POLICY) == RetryLater(4.5)


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_policy_retry_with_attempts_left(attempt: int) -> None:
    assert isinstance(decide(retry("x"), attempt, POLICY), RetryLater)


def test_policy_max_retries_counts_retries_after_first_attempt() -> None:
    # max_retries=3 → attempts 1..4 in all; the 4th failing attempt goes to the error topic.
    assert decide(retry("x"), 4, POLICY) == RouteToError("retries_exhausted")


def test_policy_zero_retries_routes_first_failure() -> None:
    policy = RetryPolicy(0, 1.0, 10.0)
    assert decide(retry("x"), 1, policy) == RouteToError("retries_exhausted")


def test_policy_backoff_is_full_jitter_capped() -> None:
    assert decide(retry("x"), 1, POLICY, rand=lambda: 0.999).delay_s == pytest.approx(0.999)
    assert decide(retry("x"), 3, POLICY, rand=lambda: 1.0).delay_s == pytest.approx(4.0)
    assert decide(retry("x"), 3, POLICY, rand=lambda: 0.0).delay_s == 0.0
    big = RetryPolicy(100, 1.0, 10.0)
    assert decide(retry("x"), 60, big, rand=lambda: 1.0).delay_s == 10.0


@pytest.mark.parametrize(
    ("choice", "expected"),
    [("error_topic", RouteToError("error")), ("drop", DROP)],
)
def test_policy_unflagged_error(choice: str, expected: object) -> None:
    policy = RetryPolicy(3, 1.0, 10.0, choice)  # type: ignore[arg-type]
    assert decide(Result(error="x"), 1, policy) == expected


def test_policy_unflagged_error_retry_then_exhausts() -> None:
    policy = RetryPolicy(1, 1.0, 10.0, "retry")
    assert isinstance(decide(Result(error="x"), 1, policy), RetryLater)
    assert decide(Result(error="x"), 2, policy) == RouteToError("retries_exhausted")


def test_result_rejects_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        retry("x", delay=-1)


def test_result_constructors_and_fields() -> None:
    r = retry(ValueError("v"), delay=2)
    assert (r.retry, r.fatal, r.delay, str(r.error)) == (True, False, 2, "v")
    assert fatal("f").fatal and not fatal("f").retry
    assert ok().is_ok and not r.is_ok
    with pytest.raises(AttributeError):
        r.retry = False  # type: ignore[misc]


def test_backoff_ceiling_does_not_overflow() -> None:
    assert exponential_ceiling(1.0, 10_000, 30.0) == 30.0
    assert exponential_ceiling(0.5, 1, 30.0) == 0.5
    assert full_jitter(1.0, 2, 30.0, rand=lambda: 0.5) == 1.0


def test_poll_backoff_doubles_caps_and_resets_to_period() -> None:
    b = Backoff(0.1, 0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.current_s == 0.1


# ---------------------------------------------------------------- before the handler: admit
def _msg(body: bytes = b"x", attempt: int = 1, **facts: object) -> Message:
    return Message("1", body, attempt=attempt, **facts)  # type: ignore[arg-type]


LIMITS = RetryPolicy(2, 1.0, 10.0, max_message_bytes=10, message_ttl_s=60.0)


def test_admit_lets_a_fresh_delivery_in() -> None:
    assert admit(_msg(), 1000.0, LIMITS) == ADMIT
    assert admit(_msg(attempt=3), 1000.0, LIMITS) == ADMIT  # max_retries + 1 deliveries in all


def test_admit_rejects_too_large_expired_and_poison() -> None:
    assert admit(_msg(b"x" * 11), 1000.0, LIMITS).reason == "too_large"  # type: ignore[union-attr]
    expired = admit(_msg(expires_at=999.0), 1000.0, LIMITS)
    assert isinstance(expired, Reject) and expired.reason == "expired"
    old = admit(_msg(enqueued_at=900.0), 1000.0, LIMITS)
    assert isinstance(old, Reject) and old.reason == "expired"
    poison = admit(_msg(attempt=4), 1000.0, LIMITS)
    assert isinstance(poison, Reject) and poison.reason == "poison"


def test_admit_counts_an_uncounted_redelivery_first_then_stops_it() -> None:
    uncounted = {"redelivered": True, "deliveries_counted": False}
    assert admit(_msg(attempt=1, **uncounted), 1000.0, LIMITS) == RECOUNT
    assert admit(_msg(attempt=2, **uncounted), 1000.0, LIMITS) == RECOUNT
    last = admit(_msg(attempt=3, **uncounted), 1000.0, LIMITS)
    assert isinstance(last, Reject) and last.reason == "poison"
    # a counted redelivery (SQS, quorum queues) is judged on its count alone
    assert admit(_msg(attempt=2, redelivered=True), 1000.0, LIMITS) == ADMIT


def test_admit_all_gives_each_message_the_verdict_admit_gives() -> None:
    """The batch form skips the call for messages no limit concerns; it must never disagree."""
    now = 1000.0
    policies = [
        POLICY,
        RetryPolicy(3, 1.0, 10.0, max_message_bytes=4),
        RetryPolicy(3, 1.0, 10.0, message_ttl_s=5.0),
    ]
    messages = [
        Message(
            str(i),
            body,
            attempt=attempt,
            enqueued_at=enqueued,
            redelivered=redelivered,
            deliveries_counted=counted,
            expires_at=expires,
        )
        for i, (body, attempt, enqueued, redelivered, counted, expires) in enumerate(
            (body, attempt, enqueued, redelivered, counted, expires)
            for body in (b"ok", b"too large")
            for attempt in (1, 4, 5)
            for enqueued in (None, 999.0, 900.0)
            for redelivered in (False, True)
            for counted in (False, True)
            for expires in (None, 999.0, 2000.0)
        )
    ]
    for policy in policies:
        admitted, others = admit_all(messages, now, policy)
        assert len(admitted) + len(others) == len(messages)
        for message in admitted:
            assert admit(message, now, policy) is ADMIT, message
        for message, verdict in others:
            assert admit(message, now, policy) == verdict, message
        assert others, "the grid holds messages to reject or recount"
