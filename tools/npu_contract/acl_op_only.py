"""Which aten ops a torch_npu release runs only as ACL "aclop" operators: the capture deny-list.

Why: torch_npu refuses aclop operators while an NPU graph is being captured ("Cannot run
aclop operators during NPU graph capture", torch_npu/csrc/core/npu/NPUGraphsUtils.h), so a
graph that works on one release can fail to capture on another. The test double
(tests/fakes/) enforces the committed lists; this module writes them.

Where the truth lives: torch_npu builds its aten kernels from op-plugin, pinned as the
submodule third_party/op-plugin of Ascend/pytorch. op-plugin's
op_plugin/config/op_plugin_functions.yaml gives each op the torch lines (v2.6, v2.7, ...)
on which it has an `acl_op:` and/or an `op_api:` (aclnn) kernel. With both, torch_npu runs
aclnn (jit compile is off by default); with `acl_op:` alone it runs an aclop. So a
release's list = ops whose `acl_op:` versions include its torch line and whose `op_api:`
versions (in any section) do not. Only aten ops: the `custom:` section is the npu:: ops.
Not modelled: an aclnn kernel that itself falls back to aclop on an old CANN
(DO_COMPATIBILITY), which depends on the installed CANN, not the wheel.

`SOURCES` pins each supported release to the Ascend/pytorch ref whose version.txt names it
(its release tag where one exists), so the op-plugin commit is the one the wheel was built
from; `NEAREST` maps releases whose source was not available to the newest ref of the same
line, and every output file records which it was.

    python -m tools.npu_contract --acl-op-only tests/platform/torch_npu_contracts/acl_op_only \
        --pytorch-git PATH --op-plugin-git PATH      # local clones of Ascend/pytorch, Ascend/op-plugin
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

YAML_PATH = "op_plugin/config/op_plugin_functions.yaml"
LIST_NAME = "{version}.json"
_SECTIONS = ("official", "symint", "quant", "autograd", "custom")

# release -> Ascend/pytorch ref (a tag `v<ascend>-pytorch<torch>` whose version.txt is the release,
# or, where no tag exists, the release branch whose head's version.txt is the release).
SOURCES = {
    "2.6.0": "v7.1.0-pytorch2.6.0", "2.6.0.post3": "v7.2.0-pytorch2.6.0", "2.6.0.post5": "v7.3.0-pytorch2.6.0",
    "2.7.1": "v7.2.0-pytorch2.7.1", "2.7.1.post2": "v7.3.0-pytorch2.7.1", "2.7.1.post4": "v26.0.0-pytorch2.7.1",
    "2.7.1.post6": "v26.0.1-pytorch2.7.1", "2.7.1.post8": "v26.1.0-pytorch2.7.1", "2.7.1.post10": "v2.7.1-26.1.0",
    "2.8.0": "v7.2.0-pytorch2.8.0", "2.8.0.post2": "v7.3.0-pytorch2.8.0", "2.8.0.post4": "v26.0.0-pytorch2.8.0",
    "2.8.0.post5": "v26.0.1-pytorch2.8.0",
    "2.9.0": "v7.3.0-pytorch2.9.0", "2.9.0.post2": "v26.0.0-pytorch2.9.0", "2.9.0.post4": "v26.0.1-pytorch2.9.0",
    "2.9.0.post6": "v26.1.0-pytorch2.9.0", "2.9.0.post8": "v2.9.0-26.1.0",
    "2.10.0": "v26.0.0-pytorch2.10.0", "2.10.0.post2": "v26.0.1-pytorch2.10.0",
    "2.10.0.post4": "v26.1.0-pytorch2.10.0", "2.10.0.post6": "v2.10.0-26.1.0",
    "2.11.0": "v26.1.0-pytorch2.11.0", "2.11.0.post2": "v2.11.0-26.1.0",
    "2.12.0": "v26.1.0-pytorch2.12.0", "2.12.0.post2": "v2.12.0-26.1.0",
    "2.13.0": "v26.2.0-0day-pytorch2.13.0",
}
# Releases newer than the sources available when the lists were made (no ref names them):
# the newest ref of the same torch line stands in, and the file says so.
NEAREST = {
    "2.7.1.post11": "v2.7.1-26.1.0", "2.9.0.post9": "v2.9.0-26.1.0", "2.9.1": "v2.9.0-26.1.0",
    "2.10.0.post7": "v2.10.0-26.1.0", "2.11.0.post3": "v2.11.0-26.1.0", "2.12.0.post3": "v2.12.0-26.1.0",
    "2.14.0": "master",
}


def torch_line(release: str) -> str:
    """The op-plugin version key of a release: 2.7.1.post4 -> "v2.7"."""
    major, minor = release.split(".")[:2]
    return f"v{major}.{minor}"


def expand(spec, all_version: list[str]) -> list[str]:
    """The torch lines a version spec covers, as op-plugin's torchnpugen reads it
    (op_codegen_utils.get_version): `all_version`, `[first, last|newest]`, or "v2.1, v2.2"."""
    if spec is None:
        return []
    if isinstance(spec, list):
        start = all_version.index(spec[0])
        return all_version[start:] if spec[1] == "newest" else all_version[start:all_version.index(spec[1]) + 1]
    if spec == "all_version":
        return list(all_version)
    return [v.strip() for v in spec.split(",")]


def acl_op_only(yaml_text: str, line: str) -> list[str]:
    """Sorted aten op names (with overload, as the yaml spells them) that have an acl_op kernel
    on `line` and no op_api kernel on it in any section."""
    doc = yaml.safe_load(yaml_text)
    all_version = doc["all_version"]
    acl, aclnn, custom = set(), set(), set()
    for section in _SECTIONS:
        for entry in doc.get(section) or []:
            name = entry["func"].split("(")[0]
            if section == "custom":
                custom.add(name)
            if line in expand(entry.get("acl_op"), all_version):
                acl.add(name)
            if line in expand(entry.get("op_api"), all_version):
                aclnn.add(name)
    return sorted(acl - aclnn - custom)


def _git(repo: str | Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def from_sources(release: str, pytorch_git: str | Path, op_plugin_git: str | Path) -> dict:
    """The list of one release, from the op-plugin commit its Ascend/pytorch ref pins."""
    ref = SOURCES.get(release) or NEAREST[release]
    commit = _git(pytorch_git, "ls-tree", ref, "third_party/op-plugin").split()[2]
    ops = acl_op_only(_git(op_plugin_git, "show", f"{commit}:{YAML_PATH}"), torch_line(release))
    source = {"pytorch_ref": ref, "pytorch_commit": _git(pytorch_git, "rev-parse", f"{ref}^{{commit}}").strip(),
              "op_plugin_commit": commit, "yaml": YAML_PATH, "torch_line": torch_line(release)}
    if release not in SOURCES:
        source["nearest"] = f"no Ascend/pytorch ref names {release}: the newest ref of its line stands in"
    return {"_comment": "Generated by `python -m tools.npu_contract --acl-op-only`; do not edit. aten ops with "
                        "an acl_op kernel and no op_api (aclnn) kernel: torch_npu refuses them during NPU graph capture.",
            "torch_npu_version": release, "source": source, "ops": ops}


def list_path(directory: str | Path, release: str) -> Path:
    return Path(directory) / LIST_NAME.format(version=release)


def load_ops(directory: str | Path, release: str) -> frozenset[str]:
    """The committed deny-list of a release, as `aten::name[.overload]` (torch's OpOverload.name())."""
    data = json.loads(list_path(directory, release).read_text())
    return frozenset(f"aten::{op}" for op in data["ops"])


def write_all(directory: str | Path, releases, pytorch_git: str | Path, op_plugin_git: str | Path) -> list[Path]:
    """--acl-op-only: one file per release."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    written = []
    for release in releases:
        path = list_path(directory, release)
        path.write_text(json.dumps(from_sources(release, pytorch_git, op_plugin_git), indent=1) + "\n")
        written.append(path)
    return written
