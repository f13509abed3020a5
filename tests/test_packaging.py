"""Installable where Ascend users are: ranges, pins, the wheel and sdist.

- pyproject.toml states ranges; constraints.txt pins what `make` / CI install, inside them;
  constraints-lowest.txt pins exactly the lower bounds that `make test-lowest` (CI's second
  pass) runs the suite's core under, so a lower bound cannot drift from what is tested;
- the `ascend` extra does not pin torch-npu (the user's CANN decides) and reaches down to
  the oldest release of the support matrix (tools/npu_contract RELEASES);
- `python -m build` gives a wheel and an sdist that carry the shipped drafts, the server's
  page and the training configs/data (~30 s: a build from a copy of the tracked files);
- pip keeps an installed older supported torch when installing the wheel (a resolver dry run
  against an environment whose torch is 2.6.0); `make test-lowest` does it for real with
  torch 2.6.0 and then runs `ascend-dspark generate` and the server's /health from outside
  the checkout (tests/packaging_check.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests import packaging_check
from tools import npu_contract

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if match:
            out[match.group(1).lower().replace("_", "-")] = Version(match.group(2))
    return out


def requirements(items) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in items]
    return {r.name.lower(): r for r in reqs}


DEPS = requirements(PYPROJECT["project"]["dependencies"])


def lower_bound(spec: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in spec if s.operator == ">="]
    return max(bounds) if bounds else None


def test_dependencies_are_ranges_and_constraints_pin_inside_them():
    exact = {name for name, r in DEPS.items() if any(s.operator == "==" for s in r.specifier)}
    assert not exact, f"pyproject dependencies must be ranges (pins go to constraints.txt): {exact}"
    assert str(DEPS["torch"].specifier) == ">=2.6" and DEPS["transformers"].specifier == SpecifierSet(">=5.17,<6")
    pinned = pins(ROOT / "constraints.txt")
    for name, req in DEPS.items():
        assert name in pinned, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pinned[name]), f"constraints.txt pins {name}=={pinned[name]}, outside {req}"
    assert pinned["torch"] == Version("2.13.0")


def test_lowest_constraints_are_the_lower_bounds(tmp_path):
    lowest = pins(ROOT / "constraints-lowest.txt")
    for name in ("torch", "transformers", "tokenizers", "safetensors"):
        assert lower_bound(DEPS[name].specifier) == lowest[name], f"{name}: {DEPS[name]} vs lowest {lowest[name]}"
    # the other lines are transitive pins that those versions need (not bounds of ours)
    assert not (set(lowest) - {"torch", "transformers", "tokenizers", "safetensors"}) & set(DEPS)
    assert lowest["triton"] == Version("3.2.0") and lowest["sympy"] == Version("1.13.1")   # torch 2.6.0's own pins
    merged = pins(packaging_check.lowest_constraints(tmp_path / "lowest.txt"))   # what make test-lowest installs
    assert {k: merged[k] for k in lowest} == lowest
    assert merged["fastapi"] == pins(ROOT / "constraints.txt")["fastapi"]


def test_ascend_extra_lets_cann_choose_the_torch_npu():
    (req,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["ascend"]]
    assert req.name == "torch-npu" and [s.operator for s in req.specifier] == [">="]
    assert lower_bound(req.specifier) == Version(npu_contract.RELEASES[0])
    for release in npu_contract.RELEASES:   # every torch_npu of the matrix pairs with a torch in range
        torch_of = Version(".".join(release.split(".")[:3]))
        assert req.specifier.contains(Version(release)) and DEPS["torch"].specifier.contains(torch_of), release


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return packaging_check.build(out, sys.executable)


def test_wheel_and_sdist_carry_drafts_static_and_ranges(dist):
    wheel, sdist = dist
    meta = packaging_check.check_dist(wheel, sdist)
    requires = meta["Requires-Dist"]
    assert "torch>=2.6" in requires and "transformers<6,>=5.17" in requires, requires
    assert 'torch-npu>=2.6.0; extra == "ascend"' in requires, requires
    assert not [r for r in requires if re.match(r"^(torch|transformers|torch-npu)==", r)]
    assert meta["Requires-Python"] == [">=3.11"]


def _stub_dist(site: Path, name: str, version: str) -> None:
    """An installed-distribution record without code: what pip's resolver sees of a torch."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    (info / "INSTALLER").write_text("pip\n")


def test_pip_keeps_an_installed_older_supported_torch(dist, tmp_path):
    """`pip install ascend-dspark` where torch 2.6.0 is installed (say, beside torch_npu 2.6.0)
    must not touch torch: the resolver's plan for the wheel, without any torch constraint."""
    wheel, _ = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    _stub_dist(site, "torch", "2.6.0")
    constraints = packaging_check.constraints_without({"torch", "triton"}, tmp_path / "c.txt", lowest=True)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--dry-run", "--quiet", "--report", str(report), "-c", str(constraints), str(wheel)],
                          capture_output=True, text=True, env=packaging_check.outside_env(), timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "ascend-dspark" in planned and "transformers" in planned
    assert "torch" not in planned, f"pip would replace the installed torch 2.6.0 with {planned.get('torch')}"
    assert not DEPS["torch"].specifier.contains(Version("2.5.1")), "torch 2.5 is below the supported range"
