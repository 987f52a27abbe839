"""Samplers as pure functions over a denoiser, and guidance as denoiser wrappers (k-diffusion's way).

A denoiser is ``denoise(x, sigma) -> x̂0`` in VE coordinates (x = x0 + σ·ε; x: (B, ...), sigma: (B,)).
``model_denoiser`` turns a VP network into one; ``cfg_denoiser``/``cfg_net`` and ``thresholded``
wrap it; ``sample_NAME(denoise, x, sigmas, ...)`` integrates from sigmas[0] to sigmas[-1]; ``sample``
does it all from a schedule and a sampler name, also from an image (img2img strength, RePaint
inpainting: :mod:`imager.samplers.editing`). Schedules and samplers know nothing of the network.
"""

from imager.samplers.denoiser import model_denoiser
from imager.samplers.editing import repaint_denoiser, sample_resampled, strength_sigmas, strength_steps
from imager.samplers.guidance import cfg_denoiser, cfg_net, dynamic_threshold, static_threshold, thresholded
from imager.samplers.registry import SAMPLERS, SamplerSpec, get_sampler, sample
from imager.samplers.solvers import (
    Denoiser,
    ancestral_step,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "SamplerSpec",
    "ancestral_step",
    "cfg_denoiser",
    "cfg_net",
    "dynamic_threshold",
    "get_sampler",
    "model_denoiser",
    "repaint_denoiser",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_resampled",
    "static_threshold",
    "strength_sigmas",
    "strength_steps",
    "thresholded",
]
