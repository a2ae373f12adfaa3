"""The amqp adapter's pure parts: delay buckets, headers, URLs and settings (no broker)."""

from __future__ import annotations

import pytest

from stalk.collectors.amqp import AMQPAdapter, AMQPSettings
from stalk.collectors.amqp.topology import (
    LADDER,
    MAX_DELAY_MS,
    bucket_ms,
    delay_expires_ms,
    delay_queue_arguments,
    header_int,
    redeclare_every_s,
    republish_headers,
    safe_url,
)
from stalk.errors import ConfigError


@pytest.mark.parametrize(
    ("delay_s", "ms"),
    [
        (0, 0),
        (0.009, 0),
        (0.01, 10),
        (0.0101, 11),
        (1, 1000),
        (1.0001, 1100),
        (2, 2000),
        (2.1, 2250),
        (5, 5000),
        (59, 60_000),
        (300, 300_000),
        (1e9, MAX_DELAY_MS),
    ],
)
def test_bucket_rounds_up_to_the_ladder(delay_s: float, ms: int) -> None:
    assert bucket_ms(delay_s) == ms


def test_buckets_are_never_early_and_at_most_20_percent_late() -> None:
    for i in range(1, 4000):
        delay_s = i * 0.0137
        ms = bucket_ms(delay_s)
        assert delay_s * 1000 <= ms <= delay_s * 1000 * 1.2 + 1e-6
    assert all(b / a <= 1.2 for a, b in zip(LADDER, (*LADDER[1:], 10.0), strict=True))


def test_delay_queue_outlives_its_messages() -> None:
    for ms in (10, 1000, 3_600_000, MAX_DELAY_MS):
        assert delay_expires_ms(ms) > ms
        assert delay_expires_ms(ms) < 2**32
        assert redeclare_every_s(ms) > 0
        # a message published just before a redeclare is due still leaves before expiry
        assert ms / 1000 + redeclare_every_s(ms) < delay_expires_ms(ms) / 1000
    args = delay_queue_arguments("orders", 5000, "quorum")
    assert args["x-dead-letter-routing-key"] == "orders"
    assert args["x-dead-letter-strategy"] == "at-least-once"


def test_republish_drops_broker_headers_and_keeps_producer_types() -> None:
    raw = {"n": 7, "x-death": [{"count": 1}], "x-first-death-queue": "q", "x-delivery-count": 2}
    out = republish_headers(raw, {"n": "7", "stalk-first-failure-at": "1.0"}, {"stalk-attempt": 3})
    assert out == {"n": 7, "stalk-first-failure-at": "1.0", "stalk-attempt": 3}


def test_republish_drops_broker_headers_the_attributes_show() -> None:
    """A quorum queue's count reaches the handler as an attribute; an error copy that kept it
    was counted as delivered six times by the error topic's reader and routed on as poison."""
    attributes = {"n": "7", "x-delivery-count": "5", "x-death": "[]", "x-first-death-queue": "q"}
    out = republish_headers({"n": 7, "x-delivery-count": 5}, attributes, {"stalk-reason": "poison"})
    assert out == {"n": 7, "stalk-reason": "poison"}


@pytest.mark.parametrize(("value", "parsed"), [(3, 3), ("4", 4), (b"5", 5), ("x", 1), (None, 1)])
def test_header_int_reads_other_producers(value: object, parsed: int) -> None:
    assert header_int(value, 1) == parsed


def test_safe_url_hides_credentials() -> None:
    text = safe_url("amqp://alice:s3cret@rabbit.internal:5673/prod")
    assert text == "amqp://rabbit.internal:5673 vhost prod"
    assert safe_url("amqps://u:p@h/") == "amqps://h:5671 vhost /"


def test_options_parse_and_reject_unknown_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STALK_AMQP_QUEUE_TYPE", "quorum")
    adapter = AMQPAdapter.from_options("q", None, {"declare": "Passive", "prefetch": "50"})
    assert isinstance(adapter.settings, AMQPSettings)
    assert (adapter.settings.declare, adapter.settings.prefetch) == ("passive", 50)
    assert adapter.settings.queue_type == "quorum"
    with pytest.raises(ConfigError, match="no option 'colour'"):
        AMQPAdapter.from_options("q", None, {"colour": "blue"})
    with pytest.raises(ConfigError, match="declare"):
        AMQPAdapter.from_options("q", None, {"declare": "maybe"})


def test_adapter_needs_no_bind_for_defaults_and_never_sees_the_retry_limit() -> None:
    adapter = AMQPAdapter("q")
    assert adapter.error_topic == "q-errors"
    assert not hasattr(adapter, "max_retries"), "policy (the retry limit) lives in the engine"
    with pytest.raises(ConfigError, match="no option 'max_retries'"):
        AMQPAdapter.from_options("q", None, {"max_retries": "3"})


def test_every_bucket_a_delay_can_get_is_in_all_buckets() -> None:
    """Hole 8: ``backlog()`` finds an earlier process's delay queues by these names."""
    from stalk.collectors.amqp.topology import MAX_DELAY_MS, all_buckets, bucket_ms

    every = all_buckets()
    assert list(every) == sorted(set(every)) and every[-1] == MAX_DELAY_MS
    delays = [0.01, 0.0105, 0.9999, 1.0, 2.0, 2.2, 2.26, 5.0, 20.0, 299.0, 86400.0, 1e7, 1e12]
    for delay_s in delays + [x / 1000 for x in range(10, 100_000, 7)]:
        assert bucket_ms(delay_s) in every, delay_s
