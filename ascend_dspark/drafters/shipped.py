"""The trained drafts that ship inside the package, for the embedded default target.

`ascend_dspark/drafts/<target>/<kind>/` holds a draft in this project's format (config.json +
model.safetensors, bf16), trained by `benchmarks/train_default_drafts.sh` with the configs in
`ascend_dspark/training/configs/`. Only the default target (SmolLM2-135M-Instruct) has
shipped drafts; for any other target a draft must be trained or given as a path.
"""

from __future__ import annotations

from pathlib import Path

DRAFTS_DIR = Path(__file__).resolve().parents[1] / "drafts"
DEFAULT_TARGET = "smollm2-135m-instruct"


def shipped_draft(kind: str, model: str | None) -> Path | None:
    """The shipped draft directory of `kind` for `model`, or None when none ships.

    `model` is what the user named the target: "default" (the embedded SmolLM2) has drafts."""
    if model != "default":
        return None
    path = DRAFTS_DIR / DEFAULT_TARGET / kind
    return path if (path / "config.json").is_file() else None


def shipped_kinds() -> list[str]:
    root = DRAFTS_DIR / DEFAULT_TARGET
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
