"""UNet building blocks (ADM, Dhariwal & Nichol 2021; Imagen, Saharia et al. 2022).

Glossary: ``emb`` is the per-sample conditioning vector (B, E) — time embedding plus pooled-text
embedding (plus the noise-augmentation embedding in the SR model); ``context`` is the per-token text
embedding (B, L, D) with ``mask`` (B, L), True for real tokens. Every residual branch ends in a
zero-initialised layer, so a freshly built block is the identity (ADM's ``zero_module``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of a continuous scalar (Transformer / ADM), float32.

    t: (B,) in [0, 1] (diffusion time or noise-augmentation level); scaled by 1000 so the
    frequencies match ADM's integer timesteps. Returns (B, dim) in [-1, 1]: [cos(1000 t f), sin(1000 t f)]
    with f = max_period ** (-k / (dim // 2)), k = 0 .. dim // 2 - 1; a zero column pads an odd dim.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → SiLU → Linear: the embedding MLPs of time, pooled text and augmentation level."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class ResBlock(nn.Module):
    """ADM residual block with scale-shift conditioning (AdaGN).

    out = skip(x) + conv(dropout(SiLU(GN(h) * (1 + scale) + shift))), h = conv(SiLU(GN(x))),
    (scale, shift) = Linear(SiLU(emb)). x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(x: Tensor, n: int) -> Tensor:
    """(B, N, C) -> (B, n, N, C // n)."""
    b, length, c = x.shape
    return x.view(b, length, n, c // n).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, n, N, c) -> (B, N, n * c)."""
    b, n, length, c = x.shape
    return x.transpose(1, 2).reshape(b, length, n * c)


def visible_mask(mask: Tensor) -> Tensor:
    """(B, L) bool, True = attend; rows with no True get their first position made visible, so
    attention over them stays finite (softmax over an all -inf row is NaN)."""
    empty = ~mask.any(dim=1, keepdim=True)  # (B, 1); no host sync, so it compiles and stays async
    return torch.cat([mask[:, :1] | empty, mask[:, 1:]], dim=1)


class SpatialAttention(nn.Module):
    """Self-attention over the H·W positions, cross-attention to the text tokens, feed-forward.

    Pre-LayerNorm transformer block applied per position on channels (so it works at any H, W); each
    of the three residual branches ends in a zero-initialised projection. x: (B, C, H, W);
    context: (B, L, D) text tokens (already normalised by the UNet); mask: (B, L) bool, True = real
    token, padding positions get exactly zero attention weight. Returns (B, C, H, W).
    """

    def __init__(self, channels: int, context_dim: int, *, head_dim: int = 32, ff_mult: int = 4):
        super().__init__()
        self.heads = channels // head_dim
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out1 = zero_(nn.Linear(channels, channels))
        self.norm2 = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)  # text tokens projected to the attention width
        self.out2 = zero_(nn.Linear(channels, channels))
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(
            nn.Linear(channels, ff_mult * channels), nn.GELU(), zero_(nn.Linear(ff_mult * channels, channels))
        )

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, N, C), N = H·W
        q, k, v = (_heads(z, self.heads) for z in self.qkv(self.norm1(h)).chunk(3, dim=-1))
        h = h + self.out1(_merge(F.scaled_dot_product_attention(q, k, v)))
        q = _heads(self.q(self.norm2(h)), self.heads)  # (B, n, N, d)
        k, v = (_heads(z, self.heads) for z in self.kv(context).chunk(2, dim=-1))  # (B, n, L, d)
        attend = visible_mask(mask)[:, None, None, :]  # (B, 1, 1, L)
        h = h + self.out2(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attend)))
        h = h + self.ff(self.norm3(h))
        return h.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    """Stride-2 3×3 conv: (B, C, H, W) -> (B, C, H/2, W/2); H and W even."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondSequential(nn.ModuleList):
    """Runs its layers in order, giving each the inputs it needs: ResBlocks get ``emb``, attention
    blocks get ``context`` and ``mask``, anything else only the feature map."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialAttention):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x
