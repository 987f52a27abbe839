"""The text-encoder interface.

An encoder maps captions to per-token embeddings (B, L, D), an attention mask (B, L) and a pooled
embedding (B, P). The diffusion UNet cross-attends to the tokens (respecting the mask) and adds the
pooled vector to its time embedding. Encoders are frozen and only run in the embed stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TextEmbeddings:
    tokens: torch.Tensor  # (B, L, D) float32, zero at padded positions
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    pooled: torch.Tensor  # (B, P) float32
    truncated: int = 0  # how many captions were longer than L tokens and cut


class TextEncoder(Protocol):
    id: str  # what produced the embeddings (family, weights, version), stored in the cache
    token_dim: int  # D
    pooled_dim: int  # P
    max_length: int  # L

    def encode(self, captions: Sequence[str]) -> TextEmbeddings: ...


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (B, L, D), (B, L) -> (B, D)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pool(tokens: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per caption, (B, L, D), (B, L) -> (B, D), read from the mask, so padding on either
    side is never pooled. ``mean``: the masked mean. ``cls``: the first real token ([CLS] in BERT-like
    models, position 0 with right padding). ``max``: the element-wise max over real tokens. ``last``:
    the last real token, the only one a decoder-only model has read the whole caption at. A caption
    without tokens pools to zeros."""
    if how == "mean":
        return masked_mean(tokens, mask)
    length = mask.shape[1]
    if how == "max":
        pooled = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    elif how in ("cls", "last"):
        positions = torch.arange(length, device=mask.device).expand_as(mask)
        if how == "cls":
            index = torch.where(mask, positions, length).amin(1)
        else:
            index = torch.where(mask, positions, -1).amax(1)
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), index.clamp(0, length - 1)]
    else:
        raise ValueError(f"unknown pooling {how!r}; expected mean, cls, max or last")
    return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
