"""The conformance kit: the same semantic tests for every adapter, ours and third parties'.

Subclass :class:`AdapterHarness` to say how to build your adapter, then let pytest collect the
suite against it::

    from stalk.testing import AdapterHarness, ConformanceSuite

    class KafkaHarness(AdapterHarness):
        def make_adapter(self, source, error_topic):
            return KafkaAdapter(source, error_topic=error_topic, settings=...)

    class TestKafkaConformance(ConformanceSuite):
        @pytest.fixture
        def harness(self):
            return KafkaHarness()

The ``features`` your adapter declares tell the suite what to expect (as Watermill's universal
pub/sub tests do): each field gates or bounds a test, and a test skips, saying why, where a
feature is not promised. Your harness may also set:

- ``visibility_timeout_s`` (2 s): the lease the suite's collectors take. Tests that assert a
  message is gone watch past it, so an ``ack``, ``extend`` or ``release`` that does nothing
  fails. Raise it if your broker's leases are coarser.
- ``patience_s`` (30 s): how long to wait for what should happen.
- ``restart()``: restart the broker for the ``persistent`` test; by default that test skips.

Needs pytest, which the core install does not.
"""

from stalk.testing.brokers import require_broker
from stalk.testing.conformance import ConformanceSuite
from stalk.testing.harness import AdapterHarness, MemoryHarness, Recorder

__all__ = ["AdapterHarness", "ConformanceSuite", "MemoryHarness", "Recorder", "require_broker"]
