"""Exponential moving average of a model, kept as a second model (ready to sample and to save).

decay(step) = min(max_decay, (1 + step) / (10 + step)): early on the average follows the weights
closely, later it averages over ~1 / (1 − max_decay) steps (the warm-up used by ADM and others).
Buffers (such as a cached null condition) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, max_decay: float):
        if not 0 <= max_decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {max_decay}")
        self.max_decay = max_decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, step: int) -> float:
        return min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """ema ← d·ema + (1 − d)·model for parameters; buffers copied."""
        d = self.decay(step)
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
