"""The command line: ``run``, ``send``, ``stats``, ``peek``, ``redrive``, ``backends``.

The only package that knows argparse: :mod:`.parser` builds the parser (and imports nothing
heavy, so ``stalk --help`` is instant), :mod:`.config` layers the environment and a config file
under the flags, and each command is one module, imported only when it runs.

Every failure a person can fix ends in one line on stderr and a non-zero exit: 2 for usage
(bad flag or option, unknown backend, handler that cannot be imported), 1 for runtime (broker
down, queue missing), 3 for ``run --until-empty`` that sent messages to the error topic.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from stalk.cli.parser import EXIT_ERRORS, EXIT_RUNTIME, EXIT_USAGE, parse
from stalk.errors import BackendError, ConfigError, HandlerImportError, StalkError

__all__ = ["EXIT_ERRORS", "EXIT_RUNTIME", "EXIT_USAGE", "main"]

#: command -> module of stalk.cli with its ``cmd(args) -> int``.
COMMANDS = {
    "run": "run",
    "send": "send",
    "stats": "stats",
    "peek": "peek",
    "redrive": "redrive",
    "backends": "backends",
}


def _fail(text: str) -> None:
    from stalk.ops.logs import redact

    print(f"stalk: {redact(text)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    args = parse(argv)
    try:
        if args.command == "backends":  # instant: no settings layer, no logging setup
            from stalk.cli import backends

            return backends.cmd(args)
        from stalk.cli.config import resolve
        from stalk.ops.logs import configure

        args.resolved = resolve(args)
        configure(args.log_format, args.log_level)
        module = importlib.import_module(f"stalk.cli.{COMMANDS[args.command]}")
        code: int = module.cmd(args)
        return code
    except HandlerImportError as exc:
        cause = exc.__cause__
        wanted = getattr(args, "traceback", False) or str(
            getattr(args, "log_level", "")
        ).startswith("DEBUG")
        hint = cause is not None and not wanted and not isinstance(cause, ModuleNotFoundError)
        _fail(str(exc) + ("; --traceback shows the whole traceback" if hint else ""))
        if cause is not None and wanted:
            import traceback

            traceback.print_exception(cause, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    except BackendError as exc:
        _fail(str(exc))
        return EXIT_RUNTIME
    except StalkError as exc:
        _fail(str(exc))
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        pydantic = sys.modules.get("pydantic")
        if pydantic is not None and isinstance(exc, pydantic.ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "value"
            flag = "--" + where.removesuffix("_s").replace("_", "-")
            _fail(f"invalid {flag} ({where}): {first['msg']}")
            return EXIT_USAGE
        raise
