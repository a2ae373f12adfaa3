"""The argument parser: every command, flag, help text and default the CLI shows.

Imports nothing heavier than argparse, so ``stalk --help`` starts in tens of milliseconds. The
defaults shown in ``--help`` are the engine's (``CollectorOptions``); a unit test keeps the two
in step. Flags default to ``None`` here so that :mod:`stalk.cli.config` can tell "not given on
the command line" from a value, and fill it from the environment or a config file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

from stalk import __version__

#: Exit codes (documented in the README and in ``stalk --help``).
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
#: ``run --until-empty`` routed messages to the error topic (and ``--allow-errors`` was not set).
EXIT_ERRORS = 3

DESCRIPTION = """\
Run a handler function over a message broker's queue, publish to it, inspect it.

  stalk send --source orders '{"order": 1}'
  stalk run workers.app:handler --source orders --until-empty

MODULE:FUNC names the handler as uvicorn and celery -A do: the importable module (run from the
directory that contains it), a colon, the function, e.g. workers.app:handler. The function takes
(body: bytes) or (body: bytes, message: stalk.Message), sync or async, and returns stalk.ok(),
stalk.retry(...), stalk.fatal(...) or None (ok); an exception it raises is a retry.

Exit codes: 0 done; 1 broker or runtime error; 2 usage error (bad flag, option, handler path);
3 --until-empty sent messages to the error topic (see --allow-errors).

Settings come from flags, then STALK_<FLAG> environment variables (STALK_CONCURRENCY=4), then
[tool.stalk] in pyproject.toml or stalk.toml (--config PATH), then the defaults shown.
Secrets (a broker password) belong in the environment (STALK_AMQP_URL) or in a file named by
--option url=@/run/secrets/amqp, never on the command line, which every user sees in ps."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Flag(NamedTuple):
    """One ``stalk run`` flag that is also an env variable and a config-file key."""

    flag: str
    dest: str
    kind: type
    help: str
    default: str
    #: The CollectorOptions field it sets; None for CLI-level settings.
    field: str | None = None
    metavar: str | None = None


#: ``run`` flags that map onto CollectorOptions fields (default texts checked by a unit test).
ENGINE_FLAGS: tuple[Flag, ...] = (
    Flag("--concurrency", "concurrency", int, "handlers running at once", "1", "concurrency", "N"),
    Flag(
        "--max-retries",
        "max_retries",
        int,
        "retries after the first attempt (attempts = N + 1), then the error topic",
        "5",
        "max_retries",
        "N",
    ),
    Flag(
        "--retry-interval",
        "retry_interval_s",
        float,
        "base of the exponential retry backoff (full jitter) when a retry names no delay",
        "1.0",
        "retry_interval_s",
        "S",
    ),
    Flag(
        "--max-retry-delay",
        "max_retry_delay_s",
        float,
        "cap of the retry backoff",
        "300.0",
        "max_retry_delay_s",
        "S",
    ),
    Flag(
        "--max-named-delay",
        "max_named_delay_s",
        float,
        "longest delay a handler may name with retry(delay=...); longer ones are shortened",
        "604800.0",
        "max_named_delay_s",
        "S",
    ),
    Flag(
        "--polling-period",
        "polling_period_s",
        float,
        "first wait after an empty poll; doubles up to --max-polling-period",
        "0.1",
        "polling_period_s",
        "S",
    ),
    Flag(
        "--max-polling-period",
        "max_polling_period_s",
        float,
        "longest wait between polls of an idle source or a broker that is down",
        "5.0",
        "max_polling_period_s",
        "S",
    ),
    Flag(
        "--handler-timeout",
        "handler_timeout_s",
        float,
        "a handler running longer is abandoned and its message retried",
        "300.0",
        "handler_timeout_s",
        "S",
    ),
    Flag(
        "--visibility-timeout",
        "visibility_timeout_s",
        float,
        "lease of a received message, kept alive by heartbeats while it runs",
        "30.0",
        "visibility_timeout_s",
        "S",
    ),
    Flag(
        "--shutdown-grace",
        "shutdown_grace_s",
        float,
        "on SIGTERM, how long running handlers may finish before their messages are released",
        "30.0",
        "shutdown_grace_s",
        "S",
    ),
    Flag(
        "--batch-size",
        "batch_size",
        int,
        "most messages asked of the broker in one lease (default: the backend's largest)",
        "backend's largest",
        "batch_size",
        "N",
    ),
    Flag(
        "--prefetch",
        "prefetch",
        int,
        "leased messages held beyond the running ones (default: max(2 x concurrency, batch))",
        "max(2 x concurrency, batch)",
        "prefetch",
        "N",
    ),
    Flag(
        "--max-message-bytes",
        "max_message_bytes",
        int,
        "bodies over this go to the error topic (reason too_large) unhandled",
        "1048576",
        "max_message_bytes",
        "N",
    ),
    Flag(
        "--message-ttl",
        "message_ttl_s",
        float,
        "messages older than this go to the error topic (reason expired) unhandled",
        "none",
        "message_ttl_s",
        "S",
    ),
)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def normalize_log_level(text: str) -> str:
    """Return ``LEVEL[,logger...]`` with the level upper-cased (``WARN`` = ``WARNING``) and the
    logger names as given: an SDK's logger names are case-sensitive."""
    level, *names = (part.strip() for part in text.split(","))
    level = level.upper()
    return ",".join([("WARNING" if level == "WARN" else level), *(n for n in names if n)])


def _log_level(text: str) -> str:
    value = normalize_log_level(text)
    if value.split(",")[0] not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; choose one of {', '.join(LOG_LEVELS).lower()}, "
            "optionally followed by SDK loggers to show at that level too (debug,botocore)"
        )
    return value


class _Once(argparse.Action):
    """Store a value given at most once (``--source a --source b`` is an error, not "b")."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in seen:
            parser.error(
                f"{option_string} given twice; one {self.metavar or self.dest} per command "
                "(run one worker per source)"
            )
        seen.add(self.dest)
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, a hint to ``--help`` and "did you mean" for flags."""

    def error(self, message: str) -> NoReturn:
        hint = f"see '{self.prog} --help'"
        if "invalid choice: '" in message and "(choose from " in message:
            word = message.split("invalid choice: '", 1)[1].split("'", 1)[0]
            choices = message.split("(choose from ", 1)[1].rstrip(")").replace("'", "").split(", ")
            message = message.replace(" (choose from", suggest(word, choices) + " (choose from", 1)
        sys.stderr.write(f"stalk: {message}; {hint}\n")
        raise SystemExit(EXIT_USAGE)

    def flag_names(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]


def suggest(word: str, choices: Sequence[str]) -> str:
    """Return `` (did you mean X?)`` for the closest of ``choices``, or ``""``."""
    import difflib  # only on the error path: it costs start-up time

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action=_Once,
        type=lambda text: text.strip().lower(),
        default=None,
        help="broker adapter, case-insensitive: local, sqs, amqp, nsq, ... (see 'stalk "
        "backends'; env STALK_BACKEND; default: local)",
    )
    parser.add_argument(
        "--source",
        action=_Once,
        default=None,
        metavar="NAME",
        help="queue, subscription or topic to use (required; env STALK_SOURCE)",
    )
    parser.add_argument(
        "--option",
        "-o",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="adapter setting, repeatable (env STALK_<BACKEND>_<KEY>); KEY=@PATH reads the value "
        "from a file: use it or the env variable for secrets such as url, never the command line",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="settings file (TOML; default: [tool.stalk] of ./pyproject.toml, or ./stalk.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=None,
        help="text for people, json (one object per line) for collectors (default: text)",
    )
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=None,
        metavar="LEVEL",
        help="debug, info, warning, error (env STALK_LOG_LEVEL; default: info); SDK loggers "
        "(botocore, aiormq, ...) stay at warning, as their debug output carries credentials, "
        "unless named after the level: debug,botocore",
    )


def build_parser() -> Parser:
    """Return the argument parser (command and flag names are part of stalk's contract)."""
    parser = Parser(
        prog="stalk",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"stalk {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    run = sub.add_parser(
        "run",
        help="consume --source with the handler MODULE:FUNC",
        description="Consume --source with the handler MODULE:FUNC (e.g. workers.app:handler: "
        "module path, colon, function).",
        allow_abbrev=False,
    )
    run.add_argument("handler", metavar="MODULE:FUNC", help="the handler, e.g. workers.app:handler")
    _common(run)
    run.add_argument(
        "--error-topic",
        action=_Once,
        default=None,
        metavar="NAME",
        help="where failed messages go (default: <source>-errors)",
    )
    for spec in ENGINE_FLAGS:
        run.add_argument(
            spec.flag,
            dest=spec.dest,
            type=spec.kind,
            default=None,
            metavar=spec.metavar,
            help=f"{spec.help} (default: {spec.default})",
        )
    run.add_argument(
        "--unflagged-error",
        choices=("error_topic", "retry", "drop"),
        default=None,
        help="what Result(error=e) with neither retry nor fatal means (default: error_topic)",
    )
    run.add_argument(
        "--fatal-exception",
        dest="fatal_exceptions",
        action="append",
        default=None,
        metavar="MODULE:CLASS",
        help="exception class meaning fatal when a handler raises it, e.g. "
        "json:JSONDecodeError or builtins.KeyError (repeatable; default: only stalk.Fatal)",
    )
    run.add_argument(
        "--until-empty",
        action="store_true",
        default=None,
        help="exit once the source is drained (delayed retries included): 0, or 3 if any "
        "message went to the error topic",
    )
    run.add_argument(
        "--allow-errors",
        action="store_true",
        default=None,
        help="with --until-empty, exit 0 even when messages went to the error topic",
    )
    run.add_argument(
        "--traceback",
        action="store_true",
        default=None,
        help="show the whole traceback when the handler module fails to import",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting with where it came from (secrets masked) and exit",
    )
    _ops_flags(run)

    send = sub.add_parser(
        "send",
        help="publish BODY... (or lines of stdin with '-') to --source",
        description="Publish each BODY (bytes as given) to --source; '-' reads one message per "
        "line of stdin (empty lines are skipped and counted on stderr).",
        allow_abbrev=False,
    )
    _common(send)
    send.add_argument("bodies", nargs="+", metavar="BODY", help="message body, or - for stdin")
    send.add_argument(
        "--delay",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="seconds before the messages become visible (default: 0)",
    )
    send.add_argument(
        "--attribute",
        "-a",
        action="append",
        type=_key_value,
        default=[],
        metavar="K=V",
        help="attribute (header) on every message, repeatable",
    )

    stats = sub.add_parser(
        "stats",
        help="show backlog counts of --source (creates nothing)",
        description="Show the counts of --source: ready, delayed, in flight, errors.",
        allow_abbrev=False,
    )
    _common(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    peek = sub.add_parser(
        "peek",
        help="show messages of --source (an error topic) without consuming them",
        description="Show up to --limit messages of --source with every stalk-* attribute, "
        "leaving them where they are. local reads and releases (attempts unchanged); sqs reads "
        "and sets visibility back to 0 (SQS counts each peek as a receive: peek error queues, "
        "not live sources); amqp gets and requeues (marked redelivered, which a worker on a "
        "classic queue counts as an attempt); nsq takes and REQs 0 (nsqd counts that as an "
        "attempt).",
        allow_abbrev=False,
    )
    _common(peek)
    peek.add_argument("--limit", type=int, default=10, metavar="N", help="at most N (default: 10)")
    peek.add_argument("--json", action="store_true", help="one JSON object per line")
    peek.add_argument(
        "--max-body",
        type=int,
        default=200,
        metavar="N",
        help="show at most N bytes of each body (default: 200)",
    )

    redrive = sub.add_parser(
        "redrive",
        help="move messages from an error topic back to a source",
        description="Move messages from --from (an error topic) back to --to, as new messages "
        "that keep their stalk-* failure attributes.",
        allow_abbrev=False,
    )
    _common(redrive)
    redrive.add_argument(
        "--from",
        dest="from_source",
        required=True,
        metavar="ERRORS",
        help="the error topic to read (required)",
    )
    redrive.add_argument(
        "--to",
        dest="to_source",
        required=True,
        metavar="SOURCE",
        help="where the messages go back to (required)",
    )
    redrive.add_argument("--limit", type=int, default=None, help="at most N messages (all)")
    redrive.add_argument(
        "--reason",
        default=None,
        metavar="REASON",
        help="only messages with this stalk-reason (fatal, retries_exhausted, poison, ...)",
    )
    redrive.add_argument(
        "--dry-run",
        action="store_true",
        help="count and list what would move, moving nothing",
    )

    backends = sub.add_parser(
        "backends",
        help="list adapters and whether their SDK is installed here",
        description="List the adapters and whether their SDK is installed here.",
        allow_abbrev=False,
    )
    backends.add_argument(
        "--log-format", choices=("text", "json"), default=None, help="accepted, not used"
    )
    backends.add_argument("--log-level", type=_log_level, default=None, help="accepted, not used")
    return parser


def _ops_flags(parser: argparse.ArgumentParser) -> None:
    """Add the operations flags (control server, autoscale, processes) to ``stalk run``."""
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /healthz /metrics /status and POST /sleep /wake /scale (0: any free port; "
        "default: off)",
    )
    parser.add_argument(
        "--http-host",
        default=None,
        metavar="HOST",
        help="control server address (default: 127.0.0.1)",
    )
    parser.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="grow and shrink concurrency with the backlog (default: off)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="N supervised worker processes (default: 1)",
    )
    parser.add_argument(
        "--max-messages-per-child",
        type=int,
        default=None,
        metavar="N",
        help="replace a worker process after N messages (implies supervision; default: never)",
    )
    parser.add_argument(
        "--max-memory-per-child",
        default=None,
        metavar="SIZE",
        help="replace a worker over SIZE resident memory, e.g. 512M, 2G (plain number: MiB; "
        "default: never)",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        default=None,
        help="no live progress line (it shows only on a terminal anyway)",
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag gets one line with the closest real one."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, args.command)
        flags = sub.flag_names() if sub is not None else parser.flag_names()
        first = extra[0]
        word = first.partition("=")[0]
        hint = suggest(word, flags) if word.startswith("-") else ""
        (sub or parser).error(f"unrecognized argument {first!r}{hint}")
    args.__dict__.pop("_given_once", None)
    return args


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> Parser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(command) if command else None
            return found if isinstance(found, Parser) else None
    return None
