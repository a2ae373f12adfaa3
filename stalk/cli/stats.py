"""``stalk stats``: backlog counts of a source, creating nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from stalk.cli.common import make_adapter
from stalk.cli.parser import EXIT_RUNTIME
from stalk.collectors.base import Adapter, Backlog, TopicAdmin


def inspect_only(args: argparse.Namespace) -> None:
    """Make the adapter declare nothing (``declare=false`` where it has that option): a typo
    must not create queues, and an error topic must not get its own ``-errors`` queue."""
    from stalk.collectors import registry

    cls = registry.get(args.backend)
    keys = {key for key, _ in args.option}
    if "declare" in cls.settings_model.model_fields and "declare" not in keys:
        args.option = [*args.option, ("declare", "false")]


async def _stats(adapter: Adapter, topic: str | None) -> dict[str, Backlog | None]:
    """Return counts per source: the one source, or each subscription of ``topic``."""
    await adapter.open()
    try:
        if topic and isinstance(adapter, TopicAdmin):
            return dict(await adapter.topic_stats(topic))
        return {adapter.source or "?": await adapter.backlog()}
    finally:
        await adapter.close()


def render_table(rows: list[dict[str, Any]]) -> str:
    """Return rows as an aligned text table, ``-`` for unknown values."""
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def cmd(args: argparse.Namespace) -> int:
    topic = dict(args.option).get("topic")
    inspect_only(args)
    counts = asyncio.run(_stats(make_adapter(args), topic))
    if any(backlog is None for backlog in counts.values()):
        print(f"stalk: backend {args.backend!r} cannot report backlog counts", file=sys.stderr)
        return EXIT_RUNTIME
    rows = [{"source": name, **b.as_dict()} for name, b in counts.items() if b is not None]
    if args.json:
        if topic:
            print(json.dumps({"backend": args.backend, "topic": topic, "subscriptions": rows}))
        else:
            print(json.dumps({"backend": args.backend, **rows[0]}))
    elif rows:
        print(render_table(rows))
    else:
        print(f"topic {topic!r} has no subscriptions")
    return 0
