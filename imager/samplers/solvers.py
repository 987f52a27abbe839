"""Samplers: pure functions that carry a state x from sigmas[0] down to sigmas[-1] with a denoiser.

Conventions are k-diffusion's (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): everything lives in VE coordinates and the samplers know nothing of the network.

Glossary (VE process x = x0 + σ·ε; a VP state x_vp = α·x0 + σ_vp·ε maps to x = x_vp/α, σ = σ_vp/α):
    x              the state at noise level σ, (B, ...)
    sigmas         (N+1,) strictly decreasing noise levels σ_0 > … > σ_N, usually σ_N = 0
    denoise        D(x, σ) = x̂0 = x̂_θ, an estimate of E[x0 | x]; σ is passed as a (B,) tensor
    x0_hat         x̂0 = D(x, σ)
    eps_hat        ε̂ = (x − x̂0)/σ; also the PF-ODE slope dx/dσ = (x − D(x, σ))/σ (Karras Eq. 1 with σ(t) = t
                   and the score of Eq. 3)
    sigma_up/down  ancestral split of a step σ_t → σ_s: σ_down² + σ_up² = σ_s² (σ_up is fresh noise)
    lam            λ = −log σ: half the log-SNR, DPM-Solver++'s time variable (Lu et al. 2022)
    h              λ_s − λ_t, the step in λ

Every sampler is ``sample_NAME(denoise, x, sigmas, *, generator=None, progress=False, **options)`` and
returns the state at sigmas[-1] (the sample, in x0 space, when sigmas ends with 0). The denoiser is
never called at σ = 0. Noise comes only from ``generator`` (``torch.randn`` of x's shape and dtype on
the generator's device, moved to x's; one draw per stochastic step), so a seeded generator makes a
sampler deterministic, and a CPU generator gives every device the same noise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from imager.errors import SamplerError

Tensor = torch.Tensor
Denoiser = Callable[[Tensor, Tensor], Tensor]  # D(x: (B, ...), sigma: (B,)) -> x̂0: (B, ...)


# ------------------------------------------------------------------------------------- helpers


def _steps(sigmas: Tensor, progress: bool) -> Iterable[tuple[float, float]]:
    """(σ_t, σ_s) for each step, as Python floats (float64; device-agnostic step coefficients)."""
    values = sigmas.detach().to("cpu", torch.float64).reshape(-1).tolist()
    if len(values) < 2:
        raise SamplerError(f"sigmas: need at least 2 noise levels (steps + 1), got {len(values)}")
    if any(not b < a for a, b in itertools.pairwise(values)) or values[-1] < 0 or not math.isfinite(values[0]):
        raise SamplerError(
            "sigmas: must be finite, strictly decreasing and end >= 0 (as NoiseSchedule.sampling_sigmas "
            "gives); with a discrete spacing keep steps <= the schedule's timesteps"
        )
    return tqdm(list(itertools.pairwise(values)), disable=not progress, desc="sampling", leave=False)


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    """σ broadcast to the batch: (B,)."""
    return x.new_full((x.shape[0],), sigma)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """z ~ N(0, I) of x's shape and dtype on x's device, drawn from ``generator`` on the generator's
    own device (a CPU generator gives the same noise to a GPU run)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of a step σ_t → σ_s with η-scaled fresh noise.

    σ_up = η·√(σ_s²(σ_t² − σ_s²)/σ_t²) is DDIM's σ_t(η) (Song et al. 2021, Eq. 16) divided by α_s,
    i.e. the same noise in VE coordinates; σ_down = √(σ_s² − σ_up²). σ_up is capped at σ_s (η > 1).
    """
    if eta < 0:
        raise SamplerError(f"eta: must be >= 0, got {eta}")
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator) -> tuple[Tensor, float]:
    """Karras et al. 2022, Alg. 2 lines 3–6: raise σ to σ̂ = (1 + γ)σ by adding noise (γ = 0: no-op)."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * _noise(x, generator)
    return x, sigma_hat


# ------------------------------------------------------------------------------------ samplers


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM, Song et al. 2021, Eq. 12 with σ_t(η) of Eq. 16, in VE coordinates.

    Eq. 12 divided by α_s (x_vp = α·x, and ε̂ is the same in both coordinates) reads
        x_s = x̂0 + σ_down·ε̂ + σ_up·z,    σ_up = η·√(σ_s²(σ_t² − σ_s²)/σ_t²),  σ_down = √(σ_s² − σ_up²).
    η = 0 is deterministic DDIM, which is also Euler's method on the PF-ODE in σ (Karras et al. 2022,
    §3); η = 1 is DDPM's ancestral sampler. x: (B, ...) at sigmas[0]; returns x at sigmas[-1].
    """
    for sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = denoise(x, _sigma_batch(x, sigma))  # (B, ...)
        eps_hat = (x - x0_hat) / sigma  # (B, ...)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0_hat + sigma_down * eps_hat  # DDIM Eq. 12, "predicted x0" + "direction pointing to x_t"
        if sigma_up > 0:
            x = x + sigma_up * _noise(x, generator)  # DDIM Eq. 12, random noise σ_t(η)·ε_t
    return x


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DDPM ancestral sampling, Ho et al. 2020, Alg. 2: x_s ~ q(x_s | x_t, x̂0) at every step.

    The posterior of Ho et al. Eq. 6–7, for any pair σ_t > σ_s and written in VE coordinates
    (x_t = x_s + √(σ_t² − σ_s²)·n, x_s = x0 + σ_s·ε):
        mean μ̃ = x̂0 + (σ_s²/σ_t²)·(x_t − x̂0),    variance σ̃² = σ_s²·(σ_t² − σ_s²)/σ_t².
    This is DDIM with η = 1 (σ_down = σ_s²/σ_t, σ_up = σ̃). x: (B, ...) at sigmas[0]; returns x at sigmas[-1].
    """
    for sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = denoise(x, _sigma_batch(x, sigma))  # (B, ...)
        ratio = sigma_next**2 / sigma**2
        x = x0_hat + ratio * (x - x0_hat)  # posterior mean μ̃, Ho et al. Eq. 7
        if sigma_next > 0:
            x = x + math.sqrt(sigma_next**2 * (1 - ratio)) * _noise(x, generator)  # √β̃, Ho et al. Eq. 7
    return x


@torch.no_grad()
def sample_euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the PF-ODE dx/dσ = (x − D(x, σ))/σ, Karras et al. 2022, Alg. 2 without the
    Heun correction (first order; s_churn > 0 adds the Alg. 2 churn). x: (B, ...) at sigmas[0]."""
    steps = _steps(sigmas, progress)
    for sigma, sigma_next in steps:
        x, sigma_hat = _churn(x, sigma, len(steps), s_churn, s_tmin, s_tmax, s_noise, generator)
        x0_hat = denoise(x, _sigma_batch(x, sigma_hat))  # (B, ...)
        d = (x - x0_hat) / sigma_hat  # dx/dσ, Karras Alg. 2 line 7
        x = x + (sigma_next - sigma_hat) * d if sigma_next > 0 else x0_hat  # Alg. 2 line 8 (exact at σ = 0)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``): an Euler step to σ_down, then fresh
    noise of scale σ_up (see :func:`ancestral_step`). With s_noise = 1 this equals DDIM with the same η.
    x: (B, ...) at sigmas[0]; returns x at sigmas[-1]."""
    for sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = denoise(x, _sigma_batch(x, sigma))  # (B, ...)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - x0_hat) / sigma  # dx/dσ
        x = x + (sigma_down - sigma) * d if sigma_down > 0 else x0_hat  # Euler step to σ_down (exact at 0)
        if sigma_up > 0:
            x = x + s_noise * sigma_up * _noise(x, generator)
    return x


@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022, Alg. 2 (s_churn = 0: Alg. 1, deterministic).

    The last step, to σ = 0, is an Euler step (Alg. 2 line 9: the correction needs D at σ_s > 0),
    which lands on x̂0; it is returned as x̂0 rather than x − σ̂·(x − x̂0)/σ̂ (no float cancellation).
    Two denoiser calls per step except the last. x: (B, ...) at sigmas[0]; returns x at sigmas[-1].
    """
    steps = _steps(sigmas, progress)
    for sigma, sigma_next in steps:
        x, sigma_hat = _churn(x, sigma, len(steps), s_churn, s_tmin, s_tmax, s_noise, generator)
        x0_hat = denoise(x, _sigma_batch(x, sigma_hat))  # (B, ...)
        if sigma_next == 0:
            x = x0_hat  # Alg. 2 line 8, x + (0 − σ̂)·d, written exactly
            continue
        d = (x - x0_hat) / sigma_hat  # Alg. 2 line 7
        x_next = x + (sigma_next - sigma_hat) * d  # Alg. 2 line 8 (Euler)
        d_next = (x_next - denoise(x_next, _sigma_batch(x_next, sigma_next))) / sigma_next  # line 10
        x = x + (sigma_next - sigma_hat) * (d + d_next) / 2  # line 11 (trapezoidal rule)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, generator: torch.Generator | None = None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, "DPM-Solver++", Alg. 2: multistep, second order in λ = −log σ.

    In VE coordinates (α = 1, σ = σ_VE; Alg. 2 divided by α_{t_i}) a step t_{i−1} → t_i is
        x_i = (σ_i/σ_{i−1})·x_{i−1} − (e^{−h_i} − 1)·D_i,                     h_i = λ_i − λ_{i−1},
        D_i = (1 + 1/(2r_i))·x̂0_{i−1} − (1/(2r_i))·x̂0_{i−2},                  r_i = h_{i−1}/h_i.
    The first step has no x̂0_{i−2} and uses D_i = x̂0_{i−1} (DPM-Solver++(1) = DDIM); so does the last
    step to σ = 0 (h = ∞: x = x̂0). The generator is unused (deterministic). x: (B, ...) at sigmas[0].
    """
    x0_prev, h_prev = None, None  # x̂0_{i−2}, h_{i−1}
    for sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = denoise(x, _sigma_batch(x, sigma))  # x̂0_{i−1}, (B, ...)
        if sigma_next == 0:
            x = x0_hat  # the last step, first order with h = ∞
            continue
        h = math.log(sigma) - math.log(sigma_next)  # λ_i − λ_{i−1} > 0
        if x0_prev is None:
            d = x0_hat  # the first step of Alg. 2, first order (DPM-Solver++(1))
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev  # Alg. 2, D_i
        x = (sigma_next / sigma) * x - math.expm1(-h) * d  # Alg. 2, the update of x̃_{t_i}
        x0_prev, h_prev = x0_hat, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """SDE-DPM-Solver++(2M): DPM-Solver++'s data-prediction multistep solver (Lu et al. 2022) for the
    reverse SDE, as k-diffusion's ``sample_dpmpp_2m_sde`` (midpoint form) and diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` write it.

    With η scaling the SDE's noise (η = 0: the PF-ODE), a step σ_t → σ_s with h = λ_s − λ_t reads
        x_s = (σ_s/σ_t)·e^{−ηh}·x_t + (1 − e^{−(1+η)h})·(x̂0_t + (x̂0_t − x̂0_prev)/(2r)) + σ_s·√(1 − e^{−2ηh})·z,
    r = h_prev/h, the multistep term dropped on the first step (no x̂0_prev) and on the last (σ_s = 0:
    x = x̂0). η = 0 is DPM-Solver++(2M) exactly; at first order η = 1 is DDPM's posterior step
    (e^{−2h} = σ_s²/σ_t²). s_noise scales z. x: (B, ...) at sigmas[0]; returns x at sigmas[-1].
    """
    if eta < 0:
        raise SamplerError(f"eta: must be >= 0, got {eta}")
    x0_prev, h_prev = None, None  # x̂0 of the previous step, its h
    for sigma, sigma_next in _steps(sigmas, progress):
        x0_hat = denoise(x, _sigma_batch(x, sigma))  # (B, ...)
        if sigma_next == 0:
            x = x0_hat  # the last step, first order with h = ∞
            continue
        h = math.log(sigma) - math.log(sigma_next)  # λ_s − λ_t > 0
        weight = -math.expm1(-(1 + eta) * h)  # 1 − e^{−(1+η)h}
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + weight * x0_hat
        if x0_prev is not None:
            x = x + weight / (2 * (h_prev / h)) * (x0_hat - x0_prev)  # the midpoint multistep correction
        if eta > 0:
            x = x + s_noise * sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * _noise(x, generator)
        x0_prev, h_prev = x0_hat, h
    return x
