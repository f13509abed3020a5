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

A fourth, acl_op_only.py: per release, the aten ops torch_npu runs only as aclop operators
(refused during NPU graph capture), read from op-plugin's op_plugin_functions.yaml at the
commit the release pins; committed in tests/platform/torch_npu_contracts/acl_op_only/ and
enforced by the test double's capture.

releases.py holds the support matrix and fetches wheels, contract.py extracts and slices
a contract (python_api.py reads the torch.npu half), check.py is the lint, cli.py the
command line. A CI lint, not part of the runtime: the schema strings are read by the one
parser in ops/backends/npu_schema.py, which the backend's capability probe also uses.

CLI: `python -m tools.npu_contract --snapshot PATH | --check PATH | --calls SRC...
[--contract PATH] | --refresh-all DIR | --check-all DIR | --acl-op-only DIR --pytorch-git PATH
--op-plugin-git PATH`, from the repository root.
`make npu-contracts` refreshes every committed snapshot (downloads each wheel once into
the cache, ~40 MB each) and lists releases on PyPI in the supported range that `RELEASES`
does not name yet.
"""

from .check import check_calls
from .contract import SNAPSHOT_APIS, SNAPSHOT_OPS, diff_contracts, extract_contract, load, snapshot, snapshot_path
from .releases import NEWEST, RELEASES, WheelUnavailable, fetch_wheel, release_key

__all__ = ["RELEASES", "NEWEST", "SNAPSHOT_OPS", "SNAPSHOT_APIS", "WheelUnavailable", "fetch_wheel", "release_key",
           "extract_contract", "snapshot", "snapshot_path", "load", "diff_contracts", "check_calls"]
