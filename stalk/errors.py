"""The one exception tree of stalk.

```
StalkError                      base of everything stalk raises on purpose
 ├── ConfigError                bad option, unknown backend, missing source (exit code 2)
 ├── HandlerImportError         MODULE:FUNC cannot be imported or is not callable (exit code 2)
 └── BackendError               the broker said no or is not there (exit code 1)
      ├── BackendUnavailable    cannot connect / timed out; retried by the engine with backoff
      ├── QueueNotFound         the source or error topic does not exist
      ├── QueueFull             publish refused: the queue is at its length limit
      └── MessageTooLarge       publish refused: the body is over the size limit

Fatal                           raise from a handler: the message goes straight to the error topic
InvalidResult (ValueError)      a Result that cannot be carried out (a delay that is nan, inf, < 0)
HandlerTimeout                  carried by the retry of a handler that ran over handler_timeout_s
```

Catch the narrow class. The engine alone has a last-resort guard, which logs with the message id.
"""

from __future__ import annotations


class StalkError(Exception):
    """Base class of every error stalk raises on purpose."""


class ConfigError(StalkError):
    """An option, backend name or source is wrong; the message says what to change."""


class HandlerImportError(StalkError):
    """The handler path cannot be imported or does not name a callable."""


class BackendError(StalkError):
    """The broker refused an operation or could not be reached."""


class BackendUnavailable(BackendError):
    """The broker cannot be reached; the engine reconnects with backoff."""


class QueueNotFound(BackendError):
    """The named queue, topic or subscription does not exist on the broker."""


class QueueFull(BackendError):
    """A publish was refused because the queue is at its length limit."""


class MessageTooLarge(BackendError):
    """A publish was refused because the body is over the size limit."""


class Fatal(Exception):
    """Raise from a handler to send the message straight to the error topic, without retries."""


class InvalidResult(ValueError):
    """A handler built a Result that cannot be carried out: a retry delay that is not a finite
    number of seconds >= 0. Raised where the Result is made, so the traceback points at the
    handler's bug; the engine routes the message as fatal, like a wrong return type, because
    retrying runs the same bug again."""


class HandlerTimeout(Exception):
    """The handler ran longer than ``handler_timeout_s``; the message is retried."""
