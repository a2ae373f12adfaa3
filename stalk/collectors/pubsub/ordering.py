"""Per-key order across retries for subscriptions with message ordering.

Pub/Sub delivers the messages of one ordering key in publish order, but a message that is nacked
or whose deadline is modified comes back *after* later ones of its key (measured: 0,1,2,...,9,3).
With ``concurrency > 1`` the engine would also run two messages of one key side by side.
:class:`KeyGate` prevents both inside one worker, as the SQS FIFO group gate does: at most one
message per key is with the engine; later ones are held here (still leased, heartbeated by the
adapter) until the one ahead is acked or routed to the error topic. When the one ahead is
retried, its key stays closed until it comes back (matched by ``Message.id``, which republished
copies keep) or its delay plus :data:`AWAIT_GRACE_S` has passed. A release at shutdown gives the
held ones back with it. No I/O here; the adapter does the calls.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from stalk.message import Message

#: How long past its retry delay a key waits for its retried message before moving on (it may
#: have been taken by another worker, or lost with a restarted emulator).
AWAIT_GRACE_S = 60.0


#: Function returning a message's ordering key ('' for none).
KeyOf = Callable[[Message], str]


class KeyGate:
    """At most one message per ordering key with the engine; the rest held in arrival order."""

    def __init__(self, key_of: KeyOf) -> None:
        self._key_of = key_of
        #: key -> id of the message with the engine, or awaited back from a retry.
        self._head: dict[str, str] = {}
        #: key -> monotonic deadline while its head is away on a retry.
        self._away: dict[str, float] = {}
        self._held: dict[str, deque[Message]] = {}

    def held(self) -> list[Message]:
        """Every message held back (to heartbeat, or to give back on close)."""
        return [m for queue in self._held.values() for m in queue]

    def admit(self, messages: Iterable[Message]) -> list[Message]:
        """Return the delivered messages the engine may run now; hold the rest."""
        out: list[Message] = []
        for message in messages:
            key = self._key_of(message)
            head = self._head.get(key) if key else None
            if not key:
                out.append(message)
            elif head is None or (head == message.id and key in self._away):
                self._head[key] = message.id
                self._away.pop(key, None)
                out.append(message)
            else:
                self._hold(key, message)
        return out

    def _hold(self, key: str, message: Message) -> None:
        """Hold ``message``; a redelivery of one already held takes its place (Pub/Sub may
        redeliver a key's later messages after a nack, with new ack ids)."""
        queue = self._held.setdefault(key, deque())
        for i, held in enumerate(queue):
            if held.id == message.id:
                queue[i] = message
                return
        queue.append(message)

    def done(self, message: Message) -> list[Message]:
        """The head was acked or routed: return the next message of its key to run, if any."""
        key = self._key_of(message)
        if not key or self._head.get(key) != message.id:
            return []
        del self._head[key]
        self._away.pop(key, None)
        return self._next(key)

    def retried(self, message: Message, delay_s: float) -> None:
        """The head waits for its retry: its key stays closed until it is back."""
        key = self._key_of(message)
        if key and self._head.get(key) == message.id:
            self._away[key] = time.monotonic() + delay_s + AWAIT_GRACE_S

    def released(self, message: Message) -> list[Message]:
        """The head went back unhandled: return its held key-mates, to give back behind it."""
        key = self._key_of(message)
        if not key or self._head.get(key) != message.id:
            return []
        del self._head[key]
        self._away.pop(key, None)
        return list(self._held.pop(key, deque()))

    def overdue(self) -> list[Message]:
        """Open the keys whose retried head has not come back in time; return what may run."""
        now = time.monotonic()
        ready: list[Message] = []
        for key, deadline in list(self._away.items()):
            if deadline < now:
                del self._away[key]
                self._head.pop(key, None)
                ready += self._next(key)
        return ready

    def drain(self) -> list[Message]:
        """Forget everything; return every held message (to give back on close)."""
        held = self.held()
        self._held.clear()
        self._head.clear()
        self._away.clear()
        return held

    def _next(self, key: str) -> list[Message]:
        queue = self._held.get(key)
        if not queue:
            self._held.pop(key, None)
            return []
        message = queue.popleft()
        if not queue:
            del self._held[key]
        self._head[key] = message.id
        return [message]
