"""Drafters: Eagle3, DFlash and DSpark behind one protocol (`base.Drafter`), and their checkpoints."""

from .base import Drafter, DraftProposal
from .checkpoint import create_drafter, load_drafter, save_drafter
from .config import DrafterConfig
from .deepspec import load_deepspec_drafter
from .dflash import DFlashDrafter
from .dspark import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .export import export_deepspec
from .zlab import export_zlab_dflash, load_zlab_drafter

__all__ = [
    "Drafter", "DraftProposal", "DrafterConfig", "create_drafter", "load_drafter", "save_drafter",
    "load_deepspec_drafter", "export_deepspec", "load_zlab_drafter", "export_zlab_dflash",
    "DFlashDrafter", "DSparkDrafter", "Eagle3Drafter",
]
