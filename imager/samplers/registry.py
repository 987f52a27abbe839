"""The sampler registry (names are imager.schema.SamplerName) and ``sample``, the one-call entry point."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from imager.diffusion.config import Spacing
from imager.diffusion.schedule import NoiseSchedule
from imager.errors import SamplerError
from imager.samplers.editing import check_strength, repaint_denoiser, sample_resampled, strength_sigmas
from imager.samplers.solvers import (
    Denoiser,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function with the σ spacing it is meant for.

    fn               ``fn(denoise, x, sigmas, *, generator=None, progress=False, **options)``
    default_spacing  the spacing ``sample`` uses when none is given
    stochastic       whether it draws fresh noise by default (needs a generator to be reproducible)
    source           the paper it follows
    """

    name: str
    fn: Callable[..., Tensor]
    default_spacing: Spacing
    stochastic: bool
    source: str

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options ``fn`` takes besides generator and progress (e.g. eta, s_churn)."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("generator", "progress"))


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", sample_ddpm, "trailing", True, "Ho et al. 2020, Alg. 2 (= DDIM with eta = 1)"),
        SamplerSpec("ddim", sample_ddim, "trailing", False, "Song et al. 2021, Eq. 12 (eta = 0 by default)"),
        SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "trailing", False, "Lu et al. 2022, DPM-Solver++ Alg. 2"),
        SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "trailing", True, "Lu et al. 2022, SDE-DPM-Solver++(2M), eta = 1"),
        # Trailing, not Karras, spacing for the Euler samplers: with the cosine schedule (σ_max ≈ 2e4)
        # Karras σs gave 2x the evaluator FID at 5-10 steps on the default model (README, Samplers).
        SamplerSpec("euler", sample_euler, "trailing", False, "Karras et al. 2022, Alg. 2, first order"),
        SamplerSpec("euler_ancestral", sample_euler_ancestral, "trailing", True, "k-diffusion, eta = 1 by default"),
        SamplerSpec("heun", sample_heun, "karras", False, "Karras et al. 2022, Alg. 1/2"),
    )
}


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``; SamplerError listing the valid names otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SamplerError(f"unknown sampler '{name}'; valid: {', '.join(sorted(SAMPLERS))}") from None


@torch.no_grad()
def sample(
    denoise: Denoiser,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    sampler: str,
    steps: int,
    spacing: Spacing | None = None,
    generator: torch.Generator | None = None,
    eta: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    progress: bool = False,
    init: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    resample: int = 1,
    **options: float,
) -> Tensor:
    """Draw samples x0 of ``shape`` = (B, ...) with a registered sampler.

        σ_0 > … > σ_steps = 0 come from ``schedule.sampling_sigmas(steps, spacing)`` (the sampler's
        default spacing when None). The start is the VP prior x_vp ~ N(0, I) at σ_0 in VE coordinates,
        x = x_vp/α(σ_0) = z·√(1 + σ_0²) (σ_0 = schedule.sigma_max for every spacing but "leading").
        ``eta`` and ``options`` (s_churn, s_noise, ...) go to the sampler; one it does not take is a
        SamplerError. Noise comes only from ``generator``, drawn on the generator's device and moved to
    ``device`` (default: the generator's), so a CPU generator gives every device the same noise.
    Returns (B, ...) samples on ``device``.

        Image conditioning (:mod:`imager.samplers.editing`), with ``init`` (B, ...) a clean image x0:
        ``strength`` < 1 (img2img, SDEdit) runs only the last ``int(steps · strength)`` steps, from
        x = init + σ_start·z with the same z the prior start would use (strength 1 is the plain prior
        start, so it gives exactly the text-to-image sample of the seed); ``mask`` (1 = repaint,
        broadcastable to x) keeps the rest of ``init`` by RePaint's replacement, and ``resample`` > 1
        adds RePaint's resampling. The known pixels are not overlaid here (the caller does it).
    """
    spec = get_sampler(sampler)
    if eta is not None:
        options = {"eta": eta, **options}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) or "none"
        raise SamplerError(f"sampler '{spec.name}' takes no option '{unknown[0]}'; it takes: {takes}")
    strength = check_strength(strength)
    if init is None and (strength < 1 or mask is not None):
        raise SamplerError("strength < 1 and a mask need an init image")
    sigmas = schedule.sampling_sigmas(steps, spacing or spec.default_spacing)  # (steps + 1,) float64
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gen_device)  # (B, ...)
    z = z.to(device or gen_device)
    if strength < 1:
        sigmas = strength_sigmas(sigmas, strength)
        x = init.to(z) + float(sigmas[0]) * z  # SDEdit: the image noised to the start level, x0 + σ·z
    else:
        x = z * math.sqrt(1 + float(sigmas[0]) ** 2)  # VP prior N(0, I) at σ_0, as VE
    if mask is not None:
        denoise = repaint_denoiser(denoise, init.to(z), mask.to(z), generator)
    return sample_resampled(spec.fn, denoise, x, sigmas, resample=resample, generator=generator, progress=progress, **options)
