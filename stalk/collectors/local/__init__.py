"""The ``local`` backend: durable queues in one SQLite WAL file, no server.

``adapter`` is the asyncio face; ``store`` the queue operations; ``sql`` the statements;
``file`` opening and lock waits; ``thread`` the one thread that owns the connection;
``settings`` the ``--option`` keys, limits and name checks.
"""

from stalk.collectors.local.adapter import LocalAdapter
from stalk.collectors.local.settings import (
    DEFAULT_PATH,
    LOCAL_FEATURES,
    QUEUE_NAME,
    LocalSettings,
    check_name,
)

__all__ = [
    "DEFAULT_PATH",
    "LOCAL_FEATURES",
    "QUEUE_NAME",
    "LocalAdapter",
    "LocalSettings",
    "check_name",
]
