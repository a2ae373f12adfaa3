"""The promises of the package itself: a light core, the public API, the README's demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import stalk

ROOT = Path(__file__).resolve().parents[2]

SDK_MODULES = ("boto3", "botocore", "aio_pika", "aiormq", "google.cloud.pubsub", "nsq")


def test_core_import_pulls_no_broker_sdk() -> None:
    code = (
        "import sys, stalk, stalk.cli, stalk.collectors.local, stalk.collectors.memory, "
        "stalk.collectors.registry as r; r.names(); "
        f"print([m for m in {SDK_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_public_api_names() -> None:
    for name in (
        "Result",
        "Message",
        "BaseCollector",
        "CollectorOptions",
        "ok",
        "retry",
        "fatal",
        "Fatal",
        "StalkError",
        "__version__",
    ):
        assert name in stalk.__all__ and hasattr(stalk, name)
    assert (ROOT / "stalk" / "py.typed").exists()


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in text.split("```sh\n")[1:3]]
    assert "./scripts/demo" in blocks[0] and "pip install" in blocks[0]
    assert "./scripts/test" in blocks[1]
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_demo_runs_on_local_backend(tmp_path: Path) -> None:
    env = {**os.environ, "STALK_LOCAL_PATH": str(tmp_path / "demo.db"), "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 retried, 1 to error topic orders-errors (fatal: 1)" in proc.stdout
