"""One YAML file per (algorithm, target): everything a training run needs, validated on load.

    algorithm: dspark            # eagle3 | dflash | dspark
    target: default              # 'default' (SmolLM2-135M-Instruct), an HF dir or a .gguf
    drafter: {num_layers: 1, markov_rank: 32, ...}   # DrafterConfig fields over the defaults
    data: [regen.jsonl]          # regenerated samples (ascend-dspark regen)
    steps: 2000
    ...

Unknown keys are errors (a typo must not silently train with a default). Command-line
`--set key=value` overrides parse their value as YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ALGORITHMS = ("eagle3", "dflash", "dspark")

# DeepSpec's loss weights per algorithm (dspark/loss.py; DFlash = the same model, CE only).
DEFAULT_LOSS_WEIGHTS = {
    "dspark": {"ce": 0.1, "tv": 0.9, "conf": 1.0},
    "dflash": {"ce": 1.0},
    "eagle3": {},                 # TTT step weights come from ttt_step_decay
}

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    algorithm: str
    target: str = "default"
    drafter: dict[str, Any] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    max_len: int = 1024
    # optimisation (DeepSpec: AdamW, lr 6e-4, wd 0, 4% warmup then cosine, clip 1.0)
    steps: int = 1000
    batch_size: int = 16               # sequences per step per rank
    lr: float = 6e-4
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.04
    grad_clip: float = 1.0
    precision: str = "bf16"            # bf16 autocast where the platform supports it, else fp32
    # losses
    loss_weights: dict[str, float] | None = None    # None: DEFAULT_LOSS_WEIGHTS[algorithm]
    position_decay: float = 4.0        # block slots: exp(-k / 4) (DeepSpec loss_decay_gamma)
    num_anchors: int = 64              # blocks per sequence (DFlash / DSpark)
    ttt_step_decay: float = 0.8        # Eagle3 TTT step weights 0.8^j
    # validation: a fixed share of the prompts (split.py), measured every val_every steps
    val_fraction: float = 0.02
    val_every: int = 200
    val_batches: int = 8               # at most this many batches of batch_size validation samples
    # weights-only continuation (init from a draft with train_progress.json): the optimiser
    # starts empty, so the learning rate ramps up again over this many steps
    rewarm_steps: int = 20
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision {self.precision!r}: expected bf16 or fp32")
        for name in ("steps", "batch_size", "max_len", "num_anchors", "checkpoint_every", "log_every", "val_every",
                     "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.rewarm_steps < 0:
            raise ValueError(f"rewarm_steps must be >= 0, got {self.rewarm_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.loss_weights is None:
            self.loss_weights = dict(DEFAULT_LOSS_WEIGHTS[self.algorithm])
        unknown = set(self.loss_weights) - {"ce", "tv", "conf"}
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}: expected ce, tv, conf")
        if self.algorithm == "eagle3" and self.loss_weights:
            raise ValueError("eagle3 trains with the TTT soft cross-entropy only; set ttt_step_decay, not loss_weights")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.steps * self.warmup_ratio))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "algorithm" not in raw:
            raise ValueError(f"{source}: 'algorithm' is required ({', '.join(ALGORITHMS)})")
        return cls(**{k: _as_float(k, v, source) if k in FLOAT_FIELDS else v for k, v in raw.items()})


def _as_float(key: str, value: Any, source: str) -> float:
    """YAML 1.1 reads `4e-4` (no dot) as a string: a float field takes it as the number it is."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} must be a number, got {value!r}") from None


FLOAT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.type in (float, "float"))


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a shipped one such as `dspark_smollm2`) and
    apply `key=value` overrides (`drafter.markov_rank=64` reaches into the drafter section)."""
    path = resolve_config_path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return TrainConfig.from_dict(raw, source=str(path))


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / f"{path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"training config {path} not found (not a file, not a shipped config: {names})")
