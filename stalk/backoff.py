"""Backoff arithmetic: exponential with full jitter (AWS Architecture Blog, 2015)."""

from __future__ import annotations

import random
from collections.abc import Callable


def exponential_ceiling(base_s: float, attempt: int, cap_s: float) -> float:
    """Return ``min(cap, base * 2**(attempt-1))`` without overflowing on large attempts."""
    exponent = max(0, attempt - 1)
    if exponent >= 64:
        return cap_s
    return float(min(cap_s, base_s * (2**exponent)))


def full_jitter(
    base_s: float,
    attempt: int,
    cap_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Return a delay drawn uniformly from ``[0, min(cap, base * 2**(attempt-1))]``.

    Full jitter spreads a thundering herd of retries best of the common schemes; the attempt cap
    in the policy, not the delay, is what stops a poison message.
    """
    return exponential_ceiling(base_s, attempt, cap_s) * rand()


class Backoff:
    """A wait that doubles on each use up to a cap, and starts over on :meth:`reset`.

    stalk's one doubling: the engine's polling period, AMQP's connect retry, the local backend's
    lock retry and (through :func:`exponential_ceiling`, counting crashes) the supervisor's
    restart delay. The n-th :meth:`next` returns ``first_s`` for n = 1, then
    ``min(max_s, first_s * 2**(n-1))``: the first wait is never cut to ``max_s``.

    Args:
        first_s: the first wait, and the wait again after :meth:`reset`.
        max_s: the longest wait that doubling reaches.
    """

    __slots__ = ("_used", "current_s", "first_s", "max_s")

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        #: The wait the next call of :meth:`next` returns.
        self.current_s = first_s
        self._used = 0

    def reset(self) -> None:
        """Go back to the first wait (not to zero, as the Go Stalk did)."""
        self.current_s = self.first_s
        self._used = 0

    def next(self) -> float:
        """Return the wait to use now and double the next one, capped."""
        wait = self.current_s
        self._used += 1
        self.current_s = exponential_ceiling(self.first_s, self._used + 1, self.max_s)
        return wait
