"""The sqs backend's options and what it guarantees: no I/O, so helpers import it freely."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from stalk.collectors.base import AdapterFeatures, AdapterSettings

SQS_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=None,  # parked copies chain past SQS's 12 h (FIFO: capped, see above)
    delay_precision_s=2.0,  # whole seconds, plus a poll
    ordering=False,  # standard queues; FIFO queues keep order per group
    persistent=True,
    visibility_timeout=True,
    release_keeps_attempt=False,  # a release is a receive: ApproximateReceiveCount rises
    backlog=True,
    binary_body=True,  # non-text bodies travel base64 with a marker attribute
    max_batch=10,  # ReceiveMessage and DeleteMessageBatch take at most 10
)


class SQSSettings(AdapterSettings):
    """``--option`` keys of the sqs backend (env ``STALK_SQS_<KEY>``); boto3's chain fills gaps."""

    model_config = SettingsConfigDict(env_prefix="STALK_SQS_", extra="forbid")

    #: SQS-compatible endpoint (moto, LocalStack, ElasticMQ); unset = AWS_ENDPOINT_URL or AWS.
    endpoint_url: str | None = None
    #: AWS region; unset = AWS_REGION/AWS_DEFAULT_REGION/profile, else the region in a queue URL.
    region: str | None = None
    #: Longest long poll (WaitTimeSeconds). The engine's polling period bounds each poll too:
    #: raise ``--max-polling-period`` to 20 for the fewest requests on an idle queue.
    wait_time_s: int = Field(default=20, ge=0, le=20)
    #: boto3 profile (``~/.aws/config``); unset = AWS_PROFILE or the default chain.
    profile: str | None = None
    #: SQS calls at once: the adapter's threads and pooled HTTP connections.
    max_connections: int = Field(default=32, ge=2, le=512)
    #: Seconds to wait for a TCP connection before an attempt counts as failed.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    #: Attempts per call (boto3 "standard" retry mode: throttling, 5xx, connection errors).
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: FIFO MessageGroupId for a publish without a ``stalk-group-id`` attribute.
    group_id: str = "stalk"
    #: Create the source and error queue when missing (development, tests); off for production.
    create_queues: bool = False

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest:
            raise ValueError(
                "expected a URL with scheme, like http://127.0.0.1:5000 or https://sqs.eu-west-1"
                ".amazonaws.com"
            )
        return value
