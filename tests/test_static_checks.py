"""Static checks, run with the suite so that they hold by themselves: mypy at the level pyproject.toml
sets (strict for driver/, memory/ and devices/), pyflakes (unused imports and names, undefined
names) and isort (import order; pyproject.toml's [tool.isort]) over the package, the tests and the
benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_types_check() -> None:
    pytest.importorskip("mypy", reason="mypy is a test dependency: pip install -e '.[test]'")
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_pyflakes_finds_nothing() -> None:
    pytest.importorskip("pyflakes", reason="pyflakes is a test dependency: pip install -e '.[test]'")
    done = subprocess.run([sys.executable, "-m", "pyflakes", "worldswitch", "tests", "bench"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_are_sorted() -> None:
    pytest.importorskip("isort", reason="isort is a test dependency: pip install -e '.[test]'")
    done = subprocess.run([sys.executable, "-m", "isort", "--check-only", "--diff", "worldswitch", "tests", "bench"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, "run `python -m isort worldswitch tests bench`:\n" + done.stdout + done.stderr


def test_the_readme_lists_every_module() -> None:
    """The architecture table in the README has a line for each module (issue 14: a reader finds
    every part's room there)."""
    readme = (ROOT / "README.md").read_text()
    package = ROOT / "worldswitch"
    modules = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                     if path.name not in ("__init__.py", "__main__.py"))
    missing = [module for module in modules if f"| `{module}` |" not in readme]
    assert not missing, f"README.md's architecture table lacks {', '.join(missing)}"
