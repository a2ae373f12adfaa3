"""Where each setting comes from: the command line, then the environment, then a config file,
then the defaults, as pip, pytest and Celery users expect.

- Environment: ``STALK_<SETTING>`` for every ``stalk run`` flag (``STALK_CONCURRENCY=4``,
  ``STALK_MAX_RETRIES``, ``STALK_SOURCE``, ...), read by pydantic-settings so a bad value is one
  line naming the variable. Adapter options keep their own ``STALK_<BACKEND>_<KEY>``.
- File: ``--config PATH`` (TOML), else ``[tool.stalk]`` of ``./pyproject.toml``, else
  ``./stalk.toml`` (top level or ``[tool.stalk]``). Keys are the flag names without ``--``
  (``max-retries`` or ``max_retries``); adapter options go in an ``options`` table.

``stalk run --print-config`` prints the result with the origin of each value, secrets masked.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from stalk.cli.parser import ENGINE_FLAGS, normalize_log_level, suggest
from stalk.errors import ConfigError

#: Settings every command shares, with their defaults (``source`` has none: it is required).
COMMON: dict[str, Any] = {
    "backend": "local",
    "source": None,
    "log_format": "text",
    "log_level": "INFO",
}
#: Settings only ``stalk run`` has, with their defaults (engine ones: None = the engine's).
RUN: dict[str, Any] = {
    "error_topic": None,
    **{spec.dest: None for spec in ENGINE_FLAGS},
    "unflagged_error": None,
    "fatal_exceptions": None,
    "until_empty": False,
    "allow_errors": False,
    "traceback": False,
    "http_port": None,
    "http_host": "127.0.0.1",
    "autoscale": None,
    "processes": 1,
    "max_messages_per_child": None,
    "max_memory_per_child": None,
    "quiet": False,
}
#: Keys a file may hold for adapter options.
OPTION_TABLES = ("options", "option")

#: Option keys whose values are secrets (printed as ``***``).
_SECRET_KEY = re.compile(r"(?i)(secret|passw(or)?d|token|credential|api_?key|private_key)")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


class EnvSettings(BaseSettings):
    """``STALK_<SETTING>`` variables; unset ones stay None (then the file or default decides)."""

    model_config = SettingsConfigDict(env_prefix="STALK_", extra="ignore", case_sensitive=False)

    backend: str | None = None
    source: str | None = None
    log_format: str | None = None
    log_level: str | None = None
    error_topic: str | None = None
    concurrency: int | None = None
    max_retries: int | None = None
    retry_interval_s: float | None = None
    max_retry_delay_s: float | None = None
    max_named_delay_s: float | None = None
    polling_period_s: float | None = None
    max_polling_period_s: float | None = None
    handler_timeout_s: float | None = None
    visibility_timeout_s: float | None = None
    shutdown_grace_s: float | None = None
    batch_size: int | None = None
    prefetch: int | None = None
    max_message_bytes: int | None = None
    message_ttl_s: float | None = None
    unflagged_error: str | None = None
    #: Comma-separated.
    fatal_exceptions: str | None = None
    until_empty: bool | None = None
    allow_errors: bool | None = None
    traceback: bool | None = None
    http_port: int | None = None
    http_host: str | None = None
    autoscale: str | None = None
    processes: int | None = None
    max_messages_per_child: int | None = None
    max_memory_per_child: str | None = None
    quiet: bool | None = None


#: Flag spellings of the engine settings whose attribute carries the unit (``--retry-interval``
#: sets ``retry_interval_s``): a file or env may use either.
_ALIASES = {spec.flag[2:].replace("-", "_"): spec.dest for spec in ENGINE_FLAGS}
_ALIASES["fatal_exception"] = "fatal_exceptions"


def _env_name(key: str) -> str:
    return f"STALK_{key.upper()}"


def read_env(keys: set[str]) -> dict[str, Any]:
    """Return the ``STALK_*`` values set for ``keys``.

    Raises:
        ConfigError: a value of the wrong type, naming the variable.
    """
    for alias, dest in _ALIASES.items():  # STALK_RETRY_INTERVAL as well as STALK_RETRY_INTERVAL_S
        if alias != dest and _env_name(alias) in os.environ and _env_name(dest) not in os.environ:
            os.environ[_env_name(dest)] = os.environ[_env_name(alias)]
    try:
        env = EnvSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = _env_name(str(first["loc"][0]))
        raise ConfigError(f"invalid {name}={first.get('input')!r}: {first['msg']}") from None
    found = {k: v for k, v in env.model_dump().items() if k in keys and v is not None}
    if isinstance(found.get("fatal_exceptions"), str):
        found["fatal_exceptions"] = [n.strip() for n in found["fatal_exceptions"].split(",") if n]
    if "log_level" in found:
        found["log_level"] = normalize_log_level(str(found["log_level"]))
    if "backend" in found:
        found["backend"] = str(found["backend"]).strip().lower()
    return found


def find_file(explicit: str | None, cwd: Path | None = None) -> Path | None:
    """Return the config file to read: ``--config``, else pyproject's [tool.stalk], else
    stalk.toml, else None.

    Raises:
        ConfigError: ``--config`` names a file that does not exist.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return path
    here = cwd or Path.cwd()
    pyproject = here / "pyproject.toml"
    if pyproject.is_file() and "stalk" in _load(pyproject).get("tool", {}):
        return pyproject
    stalk_toml = here / "stalk.toml"
    return stalk_toml if stalk_toml.is_file() else None


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None


def read_file(path: Path, keys: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Return ``(settings, adapter options)`` of a config file.

    Raises:
        ConfigError: unreadable TOML, or a key stalk does not know (with the closest one).
    """
    data = _load(path)
    table = data.get("tool", {}).get("stalk") if "tool" in data else None
    if table is None:
        table = data if path.name != "pyproject.toml" else {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.stalk] must be a table")
    settings: dict[str, Any] = {}
    options: dict[str, str] = {}
    for raw_key, value in table.items():
        key = str(raw_key).replace("-", "_")
        if key in OPTION_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {raw_key} must be a table of adapter options")
            options.update({str(k).replace("-", "_"): _text(v) for k, v in value.items()})
            continue
        key = _ALIASES.get(key, key)
        if key not in keys:
            raise ConfigError(
                f"{path}: unknown setting {raw_key!r}{suggest(key, sorted(keys))}; settings are "
                "the flag names of 'stalk run --help' without --, adapter options go in [options]"
            )
        if key == "fatal_exceptions" and isinstance(value, str):
            value = [value]
        if key == "backend" and isinstance(value, str):
            value = value.strip().lower()
        if key == "log_level" and isinstance(value, str):
            value = normalize_log_level(value)
        settings[key] = value
    return settings, options


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolve(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """Fill ``args`` in place from env, file and defaults; return ``{key: (value, origin)}``.

    ``args.option`` ends as a list of ``(key, value)`` pairs: the file's options, overridden by
    ``--option``; a file option whose ``STALK_<BACKEND>_<KEY>`` is set is left to the env.

    Raises:
        ConfigError: a bad environment value or config file.
    """
    defaults = dict(COMMON)
    if args.command == "run":
        defaults.update(RUN)
    keys = set(defaults)
    env = read_env(keys)
    path = find_file(getattr(args, "config", None))
    # every run setting is valid in the file; a command uses the ones it has
    known = set(COMMON) | set(RUN)
    file_values, file_options = read_file(path, known) if path is not None else ({}, {})
    origin: dict[str, tuple[Any, str]] = {}
    for key, default in defaults.items():
        given = getattr(args, key, None)
        if given is not None:
            value, where = given, "command line"
        elif key in env:
            value, where = env[key], f"env {_env_name(key)}"
        elif key in file_values:
            value, where = file_values[key], f"file {path}"
        else:
            value, where = default, "default"
        setattr(args, key, value)
        origin[key] = (value, where)
    backend = str(args.backend)
    options: dict[str, tuple[str, str]] = {}
    for key, value in file_options.items():
        if f"STALK_{backend.upper()}_{key.upper()}" not in os.environ:
            options[key] = (value, f"file {path}")
    for key, value in getattr(args, "option", None) or []:
        options[key] = (value, "command line")
    args.option = [(key, value) for key, (value, _) in options.items()]
    for key, (value, where) in options.items():
        origin[f"option.{key}"] = (value, where)
    return origin


def mask(key: str, value: object) -> object:
    """Return ``value`` fit to print: secrets as ``***``, URL passwords hidden."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [mask(key, item) for item in value]
    if _SECRET_KEY.search(key.rpartition(".")[2]):
        return "***"
    return _URL_PASSWORD.sub(r"\g<head>***@", str(value))


def render(
    origin: Mapping[str, tuple[Any, str]],
    adapter: Mapping[str, Any] | None = None,
    *,
    backend: str = "",
) -> str:
    """Return the ``--print-config`` text: ``key = value  # origin``, secrets masked."""
    import json

    rows = [(key, mask(key, value), where) for key, (value, where) in origin.items()]
    for key, value in (adapter or {}).items():
        if f"option.{key}" not in origin:
            name = f"STALK_{backend.upper()}_{key.upper()}"
            where = f"env {name}" if name in os.environ else "default"
            rows.append((f"option.{key}", mask(key, value), where))
    width = max(len(f"{k} = {json.dumps(v, default=str)}") for k, v, _ in rows)
    return "\n".join(
        f"{k} = {json.dumps(v, default=str)}".ljust(width) + f"  # {w}" for k, v, w in rows
    )
