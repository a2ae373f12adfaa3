"""The nsq backend: an NSQ topic consumed on a channel of nsqd, through pynsq.

See :mod:`stalk.collectors.nsq.adapter` for the scheme and ``docs/nsq.md`` for operations.
"""

from stalk.collectors.nsq.adapter import NSQAdapter
from stalk.collectors.nsq.settings import NSQSettings

__all__ = ["NSQAdapter", "NSQSettings"]
