"""`load_drafter`: one entry point for every draft directory, dispatched on its config.json.

- `"format": "ascend-dspark"`: this project's own format (`native.py`);
- `"architectures": ["DFlashDraftModel"]`: a z-lab DFlash draft (`zlab.py`);
- any other `architectures`: a DeepSpec export (`deepspec.py` names the ones it reads);
- neither: an error that says so.
This is the only module that imports the formats; they share their loading steps through
`draft_dir.py`, so imports go one way: checkpoint -> formats -> draft_dir -> build -> drafters.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ascend_dspark.spec.calibration import read_temperatures

from .base import Drafter
from .deepspec import load_deepspec_drafter
from .draft_dir import read_config
from .native import FORMAT, load_native_drafter
from .zlab import ZLAB_ARCHS, load_zlab_drafter


def load_drafter(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None) -> Drafter:
    """Load a drafter directory: our own format, a DeepSpec export or a z-lab DFlash draft
    (dispatched on config.json)."""
    path = Path(path)
    raw = read_config(path, "drafter checkpoint")
    if raw.get("format") != FORMAT and "architectures" in raw:
        if (raw.get("architectures") or [None])[0] in ZLAB_ARCHS:
            drafter = load_zlab_drafter(path, target, dtype=dtype)
        else:
            drafter = load_deepspec_drafter(path, target, dtype=dtype)
    else:
        drafter = load_native_drafter(path, target, dtype)
    # The confidence head's per-position temperatures, where `ascend-dspark calibrate` fitted them.
    drafter.confidence_temperatures = read_temperatures(path)
    return drafter
