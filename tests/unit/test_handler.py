from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from stalk import Fatal, Message, Result, ok
from stalk.engine.handler import from_exception, load, prepare, resolve_exceptions, to_result
from stalk.errors import HandlerImportError


def body_only(body: bytes) -> Result:
    return ok()


def with_message(body: bytes, message: Message) -> None:
    return None


async def async_body(body: bytes) -> None:
    return None


class CallableObject:
    async def __call__(self, body: bytes, message: Message) -> None:
        return None


def test_prepare_detects_shape() -> None:
    assert prepare(body_only).wants_message is False
    assert prepare(with_message).wants_message is True
    assert prepare(async_body).is_async is True
    obj = prepare(CallableObject())
    assert obj.is_async and obj.wants_message


def test_prepare_rejects_bad_signatures() -> None:
    def three(a: bytes, b: Message, c: int) -> None: ...

    with pytest.raises(HandlerImportError, match="takes 3"):
        prepare(three)
    with pytest.raises(HandlerImportError, match="not callable"):
        prepare(42)  # type: ignore[arg-type]


def test_to_result_none_is_ok_and_wrong_type_is_fatal_naming_handler() -> None:
    assert to_result(None, "m:f").is_ok
    bad = to_result(42, "workers.app:handler")
    assert bad.fatal and isinstance(bad.error, TypeError)
    assert "workers.app:handler" in str(bad.error) and "int" in str(bad.error)


def test_a_returned_coroutine_is_fatal_closed_and_says_to_await_it() -> None:
    async def forgot() -> None:
        return None

    coroutine = forgot()
    bad = to_result(coroutine, "workers.app:handler")
    assert bad.fatal and "did not await" in str(bad.error)
    assert coroutine.cr_frame is None, "left open: Python warns 'never awaited' at collection"


def test_from_exception_retry_or_fatal() -> None:
    assert from_exception(RuntimeError("x"), ()).retry
    assert from_exception(Fatal("x"), ()).fatal
    assert from_exception(KeyError("x"), (LookupError,)).fatal


def test_resolve_exceptions() -> None:
    assert resolve_exceptions(["ValueError", "json.JSONDecodeError"])[0] is ValueError
    with pytest.raises(HandlerImportError, match="cannot be imported"):
        resolve_exceptions(["nowhere.Nothing"])
    with pytest.raises(HandlerImportError, match="not an exception"):
        resolve_exceptions(["os.path"])


def test_load_by_module_colon_func(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myjobs.py").write_text(
        textwrap.dedent(
            """
            def handle(body):
                return None
            class Group:
                def method(self, body):
                    return None
            group = Group()
            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load("myjobs:handle").__name__ == "handle"
    assert load("myjobs.handle").__name__ == "handle"
    assert callable(load("myjobs:group.method"))
    with pytest.raises(HandlerImportError, match="has no attribute 'nope'"):
        load("myjobs:nope")
    with pytest.raises(HandlerImportError, match="not a callable"):
        load("myjobs:NOT_CALLABLE")
    sys.modules.pop("myjobs", None)


@pytest.mark.parametrize("path", ["nomodule_xyz:handler", "justaname", ":x", "m:"])
def test_load_errors_are_one_line(path: str) -> None:
    with pytest.raises(HandlerImportError) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_load_reports_module_import_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HandlerImportError, match="boom at import"):
        load("broken_mod:handler")
