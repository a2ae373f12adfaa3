"""Shared fixtures. Each backend's broker fixture lives in tests/brokers/<backend>.py and is
loaded here as a plugin, so a new backend adds a file and touches nothing else."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = [
    *sorted(
        f"tests.brokers.{path.stem}"
        for path in (Path(__file__).parent / "brokers").glob("*.py")
        if not path.stem.startswith("_")
    ),
    "tests.backends._every",  # every_backend: one test on each backend
]
