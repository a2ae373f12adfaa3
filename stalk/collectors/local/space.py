"""What a full disk means for a stalk file, said in one line.

SQLite reports only "database or disk is full". In WAL mode every change, a lease or an ack as
much as a publish, first appends to the write-ahead log beside the file, so a worker on a full
disk cannot drain its queue either (the very thing that would free space), and freeing a little
is not enough: the log needs room to grow. The line names the file, the free space, and how much
SQLite may need, so whoever reads the health reason or the log knows what to free.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: The write-ahead log is truncated back to this after a checkpoint (``journal_size_limit``):
#: the most room SQLite needs for it in normal running.
WAL_LIMIT_BYTES = 64 * 1024 * 1024
MIB = 1024 * 1024


def mib(size: int) -> str:
    """Return ``size`` in MiB for people, rounded up (``0.1 MiB`` at least when non-zero)."""
    if size <= 0:
        return "0 MiB"
    return f"{max(0.1, math.ceil(size / MIB * 10) / 10):g} MiB"


def free_bytes(directory: Path) -> int | None:
    """Return the bytes this user may still write in ``directory``'s filesystem, or None."""
    try:
        found = os.statvfs(directory)
    except (OSError, AttributeError):  # statvfs is POSIX only
        return None
    return found.f_bavail * found.f_frsize


def disk_full_text(path: Path, error: Exception) -> str:
    """Describe SQLITE_FULL on ``path``: the free space and the room its WAL may need."""
    wal = path.with_name(path.name + "-wal")
    try:
        wal_bytes = wal.stat().st_size
    except OSError:
        wal_bytes = 0
    free = free_bytes(path.parent)
    need = max(MIB, WAL_LIMIT_BYTES - wal_bytes)
    return (
        f"local backend file {path}: disk full ({error}); "
        f"{mib(free) if free is not None else 'unknown space'} free in {path.parent}. SQLite "
        f"writes every lease, ack and publish to its write-ahead log {wal.name} "
        f"({mib(wal_bytes)} now) first: free up to {mib(need)} there (the log is kept under "
        f"{mib(WAL_LIMIT_BYTES)}); a worker retries and drains once there is room"
    )
