"""The tree stays in one style: ``ruff format`` and ``ruff check`` as configured in
pyproject.toml (ruff comes with the test extra). A failure names the files to fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(exe).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return subprocess.run(
        [exe, *args, "pipeline", "nodes", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_format_is_applied() -> None:
    result = _ruff("format", "--check")
    assert result.returncode == 0, f"run 'ruff format':\n{result.stdout}{result.stderr}"


def test_ruff_lint_passes() -> None:
    result = _ruff("check")
    assert result.returncode == 0, f"ruff check:\n{result.stdout}{result.stderr}"
