"""``--autoscale MIN:MAX``: grow concurrency while work queues up, shrink it when slots sit idle.

The rule is a pure function (:func:`decide`) over a window of samples taken a few times a second
in the background; nothing runs per message except, when the adapter cannot count its backlog,
one subtraction per first delivery to learn how long messages waited.

Why it does not oscillate: it grows only when nearly every sample saw every slot busy *and* the
broker (or the queueing delay) says more work waits; it shrinks only when the mean use fell under
``down_utilisation``, and then to the size that would run at ``target_utilisation`` — below the
growth trigger, so the next window does not grow it back. Each change opens a fresh window, and
shrinking waits several times longer than growing (Celery's autoscaler keeps a similar keepalive).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stalk.engine.policy import Action
from stalk.errors import ConfigError
from stalk.message import Message
from stalk.options import MAX_CONCURRENCY

if TYPE_CHECKING:
    from stalk.engine.collector import BaseCollector

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    """Bounds and pace of the autoscaler.

    Attributes:
        minimum, maximum: the concurrency range.
        sample_s: how often in-flight is sampled.
        up_after_s: a saturated window this long (since the last change) grows concurrency.
        down_after_s: an idle window this long shrinks it.
        saturated_ratio: share of samples with every slot busy that counts as saturated.
        down_utilisation: mean use below this shrinks.
        target_utilisation: use a shrink aims for (between the two triggers).
        wait_threshold_s: queueing delay that means work waits, for adapters without backlog().
    """

    minimum: int
    maximum: int
    sample_s: float = 0.25
    up_after_s: float = 3.0
    down_after_s: float = 20.0
    saturated_ratio: float = 0.9
    down_utilisation: float = 0.5
    target_utilisation: float = 0.7
    wait_threshold_s: float = 1.0

    def clamp(self, concurrency: int) -> int:
        """Return ``concurrency`` within the bounds."""
        return max(self.minimum, min(self.maximum, concurrency))


def parse_bounds(text: str) -> tuple[int, int]:
    """Parse ``MIN:MAX`` (or a single ``MAX``, meaning ``1:MAX``).

    Raises:
        ConfigError: not two integers with 1 <= MIN <= MAX <= ``MAX_CONCURRENCY``.
    """
    low, sep, high = text.partition(":")
    try:
        minimum, maximum = (int(low), int(high)) if sep else (1, int(low))
    except ValueError:
        raise ConfigError(f"--autoscale expects MIN:MAX, e.g. 2:16; got {text!r}") from None
    if not 1 <= minimum <= maximum:
        raise ConfigError(f"--autoscale needs 1 <= MIN <= MAX; got {text!r}")
    if maximum > MAX_CONCURRENCY:  # the collector would refuse the scale() mid-run
        raise ConfigError(
            f"--autoscale MAX is at most {MAX_CONCURRENCY} per process (run more processes for "
            f"more); got {text!r}"
        )
    return minimum, maximum


@dataclass(frozen=True, slots=True)
class Window:
    """What the samples since the last change say.

    Attributes:
        saturated: share of samples in which every slot was busy.
        mean_in_flight: mean number of busy slots.
        work_waiting: the broker's backlog (or the queueing delay) says more work waits.
        since_change_s: seconds since the last change (or the start).
    """

    saturated: float
    mean_in_flight: float
    work_waiting: bool
    since_change_s: float


def decide(concurrency: int, up: Window, down: Window, settings: AutoscaleSettings) -> int:
    """Return the next concurrency (``concurrency`` itself when nothing should change).

    Args:
        up: the last ``up_after_s`` of samples; down: the last ``down_after_s``.
    """
    if (
        concurrency < settings.maximum
        and up.since_change_s >= settings.up_after_s
        and up.saturated >= settings.saturated_ratio
        and up.work_waiting
    ):
        return settings.clamp(concurrency + max(1, math.ceil(concurrency / 2)))
    if (
        concurrency > settings.minimum
        and down.since_change_s >= settings.down_after_s
        and down.mean_in_flight < settings.down_utilisation * concurrency
    ):
        wanted = math.ceil(down.mean_in_flight / settings.target_utilisation)
        return settings.clamp(min(concurrency - 1, wanted))
    return concurrency


class Autoscaler:
    """Drive ``collector.scale()`` from in-flight samples and the broker's backlog.

    Start :meth:`run` as a task on the collector's loop; it returns once the collector drains.
    :meth:`observe` is the ``on_outcome`` observer that learns queueing delay; it is needed only
    when the adapter has no ``backlog()``.
    """

    def __init__(self, collector: BaseCollector, settings: AutoscaleSettings) -> None:
        self.collector = collector
        self.settings = settings
        #: (monotonic time, in flight, concurrency) samples, newest last.
        self.samples: deque[tuple[float, int, int]] = deque()
        #: (monotonic time, new concurrency) of each change, for /status and tests.
        self.changes: list[tuple[float, int]] = []
        self.changed_at = time.monotonic()
        self.wait_s = 0.0

    def observe(self, message: Message, action: Action, seconds: float) -> None:
        """Track how long first deliveries waited in the queue (exponential mean)."""
        if message.attempt == 1 and message.enqueued_at is not None:
            waited = time.time() - seconds - message.enqueued_at
            self.wait_s += 0.1 * (waited - self.wait_s)

    def status(self) -> dict[str, Any]:
        """Return the ``autoscale`` part of ``/status``."""
        return {
            "autoscale": {
                "min": self.settings.minimum,
                "max": self.settings.maximum,
                "changes": len(self.changes),
            }
        }

    def _work_waiting(self) -> bool:
        collector = self.collector
        if collector.adapter.features.backlog and collector.stats.backlog is not None:
            return bool(collector.stats.backlog.ready)
        return self.wait_s >= self.settings.wait_threshold_s

    def window(self, now: float, length_s: float) -> Window:
        """Summarise the samples of the last ``length_s`` taken since the last change."""
        start = max(now - length_s, self.changed_at)
        picked = [(busy, size) for at, busy, size in self.samples if at >= start]
        count = len(picked) or 1
        return Window(
            saturated=sum(busy >= size for busy, size in picked) / count,
            mean_in_flight=sum(busy for busy, _ in picked) / count,
            work_waiting=self._work_waiting(),
            since_change_s=now - self.changed_at,
        )

    def step(self, now: float) -> None:
        """Take one sample and scale if the windows say so."""
        collector, settings = self.collector, self.settings
        self.samples.append((now, collector.in_flight, collector.concurrency))
        while self.samples and self.samples[0][0] < now - settings.down_after_s:
            self.samples.popleft()
        if collector.state != "awake":
            self.changed_at = now  # asleep is not idle: do not shrink on it
            return
        current = collector.concurrency
        if current != settings.clamp(current):  # scaled by hand (signal, /scale) out of bounds
            wanted = settings.clamp(current)
        else:
            up = self.window(now, settings.up_after_s)
            down = self.window(now, settings.down_after_s)
            wanted = decide(current, up, down, settings)
        if wanted != current:
            logger.info("autoscale: concurrency %d -> %d", current, wanted)
            self.changes.append((now, wanted))
            self.changed_at = now
            collector.scale(wanted)

    async def run(self) -> None:
        """Sample and scale until the collector drains or stops."""
        while self.collector.state not in ("draining", "stopped"):
            await asyncio.sleep(self.settings.sample_s)
            self.step(time.monotonic())
