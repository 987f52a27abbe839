"""The diffusion process: noise schedules, the forward process, parameterisations and the loss.

Nothing here knows about networks or samplers (see imager/samplers and imager/models). The configs
load eagerly and need no torch; the torch-side names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from imager.diffusion.config import LossConfig, ScheduleConfig

if TYPE_CHECKING:
    from imager.diffusion.process import diffusion_loss, predict_x0, q_sample, target
    from imager.diffusion.schedule import NoiseSchedule

_LAZY = {
    "NoiseSchedule": "imager.diffusion.schedule",
    "diffusion_loss": "imager.diffusion.process",
    "predict_x0": "imager.diffusion.process",
    "q_sample": "imager.diffusion.process",
    "target": "imager.diffusion.process",
}

__all__ = ["LossConfig", "NoiseSchedule", "ScheduleConfig", "diffusion_loss", "predict_x0", "q_sample", "target"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imager.diffusion' has no attribute {name!r}")
