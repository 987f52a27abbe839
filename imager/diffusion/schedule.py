"""Noise schedules: one object with a discrete and a continuous view.

Glossary (VP process, x_t = α_t·x0 + σ_t·ε):
    betas            β_t, per-step noise variance
    alphas_cumprod   ᾱ_t = Π_{s≤t} (1 − β_s) = α_t²
    alpha, sigma     α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)          (VP signal and noise scales)
    log_snr          λ_t = log(α_t² / σ_t²)
    ve_sigma         σ_t / α_t = exp(−λ_t / 2): the noise level of the equivalent VE process
                     x_t / α_t = x0 + (σ_t/α_t)·ε that Karras-style samplers integrate over

The discrete view indexes steps i = 0 … T−1. The continuous view uses t ∈ [1/T, 1] with step i at
t = (i + 1)/T and log σ_VE linear between steps (as k-diffusion's DiscreteSchedule); both views
agree exactly at the steps, and ``t_of_ve_sigma`` inverts ``ve_sigma`` anywhere in range. Everything
is precomputed in float64.
"""

from __future__ import annotations

import math

import torch

from imager.diffusion.config import ScheduleConfig, Spacing

F64 = torch.float64
ZERO_SNR_FLOOR = 2.0**-24  # ᾱ of a zero-terminal-SNR last step, for samplers (as diffusers does)


def _betas_from_alphas_cumprod(ac: torch.Tensor, max_beta: float = 1.0) -> torch.Tensor:
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).clamp(max=max_beta)


def _alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    n = cfg.num_steps
    if cfg.name == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=F64)
    elif cfg.name == "scaled_linear":
        betas = torch.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), n, dtype=F64) ** 2
    elif cfg.name == "custom_betas":
        betas = torch.tensor(cfg.betas, dtype=F64)
    elif cfg.name == "cosine":  # Nichol & Dhariwal 2021, Eq. 17; betas clipped at 0.999
        t = torch.arange(n + 1, dtype=F64) / n
        f = torch.cos((t + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
        betas = _betas_from_alphas_cumprod(f[1:] / f[0], max_beta=0.999)
    elif cfg.name == "sigmoid":  # Chen 2023, "On the importance of noise scheduling", Alg. 1
        t = torch.arange(1, n + 1, dtype=F64) / n
        lo, hi, tau = cfg.sigmoid_start, cfg.sigmoid_end, cfg.sigmoid_tau
        v_lo, v_hi = torch.sigmoid(torch.tensor(lo / tau, dtype=F64)), torch.sigmoid(torch.tensor(hi / tau, dtype=F64))
        ac = (v_hi - torch.sigmoid((t * (hi - lo) + lo) / tau)) / (v_hi - v_lo)
        betas = _betas_from_alphas_cumprod(ac.clamp(min=1e-12), max_beta=0.999)
    else:  # log_snr: λ(t) from log_snr_max (t → 0) to log_snr_min (t = 1)
        t = torch.arange(1, n + 1, dtype=F64) / n
        lmax, lmin = cfg.log_snr_max, cfg.log_snr_min
        if cfg.log_snr_shape == "linear":
            lam = lmax + t * (lmin - lmax)
        else:  # cosine in log-SNR: λ = −2 log tan(a·t + b), endpoints matched (Kingma et al. 2021)
            b = math.atan(math.exp(-lmax / 2))
            a = math.atan(math.exp(-lmin / 2)) - b
            lam = -2 * torch.log(torch.tan(a * t + b))
        return torch.sigmoid(lam)  # ᾱ = SNR / (1 + SNR) = sigmoid(λ)
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the first step keeps its value and the last becomes 0
    (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Alg. 1)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * first / (first - last)) ** 2


class NoiseSchedule:
    """A discrete schedule of T steps with its continuous view (see the module docstring)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.to(F64)
        if ac.ndim != 1 or len(ac) < 2 or not bool(((ac >= 0) & (ac < 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError("alphas_cumprod must be a non-increasing 1-D sequence in [0, 1)")
        self.alphas_cumprod = ac  # (T,) ᾱ, exact (0 at the end of a zero-terminal-SNR schedule)
        self.betas = _betas_from_alphas_cumprod(ac)  # (T,) β
        sampling = torch.where(ac > 0, ac, torch.full_like(ac, ZERO_SNR_FLOOR))  # only an exact 0 is floored
        self._log_ve_sigma = 0.5 * (torch.log1p(-sampling) - torch.log(sampling))  # (T,) log(σ/α), increasing

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> NoiseSchedule:
        ac = _alphas_cumprod(cfg)
        if cfg.zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
        return cls(ac)

    @property
    def num_steps(self) -> int:
        return len(self.alphas_cumprod)

    # ----------------------------------------------------------------------------- discrete view

    @property
    def alpha(self) -> torch.Tensor:
        """(T,) α_i = √ᾱ_i, the VP signal scale."""
        return self.alphas_cumprod.sqrt()

    @property
    def sigma(self) -> torch.Tensor:
        """(T,) σ_i = √(1 − ᾱ_i), the VP noise scale."""
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        """(T,) λ_i = log(ᾱ_i / (1 − ᾱ_i)); −inf at a zero-terminal-SNR last step."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    @property
    def ve_sigmas(self) -> torch.Tensor:
        """(T,) σ_i/α_i, increasing with i (the last step floored at ᾱ = 2⁻²⁴ for zero terminal SNR)."""
        return self._log_ve_sigma.exp()

    def t_of_index(self, index: torch.Tensor) -> torch.Tensor:
        """Continuous time of discrete steps: t = (i + 1)/T."""
        return (index.to(F64) + 1) / self.num_steps

    # --------------------------------------------------------------------------- continuous view

    def _index_of_t(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to(F64) * self.num_steps - 1).clamp(0, self.num_steps - 1)

    def ve_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ_VE(t) for t ∈ [1/T, 1] (clamped), log-linear between steps."""
        pos = self._index_of_t(t)
        lo = pos.floor().long().clamp(max=self.num_steps - 2)
        w = pos - lo
        return ((1 - w) * self._log_ve_sigma[lo] + w * self._log_ve_sigma[lo + 1]).exp()

    def log_snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) = −2 log σ_VE(t)."""
        return -2 * self.ve_sigma(t).log()

    def alpha_sigma_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) of the VP process: α = 1/√(1 + σ_VE²), σ = σ_VE·α."""
        s = self.ve_sigma(t)
        alpha = (1 + s**2).rsqrt()
        return alpha, s * alpha

    def t_of_ve_sigma(self, ve_sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of ``ve_sigma``: t such that σ_VE(t) = ve_sigma (clamped to the range)."""
        log_s = ve_sigma.to(F64).log().clamp(self._log_ve_sigma[0], self._log_ve_sigma[-1])
        hi = torch.searchsorted(self._log_ve_sigma, log_s.contiguous()).clamp(1, self.num_steps - 1)
        lo = hi - 1
        span = self._log_ve_sigma[hi] - self._log_ve_sigma[lo]
        w = torch.where(span > 0, (log_s - self._log_ve_sigma[lo]) / span.clamp(min=1e-300), torch.zeros_like(log_s))
        return (lo + w + 1) / self.num_steps

    # ------------------------------------------------------------------------- sampling sigmas

    @property
    def sigma_min(self) -> float:
        return float(self.ve_sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.ve_sigmas[-1])

    def sampling_sigmas(self, steps: int, spacing: Spacing, rho: float = 7.0) -> torch.Tensor:
        """(steps + 1,) decreasing σ_VE for a sampler, ending with 0.

        linspace / leading / trailing pick discrete steps (Lin et al. 2024, Table 2); karras spaces
        σ^(1/ρ) evenly (Karras et al. 2022, Eq. 5); exponential spaces log σ evenly.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        n = self.num_steps
        if spacing in ("linspace", "leading", "trailing"):
            if steps > n:
                raise ValueError(f"{spacing} spacing picks discrete steps: steps must be <= {n} timesteps, got {steps}")
            if spacing == "linspace":
                idx = torch.linspace(n - 1, 0, steps, dtype=F64).round()
            elif spacing == "leading":
                idx = (torch.arange(steps, dtype=F64) * (n // steps)).flip(0)
            else:
                idx = (torch.arange(n, 0, -n / steps, dtype=F64).round() - 1)[:steps]
            sigmas = self.ve_sigmas[idx.long()]
        elif spacing == "karras":
            ramp = torch.linspace(0, 1, steps, dtype=F64)
            lo, hi = self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
        elif spacing == "exponential":
            sigmas = torch.linspace(math.log(self.sigma_max), math.log(self.sigma_min), steps, dtype=F64).exp()
        else:
            raise ValueError(f"unknown spacing '{spacing}'")
        return torch.cat([sigmas, sigmas.new_zeros(1)])
