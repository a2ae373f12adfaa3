"""``mode=streaming``: not implemented yet (see issue 13); ``mode=pull`` works."""

from __future__ import annotations

from stalk.collectors.base import PollingAdapter
from stalk.collectors.pubsub.adapter import MODES, PubSubAdapter
from stalk.errors import ConfigError
from stalk.message import Message


class PubSubStreamingAdapter(PubSubAdapter, PollingAdapter):
    """Placeholder: refuses to consume until the streaming intake lands."""

    async def get_messages(self, max_messages: int, wait_s: float) -> list[Message]:
        raise ConfigError("pubsub mode=streaming is not implemented yet; use mode=pull")


MODES["streaming"] = PubSubStreamingAdapter
