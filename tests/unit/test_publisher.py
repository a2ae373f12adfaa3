"""``stalk.Publisher`` and ``stalk.AsyncPublisher``: the producer API, on the local backend
(the same adapters as the CLI, so what they publish ``stalk run`` consumes)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

import stalk
from tests.unit.test_cli_day_one import peek_json
from tests.unit.test_cli_day_one import stalk as cli


def test_publisher_publishes_what_the_cli_then_sees(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with stalk.Publisher("local", source="orders", path=str(db)) as orders:
        first = orders.publish(b'{"order": 1}', attributes={"tenant": "a"})
        rest = orders.publish_batch(['{"order": 2}', b'{"order": 3}'])
        orders.publish("later", delay_s=3600)
    assert first and len(rest) == 2
    seen = peek_json(db, "orders")
    assert [m["body"] for m in seen] == ['{"order": 1}', '{"order": 2}', '{"order": 3}']
    assert seen[0]["attributes"] == {"tenant": "a"}
    counts = json.loads(cli("stats", "--source", "orders", "--json", db=db).stdout)
    assert (counts["ready"], counts["delayed"]) == (3, 1)


def test_publisher_is_shared_by_threads_and_works_inside_a_running_loop(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    publisher = stalk.Publisher("LOCAL", source="jobs", path=str(db))
    threads = [
        threading.Thread(target=lambda i=i: publisher.publish(f"t{i}".encode())) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def view() -> str:  # an async web view calling the sync API must not deadlock
        return publisher.publish(b"from-a-loop")

    assert asyncio.run(view())
    publisher.close()
    publisher.close()  # idempotent
    assert len(peek_json(db, "jobs")) == 9


def test_async_publisher(tmp_path: Path) -> None:
    db = tmp_path / "q.db"

    async def main() -> list[str]:
        async with stalk.AsyncPublisher("local", source="events", path=str(db)) as events:
            ids = await events.publish_batch([b"a", b"b"], attributes={"k": "v"})
            ids.append(await events.publish("c"))
            return ids

    assert len(asyncio.run(main())) == 3
    assert [m["body"] for m in peek_json(db, "events")] == ["a", "b", "c"]


def test_publisher_errors_are_stalks_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STALK_SOURCE", raising=False)
    with pytest.raises(stalk.ConfigError, match="source"):
        stalk.Publisher("local")
    with pytest.raises(stalk.ConfigError, match="did you mean 'local'"):
        stalk.Publisher("locall", source="q")
    with pytest.raises(stalk.ConfigError, match="no option 'colour'"):
        stalk.Publisher("local", source="q", colour="blue")
    with stalk.Publisher("local", source="q", path=str(tmp_path / "q.db")) as q:
        with pytest.raises(ValueError, match="delay_s"):
            q.publish(b"x", delay_s=-1)
        with pytest.raises(TypeError, match="bytes or str"):
            q.publish(123)  # type: ignore[arg-type]
