"""``stalk run``: consume a source with a handler, with the operations around it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from stalk.cli import config as settings_layer
from stalk.cli.common import make_adapter, require_source, text_arg
from stalk.cli.parser import ENGINE_FLAGS, EXIT_ERRORS
from stalk.engine.stats import CollectorStats
from stalk.errors import ConfigError
from stalk.options import CollectorOptions


def ops_config(args: argparse.Namespace) -> Any:
    """Read the operations settings (and, in a worker process, the supervisor's environment).

    Raises:
        ConfigError: a value out of range.
    """
    from stalk.ops.autoscale import parse_bounds
    from stalk.ops.config import OpsConfig, parse_size, worker_environment

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
        quiet=bool(args.quiet),
        worker_id=worker_id,
        report_fd=report_fd,
        supervisor_pid=supervisor_pid,
    )


def exception_name(name: str) -> str:
    """``json:JSONDecodeError`` (as handlers are written) or ``json.JSONDecodeError``."""
    return name.replace(":", ".")


def collector_options(args: argparse.Namespace) -> CollectorOptions:
    """Return the engine options of the resolved settings."""
    values: dict[str, Any] = {"source": require_source(args), "error_topic": args.error_topic}
    if args.error_topic is not None:
        text_arg("--error-topic", args.error_topic)
    for spec in ENGINE_FLAGS:
        value = getattr(args, spec.dest)
        if value is not None:
            values[spec.dest] = value
    if args.unflagged_error is not None:
        values["unflagged_error"] = args.unflagged_error
    if args.fatal_exceptions:
        values["fatal_exceptions"] = tuple(exception_name(n) for n in args.fatal_exceptions)
    return CollectorOptions(**values)


def summary(stats: CollectorStats, description: str, error_topic: str | None) -> str:
    """Return the one line ``run`` prints when it ends, in the counts' one vocabulary."""
    from stalk.ops.status import counts

    c = counts(stats)
    errors: dict[str, int] = c["errors"]
    total = sum(errors.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    return (
        f"stalk: {c['received']} received, {c['attempts']} handled on {description}: "
        f"{c['acked']} acked, {c['retried']} retried, "
        f"{total} to error topic {error_topic}"
        + (f" ({reasons})" if reasons else "")
        + (f", {c['dropped']} dropped" if c["dropped"] else "")
        + (f", {c['released']} released" if c["released"] else "")
    )


def _exit_code(
    args: argparse.Namespace, code: int, stats: CollectorStats, topic: str | None
) -> int:
    errored = sum(stats.errored.values())
    if code == 0 and args.until_empty and errored and not args.allow_errors:
        print(
            f"stalk: {errored} message(s) went to the error topic {topic}; exit code "
            f"{EXIT_ERRORS} (--allow-errors to exit 0)",
            file=sys.stderr,
        )
        return EXIT_ERRORS
    return code


def cmd(args: argparse.Namespace) -> int:
    if args.print_config:  # works before anything is complete: it is how one finds out
        return print_config(args)
    adapter = make_adapter(args, args.error_topic)  # backend and --option errors come first
    options = collector_options(args)
    ops = ops_config(args)
    if ops.supervise:  # worker processes re-run this command line
        from stalk.ops.supervisor import Supervisor, worker_command

        supervisor = Supervisor(
            ops, adapter, until_empty=args.until_empty, command=worker_command()
        )
        code = asyncio.run(supervisor.run())
        stats = supervisor.fleet.snapshot().stats
        print(summary(stats, adapter.describe(), adapter.error_topic))
        return _exit_code(args, code, stats, adapter.error_topic)

    from stalk.engine.collector import BaseCollector
    from stalk.engine.handler import load
    from stalk.ops.runner import run_operations
    from stalk.ops.tracing import traced, wanted_tracing

    handler = load(args.handler)
    if wanted_tracing():
        handler = traced(handler, backend=adapter.name)
    collector = BaseCollector(adapter, handler, options)
    code = run_operations(collector, ops, until_empty=args.until_empty)
    if ops.worker_id is not None:  # the supervisor sums, prints and decides the exit code
        return code
    print(summary(collector.stats, adapter.describe(), adapter.error_topic))
    return _exit_code(args, code, collector.stats, adapter.error_topic)


def print_config(args: argparse.Namespace) -> int:
    """Print the resolved settings with their origins, secrets masked; nothing is consumed."""
    from stalk.collectors import registry
    from stalk.collectors.base import build_settings

    origin = dict(args.resolved)
    engine = CollectorOptions().model_dump()
    for key in (*(spec.dest for spec in ENGINE_FLAGS), "unflagged_error", "fatal_exceptions"):
        value, _ = origin.get(key, (None, "default"))
        if value is None:  # show the engine's value where no layer set one
            origin[key] = (engine[key], "default")
    cls = registry.get(args.backend)
    adapter = build_settings(cls.settings_model, cls.name, dict(args.option)).model_dump()
    print(settings_layer.render(origin, adapter, backend=cls.name))
    return 0
