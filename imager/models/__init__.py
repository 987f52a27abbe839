"""The diffusion networks: a text-conditional UNet (base and super-resolution), the diffusers
baseline behind the same interface (``arch: diffusers``), and their checkpoints.

``UNetConfig`` is imported eagerly and needs no torch (params sections embed it); the torch-side
names load on first use, so ``from imager.models import UNetConfig`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from imager.models.config import UNetConfig

if TYPE_CHECKING:
    from imager.models.base import Denoiser
    from imager.models.checkpoint import load_model, read_checkpoint_meta, save_model
    from imager.models.factory import build_denoiser
    from imager.models.unet import UNet

_LAZY = {
    "Denoiser": "imager.models.base",
    "build_denoiser": "imager.models.factory",
    "UNet": "imager.models.unet",
    "save_model": "imager.models.checkpoint",
    "load_model": "imager.models.checkpoint",
    "read_checkpoint_meta": "imager.models.checkpoint",
}

__all__ = ["Denoiser", "UNet", "UNetConfig", "build_denoiser", "load_model", "read_checkpoint_meta", "save_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imager.models' has no attribute {name!r}")
