"""``mode=pull``: the engine polls a subscription with unary pull (polling intake).

Each ``get_messages`` is one pull of at most what the engine asked for, a long poll of up to the
engine's wait (at most ``wait_time_s``, at least 1 s: see ``PubSubCalls.pull``). On the
emulator unary pull drains ~15x faster than streaming pull; on the service streaming is
usually the faster one.
"""

from __future__ import annotations

import logging
import math

from stalk.collectors.base import PollingAdapter
from stalk.collectors.pubsub.adapter import MODES, PubSubAdapter
from stalk.collectors.pubsub.settings import MAX_ACK_DEADLINE_S, PubSubSettings
from stalk.errors import BackendError
from stalk.message import Message

logger = logging.getLogger("stalk.collectors.pubsub")


class PubSubPullAdapter(PubSubAdapter, PollingAdapter):
    """Pull mode; see :mod:`stalk.collectors.pubsub.adapter` for the rest of the mapping."""

    def __init__(
        self,
        source: str | None = None,
        *,
        error_topic: str | None = None,
        settings: PubSubSettings | None = None,
    ) -> None:
        super().__init__(source, error_topic=error_topic, settings=settings)
        #: Messages the ordering gate let go, for the next ``get_messages``.
        self._ready: list[Message] = []

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        """One pull; parked copies are hidden again, the batch's lease set to the engine's.

        Raises:
            BackendUnavailable: the endpoint did not answer; QueueNotFound: the subscription
                is gone (an emulator restart loses it).
        """
        path = self.subscription
        if self._ready:  # let go by the ordering gate; kept leased by its heartbeat meanwhile
            ready, self._ready = self._ready[:max_messages], self._ready[max_messages:]
            return ready
        wait = min(wait_s, self.settings.wait_time_s)
        received = await self.calls.pull(path, min(max_messages, self.settings.max_messages), wait)
        if not received:
            return []
        leases = [self._lease_of(r) for r in received]
        lease_s = min(math.ceil(self.visibility_timeout_s), MAX_ACK_DEADLINE_S)
        if lease_s != self._ack_deadline_s:
            try:
                await self.calls.modify(path, [lease.ack_id for lease in leases], lease_s)
            except BackendError as exc:  # still leased for the subscription's deadline
                logger.warning("pubsub: could not set the lease of a pulled batch (%s)", exc)
        messages: list[Message] = []
        for item, lease in zip(received, leases, strict=True):
            parked = self._parked(lease)
            if parked is not None:
                await parked
            else:
                messages.append(self._message_of(lease, item.message.message_id))
        return self._admit(messages)

    def _hand(self, messages: list[Message]) -> None:
        """Keep what the ordering gate let go for the next poll."""
        self._ready.extend(messages)


MODES["pull"] = PubSubPullAdapter
