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

from imager.config import Embed


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


def load_text_encoder(cfg: Embed) -> TextEncoder:
    """The encoder named by ``cfg.encoder``, loaded from local files unless downloads are allowed."""
    if cfg.encoder == "minilm":
        from imager.text.hf import load_minilm

        return load_minilm(cfg)
    if cfg.encoder == "t5":
        from imager.text.hf import load_t5

        return load_t5(cfg)
    from imager.text.clip import load_clip

    return load_clip(cfg)
