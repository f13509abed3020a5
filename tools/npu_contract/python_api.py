"""The torch.npu Python API of a wheel, read with `ast` from `torch_npu/npu/*.py` (never imported).

Each name of `torch_npu.npu.__all__` (plus EXTRA_NPU_APIS) is followed through the package's
imports to where it is defined, and described by its call signature (and a class's public
methods), annotations dropped.
"""

from __future__ import annotations

import ast
import zipfile

_NPU_PKG = "torch_npu/npu"
# Public torch.npu names missing from torch_npu.npu.__all__ but reachable as attributes
# (`from ._backends import *` in torch_npu/npu/__init__.py): resolved like the listed ones.
EXTRA_NPU_APIS = ("get_soc_version",)


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


def python_api(wheel: zipfile.ZipFile) -> tuple[list[str], dict[str, dict]]:
    """(torch_npu.npu.__all__, name -> description) of the wheel's torch.npu."""
    source = _PySource(wheel)
    package = _NPU_PKG.replace("/", ".")
    names = source.exported_all(package)
    api = {}
    for name in [*names, *(n for n in EXTRA_NPU_APIS if n not in names)]:
        hit = source.resolve(package, name)
        if hit is not None:
            api[name] = _describe(hit[0], hit[1], source)
    return names, api

