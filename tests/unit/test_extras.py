"""pyproject extras name only backends that exist, and every SDK backend has its extra."""

from __future__ import annotations

import tomllib

from stalk.collectors.registry import BUILTIN, SDK_MODULES
from tests.unit.test_cli import ROOT

#: Extras that are not a backend's SDK.
NOT_BACKENDS = {"all", "prometheus", "otel", "bench", "dev", "test"}
#: Being added on another branch (its extra stays meanwhile).
ARRIVING: set[str] = set()


def test_extras_match_the_backends() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    backends = set(extras) - NOT_BACKENDS
    shipped = {name for name, (_, extra) in BUILTIN.items() if extra}
    assert backends - ARRIVING <= shipped | ARRIVING, "an extra for a backend that does not exist"
    assert shipped <= backends, "a backend without its extra"
    assert shipped <= set(SDK_MODULES), "stalk backends cannot look up this SDK"
    assert {extra for _, extra in BUILTIN.values() if extra} <= set(extras)
