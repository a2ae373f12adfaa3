"""Move messages from an error topic back to a source: ``stalk redrive``, for every backend.

Written against the adapter seam only (``get_messages`` on the error topic, ``publish`` to the
target, then ``ack``), so any polling adapter, built-in or third-party, gets the command for free.

Each message is republished as a new message: the broker counts its attempts from 1 again, and
the failure metadata it carries (``stalk-reason``, ``stalk-error``, ...) stays as attributes so a
handler or an operator can still see why it failed before. Order: publish, then ack; a crash in
between leaves a copy in both places (at-least-once), never in neither.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping

from stalk.collectors.base import Adapter, PollingAdapter
from stalk.errors import ConfigError
from stalk.message import ATTR_ATTEMPT, Message

logger = logging.getLogger(__name__)

#: Set on every redriven message: when it was moved back (epoch seconds). It also stops a run
#: from redriving, in a loop, a message that failed again while the run was still going.
ATTR_REDRIVEN_AT = "stalk-redriven-at"
#: Messages asked of the error topic per round trip.
BATCH_SIZE = 100
#: Long-poll wait per fetch, for brokers whose short poll may miss messages (SQS).
WAIT_S = 1.0


def _redriven_since(message: Message, started: float) -> bool:
    try:
        return float(message.attributes.get(ATTR_REDRIVEN_AT, "0")) >= started
    except ValueError:
        return False


def redriven_attributes(attributes: Mapping[str, str], now: float) -> dict[str, str]:
    """Return what a redriven copy carries: everything but the attempt counter, plus the time."""
    kept = {k: v for k, v in attributes.items() if k != ATTR_ATTEMPT}
    kept[ATTR_REDRIVEN_AT] = f"{now:.6f}"
    return kept


async def redrive(
    from_adapter: Adapter,
    to_adapter: Adapter,
    limit: int | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    wait_s: float = WAIT_S,
) -> int:
    """Move up to ``limit`` messages (all when ``None``) from ``from_adapter``'s source to
    ``to_adapter``'s. Both must be bound and open.

    Returns:
        how many messages were moved.

    Raises:
        ConfigError: the error topic's backend cannot be polled, or both name the same place.
        BackendError: from either adapter; what was moved so far stays moved, the rest stays.
    """
    if not isinstance(from_adapter, PollingAdapter):
        raise ConfigError(
            f"backend {from_adapter.name!r} cannot be redriven yet: reading its "
            "error topic needs a polling adapter"
        )
    if from_adapter.describe() == to_adapter.describe():
        raise ConfigError(f"redrive from and to the same place ({to_adapter.describe()})")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    started = time.time()
    moved = 0
    while limit is None or moved < limit:
        want = batch_size if limit is None else min(batch_size, limit - moved)
        batch = await from_adapter.get_messages(want, wait_s)
        if not batch:
            break
        done, looped = await _move_batch(from_adapter, to_adapter, batch, started)
        moved += done
        if looped:
            logger.warning("stopping: message failed again after this redrive moved it")
            break
    logger.info(
        "redrove %d message(s) from %s to %s", moved, from_adapter.describe(), to_adapter.describe()
    )
    return moved


async def _move_batch(
    from_adapter: Adapter, to_adapter: Adapter, batch: list[Message], started: float
) -> tuple[int, bool]:
    """Publish each message to the target, then ack the published ones; release the rest."""
    published: list[Message] = []
    looped = False
    try:
        for message in batch:
            if _redriven_since(message, started):
                looped = True
                break
            attributes = redriven_attributes(message.attributes, time.time())
            await to_adapter.publish(message.body, attributes)
            published.append(message)
    finally:
        if published:
            await from_adapter.ack(published)
        for message in batch[len(published) :]:
            with contextlib.suppress(Exception):  # it comes back when its lease ends anyway
                await from_adapter.release(message)
    return len(published), looped


async def redrive_by_name(
    adapter_cls: type[Adapter],
    options: Mapping[str, str],
    from_source: str,
    to_source: str,
    limit: int | None = None,
) -> int:
    """Build, open and close both adapters, then :func:`redrive`: the CLI's one call.

    ``stalk redrive --backend NAME --from ERRORS --to SOURCE [--limit N] [--option K=V ...]``.
    """
    from_adapter = adapter_cls.from_options(from_source, None, options)
    to_adapter = adapter_cls.from_options(to_source, None, options)
    await from_adapter.open()
    try:
        await to_adapter.open()
        try:
            return await redrive(from_adapter, to_adapter, limit)
        finally:
            await to_adapter.close()
    finally:
        await from_adapter.close()
