"""What ``stalk run`` decided about operations, and the contract between supervisor and workers.

Plain data, no argparse (the CLI builds it) and no I/O beyond reading the environment a
supervisor hands its worker processes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from stalk.errors import ConfigError

#: Exit code of a worker that stopped to be replaced (max messages or memory reached).
EXIT_RECYCLE = 3
#: Environment a supervisor gives each worker process: its index, the pipe it reports on, its pid.
ENV_WORKER_ID = "STALK_WORKER_ID"
ENV_REPORT_FD = "STALK_REPORT_FD"
ENV_SUPERVISOR_PID = "STALK_SUPERVISOR_PID"

_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([kmg]?)i?b?\s*$")


def parse_size(text: str) -> int:
    """Parse ``512M``, ``2G``, ``800K`` or a plain number of MiB into bytes.

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(f"--max-memory-per-child expects a size like 512M or 2G; got {text!r}")
    number, unit = float(match.group(1)), match.group(2).lower() or "m"
    return int(number * 1024 ** {"k": 1, "m": 2, "g": 3}[unit])


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """The operations choices of one ``stalk run``."""

    http_host: str = "127.0.0.1"
    http_port: int | None = None
    autoscale: tuple[int, int] | None = None
    processes: int = 1
    max_messages: int | None = None
    max_memory_bytes: int | None = None
    quiet: bool = False
    #: Set in a worker process started by a supervisor.
    worker_id: int | None = None
    report_fd: int | None = None
    supervisor_pid: int | None = None

    @property
    def supervise(self) -> bool:
        """True when this process should start workers rather than consume itself."""
        recycles = self.max_messages is not None or self.max_memory_bytes is not None
        return self.worker_id is None and (self.processes > 1 or recycles)


def worker_environment() -> tuple[int | None, int | None, int | None]:
    """Return ``(worker_id, report_fd, supervisor_pid)`` a supervisor set, or ``None``s."""

    def read(name: str) -> int | None:
        value = os.environ.get(name)
        return int(value) if value is not None else None

    return read(ENV_WORKER_ID), read(ENV_REPORT_FD), read(ENV_SUPERVISOR_PID)
