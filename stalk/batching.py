"""Batch handlers: one call for many messages, one outcome per message.

``@stalk.batch(max_size=100, max_wait_s=0.5)`` on ``def handler(messages: list[Message])``
(or that annotation alone, with the defaults below) makes the engine hand a worker up to
``max_size`` messages at once, waiting at most ``max_wait_s`` for the batch to fill. The
handler returns ``None`` (all ok), a list of one Result per message in order, or a mapping of
message id to Result for the ones that are not ok; a raise retries the whole batch. So one bad
item is routed alone, never retrying the rest, and bulk writes (a database ``executemany``, a
bulk index call) pay per batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute the decorator sets on the handler.
BATCH_ATTRIBUTE = "__stalk_batch__"

#: Defaults for a handler recognised by its ``list[Message]`` annotation alone.
DEFAULT_MAX_SIZE = 100
DEFAULT_MAX_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """How a batch handler wants its messages grouped."""

    max_size: int = DEFAULT_MAX_SIZE
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError(f"batch max_size must be >= 1, got {self.max_size}")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ValueError(f"batch max_wait_s must be finite and >= 0, got {self.max_wait_s}")


def batch(
    max_size: int = DEFAULT_MAX_SIZE, max_wait_s: float = DEFAULT_MAX_WAIT_S
) -> Callable[[F], F]:
    """Mark ``handler(messages: list[Message])`` as a batch handler.

    Raises:
        ValueError: ``max_size`` below 1 or a negative or infinite ``max_wait_s``.
    """
    spec = BatchSpec(max_size, max_wait_s)

    def mark(func: F) -> F:
        setattr(func, BATCH_ATTRIBUTE, spec)
        return func

    return mark
