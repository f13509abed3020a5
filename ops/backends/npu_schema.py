"""The one reader of torch_npu op schema strings, `name(.overload)?(args) -> ret`.

Two places read these strings and must read them alike: the capability probe
(ops/backends/npu_caps.py: which arguments the installed release's ops take) and the
contract tool (tools/npu_contract/: the schemas it pulls out of each wheel and the call
sites it binds against them). It lives in ops/ because ops/ imports nothing above it,
and tools/ may import ops/ but the runtime never imports tools/. Stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A whole schema literal without namespace: (1) name with its overload, (2) arguments, (3) returns.
SCHEMA_RE = re.compile(r"^(_?[A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)?)\((.*)\) -> (.+)$")


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


@dataclass(frozen=True)
class Argument:
    name: str
    type: str
    optional: bool      # accepts None (`Type?`)
    has_default: bool
    keyword_only: bool


def parse_arguments(schema: str) -> dict[str, Argument]:
    """The arguments of one `name(args) -> ret` schema, in order (a namespace prefix is ignored)."""
    head = schema.split("::", 1)[-1]
    args_text = head[head.index("(") + 1:head.rindex(") -> ")]
    out, kw_only = {}, False
    for arg in split_args(args_text):
        if arg == "*":
            kw_only = True
            continue
        decl, eq, _default = arg.partition("=")
        type_, name = decl.rsplit(None, 1)
        out[name] = Argument(name, type_, type_.endswith("?"), bool(eq), kw_only)
    return out
