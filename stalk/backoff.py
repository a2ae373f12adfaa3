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


class PollBackoff:
    """The polling period: doubles on every empty poll or broker error, resets on a message."""

    __slots__ = ("current_s", "max_s", "min_s")

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.current_s = min_s

    def reset(self) -> None:
        """Go back to the configured polling period (not to zero, as the Go Stalk did)."""
        self.current_s = self.min_s

    def next(self) -> float:
        """Return the wait to use now and double the next one, capped."""
        wait = self.current_s
        self.current_s = min(self.max_s, self.current_s * 2)
        return wait
