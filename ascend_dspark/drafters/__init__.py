"""Drafters: Eagle3, DFlash and DSpark behind one protocol (`base.Drafter`), and their checkpoints.

Imports go one way: `checkpoint` (load_drafter) -> the formats (`native`, `deepspec`, `zlab`;
`export` writes DeepSpec's) -> `draft_dir` (the loading steps they share) -> `build` (kinds,
random init) and `weights` (safetensors files) -> the drafters (`eagle3`, `dflash`, `dspark`
on `block_backbone`) -> `base`, `layers`, `config`.
"""

from .base import Drafter, DraftProposal
from .build import create_drafter
from .checkpoint import load_drafter
from .config import DrafterConfig
from .deepspec import load_deepspec_drafter
from .dflash import DFlashDrafter
from .dspark import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .export import export_deepspec
from .native import save_drafter
from .zlab import export_zlab_dflash, load_zlab_drafter

__all__ = [
    "Drafter", "DraftProposal", "DrafterConfig", "create_drafter", "load_drafter", "save_drafter",
    "load_deepspec_drafter", "export_deepspec", "load_zlab_drafter", "export_zlab_dflash",
    "DFlashDrafter", "DSparkDrafter", "Eagle3Drafter",
]
