"""The ``amqp`` backend: RabbitMQ (AMQP 0-9-1) through aio-pika and aiormq.

``adapter`` maps the seam onto AMQP; ``consumer`` owns the consuming channel and its settle book;
``broker`` connects, declares and publishes with confirms; ``topology`` names queues, delay
buckets and headers (pure); ``settings`` holds the ``--option`` keys.
"""

from stalk.collectors.amqp.adapter import AMQP_FEATURES, AMQPAdapter
from stalk.collectors.amqp.settings import AMQPSettings

__all__ = ["AMQP_FEATURES", "AMQPAdapter", "AMQPSettings"]
