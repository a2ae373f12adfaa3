"""The example handler the README runs: parse JSON, ack good input, retry a transient error,
send undecodable input to the error topic.

Try it: ``stalk send '{"order": 1}' '{"order": 2, "flaky": true}' 'not json'`` then
``stalk run workers.app:handler --until-empty``.
"""

from __future__ import annotations

import json
import logging

from stalk import Message, Result, fatal, ok, retry

logger = logging.getLogger(__name__)


def handler(body: bytes, message: Message) -> Result:
    """Handle one order: JSON in, a log line out."""
    try:
        order = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return fatal(f"not JSON: {exc}")  # retrying cannot fix bad input
    if not isinstance(order, dict):
        return fatal(f"expected a JSON object, got {type(order).__name__}")
    if order.get("flaky") and message.attempt == 1:
        return retry("payment service timed out", delay=0.5)  # transient: try again soon
    logger.info("order %s handled on attempt %d", order.get("order"), message.attempt)
    return ok()
