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
