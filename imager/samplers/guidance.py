"""Guidance and thresholding as denoiser wrappers: every sampler takes them unchanged.

Glossary:
    x0_c, x0_u   x̂0 of the conditional and the unconditional (or negative-prompt) denoiser
    scale        guidance scale w_cfg = 1 + w of Ho & Salimans 2022 (1: no guidance)
    s            Imagen's dynamic threshold: max(1, the `percentile` quantile of |x̂0| per sample)

Classifier-free guidance (Ho & Salimans 2022, Eq. 6: ε̃ = (1 + w)·ε_c − w·ε_u) is an affine
combination with weights summing to 1. For fixed x and σ, x̂0 = x − σ·ε̂ (and, for a network, x̂0 of
eps, x0 or v outputs) is affine in the output, so combining x̂0, ε̂ or the raw outputs gives the
same guided x̂0. Thresholding (Saharia et al. 2022, "Imagen", §2.3) acts on x̂0, whose data range
is [−1, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from imager.errors import SamplerError
from imager.samplers.solvers import Denoiser

Tensor = torch.Tensor
CondNetwork = Callable[..., Tensor]  # net(x: (B, ...), t: (B,), *cond) -> output: (B, ...)
ThresholdMode = Literal["none", "static", "dynamic"]
THRESHOLD_MODES = ("none", "static", "dynamic")


def cfg_denoiser(denoise_cond: Denoiser, denoise_uncond: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance on two denoisers: x̂0 = x̂0_u + scale·(x̂0_c − x̂0_u).

    scale == 1 calls only the conditional denoiser. A negative prompt is an ``denoise_uncond``
    conditioned on that prompt.
    """
    if scale == 1:
        return denoise_cond

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        x0_c = denoise_cond(x, sigma)  # (B, ...)
        x0_u = denoise_uncond(x, sigma)  # (B, ...)
        return x0_u + scale * (x0_c - x0_u)  # Ho & Salimans 2022, Eq. 6 with scale = 1 + w

    return denoise


def _batched(tensor: Tensor, batch: int, what: str) -> Tensor:
    """``tensor`` with batch ``batch``: a batch of 1 (e.g. one null embedding) is expanded."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise SamplerError(f"{what}: batch {tensor.shape[0]} does not match the images' batch {batch} (or 1)")


def cfg_net(net: CondNetwork, cond: tuple[Tensor, ...], uncond: tuple[Tensor, ...], scale: float) -> CondNetwork:
    """Classifier-free guidance on a network, one forward pass on the doubled batch.

    ``net(x, t, *cond)`` takes its conditioning tensors (batch first) after x and t; ``cond`` and
    ``uncond`` hold the same number of tensors, each of batch B or 1 and of matching trailing shapes
    (pad prompts to one length). Returns ``guided(x, t)`` = out_u + scale·(out_c − out_u) where
    [out_c; out_u] = net([x; x], [t; t], *[cond; uncond]), ready for :func:`model_denoiser`.
    scale == 1 runs only the conditional half. A negative prompt is simply a different ``uncond``.
    """
    cond, uncond = tuple(cond), tuple(uncond)
    if len(cond) != len(uncond):
        raise SamplerError(f"cfg_net: cond has {len(cond)} tensors but uncond has {len(uncond)}; they must match")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        c = tuple(_batched(v, b, f"cond[{i}]") for i, v in enumerate(cond))
        if scale == 1:
            return net(x, t, *c)
        u = tuple(_batched(v, b, f"uncond[{i}]") for i, v in enumerate(uncond))
        both = tuple(torch.cat([ci, ui]) for ci, ui in zip(c, u, strict=True))  # each (2B, ...)
        t2 = torch.cat([t, t]) if t.ndim else t  # (2B,)
        out_c, out_u = net(torch.cat([x, x]), t2, *both).split(b)  # (B, ...) each
        return out_u + scale * (out_c - out_u)  # Ho & Salimans 2022, Eq. 6

    return guided


def static_threshold(x0: Tensor) -> Tensor:
    """x̂0 clamped to the data range [−1, 1] (Saharia et al. 2022, §2.3, static thresholding)."""
    return x0.clamp(-1, 1)


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s = max(1, the
    ``percentile`` quantile of |x̂0|), then x̂0 ← clamp(x̂0, −s, s)/s. x0: (B, ...); returns values
    in [−1, 1]; a sample already inside [−1, 1] is returned unchanged (s = 1)."""
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile: must be in (0, 1], got {percentile}")
    flat = x0.detach().abs().flatten(1).sort(dim=1).values  # (B, N) ascending |x̂0|
    pos = percentile * (flat.shape[1] - 1)  # linear interpolation, as torch.quantile
    lo = int(pos)
    hi = min(lo + 1, flat.shape[1] - 1)
    q = flat[:, lo] + (pos - lo) * (flat[:, hi] - flat[:, lo])  # (B,)
    s = q.clamp(min=1).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    return torch.minimum(torch.maximum(x0, -s), s) / s


def thresholded(denoise: Denoiser, mode: ThresholdMode, percentile: float = 0.995) -> Denoiser:
    """``denoise`` with its x̂0 thresholded: none, static (clamp to [−1, 1]) or dynamic (Imagen)."""
    if mode not in THRESHOLD_MODES:
        raise SamplerError(f"unknown threshold mode '{mode}'; valid: {', '.join(THRESHOLD_MODES)}")
    if mode == "none":
        return denoise
    if mode == "static":
        return lambda x, sigma: static_threshold(denoise(x, sigma))
    if not 0 < percentile <= 1:
        raise ValueError(f"percentile: must be in (0, 1], got {percentile}")
    return lambda x, sigma: dynamic_threshold(denoise(x, sigma), percentile)
