"""The torch_npu API contract, read from the published wheel without importing it.

Why: no Ascend NPU (and no CANN) exists where this project is developed or tested, and
installing torch_npu without CANN breaks `import torch`. The wheel itself still carries the
exact contract: the `m.def()` schema strings that `torch.ops.npu.<op>` binds against live as
NUL-terminated literals in `torch_npu/lib/libtorch_npu.so` (cross-checked here against the
codegen YAML), and `torch.npu.*` is plain Python (`torch_npu/npu/*.py`) that `ast` reads.
The docstrings and meta kernels in the wheel disagree with the registered schemas, so they
are never used (see shared/reference/npu-contract.md).

Three uses:
- `extract_contract(fetch_wheel(version))`: the full contract of one release's wheel;
- `snapshot(contract)`: the part this project uses, committed once per supported release
  (`RELEASES`) as tests/platform/torch_npu_contracts/torch_npu_<version>.json; an op or API
  a release lacks is listed under `missing_ops` / `missing_apis` instead of failing;
- `check_calls(paths, contract)`: an AST lint that every `torch_npu.<op>(...)`,
  `torch.ops.npu.<op>(...)` and `torch.npu.<api>(...)` call binds against the contract
  (names, positional arity, keywords, required arguments), as the real binder would.

CLI: `python -m ascend_dspark.platform.npu_contract --snapshot PATH | --check PATH |
--calls SRC... [--contract PATH] | --refresh-all DIR | --check-all DIR`. Stdlib only.
`make npu-contracts` refreshes every committed snapshot (downloads each wheel once into
the cache, ~40 MB each) and lists releases on PyPI in the supported range that `RELEASES`
does not name yet.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Every torch-npu release on PyPI from 2.6.0 on (each pairs with the torch of its X.Y.Z, and
# each line with a CANN version): the support matrix. One committed snapshot per release; the
# NPU backend and platform must bind on all of them, adapting by capability where they differ
# (ops/backends/npu_caps.py). Oldest first; the last is the newest, checked against its wheel in CI.
RELEASES = (
    "2.6.0", "2.6.0.post3", "2.6.0.post5",
    "2.7.1", "2.7.1.post2", "2.7.1.post4", "2.7.1.post6", "2.7.1.post8", "2.7.1.post10", "2.7.1.post11",
    "2.8.0", "2.8.0.post2", "2.8.0.post4", "2.8.0.post5",
    "2.9.0", "2.9.0.post2", "2.9.0.post4", "2.9.0.post6", "2.9.0.post8", "2.9.0.post9", "2.9.1",
    "2.10.0", "2.10.0.post2", "2.10.0.post4", "2.10.0.post6", "2.10.0.post7",
    "2.11.0", "2.11.0.post2", "2.11.0.post3",
    "2.12.0", "2.12.0.post2", "2.12.0.post3",
    "2.13.0",
    "2.14.0",
)
NEWEST = RELEASES[-1]
DEFAULT_VERSION = NEWEST
SNAPSHOT_NAME = "torch_npu_{version}.json"
CACHE_ENV = "ASCEND_DSPARK_WHEEL_CACHE"
WHEEL_ENV = "ASCEND_DSPARK_TORCH_NPU_WHEEL"  # path to a local wheel: skips the download

# One fixed target so every host extracts from the very same file (the schemas are
# identical across the cp310..cp313 / aarch64 builds, but the sha256 is not).
_PIP_TARGET = ["--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]

# What the committed snapshot pins: every op we call or plan to call (all overloads of
# each name) and every torch.npu API the platform layer uses.
SNAPSHOT_OPS = (
    "npu_rms_norm", "npu_add_rms_norm", "npu_swiglu", "npu_apply_rotary_pos_emb",
    "npu_rotary_mul", "npu_fused_infer_attention_score",
    "_npu_fused_infer_attention_score_get_max_workspace", "npu_scatter_pa_kv_cache",
    "npu_top_k_top_p",
)
SNAPSHOT_APIS = (
    "is_available", "device_count", "get_device_name", "set_device", "current_device",
    "synchronize", "current_stream", "default_stream", "stream", "Stream", "Event",
    "ExternalEvent", "NPUGraph", "graph", "graph_pool_handle", "is_current_stream_capturing",
    "graph_task_group_begin", "graph_task_group_end", "graph_task_update_begin",
    "graph_task_update_end", "manual_seed_all", "mem_get_info", "memory_allocated",
    "memory_reserved", "max_memory_allocated", "empty_cache", "get_soc_version",
)
# Public torch.npu names missing from torch_npu.npu.__all__ but reachable as attributes
# (`from ._backends import *` in torch_npu/npu/__init__.py): resolved like the listed ones.
EXTRA_NPU_APIS = ("get_soc_version",)

_SO_PATH = "torch_npu/lib/libtorch_npu.so"
_YAML_PATH = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
_NPU_PKG = "torch_npu/npu"
_SCHEMA_RE = re.compile(r"^(_?[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)?)\((.*)\) -> (.+)$")
_NETWORK_HINTS = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeout", "ProxyError",
                  "Connection refused", "ConnectionResetError", "timed out", "No route to host")


class WheelUnavailable(RuntimeError):
    """The pinned wheel could not be downloaded; `network` says whether it looks offline."""

    def __init__(self, message: str, network: bool) -> None:
        super().__init__(message)
        self.network = network


# --------------------------------------------------------------------------- wheel ----
def _looks_offline(pip_log: str) -> bool:
    """pip's own connection errors, or (pip prints none with retries off) PyPI unreachable."""
    if any(hint in pip_log for hint in _NETWORK_HINTS):
        return True
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return True
    return False


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "ascend-dspark" / "wheels"


def fetch_wheel(version: str = DEFAULT_VERSION, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the torch-npu==version wheel, downloaded once with pip (never installed)."""
    if os.environ.get(WHEEL_ENV):
        path = Path(os.environ[WHEEL_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV}={path} does not exist")
        return path
    cache = _cache_dir(cache_dir)
    found = sorted(cache.glob(f"torch_npu-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # no half-written wheel in the cache
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *_PIP_TARGET, "-d", tmp, f"torch-npu=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(f"torch_npu-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            log = (proc.stdout + proc.stderr).strip()
            network = _looks_offline(log)
            raise WheelUnavailable(
                f"`pip download torch-npu=={version}` failed (exit {proc.returncode}"
                f"{', looks like no network' if network else ''}); set {WHEEL_ENV} to a local "
                f"wheel to work offline. pip said:\n{log[-2000:]}", network)
        target = cache / wheels[0].name
        os.replace(wheels[0], target)
    return target


# ---------------------------------------------------------------------- op schemas ----
def _so_schemas(blob: bytes) -> dict[str, str]:
    """Every `name(.overload)?(args) -> ret` NUL-terminated literal in the library."""
    out: dict[str, str] = {}
    marker, pos = b") -> ", 0
    while (pos := blob.find(marker, pos)) >= 0:
        start = blob.rfind(b"\0", 0, pos) + 1
        end = blob.find(b"\0", pos)
        pos = end if end > 0 else len(blob)
        try:
            text = blob[start:end].decode("ascii")
        except UnicodeDecodeError:
            continue
        match = _SCHEMA_RE.match(text)
        if match:
            prev = out.setdefault(match.group(1), text)
            if prev != text:
                raise ValueError(f"two different schemas for {match.group(1)}: {prev!r} / {text!r}")
    return out


def _codegen_rewrite(schema: str) -> str:
    """What torchnpugen's RegisterCustomSchema does to a YAML `func:` before `m.def()`.

    Several mutable keyword-only outputs collapse into `Tensor[] out`, and `self` is
    renamed `input` (which is why Python must say `input=`, not `self=`).
    """
    match = re.match(r"(?P<name>[^(]+)\((?P<args>.*)\) -> (?P<ret>.*)", schema)
    if match:
        args = split_args(match.group("args"))
        kw_only = args[args.index("*") + 1:] if "*" in args else []
        n_out = sum(bool(re.match(r"Tensor\([a-z]+!\) ", a)) for a in kw_only)
        if n_out > 1:
            kept = ",".join(match.group("args").split(",")[:-n_out])
            schema = f"{match.group('name')}({kept}, Tensor[] out) -> ({', '.join(['Tensor'] * n_out)})"
    return re.sub(r"\bself\b(?=[,)])", "input", schema)


def _yaml_schemas(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^\s*-?\s*func:\s*(.+?)\s*$", line)
        if match:
            schema = _codegen_rewrite(match.group(1))
            name = _SCHEMA_RE.match(schema)
            if name:
                out.setdefault(name.group(1), schema)
    return out


def split_args(args: str) -> list[str]:
    """Split a schema argument list on top-level commas (brackets and quotes respected)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in args:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


# ---------------------------------------------------------------- Python APIs (ast) ----
def _format_args(args: ast.arguments, drop_first: bool = False) -> str:
    """`(a, b=1, *, c, **kw)` from an ast signature, annotations dropped (as compared)."""
    pos = list(args.posonlyargs) + list(args.args)
    defaults = [None] * (len(pos) - len(args.defaults)) + list(args.defaults)
    items = []
    for i, (arg, default) in enumerate(zip(pos, defaults)):
        if i == 0 and drop_first:
            continue
        items.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
        if args.posonlyargs and i == len(args.posonlyargs) - 1:
            items.append("/")
    if args.vararg:
        items.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        items.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        items.append(arg.arg if default is None else f"{arg.arg}={ast.unparse(default)}")
    if args.kwarg:
        items.append(f"**{args.kwarg.arg}")
    return "(" + ", ".join(items) + ")"


class _PySource:
    """Resolves where each name of `torch_npu.npu.__all__` is defined, inside the zip."""

    def __init__(self, wheel: zipfile.ZipFile) -> None:
        self._zip = wheel
        self._names = set(wheel.namelist())
        self._trees: dict[str, ast.Module | None] = {}

    def path(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self._names:
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.path(module)
            self._trees[module] = ast.parse(self._zip.read(path).decode()) if path else None
        return self._trees[module]

    @staticmethod
    def _top_level(tree: ast.Module):
        """Top-level statements, looking into module-level if/try blocks."""
        stack = list(tree.body)
        while stack:
            node = stack.pop(0)
            if isinstance(node, (ast.If, ast.Try)):
                stack[:0] = node.body + getattr(node, "orelse", []) + [
                    s for h in getattr(node, "handlers", []) for s in h.body] + getattr(node, "finalbody", [])
                continue
            yield node

    def exported_all(self, module: str) -> list[str]:
        tree = self.tree(module)
        for node in self._top_level(tree) if tree else ():
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                return list(ast.literal_eval(node.value))
        return []

    def _source_module(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        pkg = module if (self.path(module) or "").endswith("__init__.py") else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        return f"{pkg}.{node.module}" if node.module else pkg

    def resolve(self, module: str, name: str, seen: frozenset = frozenset()):
        """(module, ast node or None for a plain value) where `name` is bound last."""
        if (module, name) in seen or self.tree(module) is None:
            return None
        seen = seen | {(module, name)}
        found = None
        for node in self._top_level(self.tree(module)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                found = (module, node)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                found = (module, None)
            elif isinstance(node, ast.ImportFrom):
                src = self._source_module(module, node)
                for alias in node.names:
                    if alias.name == "*":
                        exported = self.exported_all(src)
                        if name in exported or (not exported and not name.startswith("_")):
                            found = self.resolve(src, name, seen) or found
                    elif (alias.asname or alias.name) == name:
                        found = self.resolve(src, alias.name, seen) or (src, None)
        return found


def _describe(module: str, node, source: _PySource) -> dict:
    entry = {"defined_in": source.path(module) or module}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        entry.update(kind="function", call=_format_args(node.args))
    elif isinstance(node, ast.ClassDef):
        methods, classmethods, ctor = {}, [], None
        for item in node.body:
            if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if item.name in ("__init__", "__new__") and (ctor is None or item.name == "__init__"):
                ctor = _format_args(item.args, drop_first=True)
            if not item.name.startswith("_") or item.name in ("__enter__", "__exit__"):
                methods[item.name] = _format_args(item.args)
                if any(getattr(d, "id", None) == "classmethod" for d in item.decorator_list):
                    classmethods.append(item.name)
        entry.update(kind="class", call=ctor, methods=methods)
        if classmethods:
            entry["classmethods"] = classmethods
    else:
        entry["kind"] = "value"
    return entry


def _python_api(wheel: zipfile.ZipFile) -> tuple[list[str], dict[str, dict]]:
    source = _PySource(wheel)
    package = _NPU_PKG.replace("/", ".")
    names = source.exported_all(package)
    api = {}
    for name in [*names, *(n for n in EXTRA_NPU_APIS if n not in names)]:
        hit = source.resolve(package, name)
        if hit is not None:
            api[name] = _describe(hit[0], hit[1], source)
    return names, api


# ------------------------------------------------------------------------- contract ----
def extract_contract(wheel_path: str | os.PathLike) -> dict:
    """The full contract of one torch_npu wheel (all op schemas, all torch.npu APIs)."""
    wheel_path = Path(wheel_path)
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel_path) as wheel:
        ops = _so_schemas(wheel.read(_SO_PATH))
        yaml_ops = _yaml_schemas(wheel.read(_YAML_PATH).decode())
        npu_all, api = _python_api(wheel)
    version = wheel_path.name.split("-")[1]
    mismatch = sorted(n for n in ops if n in yaml_ops and yaml_ops[n] != ops[n])
    return {"torch_npu_version": version, "wheel": wheel_path.name, "sha256": digest,
            "ops": dict(sorted(ops.items())), "yaml_mismatch": mismatch,
            "python_api": dict(sorted(api.items())), "npu_all": npu_all}


def snapshot(contract: dict, ops=SNAPSHOT_OPS, apis=SNAPSHOT_APIS) -> dict:
    """The slice of `contract` this project pins. A pinned op or API this release lacks is
    recorded under `missing_ops` / `missing_apis` (the checker then reports every use of it,
    and the backend must not reach that use on this release)."""
    picked = {k: v for k, v in contract["ops"].items() if k.split(".")[0] in ops}
    present = {k.split(".")[0] for k in picked}
    return {
        "_comment": "Generated by `python -m ascend_dspark.platform.npu_contract --snapshot`; "
                    "do not edit. Op schemas come from torch_npu/lib/libtorch_npu.so, Python "
                    "signatures from torch_npu/npu/*.py (annotations dropped).",
        "torch_npu_version": contract["torch_npu_version"],
        "wheel": contract["wheel"],
        "sha256": contract["sha256"],
        "ops": picked,
        "missing_ops": [o for o in ops if o not in present],
        "yaml_mismatch": [n for n in contract["yaml_mismatch"] if n.split(".")[0] in ops],
        "python_api": {a: contract["python_api"][a] for a in apis if a in contract["python_api"]},
        "missing_apis": [a for a in apis if a not in contract["python_api"]],
        "npu_all": sorted(contract["npu_all"]),
    }


def release_key(version: str) -> tuple[int, ...]:
    """Sort key of a torch-npu release string: 2.7.1.post10 after 2.7.1.post8."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?", version)
    if not match:
        raise ValueError(f"not a torch-npu release: {version!r}")
    return tuple(int(g or 0) for g in match.groups())


def snapshot_path(directory: str | os.PathLike, version: str) -> Path:
    return Path(directory) / SNAPSHOT_NAME.format(version=version)


def pypi_releases(lowest: str = RELEASES[0]) -> list[str]:
    """torch-npu releases PyPI lists from `lowest` on (`pip index versions`; needs the network)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch-npu",
                           "--disable-pip-version-check"], capture_output=True, text=True)
    match = re.search(r"Available versions: (.+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise WheelUnavailable(f"`pip index versions torch-npu` failed: {(proc.stdout + proc.stderr)[-500:]}",
                               _looks_offline(proc.stdout + proc.stderr))
    found = [v.strip() for v in match.group(1).split(",")]
    return sorted((v for v in found if re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", v)
                   and release_key(v) >= release_key(lowest)), key=release_key)


def load(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def dump(data: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


# ---------------------------------------------------------------- call checker --------
@dataclass(frozen=True)
class Params:
    """A callable's parameters, reduced to what a call site must satisfy."""

    positional: tuple[str, ...]  # may be passed by position (in order)
    keyword: frozenset[str]  # may be passed by name
    required: frozenset[str]
    var_positional: bool = False
    var_keyword: bool = False

    @classmethod
    def from_schema(cls, schema: str) -> "Params":
        args = split_args(_SCHEMA_RE.match(schema).group(2))
        positional, keyword, required, kw_only = [], set(), set(), False
        for arg in args:
            if arg == "*":
                kw_only = True
                continue
            decl, has_default, _ = arg.partition("=")
            name = decl.split()[-1]
            keyword.add(name)
            if not kw_only:
                positional.append(name)
            if not has_default:
                required.add(name)
        return cls(tuple(positional), frozenset(keyword), frozenset(required))

    @classmethod
    def from_signature(cls, text: str, drop_first: bool = False) -> "Params":
        args = ast.parse(f"def f{text}: pass").body[0].args
        pos = list(args.posonlyargs) + list(args.args)
        n_req = len(pos) - len(args.defaults)
        required = {a.arg for a in pos[:n_req]} | {
            a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None}
        if drop_first and pos:
            required.discard(pos[0].arg)
            pos = pos[1:]
        keyword = {a.arg for a in pos if a not in args.posonlyargs} | {a.arg for a in args.kwonlyargs}
        return cls(tuple(a.arg for a in pos), frozenset(keyword), frozenset(required),
                   args.vararg is not None, args.kwarg is not None)

    def problems(self, n_pos: int, keywords: list[str], splat_pos: bool, splat_kw: bool) -> list[str]:
        """Why a call with these arguments would not bind (empty list: it binds)."""
        out = []
        if n_pos > len(self.positional) and not self.var_positional:
            out.append(f"{n_pos} positional arguments, at most {len(self.positional)} allowed "
                       f"({', '.join(self.positional) or 'none'}; the rest are keyword-only)")
        given = set(self.positional[:n_pos])
        for kw in keywords:
            if kw not in self.keyword and not self.var_keyword:
                out.append(f"unknown keyword {kw!r}")
            elif kw in given:
                out.append(f"{kw!r} given by position and by keyword")
            given.add(kw)
        if not (splat_pos or splat_kw):
            missing = sorted(self.required - given, key=lambda n: (n not in self.positional, n))
            out += [f"missing required argument {m!r}" for m in missing]
        return out


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    target: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.target}: {self.message}"


# torch_npu attributes that are modules or metadata, not ops.
_TORCH_NPU_NON_OPS = {"npu", "contrib", "profiler", "utils", "dynamo", "distributed", "optim",
                      "testing", "version", "op_plugin", "asd", "onnx", "jit", "_C", "_inductor"}


class _Checker(ast.NodeVisitor):
    def __init__(self, path: str, contract: dict) -> None:
        self.path, self.contract = path, contract
        self.aliases: dict[str, str] = {}
        self.violations: list[Violation] = []
        self.checked = 0
        self._handled: set[int] = set()
        self._overloads: dict[str, dict[str, str]] = {}
        for full, schema in contract["ops"].items():
            base, _, overload = full.partition(".")
            self._overloads.setdefault(base, {})[overload or "default"] = schema

    # -- aliases ---------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, node) -> list[str] | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        return self.aliases[node.id].split(".") + parts[::-1]

    def _classify(self, dotted: list[str]):
        """('op', name, overload) / ('api', name, rest) / None for unrelated code."""
        if dotted[:3] == ["torch", "ops", "npu"] and len(dotted) > 3:
            return ("op", dotted[3], dotted[4] if len(dotted) > 4 else None)
        if dotted[:2] in (["torch", "npu"], ["torch_npu", "npu"]) and len(dotted) > 2:
            return ("api", dotted[2], dotted[3:])
        if dotted[0] == "torch_npu" and len(dotted) > 1 and dotted[1] not in _TORCH_NPU_NON_OPS \
                and not dotted[1].startswith("__"):
            return ("op", dotted[1], dotted[2] if len(dotted) > 2 else None)
        return None

    def _flag(self, node, target: str, message: str) -> None:
        self.violations.append(Violation(self.path, node.lineno, target, message))

    # -- visits ----------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        kind = self._classify(dotted) if dotted else None
        if kind:
            self._handled.add(id(node.func))
            self.checked += 1
            n_pos = sum(not isinstance(a, ast.Starred) for a in node.args)
            splat_pos = any(isinstance(a, ast.Starred) for a in node.args)
            keywords = [k.arg for k in node.keywords if k.arg is not None]
            splat_kw = any(k.arg is None for k in node.keywords)
            call = (n_pos, keywords, splat_pos, splat_kw)
            if kind[0] == "op":
                self._check_op(node, kind[1], kind[2], call)
            else:
                self._check_api(node, kind[1], kind[2], call)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        """Bare references (`fn = torch_npu.npu_x`, `torch.npu.Stream`) must exist too."""
        if id(node) not in self._handled:
            dotted = self._dotted(node)
            kind = self._classify(dotted) if dotted else None
            if kind and kind[0] == "op":
                self._check_op(node, kind[1], kind[2], None)
            elif kind:
                self._check_api(node, kind[1], kind[2], None)
            if kind:  # do not re-check the inner chain
                inner = node.value
                while isinstance(inner, ast.Attribute):
                    self._handled.add(id(inner))
                    inner = inner.value
        self.generic_visit(node)

    def _check_op(self, node, name: str, overload: str | None, call) -> None:
        version = self.contract["torch_npu_version"]
        target = f"torch_npu.{name}" + (f".{overload}" if overload else "")
        overloads = self._overloads.get(name)
        if overloads is None and name in self.contract.get("missing_ops", ()):
            self._flag(node, target, f"torch_npu {version} has no such op")
            return
        if overloads is None:
            self._flag(node, target, f"unknown op: not in the torch_npu {version} contract "
                       "(misspelt, or add it to SNAPSHOT_OPS and regenerate the snapshot)")
            return
        if overload is not None and overload not in overloads:
            self._flag(node, target, f"op has no overload {overload!r} (has {sorted(overloads)})")
            return
        if call is None:
            return
        candidates = {overload: overloads[overload]} if overload else overloads
        reasons = {o: Params.from_schema(s).problems(*call) for o, s in candidates.items()}
        if all(reasons.values()):  # the packet binds if any overload binds
            detail = "; ".join(f"[{o}] " + ", ".join(r) for o, r in reasons.items())
            self._flag(node, target, f"does not bind: {detail}")

    def _check_api(self, node, name: str, rest: list[str], call) -> None:
        api = self.contract["python_api"].get(name)
        target = f"torch.npu.{'.'.join([name, *rest])}"
        if api is None and name in self.contract.get("missing_apis", ()):
            self._flag(node, target, f"torch_npu {self.contract['torch_npu_version']} has no torch.npu.{name}")
            return
        if api is None:
            where = ("exists in torch.npu but is not pinned: add it to SNAPSHOT_APIS"
                     if name in self.contract.get("npu_all", ()) else
                     f"not in torch.npu of torch_npu {self.contract['torch_npu_version']}")
            self._flag(node, target, where)
            return
        if call is None or api.get("kind") == "value":
            return
        if not rest:
            sig, drop = api.get("call"), False
        elif len(rest) == 1 and rest[0] in api.get("methods", {}):
            sig, drop = api["methods"][rest[0]], rest[0] in api.get("classmethods", ())
        elif len(rest) == 1:
            self._flag(node, target, f"{name} has no method {rest[0]!r}")
            return
        else:
            return
        if sig is None:
            return
        problems = Params.from_signature(sig, drop_first=drop).problems(*call)
        if problems:
            self._flag(node, target, f"does not bind to {name}{sig}: " + ", ".join(problems))


def _python_files(paths) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


def check_calls(source_paths, contract: dict, stats: dict | None = None) -> list[Violation]:
    """Every torch_npu op / torch.npu API use under `source_paths` that breaks the contract.

    `stats`, if given, receives {"files": n, "calls": n} so callers can tell "clean" from
    "found nothing to check".
    """
    violations, n_files, n_calls = [], 0, 0
    for file in _python_files(source_paths):
        checker = _Checker(str(file), contract)
        checker.visit(ast.parse(file.read_text(), filename=str(file)))
        violations += checker.violations
        n_files += 1
        n_calls += checker.checked
    if stats is not None:
        stats.update(files=n_files, calls=n_calls)
    return violations


# ------------------------------------------------------------------------------ CLI ----
def diff_contracts(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Readable differences between two contract dicts (empty: equal)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_contracts(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}:\n  snapshot: {a!r}\n  wheel:    {b!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ascend_dspark.platform.npu_contract",
                                     description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--snapshot", metavar="PATH", help="write the pinned snapshot JSON")
    mode.add_argument("--check", metavar="PATH", help="regenerate from the wheel and diff with PATH")
    mode.add_argument("--calls", metavar="SRC", nargs="+", help="lint torch_npu/torch.npu calls")
    mode.add_argument("--refresh-all", metavar="DIR", help="write the snapshot of every release in RELEASES")
    mode.add_argument("--check-all", metavar="DIR", help="diff every committed snapshot with its wheel")
    parser.add_argument("--contract", metavar="PATH", help="snapshot used by --calls (default: the wheel)")
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--wheel", help="use this wheel instead of downloading")
    args = parser.parse_args(argv)

    def from_wheel() -> dict:
        return snapshot(extract_contract(args.wheel or fetch_wheel(args.version)))

    if args.refresh_all or args.check_all:
        return _all_releases(Path(args.refresh_all or args.check_all), write=bool(args.refresh_all))
    if args.snapshot:
        dump(from_wheel(), args.snapshot)
        print(f"wrote {args.snapshot}")
        return 0
    if args.check:
        diff = diff_contracts(load(args.check), from_wheel())
        print("\n".join(diff) if diff else f"{args.check} matches the wheel")
        return 1 if diff else 0
    contract = load(args.contract) if args.contract else extract_contract(args.wheel or fetch_wheel(args.version))
    stats: dict = {}
    violations = check_calls(args.calls, contract, stats)
    for v in violations:
        print(v)
    print(f"{stats['calls']} torch_npu/torch.npu call(s) in {stats['files']} file(s), "
          f"{len(violations)} violation(s)")
    return 1 if violations else 0


def _all_releases(directory: Path, write: bool) -> int:
    """--refresh-all / --check-all: every release of RELEASES, then PyPI's list for new ones."""
    failed = 0
    for version in RELEASES:
        path = snapshot_path(directory, version)
        fresh = snapshot(extract_contract(fetch_wheel(version)))
        if write:
            dump(fresh, path)
            print(f"wrote {path}")
            continue
        diff = diff_contracts(load(path), fresh) if path.is_file() else [f"{path} is missing"]
        print("\n".join(diff) if diff else f"{path} matches the wheel")
        failed += bool(diff)
    stale = sorted(set(p.name for p in directory.glob(SNAPSHOT_NAME.format(version="*")))
                   - {snapshot_path(directory, v).name for v in RELEASES})
    if stale:
        print(f"snapshots of releases not in RELEASES (remove them): {stale}")
        failed += 1
    try:
        new = [v for v in pypi_releases() if v not in RELEASES]
    except WheelUnavailable as exc:
        print(f"could not list PyPI's torch-npu releases: {str(exc).splitlines()[0]}")
    else:
        if new:
            print(f"torch-npu releases on PyPI that RELEASES does not list yet: {new} "
                  "(add them, run `make npu-contracts`, review ops/backends/npu_caps.py)")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
