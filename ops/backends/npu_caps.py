"""What the installed torch_npu can do for ops/backends/npu*.py, read from its op schemas.

The supported releases are every torch-npu on PyPI from 2.6.0 to 2.14.0
(RELEASES in tools/npu_contract/, one committed snapshot each under
tests/platform/torch_npu_contracts/). For the ops and torch.npu APIs we call they agree,
except (read from the wheels, tests/platform/test_npu_matrix.py keeps this table true):

    npu_scatter_pa_kv_cache   absent in 2.6.0; without the `cache_mode` keyword in 2.6.0.post3,
                              2.6.0.post5, 2.7.1, 2.7.1.post2, 2.8.0, 2.8.0.post2, 2.9.0.
                              Our caches are ND ("Norm"); a call there cannot say so (where
                              the keyword exists its default is 'PA_NZ', the NZ layout), so
                              kv_write is REFUSED there: it runs the plain-torch reference (an
                              index_copy into the cache, graph-capturable), logged once with
                              the release named.
    npu_top_k_top_p           2.6.0: `(Tensor logits, Tensor p, Tensor k)`, both required
                              (later: `Tensor? p=None, Tensor? k=None`). ADAPTED: a filter the
                              request does not use is passed as its no-op value (p = 1, k = V;
                              V <= 1024, the kernel's k range, else the reference runs).
    npu_rotary_mul            no `rotate=` in the releases listed for cache_mode above and
                              2.6.0 (we never pass it).
    npu_apply_rotary_pos_emb  default layout 'BSH' (later 'BSND') up to 2.7.1.post6, 2.8.0.post5,
                              2.9.0.post4, 2.9.1 and 2.10.0.post2; no `rotary_mode` in 2.6.0
                              (not called today; a caller must pass the layout explicitly).
    torch.npu.Event / NPUGraph  no ipc_handle / from_ipc_handle / debug_dump /
                              super_kernel_optimize in the releases without cache_mode and
                              2.6.0 (not used). NPUGraph, graph(), ExternalEvent and the
                              graph_task_group_* / graph_task_update_* functions have the same
                              signatures in every supported release; NpuPlatform still checks
                              they exist (hasattr) and turns graphs off, naming the release,
                              where one is missing.

The decision is made from the schema the dispatcher will bind against
(`torch_npu.<op>.default._schema`, or the snapshot's schema string in tests), never from
the version string, which only names the release in messages. Stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ops.backends.npu_schema import parse_arguments

# torch_npu call sites (as tools/npu_contract's check_calls names them) that not every supported
# release binds, and the op whose refusal keeps them unreached on such a release.
GATED_CALLS = {"torch_npu.npu_scatter_pa_kv_cache": "kv_write"}
PROBED_OPS = ("npu_scatter_pa_kv_cache", "npu_top_k_top_p")


@dataclass(frozen=True)
class Capabilities:
    """`refused`: op -> why it runs the reference on this release; `adapted`: op -> how the call
    is shaped for this release; `top_k_top_p_optional`: npu_top_k_top_p takes p / k = None."""

    release: str
    refused: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    top_k_top_p_optional: bool = True

    @classmethod
    def from_schemas(cls, release: str, schemas: dict[str, str | None]) -> Capabilities:
        """`schemas`: op name -> its default overload's schema string, None when absent."""
        refused, adapted = {}, {}
        scatter = schemas.get("npu_scatter_pa_kv_cache")
        if scatter is None:
            refused["kv_write"] = (f"torch_npu {release} has no npu_scatter_pa_kv_cache "
                                   "(it arrived in 2.6.0.post3)")
        elif "cache_mode" not in parse_arguments(scatter):
            refused["kv_write"] = (f"torch_npu {release}'s npu_scatter_pa_kv_cache has no cache_mode argument, "
                                   "so it cannot be told the paged caches are ND ('Norm')")
        optional = True
        top = schemas.get("npu_top_k_top_p")
        if top is None:
            refused["top_k_top_p"] = f"torch_npu {release} has no npu_top_k_top_p"
        else:
            args = parse_arguments(top)
            optional = all(args[a].optional for a in ("p", "k") if a in args)
            if not optional:
                adapted["top_k_top_p"] = (f"torch_npu {release}'s npu_top_k_top_p needs both p and k: an unused "
                                          "filter is passed as p = 1 / k = V (V > 1024 without k: the reference)")
        return cls(release, refused, adapted, optional)

    @classmethod
    def from_contract(cls, contract: dict) -> Capabilities:
        """From a committed snapshot (tools/npu_contract's `snapshot`)."""
        ops = contract["ops"]
        return cls.from_schemas(contract["torch_npu_version"], {name: ops.get(name) for name in PROBED_OPS})

    @classmethod
    def probe(cls, torch_npu) -> Capabilities:
        """From the imported torch_npu module: the schemas its dispatcher binds against."""
        schemas = {}
        for name in PROBED_OPS:
            packet = getattr(torch_npu, name, None)   # torch_npu.<op> IS torch.ops.npu.<op> (every release)
            if packet is None:
                schemas[name] = None
                continue
            overload = "default" if "default" in packet.overloads() else packet.overloads()[0]
            schemas[name] = str(getattr(packet, overload)._schema)
        return cls.from_schemas(str(getattr(torch_npu, "__version__", "(unknown version)")), schemas)
