"""Hiding credentials in text: URL passwords, ``key=value`` secrets, secret environment values.

Vocabulary-level (no stalk imports) because two layers need the same rule: the CLI's log
formatters (:mod:`stalk.ops.logs`) and the error metadata the engine stores on the error topic
(:class:`stalk.message.Failure`), which outlives any log and is read by more people. A secret
hidden in one and stored verbatim in the other is not hidden.
"""

from __future__ import annotations

import os
import re

#: ``scheme://user:password@host`` → ``scheme://user:***@host``: credentials never reach a log
#: or an error copy.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")


#: ``password=x``, ``aws_secret_access_key: x``, ``"SecretAccessKey": "x"``, ``token=x``: the
#: value goes, the key stays so a reader still sees what was there.
#: A bytes repr (``'X-Amz-Security-Token': b'...'``, as botocore prints headers) counts as quoted,
#: and ``Signature`` values go too (a signed request can be replayed for minutes).
_KEY_VALUE = re.compile(
    r"(?i)(?P<head>\b[\w-]*(?:secret|passw(?:or)?d|token|credential|api[_-]?key|signature)"
    r"[\w-]*[\"']?\s*[:=]\s*(?:b(?=[\"']))?[\"']?)(?P<value>[^\s\"',;&}]+)"
)

#: Environment variables whose values are secrets wherever they turn up (an SDK's error text).
_SECRET_ENV = re.compile(r"(?i)(secret|passw(or)?d|token|credentials?|private_key|api_key)")

#: Shortest environment value treated as a secret: shorter ones ("1", "true") are settings.
MIN_SECRET_CHARS = 8


_secrets: list[str] | None = None
#: Secret values known at run time, not from the environment (an SDK's resolved credentials).
_known: set[str] = set()


def add_secrets(*values: str | None) -> None:
    """Hide these values wherever they appear from now on (e.g. credentials an SDK read from a
    profile file, which the environment scan cannot see). Short or empty values are ignored."""
    global _secrets
    fresh = {v for v in values if v and len(v) >= MIN_SECRET_CHARS} - _known
    if fresh:
        _known.update(fresh)
        _secrets = None  # re-sorted with the environment's on the next redact()


def refresh_secrets() -> list[str]:
    """Re-read which environment values are secrets (``stalk.ops.logs.configure`` does; the
    result is cached for :func:`redact`)."""
    global _secrets
    values = {
        value
        for name, value in os.environ.items()
        if _SECRET_ENV.search(name) and len(value) >= MIN_SECRET_CHARS
    } | _known
    _secrets = sorted(values, key=len, reverse=True)
    return _secrets


def redact(text: str) -> str:
    """Hide credentials: URL passwords, ``key=value`` secrets, secret environment values."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _KEY_VALUE.sub(r"\g<head>***", text)
    for value in _secrets if _secrets is not None else refresh_secrets():
        if value in text:
            text = text.replace(value, "***")
    return text
