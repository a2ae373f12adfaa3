"""stalk: write one function ``bytes -> Result``; run it as a reliable consumer on any broker.

The names below are loaded on first use (PEP 562), so ``stalk --help`` and ``stalk backends``
start without importing the engine, pydantic or any broker SDK; ``from stalk import Result``
works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from stalk.batching import batch
    from stalk.engine.collector import BaseCollector
    from stalk.errors import (
        BackendError,
        BackendUnavailable,
        ConfigError,
        Fatal,
        HandlerImportError,
        HandlerTimeout,
        InvalidResult,
        MessageTooLarge,
        QueueFull,
        QueueNotFound,
        StalkError,
    )
    from stalk.message import Failure, Message
    from stalk.ops.publisher import AsyncPublisher, Publisher
    from stalk.options import CollectorOptions
    from stalk.result import Result, fatal, ok, retry

#: public name -> module that defines it.
_LAZY = {
    "batch": "stalk.batching",
    "BaseCollector": "stalk.engine.collector",
    "BackendError": "stalk.errors",
    "BackendUnavailable": "stalk.errors",
    "ConfigError": "stalk.errors",
    "Fatal": "stalk.errors",
    "HandlerImportError": "stalk.errors",
    "HandlerTimeout": "stalk.errors",
    "InvalidResult": "stalk.errors",
    "MessageTooLarge": "stalk.errors",
    "QueueFull": "stalk.errors",
    "QueueNotFound": "stalk.errors",
    "StalkError": "stalk.errors",
    "Failure": "stalk.message",
    "Message": "stalk.message",
    "CollectorOptions": "stalk.options",
    "Publisher": "stalk.ops.publisher",
    "AsyncPublisher": "stalk.ops.publisher",
    "Result": "stalk.result",
    "fatal": "stalk.result",
    "ok": "stalk.result",
    "retry": "stalk.result",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'stalk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AsyncPublisher",
    "BackendError",
    "BackendUnavailable",
    "BaseCollector",
    "CollectorOptions",
    "ConfigError",
    "Failure",
    "Fatal",
    "HandlerImportError",
    "HandlerTimeout",
    "InvalidResult",
    "Message",
    "MessageTooLarge",
    "Publisher",
    "QueueFull",
    "QueueNotFound",
    "Result",
    "StalkError",
    "__version__",
    "batch",
    "fatal",
    "ok",
    "retry",
]
