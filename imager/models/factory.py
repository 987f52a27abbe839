"""The network a config names: Imager's own UNet or the diffusers baseline (``config.arch``)."""

from __future__ import annotations

from imager.models.base import Denoiser
from imager.models.config import UNetConfig


def build_denoiser(config: UNetConfig) -> Denoiser:
    """The network ``config.arch`` names, with fresh weights from torch's global RNG."""
    if config.arch == "diffusers":
        from imager.models.diffusers_unet import DiffusersUNet

        return DiffusersUNet(config)
    from imager.models.unet import UNet

    return UNet(config)
