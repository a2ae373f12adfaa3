"""The conformance kit can fail: memory adapters with one method broken each fail it.

Each mutant below subclasses :class:`MemoryAdapter` (and :class:`MemoryPushAdapter`) and breaks
one seam method the way a hasty adapter would: an ``ack``, ``release`` or ``extend`` that does
nothing, a ``publish_error`` that settles the original without publishing the copy, a
``retry_later`` that ignores its delay. Each is run through the kit tests that should catch it,
called directly on a :class:`ConformanceSuite`; at least one must fail, and the same tests pass on
the unmutated adapters.

The memory broker honours leases (an un-acked message comes back when its lease lapses), which
is what makes the first three mutants visible at all: the kit leases for
:attr:`AdapterHarness.visibility_timeout_s` (2 s) and watches past it before it believes a
message is gone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from stalk.collectors.base import Adapter
from stalk.collectors.memory import MemoryAdapter, MemoryPushAdapter
from stalk.message import Failure, Message
from stalk.testing import ConformanceSuite, MemoryHarness

#: A mutant's failures show within this (the kit's default patience is for real brokers).
MUTANT_PATIENCE_S = 8.0

KitTest = Callable[[ConformanceSuite, MemoryHarness], None]


def _forget(adapter: Any, messages: Sequence[Message]) -> None:
    """Free the push adapter's in-flight slots, as its real settle methods do (only the broker
    call is mutated; a stalled push pump would be a different, louder bug)."""
    if isinstance(adapter, MemoryPushAdapter):
        for message in messages:
            adapter._unsettled.discard(message.id)


class NoOpAck:
    """``ack`` deletes nothing: the message stays leased and comes back after the lease."""

    async def ack(self, messages: Sequence[Message]) -> None:
        _forget(self, messages)


class NoOpRelease:
    """``release`` gives nothing back: the message waits out its lease."""

    async def release(self, message: Message) -> None:
        _forget(self, [message])


class NoOpExtend:
    """``extend`` keeps nothing leased: a long handler's message is delivered again."""

    async def extend(self, message: Message, seconds: float) -> None:
        return None


class DroppedErrorCopy:
    """``publish_error`` settles the original and publishes no copy: the failure is lost."""

    async def publish_error(self, message: Message, failure: Failure) -> None:
        await self.ack([message])  # type: ignore[attr-defined]


class RetryWithoutDelay:
    """``retry_later`` ignores the delay: the retry comes back at once."""

    async def retry_later(self, message: Message, delay_s: float) -> None:
        await super().retry_later(message, 0.0)  # type: ignore[misc]


S = ConformanceSuite

#: mutant -> the kit tests that must catch it (at least one of them fails).
DETECTORS: dict[type, tuple[KitTest, ...]] = {
    NoOpAck: (S.test_ack_removes_message,),
    NoOpRelease: (S.test_stop_releases_unstarted_for_redelivery_at_once,),
    NoOpExtend: (S.test_heartbeat_keeps_long_handler_to_one_delivery,),
    DroppedErrorCopy: (S.test_error_copy_published_and_original_gone,),
    RetryWithoutDelay: (
        S.test_retry_redelivers_after_delay_with_next_attempt,
        S.test_retry_outlives_the_worker_that_asked,
    ),
}

BASES = (MemoryAdapter, MemoryPushAdapter)


class MutantHarness(MemoryHarness):
    """The memory harness building ``adapter_cls`` (a mutant, or a base for the control)."""

    patience_s = MUTANT_PATIENCE_S

    def __init__(self, adapter_cls: type[Adapter]) -> None:
        super().__init__()
        self.adapter_cls = adapter_cls

    def make_adapter(self, source: str, error_topic: str) -> Adapter:
        cls: Any = self.adapter_cls
        adapter: Adapter = cls(source, error_topic=error_topic, broker=self.broker)
        return adapter


def mutate(mutant: type, base: type[Adapter]) -> type[Adapter]:
    """Return ``base`` with the one method ``mutant`` overrides."""
    return type(f"{mutant.__name__}{base.__name__}", (mutant, base), {})


def outcome(test: KitTest, adapter_cls: type[Adapter]) -> str | None:
    """Run one kit test on a fresh harness; return why it failed, or None when it passed."""
    try:
        test(ConformanceSuite(), MutantHarness(adapter_cls))
    except Exception as exc:  # a kit test failing: assertion, timeout, broker error
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _name(test: KitTest) -> str:
    return test.func.__name__ if isinstance(test, functools.partial) else test.__name__


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("mutant", list(DETECTORS), ids=lambda m: m.__name__)
def test_kit_fails_mutant(mutant: type, base: type[Adapter]) -> None:
    adapter_cls = mutate(mutant, base)
    failures: dict[str, str] = {}
    for test in DETECTORS[mutant]:
        why = outcome(test, adapter_cls)
        if why is not None:
            failures[_name(test)] = why
            break  # one failing kit test is the proof; the rest would only cost time
    assert failures, f"{adapter_cls.__name__} passed every kit test meant to catch it"


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_kit_passes_unmutated_memory_adapter(base: type[Adapter]) -> None:
    tests = {_name(t): t for detectors in DETECTORS.values() for t in detectors}
    failures = {name: why for name, t in tests.items() if (why := outcome(t, base)) is not None}
    assert not failures, f"the detectors fail the real {base.__name__}: {failures}"
