"""Settings, features and name rules of the ``local`` backend (re-exported by its module)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from stalk.collectors.base import AdapterFeatures, AdapterSettings
from stalk.errors import ConfigError

#: Where the file lives when no ``path`` is given: beside the project, hidden.
DEFAULT_PATH = "./.stalk/stalk.db"
#: What a queue, error topic or topic name may look like: no path separators, no junk.
QUEUE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,199}")

LOCAL_FEATURES = AdapterFeatures(
    native_delay=True,
    max_delay_s=None,
    delay_precision_s=0.5,
    ordering=True,
    persistent=True,
    visibility_timeout=True,
    backlog=True,
    max_batch=100,  # a lease is one UPDATE … RETURNING, an ack one DELETE transaction
)


class LocalSettings(AdapterSettings):
    """Settings of the ``local`` backend (env ``STALK_LOCAL_<KEY>``)."""

    model_config = SettingsConfigDict(env_prefix="STALK_LOCAL_", extra="forbid")

    #: The SQLite file; its directory is created 0700 and the file 0600.
    path: str = DEFAULT_PATH
    #: ``full``: a publish that returned survives power loss (fsync); ``normal``: survives any
    #: process crash, and power loss may drop the last publishes (not corrupt the file).
    durability: Literal["full", "normal"] = "full"
    #: Publish to this topic (a copy per subscription); a consumer subscribes its source to it.
    topic: str | None = None
    #: Largest body a publish takes (Continuum's 1 MiB); bigger raises ``MessageTooLarge``.
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)
    #: Most messages one queue may hold (in every state); a publish past it raises ``QueueFull``.
    #: Continuum's 1,000 is too small for batch jobs; a million 1 KiB rows is about 1 GB.
    max_queue_length: int | None = Field(default=1_000_000, ge=1)
    #: Messages older than this when leased go to the error topic, reason ``expired``.
    #: ``None`` (default): they never expire; a stopped consumer must not empty a queue.
    message_ttl_s: float | None = Field(default=None, gt=0)
    #: How long to wait for another process's write lock before ``BackendUnavailable``.
    lock_timeout_s: float = Field(default=30.0, gt=0)


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a valid queue or topic name.

    Raises:
        ConfigError: saying which name and what is allowed.
    """
    if not QUEUE_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
        raise ConfigError(
            f"local backend: {what} {shown!r} is not a valid name; use 1-200 letters, digits "
            "and . _ - : @ (no path separators or spaces)"
        )
    return name
