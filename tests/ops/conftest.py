"""Clean up subprocesses a failed test left running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ops._proc import RUNNING


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    yield
    while RUNNING:
        RUNNING.pop().close()
