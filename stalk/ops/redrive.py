"""Move messages from an error topic back to a source: ``stalk redrive``, for every backend.

Written against the adapter seam only (``get_messages`` on the error topic, or ``fetch`` where a
push broker can get on request as AMQP can, ``publish`` to the target, then ``ack``), so any
polling adapter, built-in or third-party, gets the command for free.

Each message is republished as a new message: the broker counts its attempts from 1 again, and
the failure metadata it carries (``stalk-reason``, ``stalk-error``, ...) stays as attributes so a
handler or an operator can still see why it failed before. Order: publish, then ack; a crash in
between leaves a copy in both places (at-least-once), never in neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from stalk.collectors.base import Adapter
from stalk.errors import ConfigError
from stalk.message import ATTR_ATTEMPT, ATTR_REASON, Message
from stalk.ops.peek import Reader

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
    reason: str | None = None,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    wait_s: float = WAIT_S,
    on_match: Callable[[Message], None] | None = None,
) -> int:
    """Move up to ``limit`` messages (all when ``None``) from ``from_adapter``'s source to
    ``to_adapter``'s. Both must be bound and open.

    ``reason`` moves only messages whose ``stalk-reason`` is that one; the others are held
    until the end and then given back where they were. ``dry_run`` moves nothing: it reads,
    reports each match to ``on_match`` and gives every message back. Any polling adapter, and
    any :class:`~stalk.collectors.base.Fetcher` (AMQP, NSQ), can be redriven.

    Returns:
        how many messages were moved (with ``dry_run``: would have been).

    Raises:
        ConfigError: the error topic's backend cannot be read, or both name the same place.
        BackendError: from either adapter; what was moved so far stays moved, the rest stays.
    """
    if from_adapter.describe() == to_adapter.describe():
        raise ConfigError(f"redrive from and to the same place ({to_adapter.describe()})")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    reader = Reader(from_adapter)
    started = time.time()
    moved = 0
    try:
        while limit is None or moved < limit:
            want = batch_size if limit is None else min(batch_size, limit - moved)
            batch = await reader.take(want)
            if not batch:
                break
            matching = [
                m for m in batch if reason is None or m.attributes.get(ATTR_REASON) == reason
            ]
            if limit is not None:
                matching = matching[: limit - moved]
            if dry_run:
                for message in matching:
                    if on_match is not None:
                        on_match(message)
                moved += len(matching)
                continue
            done, looped = await _move_batch(reader, to_adapter, matching, started, on_match)
            moved += done
            if looped:
                logger.warning("stopping: message failed again after this redrive moved it")
                break
    finally:
        await reader.give_back()
    logger.info(
        "%s %d message(s) from %s to %s",
        "would redrive" if dry_run else "redrove",
        moved,
        from_adapter.describe(),
        to_adapter.describe(),
    )
    return moved


async def _move_batch(
    reader: Reader,
    to_adapter: Adapter,
    batch: list[Message],
    started: float,
    on_match: Callable[[Message], None] | None,
) -> tuple[int, bool]:
    """Publish each message to the target, then ack the published ones; the rest stay held and
    are given back at the end."""
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
            if on_match is not None:
                on_match(message)
    finally:
        await reader.ack(published)
    return len(published), looped


async def redrive_by_name(
    adapter_cls: type[Adapter],
    options: Mapping[str, str],
    from_source: str,
    to_source: str,
    limit: int | None = None,
    *,
    reason: str | None = None,
    dry_run: bool = False,
    from_options: Mapping[str, str] | None = None,
    on_match: Callable[[Message], None] | None = None,
) -> int:
    """Build, open and close both adapters, then :func:`redrive`: the CLI's one call.

    ``stalk redrive --backend NAME --from ERRORS --to SOURCE [--limit N] [--reason R]
    [--dry-run] [--option K=V ...]``. ``from_options`` (default: ``options``) configures the
    reading side, e.g. to declare nothing there.
    """
    from_adapter = adapter_cls.from_options(
        from_source, None, options if from_options is None else from_options
    )
    to_adapter = adapter_cls.from_options(to_source, None, options)
    await from_adapter.open()
    try:
        await to_adapter.open()
        try:
            return await redrive(
                from_adapter,
                to_adapter,
                limit,
                reason=reason,
                dry_run=dry_run,
                on_match=on_match,
            )
        finally:
            await to_adapter.close()
    finally:
        await from_adapter.close()
