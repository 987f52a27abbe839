"""The forward process, conversions between parameterisations, and the training loss.

Glossary (VP process; α, σ are the per-sample signal and noise scales, broadcast over (C, H, W)):
    x0        clean image, values in [-1, 1]
    eps       ε ~ N(0, I)
    x_t       α·x0 + σ·ε                          (Ho et al. 2020, Eq. 4)
    v         α·ε − σ·x0                          (Salimans & Ho 2022, §4)
    snr       α² / σ²

With α² + σ² = 1 every conversion below is exact algebra: x0 = α·x_t − σ·v, ε = σ·x_t + α·v.
"""

from __future__ import annotations

import torch

from imager.diffusion.config import LossConfig, Prediction

Tensor = torch.Tensor


def _b(scale: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) (as many trailing 1s as ``like`` needs)."""
    return scale.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(x0: Tensor, alpha: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """x_t = α·x0 + σ·ε. x0, eps: (B, ...); alpha, sigma: (B,)."""
    return _b(alpha, x0) * x0 + _b(sigma, x0) * eps


def v_from(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = α·ε − σ·x0."""
    return _b(alpha, x0) * eps - _b(sigma, x0) * x0


def predict_x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = (x_t − σ·ε̂)/α."""
    return (x_t - _b(sigma, x_t) * eps) / _b(alpha, x_t)


def predict_eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = (x_t − α·x̂0)/σ."""
    return (x_t - _b(alpha, x_t) * x0) / _b(sigma, x_t)


def predict_x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = α·x_t − σ·v̂ (requires α² + σ² = 1)."""
    return _b(alpha, x_t) * x_t - _b(sigma, x_t) * v


def predict_eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = σ·x_t + α·v̂ (requires α² + σ² = 1)."""
    return _b(sigma, x_t) * x_t + _b(alpha, x_t) * v


def predict_x0(output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """x̂0 from the network's output under its prediction target."""
    if prediction == "x0":
        return output
    if prediction == "eps":
        return predict_x0_from_eps(x_t, output, alpha, sigma)
    if prediction == "v":
        return predict_x0_from_v(x_t, output, alpha, sigma)
    raise ValueError(f"unknown prediction target '{prediction}'; use eps, x0 or v")


def target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """What the network is trained to output."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from(x0, eps, alpha, sigma)
    raise ValueError(f"unknown prediction target '{prediction}'; use eps, x0 or v")


def loss_weight(snr: Tensor, cfg: LossConfig) -> Tensor:
    """(B,) weight on the MSE of the prediction target.

    min_snr (Hang et al. 2023, Eq. 7): the x0-space loss weighted by min(SNR, γ). An MSE on ε equals
    SNR × the MSE on x0, and an MSE on v equals (SNR + 1) × the MSE on x0, hence the divisions.
    """
    if cfg.weighting == "uniform":
        return torch.ones_like(snr)
    clipped = snr.clamp(max=cfg.min_snr_gamma)
    if cfg.prediction == "x0":
        return clipped
    if cfg.prediction == "eps":
        return clipped / snr.clamp(min=1e-20)
    return clipped / (snr + 1)


def diffusion_loss(output: Tensor, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, cfg: LossConfig) -> Tensor:
    """(B,) weighted per-sample MSE between the network ``output`` and its target."""
    err = (output - target(x0, eps, alpha, sigma, cfg.prediction)) ** 2
    per_sample = err.flatten(1).mean(1)  # (B,)
    snr = (alpha.to(torch.float64) / sigma.to(torch.float64).clamp(min=1e-20)) ** 2
    return per_sample * loss_weight(snr, cfg).to(per_sample.dtype)
