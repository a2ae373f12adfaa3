"""nsqd for the nsq tests: started by the fixture on free loopback ports (a pytest plugin).

``nsqd`` starts one nsqd per session from PATH or from scripts/start-nsqd.sh's cache
(``${STALK_NSQ_BUILD:-~/.cache/stalk-nsq}/bin``), always on 127.0.0.1 with a temp data dir, and
stops it by PID at the end. ``start_nsqd`` starts more (other flags, restart tests). Without the
binary the tests skip loudly outside CI and fail in CI (``CI=true``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stalk.testing import AdapterHarness, require_broker
from tests.brokers import free_port

#: Seconds nsqd may take to answer /ping.
START_TIMEOUT_S = 30.0
HINT = "build it with scripts/start-nsqd.sh (needs Go) or put nsqd on PATH"


def nsqd_binary() -> str | None:
    """Return nsqd from PATH or the build cache of scripts/start-nsqd.sh, or None."""
    found = shutil.which("nsqd")
    if found:
        return found
    cache = Path(os.environ.get("STALK_NSQ_BUILD", Path.home() / ".cache" / "stalk-nsq"))
    candidate = cache / "bin" / "nsqd"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


class NSQD:
    """One nsqd process on loopback; can be stopped, killed and started again in place."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.extra = list(extra)
        self.tcp_port, self.http_port = free_port(), free_port()
        self.data = tempfile.mkdtemp(prefix="stalk-nsqd-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(self.data) / "nsqd.log"

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> None:
        args = [
            self.binary,
            f"--tcp-address={self.tcp}",
            f"--http-address={self.http}",
            "--broadcast-address=127.0.0.1",
            f"--data-path={self.data}",
            *self.extra,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nsqd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http}/ping", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM: nsqd flushes its memory queues to disk; SIGKILL: it does not)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    def stats(self, topic: str, channel: str = "stalk") -> dict[str, Any]:
        """Return nsqd's /stats entry of ``channel`` on ``topic`` (``{}`` when absent)."""
        import json

        url = f"http://{self.http}/stats?format=json&topic={topic}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        for t in data.get("topics") or []:
            for c in t.get("channels") or []:
                if t["topic_name"] == topic and c["channel_name"] == channel:
                    return dict(c)
        return {}

    def create_channel(self, topic: str, channel: str = "stalk") -> None:
        from stalk.collectors.nsq import http

        http.create_channel(self.http, topic, channel, 5.0)


@pytest.fixture(scope="session")
def start_nsqd() -> Iterator[Callable[..., NSQD]]:
    """Start nsqd processes (extra flags allowed); every one is stopped at session end."""
    started: list[NSQD] = []
    try:
        import nsq  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        require_broker("nsq", "pynsq is not installed: pip install 'stalk[nsq]'")
    binary = nsqd_binary()
    if binary is None:
        require_broker("nsq", f"no nsqd binary: {HINT}")

    def start(*extra: str) -> NSQD:
        server = NSQD(binary, *extra)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.cleanup()


class Lookupd:
    """One nsqlookupd on loopback (the binary beside nsqd)."""

    def __init__(self, nsqd_binary_path: str) -> None:
        self.binary = str(Path(nsqd_binary_path).with_name("nsqlookupd"))
        self.tcp_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.tcp_port}"

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self) -> None:
        args = [
            self.binary,
            f"--tcp-address={self.tcp}",
            f"--http-address={self.http}",
            "--broadcast-address=127.0.0.1",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.http}/ping", timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nsqlookupd did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def lookupd(start_nsqd: Callable[..., NSQD]) -> Iterator[tuple[Lookupd, NSQD]]:
    """An nsqlookupd and an nsqd registered with it; both stopped after the test."""
    binary = nsqd_binary()
    assert binary is not None  # start_nsqd required it
    if not Path(binary).with_name("nsqlookupd").exists():
        require_broker("nsq", f"no nsqlookupd beside {binary}: {HINT}")
    registry = Lookupd(binary)
    registry.start()
    try:
        yield registry, start_nsqd(f"--lookupd-tcp-address={registry.tcp}")
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def nsqd(start_nsqd: Callable[..., NSQD]) -> NSQD:
    """The session's shared nsqd."""
    return start_nsqd()


class NSQHarness(AdapterHarness):
    """The nsq adapter against a test nsqd; creates channels first (nsqd's 5 s queue scan)."""

    patience_s = 30.0

    def __init__(self, server: NSQD, **settings: Any) -> None:
        self.server = server
        self.settings = settings

    def make_adapter(self, source: str, error_topic: str) -> Any:
        from stalk.collectors.nsq import NSQAdapter, NSQSettings

        settings = NSQSettings(
            nsqd=self.server.tcp,
            nsqd_http=self.server.http,
            reconnect_interval_s=0.5,
            **self.settings,
        )
        return NSQAdapter(source, error_topic=error_topic, settings=settings)

    def new_names(self) -> tuple[str, str]:
        source = f"stalk-test-{uuid.uuid4().hex[:12]}"
        return source, f"{source}-errors"

    async def prepare(self, source: str, error_topic: str) -> None:
        channel = self.settings.get("channel", "stalk")
        await asyncio.to_thread(self.server.create_channel, source, channel)
        await asyncio.to_thread(self.server.create_channel, error_topic, "stalk")


@pytest.fixture
def nsq_harness(nsqd: NSQD) -> NSQHarness:
    """An :class:`NSQHarness` on the session's nsqd."""
    return NSQHarness(nsqd)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker process and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
