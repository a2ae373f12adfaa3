"""``stalk redrive``: move messages from an error topic back to a source."""

from __future__ import annotations

import argparse
import asyncio

from stalk.cli.common import text_arg
from stalk.collectors import registry
from stalk.message import ATTR_REASON, Message
from stalk.ops.redrive import redrive_by_name


def cmd(args: argparse.Namespace) -> int:
    cls = registry.get(args.backend)
    options = {k: text_arg(f"--option {k}", v) for k, v in args.option if k != "topic"}
    from_options = dict(options)  # read the error topic, declare nothing next to it
    if "declare" in cls.settings_model.model_fields and "declare" not in from_options:
        from_options["declare"] = "false"
    verb = "would move" if args.dry_run else "moved"

    def show(message: Message) -> None:
        if args.dry_run:
            print(f"{message.id}  {message.attributes.get(ATTR_REASON, '-')}")

    moved = asyncio.run(
        redrive_by_name(
            cls,
            options,
            text_arg("--from", args.from_source),
            text_arg("--to", args.to_source),
            args.limit,
            reason=args.reason,
            dry_run=args.dry_run,
            from_options=from_options,
            on_match=show,
        )
    )
    which = f" with reason {args.reason}" if args.reason else ""
    print(f"stalk: {verb} {moved} message(s){which} from {args.from_source} to {args.to_source}")
    return 0
