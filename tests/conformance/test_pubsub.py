"""The conformance suite on Pub/Sub: the real emulator on loopback, in both intake modes."""

from __future__ import annotations

import pytest

from stalk.testing import ConformanceSuite
from tests.brokers.pubsub import Emulator, PubSubHarness

pytestmark = pytest.mark.broker("pubsub")


class TestPubSubPullConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, pubsub_emulator: Emulator) -> PubSubHarness:
        return PubSubHarness(pubsub_emulator, mode="pull")


#: Measured on the emulator with the client library alone (no stalk): after a StreamingPull is
#: cancelled (and its channel closed) the emulator keeps it as a delivery target for ~10-20 s.
#: A message released or redelivered in that window goes to the dead stream, comes back only
#: after the 10 s ack deadline, and its ``delivery_attempt`` counts the lost delivery. Tests that
#: stop one streaming worker and expect the next to get a message at once, at an exact attempt,
#: fail there for that reason alone; the real service ends a cancelled stream at once.
ZOMBIE_STREAM = "emulator keeps a cancelled StreamingPull as a delivery target for ~10-20 s"


class TestPubSubStreamingConformance(ConformanceSuite):
    @pytest.fixture
    def harness(self, pubsub_emulator: Emulator) -> PubSubHarness:
        return PubSubHarness(pubsub_emulator, mode="streaming")

    @pytest.mark.xfail(reason=ZOMBIE_STREAM, strict=False)
    def test_retry_outlives_the_worker_that_asked(self, harness: PubSubHarness) -> None:
        super().test_retry_outlives_the_worker_that_asked(harness)

    @pytest.mark.xfail(reason=ZOMBIE_STREAM, strict=False)
    def test_lost_delivery_returns_with_next_attempt(self, harness: PubSubHarness) -> None:
        super().test_lost_delivery_returns_with_next_attempt(harness)

    @pytest.mark.xfail(reason=ZOMBIE_STREAM, strict=False)
    def test_stop_releases_unstarted_for_redelivery_at_once(self, harness: PubSubHarness) -> None:
        super().test_stop_releases_unstarted_for_redelivery_at_once(harness)

    @pytest.mark.xfail(
        reason=f"{ZOMBIE_STREAM}: late, not lost (tests/backends/test_pubsub.py::"
        "test_streaming_shutdown_with_held_messages_loses_nothing waits 90 s); often passes",
        strict=False,
    )
    def test_stop_with_in_flight_loses_nothing(self, harness: PubSubHarness) -> None:
        super().test_stop_with_in_flight_loses_nothing(harness)

    @pytest.mark.xfail(reason=f"{ZOMBIE_STREAM} (sleep cancels it; often passes)", strict=False)
    def test_sleep_stops_intake_and_wake_resumes(self, harness: PubSubHarness) -> None:
        super().test_sleep_stops_intake_and_wake_resumes(harness)

    @pytest.mark.xfail(reason=f"{ZOMBIE_STREAM} (a batch of 12 reopens the stream)", strict=False)
    def test_batch_handler_settles_each_message_on_its_own(self, harness: PubSubHarness) -> None:
        super().test_batch_handler_settles_each_message_on_its_own(harness)
