"""Run ``python -m stalk`` as a real subprocess and talk to it over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: Longest a test waits for something that should happen; a bound against hangs, not a timing.
PATIENCE_S = 30.0
ROOT = Path(__file__).resolve().parents[2]
PORT_LINE = re.compile(r"control server on http://127\.0\.0\.1:(\d+)")


def wait_until(predicate: Any, what: str, timeout_s: float = PATIENCE_S) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def http(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None):
    """Return (status, body bytes, headers) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=b"" if method == "POST" else None,
        headers=headers or {},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


#: Every process started, so a fixture can clean up after a failed test.
RUNNING: list[Stalk] = []


class Stalk:
    """``python -m stalk ARGS`` with stderr collected line by line in a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full_env.pop("STALK_WORKER_ID", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stalk", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd or ROOT,
            text=True,
        )
        RUNNING.append(self)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.process.stderr, self.lines), daemon=True
            ),
            threading.Thread(target=self._read, args=(self.process.stdout, self.out), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    @property
    def stdout(self) -> str:
        return "\n".join(self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, what: str | None = None) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.process.poll() is not None:
                raise AssertionError(f"stalk exited before {what or pattern}:\n{self.stderr}")
            return None

        return wait_until(found, what or pattern)

    def port(self) -> int:
        """Return the first control server port logged (the supervisor's, when there is one)."""
        return int(self.wait_line(PORT_LINE.pattern, "the control server").group(1))

    def status(self, port: int) -> dict[str, Any]:
        code, body, _ = http(port, "/status")
        assert code == 200, body
        return json.loads(body)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = PATIENCE_S) -> int:
        """Wait for exit (failing, and killing it, past ``timeout_s``); return the exit code."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"stalk did not exit:\n{self.stderr}") from None
        self.close()
        return self.process.returncode

    def close(self) -> None:
        """Kill it if still running, finish reading and close the pipes."""
        self.kill()
        for reader in self._readers:
            reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def local_send(db: Path, source: str, *bodies: str) -> None:
    """Publish through the real CLI into the local file backend."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stalk",
            "send",
            "--backend",
            "local",
            "--source",
            source,
            "--option",
            f"path={db}",
            *bodies,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=PATIENCE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def local_stats(db: Path, source: str) -> dict[str, Any]:
    """Return ``stalk stats --json`` of a local queue."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stalk",
            "stats",
            "--backend",
            "local",
            "--source",
            source,
            "--option",
            f"path={db}",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=PATIENCE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
