"""Creating, saving and loading drafters in this project's own format.

Own format: a directory with
- `config.json`: `{"drafter": kind, "format": "ascend-dspark", "version": 1, ...DrafterConfig fields}`;
- `model.safetensors`: the drafter's own parameters, DeepSpec names without `embed_tokens` /
  `lm_head` (those are the target's).

Published formats load through `drafters/deepspec.py` (DeepSpec exports) and
`drafters/zlab.py` (z-lab DFlash); `load_drafter` dispatches on config.json's
`architectures`. `drafters/export.py` and `zlab.py` write those formats back. The
safetensors helpers at the end (single file or sharded index, shapes from the headers
before any tensor is read, strict name/shape checks) are shared by all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Drafter
from .config import KINDS, DrafterConfig

FORMAT = "ascend-dspark"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

DEFAULT_SEED = 0
INIT_STD = 0.02


def drafter_class(kind: str) -> type[Drafter]:
    from .dflash import DFlashDrafter
    from .dspark import DSparkDrafter
    from .eagle3 import Eagle3Drafter

    classes = {"eagle3": Eagle3Drafter, "dflash": DFlashDrafter, "dspark": DSparkDrafter}
    if kind not in classes:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {', '.join(KINDS)}")
    return classes[kind]


def build_drafter(cfg: DrafterConfig, target: nn.Module) -> Drafter:
    """An uninitialised drafter of `cfg.kind` paired with `target` (validated)."""
    return drafter_class(cfg.kind)(cfg, target)


# -- random initialisation ------------------------------------------------------------------------
def default_layer_ids(kind: str, num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers to tap ("output of layer j" ids), clamped to -1..Lt-2.

    eagle3: [1, Lt//2 - 1, Lt - 4] (EAGLE-3 / SpecForge). dflash / dspark: z-lab's
    `build_target_layer_ids` spread from 1 to Lt - 3 over max(3, draft layers) taps
    (Lt = 36, 5 taps gives DeepSpec's [1, 9, 17, 25, 33]).
    """
    lt = num_target_layers
    if kind == "eagle3":
        ids = [1, lt // 2 - 1, lt - 4]
    else:
        n = max(3, num_draft_layers)
        start, end = 1, lt - 3
        ids = [int(round(start + i * (end - start) / (n - 1))) for i in range(n)]
    return [min(max(j, -1), lt - 2) for j in ids]


def default_config(kind: str, target: nn.Module, **overrides: Any) -> DrafterConfig:
    """A DrafterConfig sized from the target's config, with `overrides` applied."""
    tc = target.config
    unknown = sorted(set(overrides) - DrafterConfig.field_names() - {"kind"})
    if unknown:
        raise TypeError(f"unknown drafter option(s): {', '.join(unknown)}")
    rope = dict((tc.rope or {}).get("full_attention") or {"rope_type": "default", "rope_theta": 10000.0})
    base: dict[str, Any] = dict(
        kind=kind, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
        vocab_size=tc.vocab_size, rms_norm_eps=tc.rms_norm_eps, hidden_act=tc.hidden_act,
        attention_bias=False, rope=rope,
    )
    raw_mask = (getattr(tc, "raw", None) or {}).get("mask_token_id")
    mask_token_id = raw_mask if isinstance(raw_mask, int) and 0 <= raw_mask < tc.vocab_size else tc.vocab_size - 1
    if kind == "eagle3":
        base.update(num_layers=1, qk_norm=bool(tc.qk_norm), ttt_length=7)
    elif kind == "dflash":
        base.update(num_layers=2, qk_norm=True, block_size=8, anchor_first=False, mask_token_id=mask_token_id)
    elif kind == "dspark":
        base.update(num_layers=2, qk_norm=True, block_size=7, anchor_first=True, mask_token_id=mask_token_id,
                    markov_rank=64, confidence_head=True, confidence_head_with_markov=True)
    else:
        raise ValueError(f"unknown drafter kind {kind!r}; expected one of {', '.join(KINDS)}")
    base.update(overrides)
    if "target_layer_ids" not in overrides:
        base["target_layer_ids"] = default_layer_ids(kind, tc.num_layers, base["num_layers"])
    return DrafterConfig(**base)


def create_drafter(kind: str, target: nn.Module, *, seed: int = DEFAULT_SEED, dtype: torch.dtype | None = None,
                   **overrides: Any) -> Drafter:
    """A randomly initialised drafter for `target` (N(0, 0.02) weights, unit norms, seeded).

    `overrides` are DrafterConfig fields (num_layers, block_size, anchor_first, markov_rank,
    target_layer_ids, mask_token_id, ...). The drafter lands on the target's device, in
    `dtype` (default: the target's parameter dtype).
    """
    from .layers import init_weights

    cfg = default_config(kind, target, **overrides)
    drafter = build_drafter(cfg, target)
    init_weights(drafter, seed, INIT_STD)
    return drafter.to(**_placement(target, dtype))


def _placement(target: nn.Module, dtype: torch.dtype | None) -> dict[str, Any]:
    p = next(target.parameters(), None)
    if p is None:
        return {"dtype": dtype} if dtype is not None else {}
    return {"device": p.device, "dtype": dtype or p.dtype}


# -- own format -----------------------------------------------------------------------------------
def save_drafter(drafter: Drafter, path: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (the drafter's own parameters) into `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"drafter": drafter.config.kind, "format": FORMAT, "version": VERSION, **drafter.config.to_dict()}
    config.pop("kind")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": FORMAT, "drafter": drafter.config.kind})
    return path


def load_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None) -> Drafter:
    """Load a drafter directory: our own format, a DeepSpec export or a z-lab DFlash draft
    (dispatched on config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"drafter checkpoint directory not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"drafter config not found: {config_path}")
    raw = json.loads(config_path.read_text())
    if raw.get("format") != FORMAT:
        if "architectures" in raw:
            from .zlab import ZLAB_ARCHS, load_zlab_drafter

            if (raw.get("architectures") or [None])[0] in ZLAB_ARCHS:
                return load_zlab_drafter(path, target, dtype=dtype)
            from .deepspec import load_deepspec_drafter

            return load_deepspec_drafter(path, target, dtype=dtype)
        raise ValueError(f"{config_path}: not an {FORMAT} drafter config (no \"format\": \"{FORMAT}\") and not a "
                         "transformers-style export (no \"architectures\")")
    if raw.get("version") != VERSION:
        raise ValueError(f"{config_path}: unsupported {FORMAT} version {raw.get('version')!r} (this code reads {VERSION})")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"drafter weights not found: {weights}")
    fields = {k: v for k, v in raw.items() if k not in ("drafter", "format", "version")}
    cfg = DrafterConfig.from_dict({"kind": raw.get("drafter"), **fields})
    drafter = build_drafter(cfg, target)
    from safetensors.torch import load_file

    state = load_file(str(weights))
    load_strict(drafter, state, source=str(weights))
    return drafter.to(**_placement(target, dtype))


def load_strict(drafter: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with errors that name every missing / unexpected / mis-shaped tensor."""
    check_shapes(expected_shapes(drafter), {k: tuple(v.shape) for k, v in state.items()}, source)
    drafter.load_state_dict(state, strict=True, assign=True)   # keep stored precision until the final cast


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensor(s): {', '.join(missing)}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s): {', '.join(unexpected)}")
    for name in sorted(expected):
        if tuple(found[name]) != tuple(expected[name]):
            raise ValueError(f"{source}: tensor {name} has shape {list(found[name])}, expected {list(expected[name])}")


# -- safetensors files (shared by the published-format loaders) ---------------------------------------
def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors or model.safetensors.index.json."""
    single = path / WEIGHTS_FILE
    index = path / "model.safetensors.index.json"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        out = {}
        for name, shard in weight_map.items():
            file = path / shard
            if not file.is_file():
                raise FileNotFoundError(f"safetensors shard {file} (named in {index}) not found")
            out[name] = file
        return out
    raise FileNotFoundError(f"no drafter weights in {path}: expected {single} or {index}")


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes read from the safetensors headers (no tensor data is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if files.get(name) == file:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise ValueError(f"tensor(s) {', '.join(missing)} listed in the index but absent from their shard")
    return shapes


def read_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """The named tensors, each file opened once, in their stored dtype."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name in file_names:
                state[name] = f.get_tensor(name)
    return state
