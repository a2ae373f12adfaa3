"""Find an adapter class by ``--backend`` name: built-ins first, then entry points.

Built-ins are named by import path so that ``stalk backends`` and the core install never import a
broker SDK that is not installed. Third-party adapters register in the ``stalk.collectors``
entry-point group::

    [project.entry-points."stalk.collectors"]
    kafka = "stalk_kafka:KafkaAdapter"
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, NamedTuple

from stalk.errors import ConfigError

if TYPE_CHECKING:
    from stalk.collectors.base import Adapter

#: Entry-point group third-party adapters register under.
ENTRY_POINT_GROUP = "stalk.collectors"

#: name -> (import path, pip extra that provides its SDK or None)
BUILTIN: dict[str, tuple[str, str | None]] = {
    "local": ("stalk.collectors.local:LocalAdapter", None),
    "memory": ("stalk.collectors.memory:MemoryAdapter", None),
    "sqs": ("stalk.collectors.sqs:SQSAdapter", "sqs"),
    "amqp": ("stalk.collectors.amqp:AMQPAdapter", "amqp"),
    "nsq": ("stalk.collectors.nsq:NSQAdapter", "nsq"),
    "pubsub": ("stalk.collectors.pubsub:PubSubAdapter", "pubsub"),
}


#: name -> the SDK modules its adapter imports: ``stalk backends`` looks for them with
#: ``importlib.util.find_spec`` instead of importing them (boto3 alone takes ~0.5 s to import).
SDK_MODULES: dict[str, tuple[str, ...]] = {
    "sqs": ("boto3",),
    "amqp": ("aio_pika",),
    "nsq": ("nsq", "tornado"),
    "pubsub": ("google.cloud.pubsub_v1",),
}


class BackendInfo(NamedTuple):
    """One row of ``stalk backends``."""

    name: str
    target: str
    origin: str
    available: bool
    problem: str


def _installed_builtin(name: str) -> bool:
    module_name = BUILTIN[name][0].partition(":")[0]
    return importlib.util.find_spec(module_name) is not None


def _may_register() -> bool:
    """Return False when no installed distribution mentions the entry-point group.

    A plain directory scan (a few milliseconds) spares ``stalk backends`` and ``stalk run`` the
    import of importlib.metadata and its full scan (~40 ms) in the usual case of no third-party
    adapter; any hit (or anything unusual on ``sys.path``) takes the full, exact path.
    """
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            try:
                with open(os.path.join(entry or ".", name, "entry_points.txt"), "rb") as file:
                    if ENTRY_POINT_GROUP.encode() in file.read():
                        return True
            except OSError:
                continue
    return False


def _entry_points() -> dict[str, str]:
    if not _may_register():
        return {}
    from importlib.metadata import entry_points  # scans installed packages: only when needed

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _missing_sdk(name: str) -> str | None:
    """Return the first SDK module of a built-in backend that is not installed, else None."""
    for module in SDK_MODULES.get(name, ()):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None


def names() -> list[str]:
    """Return every backend name known: shipped ones and registered ones."""
    shipped = [n for n in BUILTIN if _installed_builtin(n)]
    return sorted(set(shipped) | set(_entry_points()))


def _import(target: str, name: str, extra: str | None) -> type[Adapter]:
    from stalk.collectors.base import Adapter

    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            f"pip install -e '.[{extra}]' from the stalk checkout"
            if extra
            else "check the package is installed"
        )
        raise ConfigError(f"backend {name!r} cannot load ({exc}); {hint}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise ConfigError(f"backend {name!r} points at {target!r}, which is not a stalk Adapter")
    return cls


def get(name: str) -> type[Adapter]:
    """Return the adapter class registered as ``name``.

    Names are matched case-insensitively (``--backend SQS`` is ``sqs``) when no adapter has
    the exact name.

    Raises:
        ConfigError: unknown name (the closest known one and the list) or an SDK that is not
            installed.
    """
    for candidate in dict.fromkeys((name, name.lower())):
        if candidate in BUILTIN and _installed_builtin(candidate):
            target, extra = BUILTIN[candidate]
            return _import(target, candidate, extra)
    registered = _entry_points()
    if name in registered:
        return _import(registered[name], name, None)
    folded = {key.lower(): key for key in registered}
    if name.lower() in folded:
        return _import(registered[folded[name.lower()]], folded[name.lower()], None)
    known = names()
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"unknown backend {name!r}; {hint}choose one of: {', '.join(known)} "
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
        if origin == "builtin":  # no import: is each SDK module there?
            missing = _missing_sdk(name)
            extra = BUILTIN[name][1]
            problem = (
                f"{missing} is not installed; pip install -e '.[{extra}]' from the stalk checkout"
                if missing is not None
                else ""
            )
            rows.append(BackendInfo(name, target, origin, missing is None, problem))
            continue
        try:
            get(name)
        except ConfigError as exc:
            rows.append(BackendInfo(name, target, origin, False, str(exc)))
        else:
            rows.append(BackendInfo(name, target, origin, True, ""))
    return rows
