"""Reference tests of the noise schedules and the forward process (float64, explicit tolerances)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from imager.diffusion import process
from imager.diffusion.config import LossConfig, ScheduleConfig
from imager.diffusion.schedule import NoiseSchedule, rescale_zero_terminal_snr

F64 = torch.float64
NAMES = ["linear", "scaled_linear", "cosine", "sigmoid", "log_snr"]


def schedule(name: str, **kw) -> NoiseSchedule:
    if name == "scaled_linear":
        kw = {"beta_start": 0.00085, "beta_end": 0.012, **kw}
    return NoiseSchedule.from_config(ScheduleConfig(name=name, **kw))


# -------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", NAMES)
def test_alphas_cumprod_is_decreasing_in_the_open_unit_interval(name):
    ac = schedule(name).alphas_cumprod
    assert ac.dtype == F64 and len(ac) == 1000
    assert bool(((ac > 0) & (ac < 1)).all())
    assert bool((ac[1:] < ac[:-1]).all())


def test_linear_endpoints_are_the_betas_given():
    # Ho et al. 2020, §4: β_1 = 1e-4 ... β_T = 0.02, linear.
    s = schedule("linear")
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(s.betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64), atol=1e-15)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0), rtol=1e-12)


def test_scaled_linear_is_linear_in_root_beta():
    s = schedule("scaled_linear")
    root = s.betas.sqrt()
    assert root[0].item() == pytest.approx(math.sqrt(0.00085), abs=1e-12)
    assert root[-1].item() == pytest.approx(math.sqrt(0.012), abs=1e-12)
    assert torch.allclose(root.diff(), root.diff()[0].expand(999), atol=1e-12)


def test_cosine_matches_its_closed_form_until_clipping():
    # Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t + s)/(1 + s))·π/2); β ≤ 0.999.
    s, ss = schedule("cosine"), 0.008
    t = torch.arange(1, 1001, dtype=F64) / 1000
    f = lambda u: torch.cos((u + ss) / (1 + ss) * math.pi / 2) ** 2  # noqa: E731
    closed = f(t) / f(torch.zeros(1, dtype=F64))
    unclipped = s.betas < 0.999
    assert unclipped[:-1].all()  # only the very last step is clipped
    assert torch.allclose(s.alphas_cumprod[:-1], closed[:-1], rtol=1e-10)
    assert s.betas.max().item() <= 0.999 + 1e-15


def test_log_snr_schedule_hits_its_endpoints():
    # λ(t) = −2 log tan(a·t + b) with tan(b) = e^(−λmax/2), tan(a + b) = e^(−λmin/2) (Kingma et al. 2021).
    b = math.atan(math.exp(-8.0 / 2))
    a = math.atan(math.exp(6.0 / 2)) - b
    first = {"linear": 8.0 - 14.0 / 500, "cosine": -2 * math.log(math.tan(a / 500 + b))}
    for shape in ("linear", "cosine"):
        s = schedule("log_snr", log_snr_max=8.0, log_snr_min=-6.0, log_snr_shape=shape, timesteps=500)
        lam = s.log_snr
        assert lam[-1].item() == pytest.approx(-6.0, abs=1e-9)  # t = 1
        assert lam[0].item() == pytest.approx(first[shape], abs=1e-9)  # t = 1/T
        assert bool((lam.diff() < 0).all())
    lin = schedule("log_snr", log_snr_max=8.0, log_snr_min=-6.0, log_snr_shape="linear", timesteps=500).log_snr
    assert torch.allclose(lin.diff(), torch.full((499,), -14.0 / 500, dtype=F64), atol=1e-9)


def test_sigmoid_schedule_follows_chen_2023():
    # Chen 2023, Alg. 1: ᾱ(t) = (v_end − sigmoid((t(end − start) + start)/τ)) / (v_end − v_start).
    s = schedule("sigmoid", sigmoid_start=-3.0, sigmoid_end=3.0, sigmoid_tau=1.0)
    t = torch.arange(1, 1001, dtype=F64) / 1000
    v0, v1 = torch.sigmoid(torch.tensor(-3.0, dtype=F64)), torch.sigmoid(torch.tensor(3.0, dtype=F64))
    closed = (v1 - torch.sigmoid(t * 6 - 3)) / (v1 - v0)
    ok = s.betas < 0.999
    assert torch.allclose(s.alphas_cumprod[ok], closed[ok], rtol=1e-9)


def test_custom_betas_are_used_as_given():
    betas = (0.01, 0.02, 0.05, 0.1, 0.3)
    s = NoiseSchedule.from_config(ScheduleConfig(name="custom_betas", betas=betas))
    assert s.num_steps == 5
    assert torch.allclose(s.betas, torch.tensor(betas, dtype=F64), atol=1e-15)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - torch.tensor(betas, dtype=F64), 0), atol=1e-15)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_rescale(name):
    # Lin et al. 2024, Alg. 1: √ᾱ shifted so √ᾱ_T = 0 and scaled so √ᾱ_1 is kept.
    base = schedule(name).alphas_cumprod
    s = schedule(name, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(base[0].item(), rel=1e-12)
    assert torch.isneginf(s.log_snr[-1]) and torch.isfinite(s.log_snr[:-1]).all()
    assert math.isfinite(s.sigma_max)  # samplers see the last step floored at ᾱ = 2⁻²⁴
    root = rescale_zero_terminal_snr(base).sqrt()
    affine = (base.sqrt() - base.sqrt()[-1]) / (base.sqrt()[0] - base.sqrt()[-1]) * base.sqrt()[0]
    assert torch.allclose(root, affine, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_continuous_and_discrete_views_agree(name):
    s = schedule(name)
    idx = torch.arange(s.num_steps)
    t = s.t_of_index(idx)
    assert torch.allclose(s.ve_sigma(t), s.ve_sigmas, rtol=1e-12)
    assert torch.allclose(s.log_snr_at(t), s.log_snr, rtol=1e-10, atol=1e-10)
    alpha, sigma = s.alpha_sigma_at(t)
    assert torch.allclose(alpha, s.alpha, rtol=1e-12) and torch.allclose(sigma, s.sigma, rtol=1e-10)
    assert torch.allclose(s.t_of_ve_sigma(s.ve_sigmas), t, atol=1e-12)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=F64) * (1 - 1e-3) + 1e-3
    assert torch.allclose(s.t_of_ve_sigma(s.ve_sigma(u)), u, atol=1e-12)
    assert bool((s.ve_sigma(u.sort().values).diff() >= 0).all())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras", "exponential"])
def test_sampling_sigmas(spacing):
    s = schedule("linear")
    sig = s.sampling_sigmas(10, spacing)
    assert sig.shape == (11,) and sig[-1].item() == 0.0
    assert bool((sig[:-1].diff() < 0).all())
    assert sig[:-1].min().item() >= s.sigma_min - 1e-12 and sig[0].item() <= s.sigma_max + 1e-9
    if spacing in ("linspace", "trailing", "karras", "exponential"):
        assert sig[0].item() == pytest.approx(s.sigma_max, rel=1e-12)  # starts from pure noise
    if spacing in ("karras", "exponential", "linspace"):
        assert sig[-2].item() == pytest.approx(s.sigma_min, rel=1e-12)
    if spacing == "karras":  # Karras et al. 2022, Eq. 5: σ^(1/ρ) evenly spaced
        root = sig[:-1] ** (1 / 7)
        assert torch.allclose(root.diff(), root.diff()[0].expand(9), atol=1e-12)
    if spacing == "exponential":
        assert torch.allclose(sig[:-1].log().diff(), sig[:-1].log().diff()[0].expand(9), atol=1e-12)


def test_discrete_spacings_refuse_more_steps_than_timesteps():
    s = NoiseSchedule.from_config(ScheduleConfig(name="linear", timesteps=10))
    for spacing in ("linspace", "leading", "trailing"):
        assert s.sampling_sigmas(10, spacing).shape == (11,)
        with pytest.raises(ValueError, match="steps must be <= 10 timesteps, got 11"):
            s.sampling_sigmas(11, spacing)
    assert s.sampling_sigmas(50, "karras").shape == (51,)  # continuous spacings take any count


def test_schedule_config_errors_name_the_key():
    cases = [
        ({"name": "linear", "beta_start": 0.02, "beta_end": 0.01}, "beta_start: must be < beta_end"),
        ({"name": "custom_betas"}, "betas: a list of at least 2 values is required"),
        ({"name": "custom_betas", "betas": [0.1, 1.5]}, "betas: every value must be in (0, 1)"),
        ({"name": "log_snr", "log_snr_min": 5, "log_snr_max": 1}, "log_snr_min: must be < log_snr_max"),
        ({"name": "fancy"}, "Input should be"),
        ({"timesteps": 1}, "greater than or equal to 2"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValidationError, match=text.replace("(", r"\(").replace(")", r"\)")):
            ScheduleConfig(**kwargs)


# ------------------------------------------------------------------------- forward process


def draw(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_q_sample_is_the_closed_form_and_has_its_moments():
    s = schedule("cosine")
    idx = torch.tensor([0, 250, 500, 900])
    alpha, sigma = s.alpha[idx], s.sigma[idx]
    x0 = draw((4, 3, 8, 8), 0).clamp(-1, 1)
    eps = draw((4, 3, 8, 8), 1)
    x_t = process.q_sample(x0, alpha, sigma, eps)
    # Ho et al. 2020, Eq. 4: q(x_t | x0) = N(√ᾱ_t x0, (1 − ᾱ_t) I)
    assert torch.allclose(x_t, alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-15)
    n = 200_000
    x0s = torch.full((n, 1), 0.7, dtype=F64)
    a, sg = s.alpha[[400]].expand(n), s.sigma[[400]].expand(n)
    xs = process.q_sample(x0s, a, sg, draw((n, 1), 2))
    se = sg[0].item() / math.sqrt(n)  # standard error of the mean
    assert abs(xs.mean().item() - a[0].item() * 0.7) < 5 * se
    assert abs(xs.var().item() - sg[0].item() ** 2) < 5 * sg[0].item() ** 2 * math.sqrt(2 / n)


def test_eps_x0_v_round_trips_are_exact():
    s = schedule("linear")
    idx = torch.tensor([0, 10, 300, 999])
    alpha, sigma = s.alpha[idx], s.sigma[idx]
    x0, eps = draw((4, 3, 5, 5), 3), draw((4, 3, 5, 5), 4)
    x_t = process.q_sample(x0, alpha, sigma, eps)
    v = process.v_from(x0, eps, alpha, sigma)
    tol = dict(rtol=1e-9, atol=1e-9)
    assert torch.allclose(process.predict_x0_from_eps(x_t, eps, alpha, sigma), x0, **tol)
    assert torch.allclose(process.predict_eps_from_x0(x_t, x0, alpha, sigma), eps, **tol)
    assert torch.allclose(process.predict_x0_from_v(x_t, v, alpha, sigma), x0, **tol)
    assert torch.allclose(process.predict_eps_from_v(x_t, v, alpha, sigma), eps, **tol)
    for pred in ("eps", "x0", "v"):
        out = process.target(x0, eps, alpha, sigma, pred)
        assert torch.allclose(process.predict_x0(out, x_t, alpha, sigma, pred), x0, **tol)


def test_loss_is_zero_for_the_target_and_min_snr_weights_follow_hang_2023():
    s = schedule("cosine")
    idx = torch.tensor([5, 200, 600, 950])
    alpha, sigma = s.alpha[idx], s.sigma[idx]
    x0, eps = draw((4, 3, 4, 4), 5), draw((4, 3, 4, 4), 6)
    snr = (alpha / sigma) ** 2
    for pred in ("eps", "x0", "v"):
        cfg = LossConfig(prediction=pred, weighting="min_snr", min_snr_gamma=5.0)
        exact = process.target(x0, eps, alpha, sigma, pred)
        assert torch.equal(process.diffusion_loss(exact, x0, eps, alpha, sigma, cfg), torch.zeros(4, dtype=F64))
        # An error δ in x0 space costs min(SNR, γ)·|δ|² whatever the prediction target (Hang et al. 2023, Eq. 7).
        x_t = process.q_sample(x0, alpha, sigma, eps)
        delta = 0.01 * draw((4, 3, 4, 4), 7)
        wrong_x0 = x0 + delta
        wrong_out = process.target(wrong_x0, process.predict_eps_from_x0(x_t, wrong_x0, alpha, sigma), alpha, sigma, pred)
        loss = process.diffusion_loss(wrong_out, x0, eps, alpha, sigma, cfg)
        expected = snr.clamp(max=5.0) * (delta**2).flatten(1).mean(1)
        assert torch.allclose(loss, expected, rtol=1e-8)
    uniform = LossConfig(prediction="eps", weighting="uniform")
    assert torch.equal(process.loss_weight(snr, uniform), torch.ones(4, dtype=F64))
