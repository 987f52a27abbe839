"""Typed sampling settings: how one model of the cascade is sampled, and the cascade as a whole.

No torch here, so that params sections (``evaluate``, the training grids) embed these models. The
defaults below are the only sampling defaults in the code; params.yaml sets the pipeline's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from imager.diffusion.config import Spacing
from imager.schema import SamplerName, Section

ThresholdMode = Literal["none", "static", "dynamic"]
DeviceName = Literal["auto", "cpu", "cuda"]


class StageSampling(Section):
    """How one model of the cascade is sampled.

    sampler     a registered sampler; None: the cascade's (``CascadeSampling.sampler``)
    steps       denoiser steps (network evaluations for first-order samplers)
    spacing     where the steps fall (linspace | leading | trailing | karras | exponential);
                None: the sampler's default
    guidance    classifier-free guidance scale (1: none; the unconditional branch is the model's null
                condition, or a negative prompt when one is given)
    threshold   what is done to x̂0 at each step: none, static (clamp to [-1, 1]) or dynamic (Imagen)
    percentile  dynamic thresholding's quantile of |x̂0|
    eta         the stochastic samplers' noise scale (ddim, euler_ancestral, dpmpp_2m_sde); None: theirs
    options     other options the sampler takes (s_churn, s_noise, ...); an unknown one is an error
    """

    sampler: SamplerName | None = None
    steps: int = Field(20, ge=1, le=1000)
    spacing: Spacing | None = None
    guidance: float = Field(3.0, ge=0)
    threshold: ThresholdMode = "none"
    percentile: float = Field(0.995, gt=0, le=1)
    eta: float | None = Field(None, ge=0)
    options: dict[str, float] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _no_eta_in_options(cls, v: dict[str, float]) -> dict[str, float]:
        if "eta" in v:
            raise ValueError("eta: set it as the `eta` key, not under options")
        return v


class SRSampling(StageSampling):
    """The super-resolution stage: few steps and no guidance by default, and the noise level of the
    base image it is given (Imagen's noise conditioning augmentation)."""

    steps: int = Field(10, ge=1, le=1000)
    guidance: float = Field(1.0, ge=0)
    aug_level: float | None = Field(None, ge=0, le=1)  # None: the level the model was trained to sample with


class CascadeSampling(Section):
    """Base then super-resolution: the stages' settings, the sampler they share unless they name
    their own, the seed, and how many images are sampled at once.

    Batches of ``batch_size`` draw their noise from generators seeded ``seed + index of the batch's
    first image``, so a seed and batch size give the same images on every run of one device.

    With an input image (the settings of a call, not of text to image, so no params section has them):
    strength     how much of the image the base stage redraws (img2img, SDEdit): the last
                 int(steps · strength) of its steps, from the image noised to that level; 1: from noise
    sr_strength  the same for the SR stage (< 1: it refines the given image instead of drawing anew)
    resample     with a mask: RePaint's resampling in the base stage, each step taken this many times
    sr_resample  the same in the SR stage
    """

    sampler: SamplerName = "dpmpp_2m_sde"
    base: StageSampling = StageSampling()
    sr: SRSampling = SRSampling()
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    strength: float = Field(1.0, gt=0, le=1)
    sr_strength: float = Field(1.0, gt=0, le=1)
    resample: int = Field(1, ge=1, le=50)
    sr_resample: int = Field(1, ge=1, le=50)

    def stage(self, name: Literal["base", "sr"]) -> StageSampling:
        """The stage's settings with its sampler resolved (its own, else the cascade's)."""
        cfg = self.base if name == "base" else self.sr
        return cfg if cfg.sampler is not None else cfg.model_copy(update={"sampler": self.sampler})


# Flat option names (``imager generate`` options, the MLflow model's per-call params) -> the keys of
# CascadeSampling they set. threshold and percentile act on both stages: they shape the image.
OVERRIDES: dict[str, tuple[tuple[str, ...], ...]] = {
    "sampler": (("sampler",),),
    "seed": (("seed",),),
    "batch_size": (("batch_size",),),
    "steps": (("base", "steps"),),
    "guidance": (("base", "guidance"),),
    "spacing": (("base", "spacing"),),
    "eta": (("base", "eta"),),
    "threshold": (("base", "threshold"), ("sr", "threshold")),
    "percentile": (("base", "percentile"), ("sr", "percentile")),
    "sr_sampler": (("sr", "sampler"),),
    "sr_steps": (("sr", "steps"),),
    "sr_guidance": (("sr", "guidance"),),
    "sr_aug_level": (("sr", "aug_level"),),
    "strength": (("strength",),),
    "sr_strength": (("sr_strength",),),
    "resample": (("resample",),),
    "sr_resample": (("sr_resample",),),
}


def with_overrides(cfg: CascadeSampling, values: dict[str, object], *, cli: bool = False) -> CascadeSampling:
    """``cfg`` with the flat options of :data:`OVERRIDES` in ``values`` that are not None, validated.
    A ConfigError names the option (``--sr-steps: ...`` with ``cli``, else ``params: sr_steps: ...``)
    for an unknown name or a bad value."""
    from pydantic import ValidationError

    from imager.errors import ConfigError

    def label(name: str) -> str:
        return f"--{name.replace('_', '-')}" if cli else f"params: {name}"

    data = cfg.model_dump()
    for name, value in values.items():
        if name not in OVERRIDES:
            raise ConfigError(f"{label(name)}: unknown option; valid: {', '.join(OVERRIDES)}")
        if value is None:
            continue
        for path in OVERRIDES[name]:
            node = data
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
    try:
        return CascadeSampling.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        path = tuple(str(p) for p in err["loc"])
        name = next((n for n, paths in OVERRIDES.items() if any(path[: len(q)] == q for q in paths)), ".".join(path))
        msg = err["msg"]
        raise ConfigError(f"{label(name)}: {msg[0].lower()}{msg[1:]}, got {err.get('input')!r}") from None
