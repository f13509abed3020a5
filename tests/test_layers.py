"""The import layers of pyproject.toml's [tool.importlinter] hold for this tree, and the
contracts have teeth: the same contracts over a copy of the tree with one forbidden import
added (ops importing the engine) must fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_tree(dest: Path) -> Path:
    for name in ("ascend_dspark", "ops", "serving", "tools"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_its_layers(tmp_path):
    result = lint(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    tree = copy_tree(tmp_path)
    norm = tree / "ops" / "norm.py"
    norm.write_text(norm.read_text() + "\nimport ascend_dspark.engine.engine  # noqa: E402,F401\n")
    result = lint(tree)
    assert result.returncode != 0
    assert "ops.norm -> ascend_dspark.engine.engine" in result.stdout
