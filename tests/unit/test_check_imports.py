"""scripts/check_imports.py: the import-cycle check that scripts/test runs over stalk/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_imports.py"


def check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60
    )


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_check_imports_passes_stalk_itself() -> None:
    out = check(ROOT / "stalk")
    assert out.returncode == 0, out.stdout
    assert "no import cycle" in out.stdout


def test_check_imports_counts_type_checking_and_function_imports(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.b import B\n",
            "b.py": "def f():\n    from . import c\n",
            "c.py": "import pkg.a\n",
        },
    )
    out = check(root)
    assert out.returncode == 1
    assert "import cycle: pkg.a -> pkg.b -> pkg.c -> pkg.a" in out.stdout
    assert "pkg/a.py:3: pkg.a imports pkg.b" in out.stdout


def test_check_imports_finds_a_package_and_its_child_importing_each_other(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "sub/__init__.py": "from pkg.sub.impl import X\n",
            "sub/impl.py": "from pkg.sub import Y\n",
        },
    )
    out = check(root)
    assert out.returncode == 1
    assert "import cycle: pkg.sub -> pkg.sub.impl -> pkg.sub" in out.stdout


def test_check_imports_accepts_a_tree(tmp_path: Path) -> None:
    root = package(
        tmp_path,
        {
            "a.py": "from pkg import b\nimport pkg.sub.impl\n",
            "b.py": "import json\nfrom .sub import impl\n",
            "sub/__init__.py": "",
            "sub/impl.py": "",
        },
    )
    out = check(root)
    assert out.returncode == 0, out.stdout
    assert "no import cycle among 5 modules" in out.stdout
