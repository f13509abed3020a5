"""The Dockerfiles as written: hadolint finds nothing (and does find a planted mistake), the
torch / torch_npu pairs are ones the project supports, and every image runs as a non-root
user, serves `uvicorn serving.app:app` on the port its settings and health check name, and
bakes the default model in at build time."""

from __future__ import annotations

import re

import pytest

from tests.deploy.images import IMAGES, REPO, dockerfile, image_id, parse
from tests.deploy.tools import run
from tools.npu_contract.releases import RELEASES

HADOLINT_CONFIG = REPO / ".hadolint.yaml"
BAKE = "/opt/ascend-dspark/bake_default_model.py"


def hadolint(path) -> tuple[int, str]:
    proc = run("hadolint", "--config", str(HADOLINT_CONFIG), "--no-color", str(path), cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", IMAGES, ids=image_id)
def test_hadolint_finds_nothing(name):
    code, out = hadolint(dockerfile(name))
    assert code == 0, out


def test_hadolint_fails_a_planted_mistake(tmp_path):
    """The negative control: the same settings reject `cd` in RUN and an unpinned base."""
    bad = tmp_path / "Dockerfile"
    text = dockerfile("cpu").read_text().replace("WORKDIR /src", "RUN cd /src")
    bad.write_text(text.replace("ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "ARG PYTHON_IMAGE=python:latest"))
    code, out = hadolint(bad)
    assert code != 0 and "DL3003" in out, out


def _constraint(name: str) -> str:
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins[name].strip()


def test_the_ascend_image_pins_a_supported_torch_npu_with_its_torch_and_cann():
    image = parse("ascend")
    torch, torch_npu = image.args["TORCH_VERSION"], image.args["TORCH_NPU_VERSION"]
    assert torch_npu in RELEASES, f"torch-npu {torch_npu} is not in tools/npu_contract/releases.py"
    assert torch_npu.split(".post")[0] == torch, (torch, torch_npu)    # torch_npu X.Y.Z[.postN] <-> torch X.Y.Z
    # the base image's CANN line is the one torch-npu 2.9.0.post2 was released for (9.0.0),
    # on Python 3.11 (pyproject: requires-python >= 3.11)
    tag = re.fullmatch(r"(?P<cann>[\d.]+)-(?P<chip>910b|a3|910)-ubuntu22\.04-py(?P<py>3\.\d+)",
                       image.base.split(":", 1)[1])
    assert tag and (tag["cann"], torch_npu) == ("9.0.0", "2.9.0.post2") and tag["py"] == "3.11", image.base
    assert "torch-npu==${TORCH_NPU_VERSION}" in " ".join(image.runs)
    assert "download.pytorch.org/whl/cpu" in " ".join(image.runs)       # x86_64 torch-npu needs torch X+cpu


@pytest.mark.parametrize("name", ["cuda", "cpu"], ids=image_id)
def test_the_cpu_and_cuda_images_pin_the_torch_ci_tests(name):
    image = parse(name)
    assert image.args["TORCH_VERSION"] == _constraint("torch")
    assert "torch_npu" not in image.path.read_text().replace("-", "_")   # it would break `import torch`


@pytest.mark.parametrize("name", IMAGES, ids=image_id)
def test_each_image_serves_the_app_as_a_non_root_user(name):
    image = parse(name)
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", image.user), image.user    # numeric: runAsNonRoot can check it
    assert image.cmd[:2] == ["uvicorn", "serving.app:app"]
    flags = dict(zip(image.cmd[2::2], image.cmd[3::2]))
    assert flags["--host"] == image.env["ASCEND_DSPARK_SERVE_HOST"] == "0.0.0.0"
    assert flags["--port"] == image.env["ASCEND_DSPARK_SERVE_PORT"]
    assert (image.env["ASCEND_DSPARK_SERVE_MODEL"], image.env["ASCEND_DSPARK_SERVE_DRAFTER"]) == ("default", "dspark")
    assert image.env["ASCEND_DSPARK_SERVE_DEVICE"] == {"ascend": "npu", "cuda": "cuda", "cpu": "cpu"}[name]
    assert "/health" in " ".join(image.healthcheck)
    # the default model converted at build time, by the server's user, into the server's cache
    bake = [i for i, r in enumerate(image.runs) if BAKE in r]
    assert len(bake) == 1 and image.copies[BAKE] == "deploy/docker/bake_default_model.py"
    assert image.env["HF_HUB_OFFLINE"] == "1"
    text = image.path.read_text()
    assert text.index("USER ") < text.index(f"python {BAKE}") < text.index("CMD [")
