"""Test servers on loopback (RabbitMQ, nsqd, moto, the Pub/Sub emulator) and their harnesses."""

from __future__ import annotations

import socket


def free_port() -> int:
    """Return a loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
