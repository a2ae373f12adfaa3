"""The command line: ``run``, ``send``, ``stats``, ``backends``.

Every failure a person can fix ends in one line on stderr and a non-zero exit: 2 for usage
(bad option, unknown backend, handler that cannot be imported), 1 for runtime (broker down,
queue missing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from stalk import __version__
from stalk.collectors import registry
from stalk.collectors.base import Adapter, Backlog, BatchPublisher, TopicAdmin
from stalk.engine.collector import BaseCollector
from stalk.engine.handler import load
from stalk.errors import BackendError, ConfigError, HandlerImportError, StalkError
from stalk.ops.autoscale import parse_bounds
from stalk.ops.config import OpsConfig, parse_size, worker_environment
from stalk.ops.logs import configure, redact
from stalk.ops.redrive import redrive_by_name
from stalk.ops.runner import run_operations
from stalk.ops.supervisor import supervise
from stalk.ops.tracing import traced, wanted_tracing
from stalk.options import CollectorOptions

logger = logging.getLogger("stalk.cli")

#: Exit codes: usage errors (the command line is wrong) and runtime errors (the world is).
EXIT_USAGE = 2
EXIT_RUNTIME = 1

#: ``run`` flags that map one-to-one onto CollectorOptions fields.
RUN_FLAGS: dict[str, tuple[str, type]] = {
    "--concurrency": ("concurrency", int),
    "--max-retries": ("max_retries", int),
    "--retry-interval": ("retry_interval_s", float),
    "--max-retry-delay": ("max_retry_delay_s", float),
    "--polling-period": ("polling_period_s", float),
    "--max-polling-period": ("max_polling_period_s", float),
    "--handler-timeout": ("handler_timeout_s", float),
    "--visibility-timeout": ("visibility_timeout_s", float),
    "--shutdown-grace": ("shutdown_grace_s", float),
    "--batch-size": ("batch_size", int),
    "--max-message-bytes": ("max_message_bytes", int),
    "--message-ttl": ("message_ttl_s", float),
}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=os.environ.get("STALK_BACKEND", "local"),
        help="broker adapter (default: local, or $STALK_BACKEND); see `stalk backends`",
    )
    parser.add_argument(
        "--source",
        default=os.environ.get("STALK_SOURCE", "default"),
        help="queue, subscription or topic name (default: $STALK_SOURCE or 'default')",
    )
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="adapter setting, repeatable (also env STALK_<BACKEND>_<KEY>)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default=os.environ.get("STALK_LOG_LEVEL", "INFO"))


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser (names are part of stalk's contract)."""
    parser = argparse.ArgumentParser(prog="stalk", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stalk {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume SOURCE with the handler MODULE:FUNC")
    run.add_argument("handler", metavar="MODULE:FUNC")
    _common(run)
    run.add_argument("--error-topic", default=None, help="default: <source>-errors")
    for flag, (field, kind) in RUN_FLAGS.items():
        run.add_argument(flag, dest=field, type=kind, default=None)
    run.add_argument("--unflagged-error", choices=("error_topic", "retry", "drop"), default=None)
    run.add_argument(
        "--fatal-exception",
        dest="fatal_exceptions",
        action="append",
        default=None,
        metavar="MODULE.CLASS",
        help="exception class that means fatal when a handler raises it (repeatable)",
    )
    run.add_argument("--until-empty", action="store_true", help="exit 0 once drained")
    _ops_flags(run)

    send = sub.add_parser("send", help="publish BODY... (or stdin lines with '-') to SOURCE")
    _common(send)
    send.add_argument("bodies", nargs="+", metavar="BODY")
    send.add_argument("--delay", type=float, default=0.0, help="seconds before it is visible")
    send.add_argument(
        "--attribute", "-a", action="append", type=_key_value, default=[], metavar="K=V"
    )

    stats = sub.add_parser("stats", help="show backlog counts of SOURCE")
    _common(stats)
    stats.add_argument("--json", action="store_true")

    redrive = sub.add_parser("redrive", help="move messages from an error topic back to a source")
    _common(redrive)
    redrive.add_argument("--from", dest="from_source", required=True, metavar="ERRORS")
    redrive.add_argument("--to", dest="to_source", required=True, metavar="SOURCE")
    redrive.add_argument("--limit", type=int, default=None, help="at most N messages (all)")

    backends = sub.add_parser("backends", help="list adapters and whether they load here")
    backends.add_argument("--log-format", choices=("text", "json"), default="text")
    backends.add_argument("--log-level", default="WARNING")
    return parser


def _ops_flags(parser: argparse.ArgumentParser) -> None:
    """Add the operations flags (control server, autoscale, processes) to ``stalk run``."""
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /healthz /metrics /status and POST /sleep /wake /scale (0: any free port)",
    )
    parser.add_argument("--http-host", default="127.0.0.1", help="default: 127.0.0.1 (loopback)")
    parser.add_argument(
        "--autoscale", default=None, metavar="MIN:MAX", help="grow/shrink concurrency with load"
    )
    parser.add_argument(
        "--processes", type=int, default=1, metavar="N", help="N supervised worker processes"
    )
    parser.add_argument(
        "--max-messages-per-child",
        type=int,
        default=None,
        metavar="N",
        help="replace a worker process after N messages (implies supervision)",
    )
    parser.add_argument(
        "--max-memory-per-child",
        default=None,
        metavar="SIZE",
        help="replace a worker over SIZE resident memory, e.g. 512M, 2G (plain number: MiB)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no live progress line")


def _ops_config(args: argparse.Namespace) -> OpsConfig:
    """Read the operations flags (and, in a worker process, the supervisor's environment).

    Raises:
        ConfigError: a value out of range.
    """
    if args.processes < 1:
        raise ConfigError(f"--processes must be >= 1, got {args.processes}")
    if args.max_messages_per_child is not None and args.max_messages_per_child < 1:
        raise ConfigError("--max-messages-per-child must be >= 1")
    worker_id, report_fd, supervisor_pid = worker_environment()
    return OpsConfig(
        http_host=args.http_host,
        http_port=args.http_port,
        autoscale=parse_bounds(args.autoscale) if args.autoscale else None,
        processes=args.processes,
        max_messages=args.max_messages_per_child,
        max_memory_bytes=(
            parse_size(args.max_memory_per_child) if args.max_memory_per_child else None
        ),
        quiet=args.quiet,
        worker_id=worker_id,
        report_fd=report_fd,
        supervisor_pid=supervisor_pid,
    )


def make_adapter(args: argparse.Namespace, error_topic: str | None = None) -> Adapter:
    """Build the ``--backend`` adapter from the command line's source and options."""
    cls = registry.get(args.backend)
    return cls.from_options(args.source, error_topic, dict(args.option))


def _run_options(args: argparse.Namespace) -> CollectorOptions:
    values: dict[str, Any] = {"source": args.source, "error_topic": args.error_topic}
    for field, _ in RUN_FLAGS.values():
        if getattr(args, field) is not None:
            values[field] = getattr(args, field)
    if args.unflagged_error is not None:
        values["unflagged_error"] = args.unflagged_error
    if args.fatal_exceptions:
        values["fatal_exceptions"] = tuple(args.fatal_exceptions)
    return CollectorOptions(**values)


def cmd_run(args: argparse.Namespace) -> int:
    options = _run_options(args)
    ops_config = _ops_config(args)
    if ops_config.supervise:  # worker processes re-run this command line
        adapter = make_adapter(args, options.error_topic)  # bad --option: fail here, not in N
        return supervise(ops_config, adapter, until_empty=args.until_empty)
    handler = load(args.handler)
    adapter = make_adapter(args, options.error_topic)
    if wanted_tracing():
        handler = traced(handler, backend=adapter.name)
    collector = BaseCollector(adapter, handler, options)
    code = run_operations(collector, ops_config, until_empty=args.until_empty)
    if ops_config.worker_id is None:
        print(summary(collector))
    return code


def summary(collector: BaseCollector) -> str:
    """Return the one line ``run`` prints when it ends: what became of the messages."""
    stats = collector.stats
    errored = sum(stats.errored.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.errored.items()))
    return (
        f"stalk: {stats.handled} handled on {collector.adapter.describe()}: "
        f"{stats.acked - errored} acked, {stats.retried} retried, "
        f"{errored} to error topic {collector.adapter.error_topic}"
        + (f" ({reasons})" if reasons else "")
        + (f", {stats.released} released" if stats.released else "")
    )


async def _send(adapter: Adapter, bodies: list[bytes], attrs: dict[str, str], delay: float) -> int:
    adapter.source_name  # noqa: B018 - one line naming --source before connecting
    await adapter.open()
    try:
        if isinstance(adapter, BatchPublisher) and len(bodies) > 1:  # one call: all or nothing
            ids = await adapter.publish_batch(bodies, attrs, delay)
        else:
            ids = [await adapter.publish(body, attrs, delay) for body in bodies]
    finally:
        await adapter.close()
    for message_id in ids:
        print(message_id)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    bodies: list[bytes] = []
    for body in args.bodies:
        if body == "-":
            bodies.extend(line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip())
        else:
            bodies.append(body.encode())
    return asyncio.run(_send(make_adapter(args), bodies, dict(args.attribute), args.delay))


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


def cmd_stats(args: argparse.Namespace) -> int:
    topic = dict(args.option).get("topic")
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


def cmd_redrive(args: argparse.Namespace) -> int:
    options = {k: v for k, v in args.option if k != "topic"}  # a redrive must not fan out
    cls = registry.get(args.backend)
    moved = asyncio.run(redrive_by_name(cls, options, args.from_source, args.to_source, args.limit))
    print(f"stalk: moved {moved} message(s) from {args.from_source} to {args.to_source}")
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    for info in registry.describe_all():
        status = "ok" if info.available else f"unavailable: {info.problem}"
        print(f"{info.name:<10} {info.origin:<12} {status}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "send": cmd_send,
    "stats": cmd_stats,
    "redrive": cmd_redrive,
    "backends": cmd_backends,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = build_parser().parse_args(argv)
    configure(args.log_format, args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, HandlerImportError) as exc:
        print(f"stalk: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"stalk: invalid {where}: {first['msg']}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as exc:
        print(f"stalk: {redact(str(exc))}", file=sys.stderr)
        return EXIT_RUNTIME
    except StalkError as exc:
        print(f"stalk: {redact(str(exc))}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
