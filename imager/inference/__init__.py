"""Inference: the one path from trained networks and text to images.

- :mod:`imager.inference.config`: typed sampling settings (no torch; params sections embed them)
- :mod:`imager.inference.sampling`: :class:`Stage`, one model sampled on its own device
- :mod:`imager.inference.cascade`: :class:`Cascade`, base then super-resolution, and prompt encoding
- :mod:`imager.inference.images`: image tensors between uint8 data, [-1, 1] models and PNGs

The settings load eagerly (they need no torch); the torch-side names load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from imager.inference.config import CascadeSampling, SRSampling, StageSampling

if TYPE_CHECKING:
    from imager.inference.cascade import Cascade, encode_negative, encode_prompts
    from imager.inference.sampling import Stage, check_sampling, resolve_device

_LAZY = {
    "Cascade": "imager.inference.cascade",
    "encode_negative": "imager.inference.cascade",
    "encode_prompts": "imager.inference.cascade",
    "Stage": "imager.inference.sampling",
    "check_sampling": "imager.inference.sampling",
    "resolve_device": "imager.inference.sampling",
}

__all__ = [
    "Cascade", "CascadeSampling", "SRSampling", "Stage", "StageSampling", "check_sampling", "encode_negative", "encode_prompts",
    "resolve_device",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'imager.inference' has no attribute {name!r}")
