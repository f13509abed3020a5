"""An AST lint: every torch_npu op and torch.npu API use binds against a release's contract.

It checks what the real binder would: the name exists (and the op overload), positional
arity, keywords, required arguments. Imports are followed (`import torch_npu as t`,
`from torch_npu import npu_swiglu`); the NPU platform's inherited accelerator calls are
read as torch.npu (DEVICE_MODULE).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from ops.backends.npu_schema import parse_arguments


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
        args = parse_arguments(schema).values()
        return cls(tuple(a.name for a in args if not a.keyword_only), frozenset(a.name for a in args),
                   frozenset(a.name for a in args if not a.has_default))

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


# The platform's accelerator base class (ascend_dspark/platform/accelerator.py) calls its
# device module as `self.device_module`; on NpuPlatform that is torch.npu, so those calls are
# checked as torch.npu calls.
DEVICE_MODULE = ("self", "device_module")
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
        if not isinstance(node, ast.Name):
            return None
        parts.reverse()
        if (node.id, *parts[:1]) == DEVICE_MODULE:
            return ["torch", "npu", *parts[1:]]
        if node.id not in self.aliases:
            return None
        return self.aliases[node.id].split(".") + parts

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

