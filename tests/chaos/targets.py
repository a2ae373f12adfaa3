"""The brokers the chaos driver attacks: each one its own, started here and stopped here.

A target starts its broker (its own RabbitMQ node, nsqd or moto server: never the shared test
brokers, which other work uses), puts a :class:`~tests.chaos.proxy.Proxy` between the workers and
the broker so connections can be cut, and knows the one disruption that broker allows:

- ``local``: no server (the SQLite file is the broker): no restart, no connections to cut.
- ``sqs``: moto keeps its queues in process memory and would lose them on a restart, so the
  server is *paused* (SIGSTOP, then SIGCONT) instead.
- ``amqp`` / ``amqp-quorum``: a RabbitMQ node of our own (``chaos-<port>@localhost``, its own
  ports and data directory) is stopped and started again. Where no node of our own can start
  (no rabbitmq-server, not root nor the rabbitmq user), the shared broker is used behind the
  proxy and the "restart" is a proxy outage instead; the report says which.
- ``nsq``: our own nsqd is stopped (SIGTERM: it writes its queues, in-flight and deferred
  messages to disk) and started again on the same ports and data directory.
- ``pubsub``: the Pub/Sub emulator keeps everything in memory and loses it on a restart, so its
  Java process is *paused* (SIGSTOP, then SIGCONT) instead, as moto is; the workers reach it
  through the proxy (gRPC over plain HTTP/2), so their connections are cut too. Only the
  adapter's default mode (unary pull) is attacked: see :data:`STREAMING_NOT_RUN` for streaming.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.brokers import free_port
from tests.chaos.proxy import Proxy

BACKENDS = ("local", "sqs", "amqp", "amqp-quorum", "nsq", "pubsub")
#: Seconds a broker is left paused or stopped.
OUTAGE_S = 5.0


def pause(pid: int) -> None:
    """Stop ``pid`` for ``OUTAGE_S`` (SIGSTOP), then let it go on (SIGCONT): the outage of a
    broker that keeps no state across a restart."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(OUTAGE_S)
    finally:
        os.kill(pid, signal.SIGCONT)


def restore_env(saved: dict[str, str | None]) -> None:
    """Put the driver's environment back as ``saved`` recorded it (None: was unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Target:
    """One backend under attack: its broker, the worker's CLI arguments, its disruption."""

    name = "?"
    #: What :meth:`disrupt` does ("restart", "pause", "outage") or None when it can do nothing.
    disruption: str | None = None
    #: Why a column is empty, shown under the table.
    notes: list[str]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        tag = uuid.uuid4().hex[:8]
        self.source, self.errors = f"chaos-{tag}", f"chaos-{tag}-errors"
        self.proxy: Proxy | None = None
        self.notes = []

    def start(self) -> None:
        """Start the broker and the proxy; create the source and the error topic."""

    def stop(self) -> None:
        """Stop everything :meth:`start` started."""
        if self.proxy is not None:
            self.proxy.close()

    def cli(self) -> list[str]:
        """``--backend`` and ``--option`` arguments of a worker (through the proxy)."""
        raise NotImplementedError

    def publish_options(self) -> dict[str, Any]:
        """``AsyncPublisher`` options that reach the broker directly."""
        raise NotImplementedError

    @property
    def backend(self) -> str:
        return self.name.split("-")[0]

    def env(self) -> dict[str, str]:
        """Environment a worker needs besides the driver's own."""
        return {}

    def disrupt(self) -> None:
        """Restart (or pause) the broker, returning once it answers again."""

    def diagnose(self) -> str:
        """What the broker holds (for a report that found a loss)."""
        return "-"

    def cut(self) -> int | None:
        """Cut every worker connection; return how many were cut (None: not possible)."""
        return self.proxy.cut() if self.proxy is not None else None

    def connected(self) -> bool:
        """Whether a worker holds a connection through the proxy (always, without a proxy)."""
        return self.proxy is None or self.proxy.connections() > 0

    def publish(self, bodies: list[bytes], source: str | None = None) -> None:
        """Publish ``bodies`` to the source (in batches, as ``stalk send`` does)."""
        from stalk import AsyncPublisher

        async def go() -> None:
            async with AsyncPublisher(
                self.backend, source or self.source, **self.publish_options()
            ) as publisher:
                for start in range(0, len(bodies), 100):
                    await publisher.publish_batch(bodies[start : start + 100])

        asyncio.run(go())


class LocalTarget(Target):
    name = "local"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.path = workdir / "stalk.db"
        self.notes.append("local: no broker process to restart and no connection to cut")

    def cli(self) -> list[str]:
        return ["--backend", "local", "--option", f"path={self.path}"]

    def publish_options(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def cut(self) -> int | None:
        return None


class SQSTarget(Target):
    name = "sqs"
    disruption = "pause"

    def start(self) -> None:
        from tests.brokers.sqs import _UNSET, FAKE_AWS_ENV, REGION, MotoServer, create_queue

        # The driver's own boto3 (publishing, diagnose) gets the fake credentials too; stop()
        # puts the environment back as it was.
        self.saved_env = {k: os.environ.get(k) for k in (*_UNSET, *FAKE_AWS_ENV)}
        for key in _UNSET:
            os.environ.pop(key, None)
        os.environ.update(FAKE_AWS_ENV)
        self.region = REGION
        self.server = MotoServer(self.workdir / "moto.log")
        problem = self.server.wait_ready()
        if problem is not None:
            self.server.stop()
            raise RuntimeError(problem)
        for name in (self.source, self.errors):
            create_queue(self.server.endpoint, name)
        self.proxy = Proxy("127.0.0.1", self.server.port)
        self.notes.append(
            f"sqs: moto keeps its queues in memory, so it was paused (SIGSTOP {OUTAGE_S:.0f} s,"
            " SIGCONT) instead of restarted"
        )

    def stop(self) -> None:
        super().stop()
        if self.server.process.poll() is None:
            os.kill(self.server.process.pid, signal.SIGCONT)
        self.server.stop()
        restore_env(self.saved_env)

    def env(self) -> dict[str, str]:
        from tests.brokers.sqs import FAKE_AWS_ENV

        return dict(FAKE_AWS_ENV)

    def cli(self) -> list[str]:
        assert self.proxy is not None
        return [
            "--backend", "sqs",
            "--option", f"endpoint_url=http://127.0.0.1:{self.proxy.port}",
            "--option", f"region={self.region}",
        ]  # fmt: skip

    def publish_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.server.endpoint, "region": self.region}

    def diagnose(self) -> str:
        from tests.brokers.sqs import sqs_client

        client = sqs_client(self.server.endpoint)
        parts = []
        for name in (self.source, self.errors):
            url = client.get_queue_url(QueueName=name)["QueueUrl"]
            attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
            parts.append(f"{name}: {attributes['Attributes']}")
        return "; ".join(parts)

    def disrupt(self) -> None:
        pause(self.server.process.pid)


class RabbitNode:
    """A RabbitMQ node of our own: ``chaos-<port>@localhost`` with its own ports and data."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"chaos{self.port}@localhost"
        self.base = Path(tempfile.mkdtemp(prefix="stalk-chaos-rmq-"))
        self.log = workdir / "rabbitmq.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.as_root = os.getuid() == 0
        if self.as_root:
            shutil.chown(self.base, "rabbitmq")

    @staticmethod
    def available() -> bool:
        if not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
            return False
        if os.getuid() == 0:
            return True
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name == "rabbitmq"

    def _env(self) -> dict[str, str]:
        return {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "none"),
        }

    def start(self) -> None:
        env = " ".join(f"{k}={v}" for k, v in self._env().items())
        script = f"cd /var/lib/rabbitmq && exec env {env} /usr/lib/rabbitmq/bin/rabbitmq-server"
        args = (
            ["su", "rabbitmq", "-s", "/bin/sh", "-c", script]
            if self.as_root
            else ["sh", "-c", script]
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while self.ctl("-q", "ping", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq node did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)
        self.ctl("-q", "await_startup")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            capture_output=True,
            timeout=120,
            check=check,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.ctl("-q", "stop", check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class AMQPTarget(Target):
    name = "amqp"
    queue_type = "classic"

    def start(self) -> None:
        self.node: RabbitNode | None = None
        if RabbitNode.available():
            self.node = RabbitNode(self.workdir)
            self.node.start()
            self.url = f"amqp://guest:guest@127.0.0.1:{self.node.port}/"
            self.disruption = "restart"
            self.proxy = Proxy("127.0.0.1", self.node.port)
            self.notes.append(
                f"{self.name}: its own RabbitMQ node ({self.node.name}) stopped and started again"
            )
        else:
            from urllib.parse import urlsplit

            from tests.brokers.amqp import AMQP_URL

            self.url = AMQP_URL
            where = urlsplit(AMQP_URL)
            self.proxy = Proxy(where.hostname or "127.0.0.1", where.port or 5672)
            self.disruption = "outage"
            self.notes.append(
                f"{self.name}: no RabbitMQ node of our own could start; the shared broker stayed"
                f" up and the proxy refused connections for {OUTAGE_S:.0f} s instead"
            )

    def stop(self) -> None:
        super().stop()
        if self.node is not None:
            self.node.cleanup()
        else:
            from tests.brokers.amqp import delete_topology

            asyncio.run(delete_topology(self.url, [self.source, self.errors]))

    def _url(self, port: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    def cli(self) -> list[str]:
        assert self.proxy is not None
        return [
            "--backend", "amqp",
            "--option", f"url={self._url(self.proxy.port)}",
            "--option", f"queue_type={self.queue_type}",
        ]  # fmt: skip

    def publish_options(self) -> dict[str, Any]:
        return {"url": self.url, "queue_type": self.queue_type}

    def disrupt(self) -> None:
        if self.node is not None:
            self.node.stop()
            time.sleep(1)
            self.node.start()
        else:
            assert self.proxy is not None
            self.proxy.refuse_for(OUTAGE_S)

    def diagnose(self) -> str:
        if self.node is None:
            return "-"
        done = self.node.ctl("-q", "list_queues", "name", "type", "messages", check=False)
        return " | ".join(done.stdout.decode().split("\n"))


class QuorumTarget(AMQPTarget):
    name = "amqp-quorum"
    queue_type = "quorum"


class NSQTarget(Target):
    name = "nsq"
    disruption = "restart"

    def start(self) -> None:
        from tests.brokers.nsq import NSQD, nsqd_binary

        binary = nsqd_binary()
        if binary is None:
            raise RuntimeError("no nsqd binary (scripts/start-nsqd.sh builds one)")
        self.server = NSQD(binary)
        self.server.start()
        for topic in (self.source, self.errors):
            self.server.create_channel(topic, "stalk")
        self.proxy = Proxy("127.0.0.1", self.server.tcp_port)
        self.notes.append("nsq: its own nsqd stopped (SIGTERM) and started again on the same data")

    def stop(self) -> None:
        super().stop()
        self.server.cleanup()

    def cli(self) -> list[str]:
        assert self.proxy is not None
        return [
            "--backend", "nsq",
            "--option", f"nsqd=127.0.0.1:{self.proxy.port}",
            "--option", f"nsqd_http={self.server.http}",
        ]  # fmt: skip

    def publish_options(self) -> dict[str, Any]:
        return {"nsqd": self.server.tcp, "nsqd_http": self.server.http}

    def diagnose(self) -> str:
        parts = []
        for topic in (self.source, self.errors):
            stats = self.server.stats(topic)
            depth, deferred = stats.get("depth"), stats.get("deferred_count")
            parts.append(f"{topic}: depth {depth}, deferred {deferred}")
        return "; ".join(parts)

    def disrupt(self) -> None:
        self.server.stop()
        time.sleep(1)
        self.server.start()


#: Why there is no ``pubsub-streaming`` target (said under the pubsub table).
STREAMING_NOT_RUN = (
    "pubsub: mode=streaming is not attacked: on the emulator a SIGKILLed StreamingPull counts"
    " deliveries against the whole backlog, not only what it leased, and holds it back ~70 s (two"
    " killed plain google-cloud-pubsub subscribers of 10 leases each: all 60 messages came back"
    " together after 81 s with delivery_attempt 4), so healthy messages reach the error topic as"
    " poison and the stream stands still past the 60 s stall limit (unary pull, the default, has"
    " neither problem)"
)


class PubSubTarget(Target):
    """A Pub/Sub emulator of our own, consumed in the adapter's default mode (unary pull).

    The source is a subscription of a topic of the same id and the error topic is a topic with a
    subscription of the same id too (how ``tests.brokers.pubsub.create`` makes them), so the
    driver reads the error topic as ``--source <errors>``; ``<errors>-errors`` exists as well,
    should the reader route a copy on. Every subscription has a dead-letter policy far above
    ``max_retries``: Pub/Sub then counts deliveries, a worker killed by a pill included, so
    stalk's poison rule sees each death.
    """

    name = "pubsub"
    disruption = "pause"
    mode = "pull"

    def start(self) -> None:
        from tests.brokers.pubsub import HINT, PROJECT, Emulator, create, emulator_binary

        binary = emulator_binary()
        if binary is None:
            raise RuntimeError(f"no Pub/Sub emulator: {HINT}")
        self.project = PROJECT
        # The driver's own clients (publishing, diagnose) reach the emulator directly; stop()
        # puts the environment back as it was.
        self.saved_env = {k: os.environ.get(k) for k in ("PUBSUB_EMULATOR_HOST",)}
        self.server = Emulator(binary)
        self.server.start()
        os.environ["PUBSUB_EMULATOR_HOST"] = self.server.host

        async def topology() -> None:
            for name in (self.source, self.errors, f"{self.errors}-errors"):
                await create(self.server.host, name)

        asyncio.run(topology())
        self.proxy = Proxy("127.0.0.1", self.server.port)
        self.notes.append(
            f"{self.name}: the emulator keeps its topics in memory, so its JVM was paused"
            f" (SIGSTOP {OUTAGE_S:.0f} s, SIGCONT) instead of restarted; mode={self.mode}"
        )
        self.notes.append(STREAMING_NOT_RUN)

    def java_pid(self) -> int:
        """The emulator's JVM: the launcher script execs java (else it is a java child of it)."""
        from tests.chaos.driver import children

        assert self.server.proc is not None
        pid = self.server.proc.pid
        for candidate in (pid, *children(pid)):
            try:
                command = Path(f"/proc/{candidate}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if command.endswith(b"java"):
                return candidate
        return pid

    def stop(self) -> None:
        super().stop()
        if self.server.proc is not None and self.server.proc.poll() is None:
            os.kill(self.java_pid(), signal.SIGCONT)
        self.server.stop()
        restore_env(self.saved_env)

    def env(self) -> dict[str, str]:
        assert self.proxy is not None
        return {"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{self.proxy.port}"}

    def cli(self) -> list[str]:
        assert self.proxy is not None
        return [
            "--backend", "pubsub",
            "--option", f"project={self.project}",
            "--option", f"emulator_host=127.0.0.1:{self.proxy.port}",
            "--option", f"mode={self.mode}",
        ]  # fmt: skip

    def publish_options(self) -> dict[str, Any]:
        return {"project": self.project, "emulator_host": self.server.host, "mode": self.mode}

    def diagnose(self) -> str:
        """What a plain pull (no ack) finds on each subscription: the emulator tells no counts."""
        from google.pubsub_v1 import SubscriberClient

        client = SubscriberClient(client_options={"api_endpoint": self.server.host})
        parts = []
        for name in (self.source, self.errors):
            path = f"projects/{self.project}/subscriptions/{name}"
            try:
                got = client.pull(subscription=path, max_messages=1000, timeout=10)
                parts.append(f"{name}: {len(got.received_messages)} pulled (not acked)")
            except Exception as exc:  # a diagnosis must not hide the report
                parts.append(f"{name}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)

    def disrupt(self) -> None:
        pause(self.java_pid())


TARGETS: dict[str, type[Target]] = {
    "local": LocalTarget,
    "sqs": SQSTarget,
    "amqp": AMQPTarget,
    "amqp-quorum": QuorumTarget,
    "nsq": NSQTarget,
    "pubsub": PubSubTarget,
}
