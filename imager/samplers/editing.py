"""Image-conditioned sampling without a new model: a later start and a wrapper around the denoiser.

- img2img (SDEdit, Meng et al. 2021): start at a noise level set by ``strength`` from the input
  image noised to that level, then denoise with the prompt. :func:`strength_sigmas` picks the start
  the way diffusers' img2img pipelines do: the last ``int(steps · strength)`` of the ``steps`` points.
- Inpainting (RePaint, Lugmayr et al. 2022): :func:`repaint_denoiser` shows the network the known
  region as the original noised to the current σ (fresh noise per call) and the sampler's state
  elsewhere; :func:`sample_resampled` adds RePaint's resampling (a step, a jump back by forward
  noise, the step again). The final overlay of the known pixels is the caller's (it is a pixel
  operation, not part of sampling).

Every sampler of the registry updates x pixel by pixel (x_s is a per-pixel combination of x_t, x̂0
and noise), so the known region of the sampler's own state never reaches the unknown region: the
wrapper's replacement of the network's input is RePaint's replacement of the state.

Masks are (B or 1, 1 or C, H, W) floats in [0, 1] broadcastable to x: 1 = repaint, 0 = keep; values
between blend the two (a feathered edge).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from imager.errors import SamplerError
from imager.samplers.solvers import Denoiser, _noise

Tensor = torch.Tensor


def check_strength(strength: float) -> float:
    """``strength`` as a float; a SamplerError unless 0 < strength <= 1."""
    value = float(strength)
    if not 0 < value <= 1:
        raise SamplerError(f"strength: must be in (0, 1], got {strength}")
    return value


def strength_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` steps an img2img run of ``strength`` takes: ``int(steps · strength)``
    (diffusers' ``get_timesteps``), at least 1 so that a tiny strength still denoises once at the
    lowest noise level instead of returning its input untouched."""
    return min(steps, max(1, int(steps * check_strength(strength))))


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of ``sigmas`` ((steps + 1,), ending with 0) that ``strength`` selects: the last
    :func:`strength_steps` steps, i.e. ``sigmas[steps − n:]``; strength 1 keeps them all."""
    steps = sigmas.shape[0] - 1
    return sigmas[steps - strength_steps(steps, strength) :]


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.ndim != like.ndim:
        raise SamplerError(f"mask: needs {like.ndim} dims like the images, got shape {tuple(mask.shape)}")
    return mask.to(like.device, like.dtype)


def repaint_denoiser(denoise: Denoiser, known: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Denoiser:
    """RePaint's replacement as a denoiser: D'(x, σ) = D(m·x + (1 − m)·(known + σ·z), σ).

    ``known`` (B, ...) is the clean original x0 and ``mask`` (m, 1 = repaint) broadcasts to it; z is
    fresh N(0, I) noise for every call, drawn from ``generator`` (RePaint's sample of q(x_t | x0)).
    The output is the model's x̂0 everywhere; the caller overlays the known pixels at the end.
    """

    def inner(x: Tensor, sigma: Tensor) -> Tensor:
        m = _as_mask(mask, x)
        k = known.to(x.device, x.dtype)
        s = sigma.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
        x_in = m * x + (1 - m) * (k + s * _noise(x, generator))
        return denoise(x_in, sigma)

    return inner


def sample_resampled(
    fn: Callable[..., Tensor],
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    resample: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **options: float,
) -> Tensor:
    """RePaint's resampling with jump length 1 around any sampler ``fn``.

    Each step σ_t → σ_s (σ_s > 0) is taken ``resample`` times: after each but the last, the state
    goes back to σ_t by the forward process, x_t = x_s + √(σ_t² − σ_s²)·z, so that the repainted
    region is denoised again with the known region's information (Lugmayr et al. 2022, Alg. 1 with
    U = resample, j = 1). The last step, to σ = 0, is taken once. Every step calls ``fn`` on
    [σ_t, σ_s] alone, so a multistep sampler (dpmpp_2m) acts as its first-order self here, and
    s_churn's γ is computed for one step. A first-order sampler makes (steps − 1)·resample + 1
    denoiser calls when the last σ is 0. ``resample`` 1 is ``fn`` over all of ``sigmas``.
    """
    if resample < 1:
        raise SamplerError(f"resample: must be >= 1, got {resample}")
    if resample == 1:
        return fn(denoise, x, sigmas, generator=generator, progress=progress, **options)
    values = sigmas.detach().to("cpu", torch.float64).reshape(-1).tolist()
    pairs = list(itertools.pairwise(values))
    for i, (sigma, sigma_next) in enumerate(tqdm(pairs, disable=not progress, desc="sampling (resampled)", leave=False)):
        segment = sigmas[i : i + 2]
        repeats = resample if sigma_next > 0 else 1
        for r in range(repeats):
            x = fn(denoise, x, segment, generator=generator, progress=False, **options)  # x_s
            if r < repeats - 1:
                x = x + math.sqrt(sigma**2 - sigma_next**2) * _noise(x, generator)  # the jump back to σ_t
    return x
