"""The one owner of what a collector holds: received messages not yet settled, and the wait for
a slot to free up.

Intake asks it how much room there is, the settler removes what it settled, housekeeping reads
when each lease was last extended, and shutdown waits on it until it is empty. One event wakes
every waiter; waiters re-check their condition, so a spurious wake-up costs one loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from stalk.message import Message


class InFlight:
    """Messages received and not yet settled, each with when its lease was last extended."""

    def __init__(self) -> None:
        #: message -> monotonic time of its receipt or last lease extension.
        self._held: dict[Message, float] = {}
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._held)

    def __bool__(self) -> bool:
        return bool(self._held)

    def __contains__(self, message: object) -> bool:
        return message in self._held

    def __iter__(self) -> Iterator[Message]:
        return iter(list(self._held))

    def hold(self, messages: Iterable[Message], now: float) -> None:
        """Start tracking ``messages``, received at monotonic ``now``."""
        held = self._held
        for message in messages:
            held[message] = now

    def settled(self, message: Message) -> bool:
        """Stop tracking ``message`` and wake slot waiters; False if it was not held."""
        if self._held.pop(message, None) is None:
            return False
        self._changed.set()
        return True

    def settled_all(self, messages: Iterable[Message]) -> None:
        """:meth:`settled` for a batch (an ack batch): one wake-up for all of them."""
        pop = self._held.pop
        for message in messages:
            pop(message, None)
        self._changed.set()

    def fence(self, lease_s: float) -> Callable[[Message], bool]:
        """Return a check that is True while a message is held and its lease (``lease_s`` from
        its last extension) has not lapsed. Safe from a handler thread: one dict read. One
        closure, as a handler thread calls it for every message it takes."""
        held_at, monotonic = self._held.get, time.monotonic

        def holds(message: Message) -> bool:
            at = held_at(message)
            return at is not None and monotonic() - at < lease_s

        return holds

    def free(self, capacity: int) -> int:
        """Return how many more messages fit under ``capacity`` (may be negative after a scale
        down)."""
        return capacity - len(self._held)

    def due_for_extension(self, now: float, older_than_s: float) -> list[Message]:
        """Return the messages whose lease was last extended ``older_than_s`` ago."""
        return [m for m, at in self._held.items() if now - at >= older_than_s]

    def extended(self, message: Message, at: float) -> None:
        """Record that the broker extended ``message``'s lease at monotonic ``at`` (only after it
        did: the fence trusts this time, so a failed heartbeat must not move it)."""
        if message in self._held:
            self._held[message] = at

    def notify(self) -> None:
        """Wake every waiter to re-check (a scale, a state change, a stop)."""
        self._changed.set()

    async def changed(self, timeout_s: float | None = None) -> None:
        """Wait for the next change or :meth:`notify`, at most ``timeout_s``."""
        self._changed.clear()
        if timeout_s is None:
            await self._changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._changed.wait()

    async def emptied(self, deadline: float, give_up: asyncio.Event | None = None) -> bool:
        """Wait until nothing is held or monotonic ``deadline`` passes; True if emptied.

        ``give_up`` set (a second stop signal) ends the wait early too.
        """
        while self._held and (give_up is None or not give_up.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.changed(remaining)
        return not self._held
