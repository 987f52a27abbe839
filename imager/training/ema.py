"""Exponential moving average of a model's parameters, with warm-up.

decay(step) = min(max_decay, (1 + step) / (10 + step)): early on the average follows the weights
closely, later it averages over ~1 / (1 − max_decay) steps (as in ADM and most diffusion codebases).
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, max_decay: float):
        if not 0 <= max_decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {max_decay}")
        self.max_decay = max_decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def decay(self, step: int) -> float:
        return min(self.max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay(step)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1 - d)  # shadow ← d·shadow + (1 − d)·p

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into ``model`` (buffers are left as they are)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:3]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)
