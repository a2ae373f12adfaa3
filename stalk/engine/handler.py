"""User handlers: their protocol, loading by ``MODULE:FUNC``, and outcomes turned into Results."""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from stalk.batching import BATCH_ATTRIBUTE, BatchSpec
from stalk.errors import Fatal, HandlerImportError, InvalidResult
from stalk.message import Message
from stalk.result import OK, Result


@runtime_checkable
class BodyHandler(Protocol):
    """``def handler(body: bytes) -> Result | None`` — the primary contract."""

    def __call__(self, body: bytes, /) -> Result | Awaitable[Result | None] | None: ...


@runtime_checkable
class MessageHandler(Protocol):
    """``def handler(body: bytes, message: Message) -> Result | None`` — sees id, attempt, ..."""

    def __call__(
        self, body: bytes, message: Message, /
    ) -> Result | Awaitable[Result | None] | None: ...


@dataclass(frozen=True, slots=True)
class PreparedHandler:
    """A handler with its shape worked out once, so the hot path does no introspection.

    ``batch`` is set for a batch handler (``@stalk.batch`` or a ``list[Message]`` parameter):
    it takes the list of messages instead of one body.
    """

    func: Callable[..., Any]
    name: str
    is_async: bool
    wants_message: bool
    batch: BatchSpec | None = None


def _batch_spec(func: Callable[..., Any], first: inspect.Parameter | None) -> BatchSpec | None:
    """Return the handler's batch spec: from ``@stalk.batch``, or from a ``list[Message]``
    annotation on its only parameter (with the default size and wait)."""
    spec = getattr(func, BATCH_ATTRIBUTE, None)
    if isinstance(spec, BatchSpec):
        return spec
    if first is None or first.annotation is first.empty:
        return None
    annotation = first.annotation
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").replace("stalk.", "").replace("typing.", "")
        return BatchSpec() if text in ("list[Message]", "List[Message]") else None
    origin = getattr(annotation, "__origin__", None)
    args = getattr(annotation, "__args__", ())
    return BatchSpec() if origin is list and args == (Message,) else None


def describe(func: Callable[..., Any]) -> str:
    """Return ``module:qualname`` for error texts that name the handler."""
    module = getattr(func, "__module__", None) or "?"
    name = getattr(func, "__qualname__", None) or type(func).__name__
    return f"{module}:{name}"


def prepare(func: Callable[..., Any]) -> PreparedHandler:
    """Inspect a handler once: async or not, and whether it takes the Message too.

    Raises:
        HandlerImportError: the object is not callable or takes an unusable signature.
    """
    if not callable(func):
        raise HandlerImportError(f"handler {func!r} is not callable")
    name = describe(func)
    call = getattr(func, "__call__", None)  # noqa: B004 - we want the bound __call__ of objects
    is_async = inspect.iscoroutinefunction(func) or (
        not inspect.isroutine(func) and call is not None and inspect.iscoroutinefunction(call)
    )
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        spec = getattr(func, BATCH_ATTRIBUTE, None)
        batch = spec if isinstance(spec, BatchSpec) else None
        return PreparedHandler(func, name, is_async, wants_message=False, batch=batch)
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    spec = _batch_spec(func, positional[0] if len(positional) == 1 else None)
    if spec is not None:
        if len(positional) != 1:
            raise HandlerImportError(f"batch handler {name} must take one argument: the messages")
        return PreparedHandler(func, name, is_async, wants_message=False, batch=spec)
    if len(positional) > 2 or (not positional and not var_positional):
        raise HandlerImportError(
            f"handler {name} must take (body) or (body, message); it takes {len(positional)} "
            "required arguments"
        )
    return PreparedHandler(func, name, is_async, wants_message=len(positional) == 2)


def load(path: str) -> Callable[..., Any]:
    """Import ``MODULE:FUNC`` (or ``MODULE.FUNC``) the way ``uvicorn`` and ``celery -A`` do.

    The working directory is put on ``sys.path`` first so ``workers.app:handler`` works from
    the project root, as users expect.

    Raises:
        HandlerImportError: with one line saying what is wrong and what to try.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise HandlerImportError(
            f"handler path {path!r} is not MODULE:FUNC; write it like workers.app:handler"
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and not _is_part_of(missing, module_name):  # raised inside the module
            raise HandlerImportError(
                f"handler module {module_name!r} imports {missing!r}, which is not installed "
                f"({_where(exc)}): a missing dependency; pip install it in this environment"
            ) from exc
        raise HandlerImportError(
            f"cannot import module {module_name!r} for handler {path!r}: {exc}; "
            "run from the directory that contains it or fix the path"
        ) from exc
    except SyntaxError as exc:
        raise HandlerImportError(
            f"handler module {module_name!r} has a syntax error at {exc.filename}:{exc.lineno}: "
            f"{exc.msg}"
        ) from exc
    except Exception as exc:
        raise HandlerImportError(
            f"importing module {module_name!r} failed at {_where(exc)}: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(
                f"module {module_name!r} has no attribute {attr!r}; check the name after ':'"
            ) from None
    if not callable(obj):
        raise HandlerImportError(f"{path!r} is a {type(obj).__name__}, not a callable handler")
    return obj  # type: ignore[no-any-return]


def _is_part_of(missing: str, module_name: str) -> bool:
    """True when ``missing`` is ``module_name`` or one of its parent packages."""
    return module_name == missing or module_name.startswith(missing + ".")


def _where(exc: BaseException) -> str:
    """Return ``file:line`` of the deepest frame outside the import machinery."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")
    ]
    if not frames:
        return "unknown place"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}"


def resolve_exceptions(names: Sequence[str]) -> tuple[type[BaseException], ...]:
    """Turn ``module.Class`` names from options into exception classes.

    Raises:
        HandlerImportError: a name does not resolve to an exception class.
    """
    found: list[type[BaseException]] = []
    for name in names:
        module_name, _, cls_name = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name or "builtins"), cls_name)
        except (ImportError, AttributeError) as exc:
            raise HandlerImportError(f"fatal exception {name!r} cannot be imported: {exc}") from exc
        if not (isinstance(obj, type) and issubclass(obj, BaseException)):
            raise HandlerImportError(f"fatal exception {name!r} is not an exception class")
        found.append(obj)
    return tuple(found)


def to_result(value: object, handler_name: str) -> Result:
    """Turn a handler's return value into a Result: None is ok, anything odd is fatal."""
    if value is None:
        return OK
    if isinstance(value, Result):
        return value
    if inspect.iscoroutine(value):
        # Closed here so Python does not warn "never awaited" later, far from its cause.
        value.close()
        return Result(
            error=TypeError(
                f"handler {handler_name} returned a coroutine it did not await; expected "
                "stalk.Result or None (make the handler async def, or await the call)"
            ),
            fatal=True,
        )
    return Result(
        error=TypeError(
            f"handler {handler_name} returned {type(value).__name__}; expected stalk.Result or None"
        ),
        fatal=True,
    )


def from_exception(exc: BaseException, fatal_types: tuple[type[BaseException], ...]) -> Result:
    """Turn a raised exception into a Result: retry, or fatal for ``Fatal`` and the listed types."""
    if isinstance(exc, Fatal | InvalidResult) or (fatal_types and isinstance(exc, fatal_types)):
        return Result(error=exc, fatal=True)
    return Result(error=exc, retry=True)
