"""stalk: write one function ``bytes -> Result``; run it as a reliable consumer on any broker."""

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
from stalk.options import CollectorOptions
from stalk.result import Result, fatal, ok, retry

__version__ = "0.1.0"

__all__ = [
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
