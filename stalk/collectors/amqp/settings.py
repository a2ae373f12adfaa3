"""Options of the amqp backend: no I/O, so every helper module imports them freely."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from stalk.collectors.base import AdapterSettings

QueueType = Literal["classic", "quorum"]


class AMQPSettings(AdapterSettings):
    """Options of ``--backend amqp`` (``--option key=value`` or ``STALK_AMQP_<KEY>``)."""

    model_config = SettingsConfigDict(env_prefix="STALK_AMQP_", extra="forbid")

    #: Broker URL, ``amqp://`` or ``amqps://``; user and password never appear in stalk's logs
    #: or ``describe()``. Pass a password by ``STALK_AMQP_URL`` or ``--option url=@FILE``: the
    #: command line is visible to every user of the host in ``ps``.
    url: str = "amqp://guest:guest@127.0.0.1/"
    #: Exchange to bind the source queue to ("" = none; producers publish to the queue).
    exchange: str = ""
    #: Type of ``exchange`` when stalk declares it.
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "direct"
    #: Binding key of the source on ``exchange``; default the source name.
    routing_key: str | None = None
    #: ``true``: declare source, error queue, exchange, binding. ``passive``: check they exist.
    #: ``false``: declare nothing (only the source is checked, to consume it).
    declare: Literal["true", "false", "passive"] = "true"
    #: Type of the source and error queues (and of the delay buckets).
    queue_type: QueueType = "classic"
    #: Prefetch when it should not follow the engine's concurrency (0 = follow it).
    prefetch: int = Field(default=0, ge=0, le=65535)
    #: TCP + AMQP handshake limit of one connection attempt.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    #: Keep trying to connect at ``open`` this long before failing (0 = fail at once).
    connect_wait_s: float = Field(default=0.0, ge=0)
    #: Pause between reconnection attempts after the connection was lost.
    reconnect_interval_s: float = Field(default=2.0, gt=0)
    #: Longest wait for one broker operation (publish confirm, declare, consume).
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep:
            raise ValueError("expected amqp://user:password@host:port/vhost (no scheme given)")
        if scheme.lower() not in ("amqp", "amqps"):
            raise ValueError(f"unknown scheme {scheme + '://'!r}; expected amqp:// or amqps://")
        host = rest.partition("/")[0].rpartition("@")[2]
        if not host:
            raise ValueError("no host in the URL; expected amqp://user:password@host:port/vhost")
        return value

    @field_validator("declare", mode="before")
    @classmethod
    def _normalise_declare(cls, value: object) -> object:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value.strip().lower() if isinstance(value, str) else value
