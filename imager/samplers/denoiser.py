"""From a VP network to a VE denoiser D(x, σ) = x̂0, the only thing the samplers call.

Glossary:
    x, sigma   VE state and noise level, x = x0 + σ·ε; x: (B, ...), sigma: (B,)
    alpha      α = 1/√(1 + σ²), the VP signal scale of the same noise level (α² + σ_vp² = 1)
    sigma_vp   σ_vp = σ·α, the VP noise scale
    x_vp       α·x = α·x0 + σ_vp·ε, the network's input (Ho et al. 2020, Eq. 4)
    t          continuous time in [1/T, 1] with σ_VE(t) = σ (NoiseSchedule's continuous view)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from imager.diffusion.config import Prediction
from imager.diffusion.process import predict_x0
from imager.diffusion.schedule import NoiseSchedule
from imager.samplers.solvers import Denoiser

Tensor = torch.Tensor
Network = Callable[[Tensor, Tensor], Tensor]  # net(x_vp: (B, ...), t: (B,)) -> eps, x0 or v: (B, ...)

PREDICTIONS = ("eps", "x0", "v")


def _b(scale: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), cast to ``like``'s dtype and device."""
    return scale.to(dtype=like.dtype).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def model_denoiser(net: Network, schedule: NoiseSchedule, prediction: Prediction) -> Denoiser:
    """Wrap a VP network ``net(x_vp, t)`` into the VE denoiser D(x, σ) the samplers integrate.

    Conditioning (text embeddings, masks, guidance) belongs to ``net``: close over it, e.g. with
    ``functools.partial(unet, text=emb, mask=mask)`` or :func:`imager.samplers.guidance.cfg_net`.
    ``prediction`` is what ``net`` outputs: eps (ε̂), x0 (x̂0) or v (v̂ = α·ε̂ − σ_vp·x̂0).
    The network gets t in x's dtype and device; the coefficients are computed in float64.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction target '{prediction}'; use eps, x0 or v")

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        sigma64 = sigma.detach().to("cpu", torch.float64).reshape(-1)  # (B,)
        alpha = (1 + sigma64**2).rsqrt()  # (B,) α = 1/√(1 + σ²)
        t = schedule.t_of_ve_sigma(sigma64)  # (B,) σ_VE(t) = σ
        x_vp = _b(alpha, x) * x  # (B, ...) α·x
        output = net(x_vp, t.to(dtype=x.dtype).to(x.device))  # (B, ...)
        alpha_, sigma_vp = (s.to(dtype=x.dtype).to(x.device) for s in (alpha, sigma64 * alpha))  # (B,)
        return predict_x0(output, x_vp, alpha_, sigma_vp, prediction)

    return denoise
