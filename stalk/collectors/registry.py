"""Find an adapter class by ``--backend`` name: built-ins first, then entry points.

Built-ins are named by import path so that ``stalk backends`` and the core install never import a
broker SDK that is not installed. Third-party adapters register in the ``stalk.collectors``
entry-point group::

    [project.entry-points."stalk.collectors"]
    kafka = "stalk_kafka:KafkaAdapter"
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points

from stalk.collectors.base import Adapter
from stalk.errors import ConfigError

#: Entry-point group third-party adapters register under.
ENTRY_POINT_GROUP = "stalk.collectors"

#: name -> (import path, pip extra that provides its SDK or None)
BUILTIN: dict[str, tuple[str, str | None]] = {
    "local": ("stalk.collectors.local:LocalAdapter", None),
    "memory": ("stalk.collectors.memory:MemoryAdapter", None),
    "sqs": ("stalk.collectors.sqs:SQSAdapter", "sqs"),
    "amqp": ("stalk.collectors.amqp:AMQPAdapter", "amqp"),
    "nsq": ("stalk.collectors.nsq:NSQAdapter", "nsq"),
}


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """One row of ``stalk backends``."""

    name: str
    target: str
    origin: str
    available: bool
    problem: str


def _installed_builtin(name: str) -> bool:
    module_name = BUILTIN[name][0].partition(":")[0]
    return importlib.util.find_spec(module_name) is not None


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Return every backend name known: shipped ones and registered ones."""
    shipped = [n for n in BUILTIN if _installed_builtin(n)]
    return sorted(set(shipped) | set(_entry_points()))


def _import(target: str, name: str, extra: str | None) -> type[Adapter]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"pip install 'stalk[{extra}]'" if extra else "check the package is installed"
        raise ConfigError(f"backend {name!r} cannot load ({exc}); {hint}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError(f"backend {name!r} points at {target!r}, which is not a stalk Adapter")
    return cls


def get(name: str) -> type[Adapter]:
    """Return the adapter class registered as ``name``.

    Raises:
        ConfigError: unknown name (listing the known ones) or an SDK that is not installed.
    """
    if name in BUILTIN and _installed_builtin(name):
        target, extra = BUILTIN[name]
        return _import(target, name, extra)
    registered = _entry_points()
    if name in registered:
        return _import(registered[name], name, None)
    raise ConfigError(
        f"unknown backend {name!r}; choose one of: {', '.join(names())} "
        "(third-party adapters register in the 'stalk.collectors' entry-point group)"
    )


def describe_all() -> list[BackendInfo]:
    """Return every backend with whether it loads here and, if not, why."""
    rows: list[BackendInfo] = []
    found = {n: (t, "builtin") for n, (t, _) in BUILTIN.items() if _installed_builtin(n)}
    for ep_name, target in _entry_points().items():
        found.setdefault(ep_name, (target, "entry point"))
    for name in sorted(found):
        target, origin = found[name]
        try:
            get(name)
        except ConfigError as exc:
            rows.append(BackendInfo(name, target, origin, False, str(exc)))
        else:
            rows.append(BackendInfo(name, target, origin, True, ""))
    return rows
