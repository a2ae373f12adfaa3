"""Broker presence for tests: skip loudly on a laptop, fail in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when the environment says this is CI (``CI=true``, as CI systems set)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_broker(name: str, reason: str) -> NoReturn:
    """Stop a test whose broker is missing: fail in CI, skip with the reason elsewhere.

    Args:
        name: the backend, e.g. ``amqp``.
        reason: what is missing and how to start it (``scripts/start-rabbitmq.sh``).
    """
    message = f"{name} broker unavailable: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: every broker must be present)", pytrace=False)
    pytest.skip(f"SKIPPING {name.upper()} TESTS — {message}")
