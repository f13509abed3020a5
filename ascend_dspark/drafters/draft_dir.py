"""Loading a draft directory, the same steps for every checkpoint format.

A draft directory is `config.json` + safetensors weights (`weights.py`). A format module
(`native.py`, `deepspec.py`, `zlab.py`) says only how its config.json becomes a
DrafterConfig and whether its files also hold copies of the target's embedding and LM head;
`load_draft_dir` does the rest, in one order for all of them: read config.json -> DrafterConfig
-> the target's layer count -> build (hidden size, vocabulary, tapped layers checked against
the target) -> every stored tensor's name and shape, from the file headers -> tensors ->
placement beside the target. Loading is strict: a missing, unexpected or mis-shaped tensor is
an error that names it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ascend_dspark.models.config import ModelConfig

from .base import Drafter
from .build import build_drafter, placement
from .config import DrafterConfig
from .weights import read_tensors, tensor_shapes, weight_files

CONFIG_FILE = "config.json"
# The target's input embedding and output head, under the names DeepSpec stores copies of them.
TARGET_COPIES = ("embed_tokens.weight", "lm_head.weight")

ConfigParser = Callable[[dict[str, Any], str], DrafterConfig]


def load_draft_dir(path: str | Path, target: nn.Module, dtype: torch.dtype | None, what: str,
                   parse: ConfigParser, target_copies: bool = False) -> Drafter:
    """The drafter stored in the directory `path`, for `target`, in `dtype` (default: the target's).

    what: the format's name in errors ("DeepSpec draft", ...).
    parse(raw config.json, its path): the format's DrafterConfig.
    target_copies: the files also hold `TARGET_COPIES`, [V, H] each; their shapes are
        checked, their values compared with the target's (one warning when they differ), and
        they are not loaded: a drafter always uses the target's modules. Otherwise such a
        tensor is refused with that reason.
    """
    path = Path(path)
    raw = read_config(path, what)
    config_path = str(path / CONFIG_FILE)
    cfg = parse(raw, config_path)
    check_target_layer_count(raw, target, config_path)
    drafter = build_drafter(cfg, target)           # validates hidden size, vocab, target_layer_ids
    files = weight_files(path)
    source = str(path)
    expected = expected_shapes(drafter)
    if target_copies:
        tc = target.config
        expected.update(dict.fromkeys(TARGET_COPIES, (tc.vocab_size, tc.hidden_size)))
    else:
        refuse_target_copies(files, what, source)
    check_shapes(expected, tensor_shapes(files), source)
    if target_copies:
        compare_target_copies(files, target, source)
    state = read_tensors(files, [name for name in files if name not in TARGET_COPIES])
    drafter.load_state_dict(state, strict=True, assign=True)   # keep stored precision until the final cast
    return drafter.to(**placement(target, dtype))


def read_config(path: Path, what: str) -> dict[str, Any]:
    """config.json of the draft directory `path`; errors name `what` was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{what} config not found: {config_path}")
    return json.loads(config_path.read_text())


def check_target_layer_count(raw: dict[str, Any], target: nn.Module, source: str) -> None:
    """Refuse a draft whose config names a target of another depth (`num_target_layers`):
    its tapped layer ids would point at different layers."""
    n_target = raw.get("num_target_layers")
    if n_target is not None and int(n_target) != target.config.num_layers:
        raise ValueError(f"{source}: draft was built for a target with num_target_layers={n_target}, "
                         f"but the target has {target.config.num_layers} layers")


def transformers_fields(mc: ModelConfig) -> dict[str, Any]:
    """DrafterConfig fields of a Qwen3-style draft whose config.json is a transformers config
    (DeepSpec's and z-lab's are; `ModelConfig.from_dict` fills transformers' defaults and reads
    both RoPE spellings)."""
    return dict(
        hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size, num_layers=mc.num_layers,
        num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, vocab_size=mc.vocab_size,
        rms_norm_eps=mc.rms_norm_eps, hidden_act=mc.hidden_act, attention_bias=mc.attention_bias, qk_norm=True,
        rope=dict(mc.rope.get("full_attention") or next(iter(mc.rope.values()))),
    )


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


def refuse_target_copies(files: dict[str, Path], what: str, source: str) -> None:
    own = sorted(set(files) & set(TARGET_COPIES))
    if own:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(own)}: a {what} uses the target's embedding "
                         "and LM head (a DeepSpec export, which stores copies of them, says architectures "
                         "Qwen3DSparkModel or Qwen3Eagle3Model)")


def compare_target_copies(files: dict[str, Path], target: nn.Module, source: str, rows: int = 8192) -> None:
    """Warn once when the stored copies differ from the target's matrices (cast to the stored
    dtype), e.g. a draft trained against another revision of the target; read in row chunks."""
    diffs = []
    for name in TARGET_COPIES:
        mine = target_matrix(target, name)
        if mine is None:
            continue
        worst = 0.0
        with safe_open(str(files[name]), framework="pt") as f:
            stored = f.get_slice(name)
            for start in range(0, mine.shape[0], rows):
                chunk = stored[start:start + rows]
                ref = mine[start:start + rows].detach().to(device="cpu", dtype=chunk.dtype)
                if not torch.equal(chunk, ref):
                    worst = max(worst, (chunk.float() - ref.float()).abs().max().item())
        if worst > 0:
            diffs.append(f"{name} (max |diff| {worst:.3g})")
    if diffs:
        warnings.warn(f"{source}: stored {' and '.join(diffs)} differ from the target's; using the target's "
                      "embedding and LM head (the draft may have been trained against another target)",
                      stacklevel=4)


def target_matrix(target: nn.Module, name: str) -> torch.Tensor | None:
    """The target's embedding / LM-head matrix when it exposes the HF module layout."""
    try:
        if name == "embed_tokens.weight":
            return target.model.embed_tokens.weight
        return target.lm_head.weight
    except AttributeError:
        return None
