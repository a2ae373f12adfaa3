"""``--autoscale``: the pure rule, and a memory-adapter collector under a synthetic load."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from stalk import BaseCollector, CollectorOptions
from stalk.collectors.memory import MemoryAdapter, MemoryBroker
from stalk.errors import ConfigError
from stalk.ops.autoscale import Autoscaler, AutoscaleSettings, Window, decide, parse_bounds
from stalk.ops.runner import poll_backlog
from stalk.options import MAX_CONCURRENCY
from stalk.testing.harness import FAST_OPTIONS, wait_for

SETTINGS = AutoscaleSettings(2, 20, up_after_s=3, down_after_s=20)


def window(saturated: float, mean: float, waiting: bool, since: float = 60.0) -> Window:
    return Window(saturated, mean, waiting, since)


def test_grows_by_half_when_saturated_and_work_waits() -> None:
    for size, wanted in ((8, 12), (16, 20), (20, 20)):  # clamped to MAX
        busy = window(1.0, size, True)
        assert decide(size, busy, busy, SETTINGS) == wanted


def test_does_not_grow_without_waiting_work_or_before_the_window_is_full() -> None:
    assert decide(8, window(1.0, 8, False), window(1.0, 8, False), SETTINGS) == 8
    assert decide(8, window(1.0, 8, True, since=1.0), window(1.0, 8, True, 1.0), SETTINGS) == 8
    assert decide(8, window(0.5, 7, True), window(0.5, 7, True), SETTINGS) == 8


def test_shrinks_to_the_target_use_and_not_below_min() -> None:
    idle = window(0.0, 2.1, False)
    assert decide(10, idle, idle, SETTINGS) == 4  # ceil(2.1 / 0.7)
    assert decide(10, window(0.0, 0.0, False), window(0.0, 0.0, False), SETTINGS) == 2


def test_dead_band_between_the_triggers_keeps_concurrency() -> None:
    steady = window(0.6, 7.0, True)  # 70% use: neither saturated nor idle
    assert decide(10, steady, steady, SETTINGS) == 10


def test_autoscale_bounds_stop_at_the_concurrency_cap() -> None:
    """Hole 9: ``--autoscale 1:5000`` was accepted and failed in ``scale()`` once it grew."""
    assert parse_bounds(f"1:{MAX_CONCURRENCY}") == (1, MAX_CONCURRENCY)
    with pytest.raises(ConfigError, match=f"at most {MAX_CONCURRENCY}"):
        parse_bounds(f"1:{MAX_CONCURRENCY + 1}")


def test_parse_bounds() -> None:
    assert parse_bounds("2:16") == (2, 16)
    assert parse_bounds("8") == (1, 8)
    for bad in ("0:4", "5:2", "a:b", ""):
        with pytest.raises(ConfigError):
            parse_bounds(bad)


def test_synthetic_load_grows_settles_without_oscillation_then_shrinks() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()

        async def handler(body: bytes) -> None:
            await asyncio.sleep(0.02)

        options = CollectorOptions(**{**FAST_OPTIONS, "concurrency": 1, "batch_size": 50})
        collector = BaseCollector(MemoryAdapter("load", broker=broker), handler, options)
        settings = AutoscaleSettings(1, 16, sample_s=0.02, up_after_s=0.2, down_after_s=1.0)
        scaler = Autoscaler(collector, settings)
        seen: list[int] = []
        feeding = True

        async def feed() -> None:  # ~250 msg/s of 20 ms work: about five busy slots
            while feeding:
                for _ in range(5):
                    broker.put("load", b"x", {}, 0)
                seen.append(collector.concurrency)
                await asyncio.sleep(0.02)

        await collector.start()
        collector.wake()
        tasks = [
            asyncio.create_task(poll_backlog(collector, 0.05)),
            asyncio.create_task(scaler.run()),
            asyncio.create_task(feed()),
        ]
        try:
            await wait_for(lambda: collector.concurrency >= 5, 30, "growth to meet the load")
            await asyncio.sleep(3)  # hold the load: the size must settle and stay
            under_load = [size for _, size in scaler.changes]
            feeding = False
            await wait_for(lambda: collector.concurrency == 1, 30, "shrinking back when idle")
        finally:
            feeding = False
            await collector.stop(2)
            await asyncio.gather(*tasks, return_exceptions=True)
        sizes = [size for _, size in scaler.changes]
        assert max(seen) <= 16 and max(sizes) <= 16
        ups = [b > a for a, b in zip([1, *sizes], sizes, strict=False)]
        first_down = ups.index(False)
        assert all(ups[:first_down]), sizes  # grew monotonically under load...
        assert not any(ups[first_down:]), sizes  # ...and once shrinking, never grew back
        downs_under_load = sum(b < a for a, b in itertools.pairwise(under_load))
        assert downs_under_load <= 1, sizes  # at most one correction of an overshoot

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_manual_scale_outside_the_bounds_is_brought_back() -> None:
    collector = BaseCollector(MemoryAdapter("q"), lambda body: None, CollectorOptions())
    scaler = Autoscaler(collector, AutoscaleSettings(2, 4))
    collector.state = "awake"
    collector.concurrency = 9
    scaler.step(1000.0)
    assert collector.concurrency == 4
    assert scaler.changes == [(1000.0, 4)]
