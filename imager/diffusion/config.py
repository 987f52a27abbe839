"""Typed settings of the diffusion process: the noise schedule and the training objective.

Plain pydantic (no torch) so that params.yaml sections can embed them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from imager.schema import Section

ScheduleName = Literal["linear", "scaled_linear", "cosine", "sigmoid", "custom_betas", "log_snr"]
Prediction = Literal["eps", "x0", "v"]
Spacing = Literal["linspace", "leading", "trailing", "karras", "exponential"]


class ScheduleConfig(Section):
    """A discrete noise schedule of ``timesteps`` steps.

    linear          betas evenly spaced in [beta_start, beta_end]            (Ho et al. 2020)
    scaled_linear   sqrt(betas) evenly spaced (Stable Diffusion's schedule)
    cosine          alphas_cumprod = cos²(((t + s) / (1 + s)) π/2), betas ≤ 0.999 (Nichol & Dhariwal 2021)
    sigmoid         alphas_cumprod from a sigmoid over [start, end] with temperature tau (Chen 2023)
    custom_betas    your own ``betas`` list (its length sets the number of timesteps)
    log_snr         log-SNR from ``log_snr_max`` (t → 0) to ``log_snr_min`` (t = 1), linear or cosine shape
    """

    name: ScheduleName = "cosine"
    timesteps: int = Field(1000, ge=2, le=100_000)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    cosine_s: float = Field(0.008, ge=0)
    sigmoid_start: float = -3.0
    sigmoid_end: float = 3.0
    sigmoid_tau: float = Field(1.0, gt=0)
    betas: tuple[float, ...] | None = None
    log_snr_max: float = 10.0
    log_snr_min: float = -10.0
    log_snr_shape: Literal["linear", "cosine"] = "cosine"
    zero_terminal_snr: bool = False  # rescale so the last step is pure noise (Lin et al. 2024)

    @model_validator(mode="after")
    def _consistent(self) -> ScheduleConfig:
        if self.name in ("linear", "scaled_linear") and self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start: must be < beta_end ({self.beta_end}), got {self.beta_start}")
        if self.name == "custom_betas":
            if not self.betas or len(self.betas) < 2:
                raise ValueError("betas: a list of at least 2 values is required when name is 'custom_betas'")
            if not all(0 < b < 1 for b in self.betas):
                raise ValueError("betas: every value must be in (0, 1)")
        if self.name == "sigmoid" and self.sigmoid_start >= self.sigmoid_end:
            raise ValueError(f"sigmoid_start: must be < sigmoid_end ({self.sigmoid_end}), got {self.sigmoid_start}")
        if self.name == "log_snr" and self.log_snr_min >= self.log_snr_max:
            raise ValueError(f"log_snr_min: must be < log_snr_max ({self.log_snr_max}), got {self.log_snr_min}")
        return self

    @property
    def num_steps(self) -> int:
        return len(self.betas) if self.name == "custom_betas" and self.betas else self.timesteps


class LossConfig(Section):
    """What the network predicts and how timesteps are weighted in the loss.

    prediction   eps (the noise), x0 (the clean image) or v = α·ε − σ·x0 (Salimans & Ho 2022)
    weighting    uniform, or min_snr: the loss in x0 space weighted by min(SNR, γ) (Hang et al. 2023)
    """

    prediction: Prediction = "v"
    weighting: Literal["uniform", "min_snr"] = "min_snr"
    min_snr_gamma: float = Field(5.0, gt=0)
