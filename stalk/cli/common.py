"""What several commands share: building the ``--backend`` adapter from the resolved settings."""

from __future__ import annotations

import argparse

from stalk.collectors import registry
from stalk.collectors.base import Adapter
from stalk.errors import ConfigError


def text_arg(flag: str, value: str) -> str:
    """Return ``value`` if it is valid UTF-8 text (argv arrives surrogate-escaped otherwise).

    Raises:
        ConfigError: one line naming the flag.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{flag} {value.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8 "
            "text; names and attributes must be text (bodies may be any bytes)"
        ) from None
    return value


def require_source(args: argparse.Namespace) -> str:
    """Return ``--source``.

    Raises:
        ConfigError: none was given: stalk never guesses a queue to consume or publish to.
    """
    source = getattr(args, "source", None)
    if not source:
        raise ConfigError(
            f"stalk {args.command} needs --source NAME (or STALK_SOURCE, or source in "
            "[tool.stalk]): the queue, subscription or topic to use"
        )
    return text_arg("--source", source)


def make_adapter(
    args: argparse.Namespace, error_topic: str | None = None, source: str | None = None
) -> Adapter:
    """Build the ``--backend`` adapter from the resolved source and options."""
    cls = registry.get(args.backend)
    options = {key: text_arg(f"--option {key}", value) for key, value in args.option}
    return cls.from_options(source or require_source(args), error_topic, options)
