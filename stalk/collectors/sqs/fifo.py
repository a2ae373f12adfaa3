"""In-group order for SQS FIFO queues when the engine runs several handlers at once.

SQS keeps a FIFO group's order on the broker side: while any message of a group is in flight
(received, not deleted, not visible again), no later message of that group is handed to anyone.
That is why a retry uses ChangeMessageVisibility: the retried message stays in flight for its
delay and the rest of its group waits behind it, across every worker, surviving crashes.

One receive may however return several messages of the same group, and with ``concurrency > 1``
the engine would run them side by side, so message 2 could be acked before message 1 failed.
:class:`GroupGate` prevents that inside one worker: it hands the engine at most one message per
group at a time and holds the rest (still leased) until the one ahead is deleted. When the one
ahead is retried or released, the held ones are given back to SQS (visibility 0); the group is
still locked by the invisible message ahead, so they come back after it, in order. The cost: each
such hand-back counts one receive of the held messages (``ApproximateReceiveCount``); the adapter
subtracts those it knows of in this process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from stalk.message import Message

#: Function returning a message's FIFO group id (``None`` for messages outside any group).
GroupOf = Callable[[Message], "str | None"]


class GroupGate:
    """Let at most one message per FIFO group be with the engine; hold the others in order.

    Args:
        group_of: reads a message's group id.
        lease_s: how long a lease lasts; a group whose head was neither settled nor extended for
            that long is considered given back by SQS (its settle failed), so it stops blocking.
    """

    def __init__(self, group_of: GroupOf, lease_s: float) -> None:
        self._group_of = group_of
        self.lease_s = lease_s
        #: group -> monotonic time its head was handed out or last extended.
        self._busy: dict[str, float] = {}
        #: group -> (monotonic time held or last extended, message), oldest first.
        self._held: dict[str, deque[tuple[float, Message]]] = {}

    @property
    def held_count(self) -> int:
        """Messages held back, leased, waiting for the one ahead of them."""
        return sum(len(q) for q in self._held.values())

    def admit(self, messages: Iterable[Message]) -> list[Message]:
        """Return the received messages the engine may run now; hold the rest in group order."""
        now = time.monotonic()
        out: list[Message] = []
        for message in messages:
            group = self._group_of(message)
            if group is None:
                out.append(message)
            elif group in self._busy or group in self._held:
                self._held.setdefault(group, deque()).append((now, message))
            else:
                self._busy[group] = now
                out.append(message)
        return out

    def take(self, limit: int) -> list[Message]:
        """Return up to ``limit`` held messages whose group is free.

        Held messages whose lease has lapsed are dropped: SQS has them back and will deliver
        them again, so nobody needs them here.
        """
        now = time.monotonic()
        stale_before = now - self.lease_s
        for group, since in list(self._busy.items()):
            if since < stale_before:
                del self._busy[group]
        ready: list[Message] = []
        for group, queue in list(self._held.items()):
            while queue and queue[0][0] < stale_before:
                queue.popleft()
            if queue and group not in self._busy and len(ready) < limit:
                ready.append(queue.popleft()[1])
                self._busy[group] = now
            if not queue:
                del self._held[group]
        return ready

    def touch(self, message: Message) -> list[Message]:
        """Note a heartbeat of ``message``; return the held messages of its group to extend too."""
        group = self._group_of(message)
        if group is None or group not in self._busy:
            return []
        now = time.monotonic()
        self._busy[group] = now
        queue = self._held.get(group, deque())
        for i, (_, held) in enumerate(queue):
            queue[i] = (now, held)
        return [held for _, held in queue]

    def done(self, message: Message) -> None:
        """The group's head was deleted: the next held message of the group may run."""
        group = self._group_of(message)
        if group is not None:
            self._busy.pop(group, None)

    def abandon(self, message: Message) -> list[Message]:
        """The head was retried or released: return the held messages of its group to give back."""
        group = self._group_of(message)
        if group is None:
            return []
        self._busy.pop(group, None)
        return [held for _, held in self._held.pop(group, deque())]

    def drain(self) -> list[Message]:
        """Forget everything and return every held message (to give back on close)."""
        held = [m for queue in self._held.values() for _, m in queue]
        self._held.clear()
        self._busy.clear()
        return held
