"""Code hygiene is part of the test command: ``ruff check`` and ``ruff format --check`` on the repository.

CI runs exactly the README's test command, so a lint error or an unformatted file fails CI here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["src", "tests", "bench", "scripts"]


def _ruff() -> list[str]:
    beside_python = Path(sys.executable).with_name("ruff")
    if beside_python.exists():
        return [str(beside_python)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: run scripts/bootstrap.sh (it installs the dev extra)")
    return [found]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_clean(command: list[str]) -> None:
    result = subprocess.run([*_ruff(), *command, *CHECKED], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
