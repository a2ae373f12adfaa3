"""The ``pubsub`` backend: Google Pub/Sub (and its emulator) through google-cloud-pubsub.

``adapter`` maps the seam onto Pub/Sub for both modes; ``pull`` is the polling intake (unary
pull), ``streaming`` the push intake (streaming pull); ``client`` makes the calls, ``wire``
keeps names and attributes within the service's rules. ``docs/pubsub.md`` has operations.
"""

from stalk.collectors.pubsub.adapter import PubSubAdapter
from stalk.collectors.pubsub.pull import PubSubPullAdapter
from stalk.collectors.pubsub.settings import PUBSUB_FEATURES, PubSubSettings
from stalk.collectors.pubsub.streaming import PubSubStreamingAdapter

__all__ = [
    "PUBSUB_FEATURES",
    "PubSubAdapter",
    "PubSubPullAdapter",
    "PubSubSettings",
    "PubSubStreamingAdapter",
]
