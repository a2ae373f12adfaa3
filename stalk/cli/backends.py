"""``stalk backends``: the adapters and whether their SDK is installed, importing none."""

from __future__ import annotations

import argparse

from stalk.collectors import registry


def cmd(args: argparse.Namespace) -> int:
    for info in registry.describe_all():
        status = "ok" if info.available else f"unavailable: {info.problem}"
        print(f"{info.name:<10} {info.origin:<12} {status}")
    return 0
