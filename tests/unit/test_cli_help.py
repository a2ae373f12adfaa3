"""``stalk --help`` tells the truth and starts fast: every flag described with its default, the
engine's defaults as shown, and no pydantic or broker SDK imported to print it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stalk.cli.parser import ENGINE_FLAGS, build_parser
from stalk.options import CollectorOptions
from tests.unit.test_cli import ROOT
from tests.unit.test_cli_day_one import stalk


def test_top_level_help_lists_every_command_and_explains_module_func() -> None:
    out = stalk("--help").stdout
    for command in ("run", "send", "stats", "peek", "redrive", "backends"):
        assert f"    {command} " in out
    assert "MODULE:FUNC" in out and "workers.app:handler" in out
    assert "Exit codes" in out and "3 --until-empty" in out
    assert "`" not in out  # no reStructuredText backticks


@pytest.mark.parametrize("command", ["run", "send", "stats", "peek", "redrive", "backends"])
def test_every_flag_has_a_description(command: str) -> None:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
    out = stalk(command, "--help").stdout
    assert "`" not in out


def test_run_help_shows_the_engines_defaults() -> None:
    defaults = CollectorOptions()
    for spec in ENGINE_FLAGS:
        value = getattr(defaults, spec.dest)
        if value is not None:
            assert spec.default == str(value), f"{spec.flag} shows {spec.default}, engine {value}"
    out = " ".join(stalk("run", "--help").stdout.split())
    assert "(default: 5)" in out and "(default: 30.0)" in out and "default: local)" in out


@pytest.mark.parametrize("args", [["--help"], ["backends"], ["run", "--help"]])
def test_help_and_backends_import_no_pydantic_and_no_sdk(args: list[str]) -> None:
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['stalk', *{args!r}]\n"
        "try:\n    runpy.run_module('stalk', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = ('pydantic', 'boto3', 'aio_pika', 'nsq', 'asyncio')\n"
        "print([m for m in heavy if m in sys.modules], file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
