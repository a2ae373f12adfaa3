"""The pubsub backend's options and what it guarantees: no I/O, so helpers import it freely."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stalk.collectors.base import AdapterFeatures, AdapterSettings

#: Longest ``modify_ack_deadline`` Pub/Sub takes (and so the longest retry held in place).
MAX_ACK_DEADLINE_S = 600
#: Most ack ids one ``acknowledge``/``modify_ack_deadline`` request carries: the request limit
#: is 512 KiB and an ack id is ~180 bytes on the service, so 2,500 stays well inside it.
MAX_ACK_IDS = 2500
#: Most messages one ``publish`` request may carry (the service's limit is 1,000 or 10 MB).
MAX_PUBLISH_BATCH = 1000

PUBSUB_FEATURES = AdapterFeatures(
    native_delay=True,  # modack (<= 600 s) or a parked copy: the delay lives in Pub/Sub
    max_delay_s=None,  # longer than 600 s is parked with a not-before attribute
    delay_precision_s=2.0,  # whole-second modack, plus a poll
    ordering=False,  # only per ordering key, and not across a retry without the key gate
    persistent=False,  # the emulator loses everything on restart (the service persists)
    visibility_timeout=True,  # the ack deadline
    release_keeps_attempt=False,  # with a dead-letter policy a nack is a counted delivery
    backlog=False,  # the Pub/Sub API tells no counts (Cloud Monitoring does)
    binary_body=True,
    max_batch=100,  # one unary pull
)


class PubSubSettings(AdapterSettings):
    """``--option`` keys of the pubsub backend (env ``STALK_PUBSUB_<KEY>``).

    ``PUBSUB_EMULATOR_HOST`` and Application Default Credentials work as they do for the
    Google client itself; ``emulator_host`` overrides the former for one run.
    """

    model_config = SettingsConfigDict(env_prefix="STALK_PUBSUB_", extra="forbid")

    #: Project of ids given without ``projects/P/...``; unset = GOOGLE_CLOUD_PROJECT, then the
    #: project of Application Default Credentials.
    project: str | None = None
    #: ``pull``: the engine polls with unary pull (fastest on the emulator, ~15x streaming);
    #: ``streaming``: the client library's streaming pull pushes (favoured on the service).
    mode: Literal["pull", "streaming"] = "pull"
    #: ``host:port`` of an emulator; unset = PUBSUB_EMULATOR_HOST, else the real service.
    emulator_host: str | None = None
    #: Longest one unary pull waits for messages (the engine's poll wait bounds it too).
    wait_time_s: float = Field(default=10.0, ge=0, le=60)
    #: Seconds ``open`` waits for the first answer before the one-line "unreachable" error.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds any other call may take before it counts as failed.
    call_timeout_s: float = Field(default=30.0, gt=0)
    #: Streaming: messages the stream may lease at once (its ``max_outstanding_messages``), at
    #: least the engine's concurrency. Those past the concurrency wait in the worker, leased and
    #: extended; a floor above 1 spares a stream reopen when the engine raises its limit after
    #: its careful first message.
    flow_messages: int = Field(default=10, ge=1, le=10_000)
    #: Most messages one pull asks for (Pub/Sub allows 1,000; the engine asks for its slots).
    max_messages: int = Field(default=100, ge=1, le=1000)
