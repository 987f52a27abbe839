"""Samplers, the network-to-denoiser wrapper and guidance, against references that know the answer.

References used below (float64 throughout):
- a point mass at x0: the oracle D(x, σ) = x0 makes the PF-ODE dx/dσ = (x − x0)/σ (Karras et al.
  2022, Eq. 1 and 3) linear in σ, so x(σ) = x0 + σ·(x_T − x0)/σ_T exactly;
- Gaussian data x0 ~ N(μ, diag s²): E[x0 | x] = μ + s²/(s² + σ²)·(x − μ) (Gaussian conditioning), and
  the PF-ODE then has dx/dσ = (x − μ)·σ/(s² + σ²), so x(0) = μ + (x_T − μ)·s/√(s² + σ_T²); every
  sampler is then affine in its start and its noise, so its output moments are exact (exact_moments);
- DDIM's update in VP form, Song et al. 2021, Eq. 12 with σ_t(η) of Eq. 16;
- DDPM's posterior q(x_{t−1} | x_t, x0), Ho et al. 2020, Eq. 6–7;
- classifier-free guidance in ε-space, Ho & Salimans 2022, Eq. 6;
- dynamic thresholding, Saharia et al. 2022 §2.3, with torch.quantile as the percentile.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from imager import config
from imager.diffusion import NoiseSchedule, ScheduleConfig
from imager.errors import SamplerError
from imager.samplers import (
    SAMPLERS,
    cfg_denoiser,
    cfg_net,
    dynamic_threshold,
    get_sampler,
    model_denoiser,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    solvers,
    static_threshold,
    thresholded,
)

F64 = torch.float64
LINEAR = NoiseSchedule.from_config(ScheduleConfig(name="linear"))  # σ_VE ∈ [0.0100, 157.4]
COSINE = NoiseSchedule.from_config(ScheduleConfig(name="cosine"))
DETERMINISTIC = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}
ALL = {**DETERMINISTIC, "ddpm": sample_ddpm, "euler_ancestral": sample_euler_ancestral, "dpmpp_2m_sde": sample_dpmpp_2m_sde}

D = 16  # Gaussian data dimension
MU = torch.linspace(-0.8, 0.8, D, dtype=F64)  # (D,) per-dimension mean μ
S = torch.linspace(0.3, 1.0, D, dtype=F64)  # (D,) per-dimension standard deviation s


pytestmark = pytest.mark.usefixtures("one_thread")  # (N, 16) float64 tensors: threads cost more than they save


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_denoiser(x, sigma):
    """E[x0 | x] for x0 ~ N(μ, s²), x = x0 + σ·ε: the optimal denoiser, in closed form."""
    var = sigma.reshape(-1, 1) ** 2  # (B, 1)
    return MU + S**2 / (S**2 + var) * (x - MU)  # (B, D)


def pf_ode_solution(x_t, sigma_t: float):
    """The exact PF-ODE solution at σ = 0 from x_t at σ_t, for the Gaussian data above."""
    return MU + (x_t - MU) * S / (S**2 + sigma_t**2).sqrt()


def nonlinear_denoiser(x, sigma):
    """An arbitrary smooth denoiser that is not linear in x, to exercise algebraic identities."""
    sg = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + sg)) + 0.1 * torch.sin(3 * x) * sg / (1 + sg**2)


# ---------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("name", sorted(ALL))
def test_oracle_denoiser_lands_on_x0_from_any_start(name):
    # Reference: the last step of every sampler returns D(x, σ_N−1) = x0 for the oracle D ≡ x0.
    x0 = torch.randn(4, 3, 8, 8, generator=gen(0), dtype=F64)
    x = 50 * torch.randn(4, 3, 8, 8, generator=gen(1), dtype=F64)  # unrelated to x0
    out = ALL[name](lambda x_, s_: x0, x, LINEAR.sampling_sigmas(7, "karras"), generator=gen(2))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
@pytest.mark.parametrize("spacing", ["karras", "trailing", "linspace"])
def test_deterministic_samplers_are_exact_for_a_point_mass(name, spacing):
    # Reference: x(σ) = x0 + σ·(x_T − x0)/σ_T, the PF-ODE solution for D ≡ x0 (module docstring).
    # DDIM/Euler, Heun and DPM-Solver++ all integrate this linear ODE exactly; stop before σ = 0.
    x0 = torch.randn(3, 10, generator=gen(3), dtype=F64)
    x_t = torch.randn(3, 10, generator=gen(4), dtype=F64) * 20
    sigmas = LINEAR.sampling_sigmas(6, spacing)[:-1]  # (6,), ends at σ_min > 0
    out = DETERMINISTIC[name](lambda x_, s_: x0, x_t, sigmas)
    expected = x0 + float(sigmas[-1]) * (x_t - x0) / float(sigmas[0])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- Gaussian data: the PF-ODE


def ode_error(name: str, steps: int, schedule=LINEAR, spacing="karras") -> float:
    """RMS over samples and dimensions of (x − x_exact)/s at σ = 0, from the same x_T."""
    sigmas = schedule.sampling_sigmas(steps, spacing)
    sigma_t = float(sigmas[0])
    x_t = MU + (S**2 + sigma_t**2).sqrt() * torch.randn(256, D, generator=gen(5), dtype=F64)  # (256, D)
    out = DETERMINISTIC[name](gaussian_denoiser, x_t, sigmas)
    return float((((out - pf_ode_solution(x_t, sigma_t)) / S) ** 2).mean().sqrt())


ORDER = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_samplers_converge_at_their_order(name):
    # Reference: the exact PF-ODE solution x(0) for Gaussian data (module docstring).
    errors = [ode_error(name, steps) for steps in (10, 20, 50, 100)]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < (0.04 if ORDER[name] == 1 else 0.003), errors
    # empirical order between 50 and 100 steps: log2(e50/e100) ≈ 1 (Euler, DDIM) or ≈ 2 (Heun, DPM++)
    order = math.log2(errors[2] / errors[3])
    if ORDER[name] == 1:
        assert 0.8 < order < 1.2, (errors, order)
    else:
        assert order > 1.7, (errors, order)


GRID = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400)


def steps_to_error(name: str, tol: float, spacing: str = "karras") -> float:
    """The fewest steps on GRID from which the error stays <= tol (inf if never)."""
    errors = [ode_error(name, steps, spacing=spacing) for steps in GRID]
    for i, steps in enumerate(GRID):
        if all(e <= tol for e in errors[i:]):
            return steps
    return math.inf


@pytest.mark.parametrize("tol", [5e-2, 1e-2])
def test_higher_order_solvers_need_fewer_steps(tol):
    # Reference: the exact PF-ODE solution; all four share the linear schedule's karras σs.
    needed = {name: steps_to_error(name, tol) for name in DETERMINISTIC}
    assert needed["ddim"] == needed["euler"], needed  # DDIM(η = 0) is Euler in σ (Karras et al. 2022, §3)
    assert max(needed["heun"], needed["dpmpp_2m"]) < min(needed["ddim"], needed["euler"]), needed
    assert max(needed["heun"], needed["dpmpp_2m"]) * 2 <= needed["ddim"], needed  # by a wide margin


def test_ddim_eta0_is_euler_in_sigma():
    # Reference: x̂0 + σ_s·(x − x̂0)/σ_t = x + (σ_s − σ_t)·(x − x̂0)/σ_t (Karras et al. 2022, §3).
    x = torch.randn(5, 7, generator=gen(6), dtype=F64) * 30
    sigmas = COSINE.sampling_sigmas(9, "trailing")
    a, b = (sample_ddim(nonlinear_denoiser, x, sigmas), sample_euler(nonlinear_denoiser, x, sigmas))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------- Gaussian data: sample moments


def exact_moments(name: str, sigmas, x_mean, x_var, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (D,) of a sampler's output for the Gaussian data, from x ~ N(x_mean, x_var) at
    sigmas[0], computed exactly rather than by Monte Carlo.

    With the linear denoiser every sampler is affine in its start and in its noise draws, per
    dimension: out = m + a·(x − x_mean) + Σ_k c_k·z_k, so mean = m and variance = a²·x_var + Σ_k c_k².
    Row 0 runs from x_mean with every draw z_k = 0, row 1 from x_mean + 1, and row 2 + k from x_mean
    with z_k = 1 alone (the draws replaced through solvers._noise, one call per draw).
    """
    steps = len(sigmas) - 1
    x = x_mean.expand(2 + steps, D).clone()  # (2 + steps, D): at most one draw per step
    x[1] += 1
    draws = []

    def one_hot_noise(x_, generator):
        z = torch.zeros_like(x_)
        z[2 + len(draws)] = 1
        draws.append(z)
        return z

    with monkeypatch.context() as patch:
        patch.setattr(solvers, "_noise", one_hot_noise)
        out = ALL[name](gaussian_denoiser, x, sigmas)
    m, a, c = out[0], out[1] - out[0], out[2 : 2 + len(draws)] - out[0]  # (D,), (D,), (K, D)
    return m, a**2 * x_var + (c**2).sum(0)


# Order of the variance error measured below: DDPM and Euler ancestral are first-order (weak) schemes,
# and SDE-DPM-Solver++(2M) measures second order on this problem, as its ODE counterpart.
MOMENT_ORDER = {**ORDER, "ddpm": 1, "euler_ancestral": 1, "dpmpp_2m_sde": 2}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_output_variance_converges_at_the_samplers_order(name, monkeypatch):
    # Reference: from the exact marginal x ~ N(μ, s² + σ_0²) at σ_0, the exact reverse process (ODE or
    # SDE) is at N(μ, s² + σ²) at every σ; the last step of every sampler returns x̂0 = E[x0 | x] at
    # σ_{N−1}, whose variance is k²·(s² + σ_{N−1}²) = s⁴/(s² + σ_{N−1}²), k = s²/(s² + σ_{N−1}²). The
    # error is the rest: the discretisation of the transport from σ_0 to σ_{N−1} (karras σs, fixed ends).
    errors = []
    for steps in (50, 100, 200):
        sigmas = LINEAR.sampling_sigmas(steps, "karras")
        s0, s_last = float(sigmas[0]), float(sigmas[-2])
        mean, var = exact_moments(name, sigmas, MU, S**2 + s0**2, monkeypatch)
        torch.testing.assert_close(mean, MU, rtol=0, atol=1e-12)  # μ is a fixed point of every step
        errors.append(float((var / (S**4 / (S**2 + s_last**2)) - 1).abs().max()))
    # error(2N) <= error(N) / 2^order with 25 % slack (measured orders 0.88-1.0 and 2.03-2.1), and the
    # size at 100 steps: measured 0.063-0.127 (first order) and 0.0039-0.0103 (second order), 2x room.
    order = MOMENT_ORDER[name]
    for coarse, fine in itertools.pairwise(errors):
        assert fine <= 1.25 * coarse / 2**order, (errors, order)
    assert errors[1] <= (0.25 if order == 1 else 0.02), errors


N_SAMPLES = 20_000


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_draws_the_moments_it_should(name, monkeypatch):
    # Reference: the exact output moments of the same sampler from the same start (exact_moments;
    # their distance to the data's is test_output_variance_converges_...). ``sample`` starts from the VP
    # prior, x = z·√(1 + σ_0²), and draws real noise; its Monte Carlo moments must agree to 5 standard
    # errors: 5/√N of the output sd for the mean, 5·√(2/(N − 1)) relative for the variance.
    for steps in (25, 100):
        x = sample(gaussian_denoiser, (N_SAMPLES, D), LINEAR, sampler=name, steps=steps, generator=gen(7), dtype=F64)
        sigmas = LINEAR.sampling_sigmas(steps, get_sampler(name).default_spacing)
        zeros = torch.zeros(D, dtype=F64)
        mean, var = exact_moments(name, sigmas, zeros, zeros + 1 + float(sigmas[0]) ** 2, monkeypatch)
        mean_err = ((x.mean(0) - mean) / var.sqrt()).abs()  # (D,)
        var_err = (x.var(0) / var - 1).abs()  # (D,)
        assert bool((mean_err <= 5 / math.sqrt(N_SAMPLES)).all()), (steps, mean_err)
        assert bool((var_err <= 5 * math.sqrt(2 / (N_SAMPLES - 1))).all()), (steps, var_err)


# ------------------------------------------------------------------------ identities between samplers


def test_dpmpp_2m_first_step_is_ddim_and_second_is_not():
    # Reference: DPM-Solver++ Alg. 2 starts with DPM-Solver++(1), which is DDIM (Lu et al. 2022, §4).
    x = torch.randn(2, 3, 4, 4, generator=gen(8), dtype=F64) * 10
    sigmas = LINEAR.sampling_sigmas(10, "karras")
    one = sample_dpmpp_2m(nonlinear_denoiser, x, sigmas[:2])
    torch.testing.assert_close(one, sample_ddim(nonlinear_denoiser, x, sigmas[:2]), rtol=1e-12, atol=1e-12)
    # the second step is Alg. 2's multistep update, with D_2 = (1 + 1/(2r))·x̂0_1 − 1/(2r)·x̂0_0, r = h_1/h_2
    s0, s1, s2 = (float(v) for v in sigmas[:3])
    x0_0 = nonlinear_denoiser(x, sigmas[0].expand(2))
    x0_1 = nonlinear_denoiser(one, sigmas[1].expand(2))
    r = math.log(s0 / s1) / math.log(s1 / s2)
    expected = s2 / s1 * one - math.expm1(-math.log(s1 / s2)) * ((1 + 1 / (2 * r)) * x0_1 - x0_0 / (2 * r))
    two = sample_dpmpp_2m(nonlinear_denoiser, x, sigmas[:3])
    torch.testing.assert_close(two, expected, rtol=1e-12, atol=1e-12)
    assert float((two - sample_ddim(nonlinear_denoiser, x, sigmas[:3])).abs().max()) > 1e-5  # not DDIM


def test_dpmpp_2m_sde_with_eta_0_is_dpmpp_2m():
    # Reference: with η = 0 the SDE solver's update is DPM-Solver++(2M)'s (e^{−(1+η)h} = e^{−h}, no noise):
    # (1 − e^{−h})·(x̂0 + (x̂0 − x̂0_prev)/(2r)) = −(e^{−h} − 1)·((1 + 1/(2r))·x̂0 − x̂0_prev/(2r)).
    x = torch.randn(3, 2, 4, 4, generator=gen(40), dtype=F64) * 20
    sigmas = COSINE.sampling_sigmas(12, "trailing")
    ode = sample_dpmpp_2m(nonlinear_denoiser, x, sigmas)
    sde = sample_dpmpp_2m_sde(nonlinear_denoiser, x, sigmas, eta=0.0, generator=gen(41))
    torch.testing.assert_close(sde, ode, rtol=1e-12, atol=1e-12)


def test_dpmpp_2m_sde_first_step_is_ddpm_and_second_adds_the_multistep_term():
    # Reference: at first order with η = 1, x_s = e^{−2h}·x + (1 − e^{−2h})·x̂0 + σ_s·√(1 − e^{−2h})·z,
    # e^{−2h} = σ_s²/σ_t²: the DDPM posterior (Ho et al. Eq. 7 in VE coordinates, sample_ddpm), same z.
    x = torch.randn(2, 3, 4, 4, generator=gen(42), dtype=F64) * 10
    sigmas = LINEAR.sampling_sigmas(10, "karras")
    one = sample_dpmpp_2m_sde(nonlinear_denoiser, x, sigmas[:2], generator=gen(43))
    torch.testing.assert_close(one, sample_ddpm(nonlinear_denoiser, x, sigmas[:2], generator=gen(43)), rtol=1e-12, atol=1e-12)
    # the second step, written out (SDE-DPM-Solver++(2M), midpoint): the same two draws of z in order
    s0, s1, s2 = (float(v) for v in sigmas[:3])
    g = gen(43)
    z1, z2 = (torch.randn(x.shape, generator=g, dtype=F64) for _ in range(2))
    x0_0 = nonlinear_denoiser(x, sigmas[0].expand(2))
    x1 = (s1 / s0) ** 2 * x + (1 - (s1 / s0) ** 2) * x0_0 + s1 * math.sqrt(1 - (s1 / s0) ** 2) * z1
    x0_1 = nonlinear_denoiser(x1, sigmas[1].expand(2))
    h0, h1 = math.log(s0 / s1), math.log(s1 / s2)
    w = 1 - math.exp(-2 * h1)
    expected = (s2 / s1) * math.exp(-h1) * x1 + w * x0_1 + w * h1 / (2 * h0) * (x0_1 - x0_0) + s2 * math.sqrt(w) * z2
    two = sample_dpmpp_2m_sde(nonlinear_denoiser, x, sigmas[:3], generator=gen(43))
    torch.testing.assert_close(two, expected, rtol=1e-12, atol=1e-12)
    assert float((two - sample_ddpm(nonlinear_denoiser, x, sigmas[:3], generator=gen(43))).abs().max()) > 1e-5


def test_dpmpp_2m_sde_s_noise_scales_the_fresh_noise_and_eta_is_checked():
    # Reference: the sampler is affine in s_noise on one step (x_s = m + s_noise·σ_s·√(1 − e^{−2ηh})·z).
    x = torch.randn(2, 5, generator=gen(44), dtype=F64) * 30
    sigmas = COSINE.sampling_sigmas(10, "trailing")[:2]
    mean, full, half = (sample_dpmpp_2m_sde(nonlinear_denoiser, x, sigmas, s_noise=k, generator=gen(45)) for k in (0.0, 1.0, 0.5))
    torch.testing.assert_close(half - mean, (full - mean) / 2, rtol=1e-12, atol=1e-12)
    assert float((full - mean).abs().max()) > 1e-3
    with pytest.raises(SamplerError, match="eta: must be >= 0, got -0.5"):
        sample(nonlinear_denoiser, (1, 2), LINEAR, sampler="dpmpp_2m_sde", steps=3, eta=-0.5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_the_vp_form_of_song_eq_12(eta):
    # Reference: Song et al. 2021, Eq. 12 with σ_t(η) of Eq. 16, written with ᾱ between steps 799 → 499.
    t, s = 799, 499
    ab_t, ab_s = LINEAR.alphas_cumprod[t], LINEAR.alphas_cumprod[s]
    x_ve = torch.randn(3, 2, 5, 5, generator=gen(9), dtype=F64) * float(LINEAR.ve_sigmas[t])
    x_vp = ab_t.sqrt() * x_ve
    x0_hat = nonlinear_denoiser(x_ve, LINEAR.ve_sigmas[t].expand(3))
    eps_hat = (x_vp - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    sigma_eta = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()  # Eq. 16
    z = torch.randn(x_ve.shape, generator=gen(10), dtype=F64)  # the one draw the sampler makes
    x_s_vp = ab_s.sqrt() * x0_hat + (1 - ab_s - sigma_eta**2).sqrt() * eps_hat + sigma_eta * z  # Eq. 12
    out = sample_ddim(nonlinear_denoiser, x_ve, LINEAR.ve_sigmas[[t, s]], eta=eta, generator=gen(10))
    torch.testing.assert_close(out, x_s_vp / ab_s.sqrt(), rtol=1e-10, atol=1e-10)


def test_ddpm_step_is_ho_posterior():
    # Reference: Ho et al. 2020, Eq. 6–7, q(x_{t−1} | x_t, x̂0) between consecutive steps 500 → 499:
    # μ̃ = √ᾱ_{t−1}·β_t/(1 − ᾱ_t)·x̂0 + √α_t·(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t,  β̃ = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t.
    t = 500
    ab_t, ab_prev, beta = (LINEAR.alphas_cumprod[t], LINEAR.alphas_cumprod[t - 1], LINEAR.betas[t])
    x_ve = torch.randn(4, 6, generator=gen(11), dtype=F64) * float(LINEAR.ve_sigmas[t])
    x_vp = ab_t.sqrt() * x_ve
    x0_hat = nonlinear_denoiser(x_ve, LINEAR.ve_sigmas[t].expand(4))
    mean = ab_prev.sqrt() * beta / (1 - ab_t) * x0_hat + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t) * x_vp
    var = (1 - ab_prev) / (1 - ab_t) * beta
    z = torch.randn(x_ve.shape, generator=gen(12), dtype=F64)
    out = sample_ddpm(nonlinear_denoiser, x_ve, LINEAR.ve_sigmas[[t, t - 1]], generator=gen(12))
    torch.testing.assert_close(out, (mean + var.sqrt() * z) / ab_prev.sqrt(), rtol=1e-10, atol=1e-10)


def test_ddpm_is_ddim_eta_1_is_euler_ancestral():
    # Reference: DDIM with η = 1 is DDPM (Song et al. 2021, §4.1); k-diffusion's Euler ancestral
    # is the same update written as an Euler step to σ_down plus σ_up noise.
    x = torch.randn(3, 9, generator=gen(13), dtype=F64) * 157
    sigmas = LINEAR.sampling_sigmas(12, "trailing")
    ddpm = sample_ddpm(nonlinear_denoiser, x, sigmas, generator=gen(14))
    ddim = sample_ddim(nonlinear_denoiser, x, sigmas, eta=1.0, generator=gen(14))
    anc = sample_euler_ancestral(nonlinear_denoiser, x, sigmas, eta=1.0, generator=gen(14))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(anc, ddpm, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- model_denoiser


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_model_denoiser_recovers_x0_from_an_oracle_network(prediction, schedule):
    # Reference: the VP identities x_t = α·x0 + σ·ε, v = α·ε − σ·x0 (Ho et al. 2020 Eq. 4, Salimans &
    # Ho 2022 §4). The fake network derives α(t), σ(t) from t alone through the schedule's continuous
    # view, so x0 comes back only if t round-trips σ_VE.
    x0 = torch.randn(6, 2, 4, 4, generator=gen(15), dtype=F64).clamp(-1, 1)
    seen = {}

    def net(x_vp, t):
        seen["t"] = t
        alpha, sigma = (v.reshape(-1, 1, 1, 1) for v in schedule.alpha_sigma_at(t))
        eps = (x_vp - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]

    sigma = torch.cat([schedule.sampling_sigmas(5, "karras")[:-1], torch.tensor([1.0], dtype=F64)])  # (6,)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen(16), dtype=F64)
    out = model_denoiser(net, schedule, prediction)(x, sigma)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.ve_sigma(seen["t"]), sigma, rtol=1e-12, atol=0)
    assert seen["t"].dtype == x.dtype and seen["t"].shape == (6,)


def test_model_denoiser_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="unknown prediction target 'score'; use eps, x0 or v"):
        model_denoiser(lambda x, t: x, LINEAR, "score")


# ---------------------------------------------------------------------------------- guidance


def test_cfg_scale_1_is_the_conditional_denoiser_and_skips_the_other():
    def uncond(x, sigma):
        raise AssertionError("the unconditional denoiser must not run at scale 1")

    x, sigma = (torch.randn(2, 5, generator=gen(17), dtype=F64), torch.full((2,), 3.0, dtype=F64))
    assert torch.equal(cfg_denoiser(nonlinear_denoiser, uncond, 1.0)(x, sigma), nonlinear_denoiser(x, sigma))


def test_cfg_in_x0_equals_cfg_in_eps():
    # Reference: Ho & Salimans 2022, Eq. 6, ε̃ = (1 + w)·ε_c − w·ε_u with scale = 1 + w; x̂0 = x − σ·ε̃.
    x, sigma = (torch.randn(3, 5, generator=gen(18), dtype=F64) * 4, torch.full((3,), 4.0, dtype=F64))
    cond, uncond, w = nonlinear_denoiser, gaussian_denoiser_5, 6.5
    eps_c, eps_u = (x - cond(x, sigma)) / 4, (x - uncond(x, sigma)) / 4
    expected = x - 4 * ((1 + w) * eps_c - w * eps_u)
    torch.testing.assert_close(cfg_denoiser(cond, uncond, 1 + w)(x, sigma), expected, rtol=1e-12, atol=1e-12)


def gaussian_denoiser_5(x, sigma):
    """A second, different denoiser on (B, 5) inputs."""
    return 0.3 + x / (1 + sigma.reshape(-1, 1) ** 2)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_cfg_net_equals_cfg_denoiser_in_one_doubled_pass(prediction, scale):
    # Reference: cfg_denoiser on the two conditioned denoisers (x̂0 is affine in the output).
    calls = []

    def net(x, t, emb, mask):  # (B, C, H, W), (B,), (B, L, E), (B, L)
        calls.append(x.shape[0])
        pooled = (emb * mask[..., None]).sum(1).mean(-1)  # (B,)
        return torch.tanh(x * (1 + pooled.reshape(-1, 1, 1, 1))) * t.reshape(-1, 1, 1, 1)

    b = 3
    emb_c = torch.randn(b, 4, 6, generator=gen(19), dtype=F64)
    mask_c = torch.ones(b, 4, dtype=F64)
    emb_u, mask_u = (torch.zeros(1, 4, 6, dtype=F64), torch.ones(1, 4, dtype=F64))  # one null prompt, expanded
    x = torch.randn(b, 2, 4, 4, generator=gen(20), dtype=F64) * 5
    sigma = torch.full((b,), 5.0, dtype=F64)
    guided = model_denoiser(cfg_net(net, (emb_c, mask_c), (emb_u, mask_u), scale), LINEAR, prediction)(x, sigma)
    assert calls == [b if scale == 1 else 2 * b]
    reference = cfg_denoiser(
        model_denoiser(lambda x_, t_: net(x_, t_, emb_c, mask_c), LINEAR, prediction),
        model_denoiser(lambda x_, t_: net(x_, t_, emb_u.expand(b, 4, 6), mask_u.expand(b, 4)), LINEAR, prediction),
        scale,
    )(x, sigma)
    torch.testing.assert_close(guided, reference, rtol=1e-10, atol=1e-10)


def test_cfg_net_rejects_mismatched_conditioning():
    net = cfg_net(lambda x, t, e: x, (torch.zeros(2, 3),), (torch.zeros(3, 3),), 2.0)
    with pytest.raises(SamplerError, match=r"uncond\[0\]: batch 3 does not match the images' batch 2"):
        net(torch.zeros(2, 5), torch.zeros(2))
    with pytest.raises(SamplerError, match="cond has 1 tensors but uncond has 2"):
        cfg_net(lambda x, t, e: x, (torch.zeros(2, 3),), (torch.zeros(2, 3), torch.zeros(2, 3)), 2.0)


def test_thresholds_keep_inside_values_and_bound_outside_ones():
    inside = torch.rand(2, 3, 8, 8, generator=gen(21), dtype=F64) * 2 - 1  # (2, 3, 8, 8) in [−1, 1)
    outside = torch.randn(2, 3, 8, 8, generator=gen(22), dtype=F64) * 3  # many |x| > 1
    for fn in (static_threshold, dynamic_threshold):
        assert torch.equal(fn(inside), inside)
        out = fn(outside)
        assert float(out.abs().max()) <= 1.0 and float(outside.abs().max()) > 1.0
    # Reference: Saharia et al. 2022 §2.3, s = max(1, quantile(|x̂0|, p)) per sample via torch.quantile.
    s = torch.quantile(outside.abs().flatten(1), 0.9, dim=1).clamp(min=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(dynamic_threshold(outside, 0.9), outside.clamp(-s, s) / s, rtol=1e-12, atol=1e-12)
    mixed = torch.cat([inside[:1], outside[1:]])  # a sample inside [−1, 1] is left alone next to one outside
    assert torch.equal(dynamic_threshold(mixed)[0], inside[0])


def test_thresholded_wraps_a_denoiser():
    x, sigma = (torch.randn(2, 50, generator=gen(23), dtype=F64) * 3, torch.ones(2, dtype=F64))
    def identity(x_, s_):
        return x_

    assert torch.equal(thresholded(identity, "none")(x, sigma), x)
    assert torch.equal(thresholded(identity, "static")(x, sigma), x.clamp(-1, 1))
    assert torch.equal(thresholded(identity, "dynamic", 0.8)(x, sigma), dynamic_threshold(x, 0.8))
    with pytest.raises(SamplerError, match="unknown threshold mode 'soft'; valid: none, static, dynamic"):
        thresholded(identity, "soft")


# ------------------------------------------------------------------ determinism and registry


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_samples_different_seed_different(name):
    kw = {"sampler": name, "steps": 6, "dtype": F64}
    rng = torch.get_rng_state()
    a = sample(nonlinear_denoiser, (2, 3, 4, 4), COSINE, generator=gen(24), **kw)
    b = sample(nonlinear_denoiser, (2, 3, 4, 4), COSINE, generator=gen(24), progress=True, **kw)
    c = sample(nonlinear_denoiser, (2, 3, 4, 4), COSINE, generator=gen(25), **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), rng)  # noise came only from the given generator


def test_heun_churn_is_seeded_and_changes_the_path():
    sigmas, x = (LINEAR.sampling_sigmas(8, "karras"), torch.randn(2, 6, generator=gen(26), dtype=F64) * 157)
    a, b = (sample_heun(nonlinear_denoiser, x, sigmas, s_churn=4.0, generator=gen(27)) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, sample_heun(nonlinear_denoiser, x, sigmas))


def test_sample_starts_from_the_vp_prior_in_ve_coordinates():
    # Reference: x_vp ~ N(0, I) at σ_0 is x = x_vp/α = z·√(1 + σ_0²) in VE coordinates.
    seen = []

    def denoise(x, sigma):
        seen.append(x)
        return torch.zeros_like(x)

    sample(denoise, (3, 5), LINEAR, sampler="euler", steps=4, generator=gen(28), dtype=F64)
    z = torch.randn(3, 5, generator=gen(28), dtype=F64)
    torch.testing.assert_close(seen[0], z * math.sqrt(1 + LINEAR.sigma_max**2), rtol=1e-14, atol=0)


def test_registry_matches_config_and_default_spacings():
    assert set(SAMPLERS) == set(config.SAMPLERS)
    assert {n: s.default_spacing for n, s in SAMPLERS.items()} == {
        "ddpm": "trailing", "ddim": "trailing", "dpmpp_2m": "trailing", "dpmpp_2m_sde": "trailing",
        "euler": "trailing", "euler_ancestral": "trailing", "heun": "karras",
    }  # fmt: skip
    assert get_sampler("heun").fn is sample_heun


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(SamplerError) as err:
        get_sampler("plms")
    assert str(err.value) == "unknown sampler 'plms'; valid: ddim, ddpm, dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral, heun"


def test_bad_options_and_sigmas_are_sampler_errors():
    with pytest.raises(SamplerError, match="sampler 'heun' takes no option 'eta'; it takes: s_churn"):
        sample(nonlinear_denoiser, (1, 2), LINEAR, sampler="heun", steps=3, eta=0.5)
    with pytest.raises(SamplerError, match="sampler 'ddpm' takes no option 's_noise'; it takes: none"):
        sample(nonlinear_denoiser, (1, 2), LINEAR, sampler="ddpm", steps=3, s_noise=0.5)
    with pytest.raises(SamplerError, match="strictly decreasing"):
        sample_ddim(nonlinear_denoiser, torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(SamplerError, match="eta: must be >= 0"):
        sample_ddim(nonlinear_denoiser, torch.zeros(1, 2), torch.tensor([2.0, 1.0, 0.0]), eta=-1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_float32_pipeline_with_guidance_and_thresholding(name):
    # Smoke test of the composed stack a stage uses: network -> cfg_net -> model_denoiser -> thresholded.
    def net(x, t, emb):  # (B, C, H, W), (B,), (B, E): a v-prediction-shaped output in x's dtype
        assert x.dtype == t.dtype == torch.float32
        return torch.tanh(x + emb.mean(-1).reshape(-1, 1, 1, 1)) * t.reshape(-1, 1, 1, 1)

    emb = torch.randn(2, 8, generator=gen(29))
    guided = cfg_net(net, (emb,), (torch.zeros(1, 8),), 5.0)
    denoise = thresholded(model_denoiser(guided, COSINE, "v"), "dynamic")
    out = sample(denoise, (2, 3, 8, 8), COSINE, sampler=name, steps=5, generator=gen(30))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    assert bool(out.isfinite().all()) and float(out.abs().max()) <= 1.0
