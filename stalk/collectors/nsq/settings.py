"""Options of the nsq backend: ``--option KEY=VALUE`` or ``STALK_NSQ_<KEY>``."""

from __future__ import annotations

import re

from pydantic import field_validator
from pydantic_settings import SettingsConfigDict

from stalk.collectors.base import AdapterSettings

#: nsqd's rule for topic and channel names (``protocol.IsValidTopicName``), 1-64 characters.
NAME_RE = re.compile(r"^[.a-zA-Z0-9_-]{1,64}(#ephemeral)?$")

#: nsqd's ``--max-msg-size`` default: one byte more is ``E_BAD_MESSAGE`` and a closed connection.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: nsqd's ``--max-body-size`` default: the whole of one MPUB.
DEFAULT_MAX_BODY_BYTES = 5 * 1024 * 1024
#: nsqd's ``--max-req-timeout`` default: REQ longer is clamped silently, DPUB longer is refused.
DEFAULT_MAX_REQ_TIMEOUT_S = 3600.0
#: nsqd's ``--max-msg-timeout`` default: the longest lease IDENTIFY may ask for.
DEFAULT_MAX_MSG_TIMEOUT_S = 900.0


class NSQSettings(AdapterSettings):
    """Where nsqd is and how to talk to it.

    Attributes:
        channel: the channel stalk consumes the source topic on. The Go Stalk hard-coded
            ``stalk``; it stays the default so both can share a channel during a migration.
        nsqd: comma-separated nsqd TCP addresses (``host:port``); empty with no ``lookupd``
            means ``127.0.0.1:4150``. Publishing goes here.
        lookupd: comma-separated nsqlookupd HTTP addresses; when set, the reader discovers the
            nsqd nodes of the topic through them (and publishing uses their nodes if ``nsqd``
            is empty).
        nsqd_http: nsqd HTTP address for ``stalk stats``; empty = the first ``nsqd`` host with
            its TCP port + 1 (4150 -> 4151, nsqd's own pairing of defaults).
        reconnect_interval_s: wait between reconnects to a lost nsqd (pynsq hard-codes 15 s).
        connect_timeout_s: how long ``open`` waits for nsqd before the one-line error.
        msg_timeout_s: lease of a delivered message (IDENTIFY ``msg_timeout``); 0 = the
            engine's ``visibility_timeout_s``. Clamped to [1, ``max_msg_timeout_s``].
        max_msg_timeout_s: nsqd's ``--max-msg-timeout``.
        max_req_timeout_s: nsqd's ``--max-req-timeout``; longer delays are parked.
        max_message_bytes: nsqd's ``--max-msg-size``; checked before every publish.
        max_body_bytes: nsqd's ``--max-body-size``; MPUB batches are split to stay under it.
        lookupd_poll_interval_s: how often the reader asks lookupd for new nodes.
    """

    model_config = SettingsConfigDict(env_prefix="STALK_NSQ_", extra="forbid")

    channel: str = "stalk"
    nsqd: str = ""
    lookupd: str = ""
    nsqd_http: str = ""
    reconnect_interval_s: float = 1.0
    connect_timeout_s: float = 5.0
    msg_timeout_s: float = 0.0
    max_msg_timeout_s: float = DEFAULT_MAX_MSG_TIMEOUT_S
    max_req_timeout_s: float = DEFAULT_MAX_REQ_TIMEOUT_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    lookupd_poll_interval_s: float = 60.0

    @field_validator("channel")
    @classmethod
    def _valid_channel(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError("an NSQ channel name is 1-64 of [.a-zA-Z0-9_-] (#ephemeral allowed)")
        return value

    @field_validator("nsqd")
    @classmethod
    def _valid_nsqd(cls, value: str) -> str:
        for address in split_addresses(value):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{address!r} is not host:port")
        return value

    @field_validator("reconnect_interval_s", "connect_timeout_s", "max_req_timeout_s")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    def nsqd_addresses(self) -> list[str]:
        """Return the nsqd TCP addresses, in the order given."""
        return split_addresses(self.nsqd)

    def lookupd_addresses(self) -> list[str]:
        """Return the lookupd HTTP addresses, in the order given."""
        return split_addresses(self.lookupd)

    def http_address(self) -> str:
        """Return nsqd's HTTP address for ``/stats`` (see ``nsqd_http``)."""
        if self.nsqd_http:
            return self.nsqd_http
        addresses = self.nsqd_addresses()
        if not addresses:
            return ""
        host, _, port = addresses[0].rpartition(":")
        return f"{host}:{int(port) + 1}"

    def lease_s(self, visibility_timeout_s: float) -> float:
        """Return the msg_timeout to IDENTIFY with, clamped to what nsqd accepts."""
        wanted = self.msg_timeout_s or visibility_timeout_s
        return min(max(wanted, 1.0), self.max_msg_timeout_s)


def split_addresses(value: str) -> list[str]:
    """Split a comma-separated address list, dropping blanks."""
    return [part.strip() for part in value.split(",") if part.strip()]
