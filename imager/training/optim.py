"""The optimizer of every training loop: AdamW, fused where torch supports it.

The fused kernel updates all parameters in one pass instead of a handful of multi-tensor ops per
update, so the optimizer step costs less wherever many small parameter tensors make per-op overhead
dominate (small models, CPUs). It is the same algorithm: the two agree to float rounding. torch <
2.4 has no CPU kernel, and some devices none at all; there the multi-tensor implementation runs
(``optimizer.defaults["fused"]`` says which one was built).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, with ``fused=True`` when this torch and device allow it."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, **kwargs, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for these tensors' device or dtype
        return torch.optim.AdamW(params, **kwargs)
