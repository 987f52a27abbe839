"""Imager's timestep spacings and samplers against diffusers' schedulers (docs/samplers.md sums them up).

References: diffusers' DDIMScheduler, DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2) and EulerDiscreteScheduler (written against diffusers 0.42.1), driven step by step
(set_timesteps, scale_model_input, step). The problem is Gaussian data x0 ~ N(μ, diag s²), whose
posterior mean E[x0 | x] = μ + s²/(s² + σ²)·(x − μ) is closed form; it is written as an eps- or
v-prediction network for both libraries, in float64.

Alignments used throughout:
- ᾱ: diffusers keeps alphas_cumprod in float32, which puts σ_VE(0) off by 8e-5
  (test_diffusers_float32_alphas_cumprod...). ``scheduler`` hands it Imager's float64 ᾱ, so the
  comparisons below are of spacing logic and update rules, not of float32 rounding.
- σ lists agree to rtol 1e-6: diffusers stores ``sigmas`` in float32 (unit roundoff u = 2⁻²⁴ ≈ 6e-8),
  and 1e-6 is 16u, while neighbouring timesteps' σ differ by at least 0.3 %: one step off fails.
- The diffusers-side network is told the σ the scheduler is at, so it is exact also where diffusers
  hands a network a rounded (DPM-Solver, Karras) or fractional (Euler) timestep. Imager's side goes
  through ``model_denoiser``, which tells the network the continuous t of σ.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a dev dependency (pip install -e '.[dev]')")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler  # noqa: E402

from imager.diffusion import NoiseSchedule, ScheduleConfig  # noqa: E402
from imager.samplers import model_denoiser, sample_ddim, sample_dpmpp_2m, sample_euler  # noqa: E402

F64 = torch.float64
U32 = 2.0**-24  # float32 unit roundoff
T = 1000
SCHEDULES = {name: NoiseSchedule.from_config(ScheduleConfig(name=name, timesteps=T)) for name in ("linear", "cosine")}
STEPS = (1, 7, 10, 20, 50)
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
# diffusers calls np.array on its torch ᾱ (float32 or the float64 handed over here): numpy 2 warns.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

D = 16
MU = torch.linspace(-0.8, 0.8, D, dtype=F64)  # (D,) data mean μ
S = torch.linspace(0.3, 1.0, D, dtype=F64)  # (D,) data standard deviation s


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (64, 16) tensors: threads cost more than they save
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- helpers


def scheduler(cls, name: str, **config):
    """A diffusers scheduler on Imager's schedule ``name``: linear through diffusers' own
    beta_schedule="linear" (the same β range), cosine through trained_betas = NoiseSchedule.betas;
    then Imager's float64 ᾱ in place of diffusers' float32 cumulative product."""
    schedule = SCHEDULES[name]
    if name == "linear":
        betas = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    else:
        betas = {"trained_betas": schedule.betas.numpy()}
    s = cls(num_train_timesteps=T, **betas, **config)
    s.alphas_cumprod = schedule.alphas_cumprod.clone()
    if cls is DDIMScheduler:  # ᾱ after the last step: 1, or ᾱ_0 with set_alpha_to_one=False
        s.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if s.config.set_alpha_to_one else s.alphas_cumprod[0]
    return s


def spacing_config(spacing: str) -> dict:
    if spacing in ("karras", "exponential"):
        return {f"use_{spacing}_sigmas": True, "timestep_spacing": "linspace"}
    return {"timestep_spacing": spacing}


def imager_index(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """Timestep indices of σ_VE values, t·T − 1 with t = NoiseSchedule.t_of_ve_sigma (step i sits at
    t = (i + 1)/T): whole numbers for the discrete spacings, fractional for karras and exponential."""
    return schedule.t_of_ve_sigma(sigmas) * schedule.num_steps - 1


def network_output(x_vp, sigma_ve, prediction: str):
    """The exact network for the Gaussian data: eps or v from x_vp = α·x0 + σ_vp·ε at σ_VE (B,)."""
    alpha = (1 + sigma_ve.reshape(-1, 1) ** 2).rsqrt()  # (B, 1) α = 1/√(1 + σ²)
    sigma_vp = sigma_ve.reshape(-1, 1) * alpha
    x = x_vp / alpha  # VE state x0 + σ·ε
    x0 = MU + S**2 / (S**2 + sigma_ve.reshape(-1, 1) ** 2) * (x - MU)  # E[x0 | x], (B, D)
    eps = (x_vp - alpha * x0) / sigma_vp
    return eps if prediction == "eps" else alpha * eps - sigma_vp * x0  # v = α·ε − σ_vp·x0


def imager_denoiser(schedule: NoiseSchedule, prediction: str):
    def net(x_vp, t):  # the network sees only t; σ_VE(t) from the schedule's continuous view
        return network_output(x_vp, schedule.ve_sigma(t), prediction)

    return model_denoiser(net, schedule, prediction)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(64, D, generator=torch.Generator().manual_seed(seed), dtype=F64)  # (64, D)


def run_diffusers(s, x: torch.Tensor, prediction: str, schedule: NoiseSchedule) -> torch.Tensor:
    """diffusers' own loop: scale_model_input, the network, step. The network is told σ_VE of the
    step: ``s.sigmas[i]`` (DPM-Solver, Euler) or σ_VE of the integer timestep (DDIM)."""
    for i, t in enumerate(s.timesteps):
        sigma = s.sigmas[i] if hasattr(s, "sigmas") else schedule.ve_sigmas[int(t)]
        model_input = s.scale_model_input(x, t)  # Euler: x/√(σ² + 1), the VP state; else unchanged
        x = s.step(network_output(model_input, sigma.to(F64).expand(len(x)), prediction), t, x).prev_sample
    return x


def vp_prior_start(sigmas: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Imager's start (registry.sample): the VP prior z at σ_0, x = z·√(1 + σ_0²) in VE coordinates."""
    return z * math.sqrt(1 + float(sigmas[0]) ** 2)


# ----------------------------------------------------------------------------- timestep lists


SAME_TIMESTEPS = {  # the diffusers schedulers whose timestep_spacing picks Imager's discrete steps
    "linspace": (DDIMScheduler,),  # DPM-Solver: test_dpm_solver_..., Euler: test_euler_linspace_...
    "leading": (DDIMScheduler, EulerDiscreteScheduler),
    "trailing": (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler),
}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", sorted(SAME_TIMESTEPS))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_discrete_spacings_pick_diffusers_timesteps(name, spacing, steps):
    # Reference: diffusers' set_timesteps for timestep_spacing linspace / leading / trailing (Lin et al.
    # 2024, Table 2), with steps_offset = 0.
    schedule = SCHEDULES[name]
    sigmas = schedule.sampling_sigmas(steps, spacing)  # (steps + 1,)
    index = imager_index(schedule, sigmas[:-1])
    torch.testing.assert_close(index, index.round(), rtol=0, atol=1e-6)  # on the steps, not between
    assert float(sigmas[-1]) == 0.0
    for cls in SAME_TIMESTEPS[spacing]:
        if spacing == "linspace" and steps == 1:
            continue  # diffusers' one linspace step is t = 0: test_diffusers_linspace_with_one_step...
        s = scheduler(cls, name, timestep_spacing=spacing)
        s.set_timesteps(steps)
        assert torch.equal(s.timesteps, s.timesteps.round()), cls.__name__  # Euler's are float32 integers here
        assert index.round().long().tolist() == s.timesteps.long().tolist(), cls.__name__
        assert torch.equal(sigmas[:-1], schedule.ve_sigmas[s.timesteps.long()]), cls.__name__  # the same entries
        if cls is not DDIMScheduler:  # DDIM keeps no σ list
            torch.testing.assert_close(s.sigmas.to(F64), sigmas, rtol=1e-6, atol=0)  # ends with 0 too


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_karras_and_exponential_sigmas_equal_diffusers(name, spacing, steps):
    # Reference: diffusers' use_karras_sigmas (Karras et al. 2022, Eq. 5, ρ = 7) and
    # use_exponential_sigmas (log σ evenly spaced) between σ(0) and σ(T − 1).
    schedule = SCHEDULES[name]
    sigmas = schedule.sampling_sigmas(steps, spacing)
    index = imager_index(schedule, sigmas[:-1])  # fractional
    dpm = scheduler(DPMSolverMultistepScheduler, name, **{f"use_{spacing}_sigmas": True})
    dpm.set_timesteps(steps)
    torch.testing.assert_close(dpm.sigmas.to(F64), sigmas, rtol=1e-6, atol=0)
    # The timestep DPM-Solver tells the network: rounded for karras, truncated for exponential (its
    # int64 cast); the update itself uses the σ above, as Imager does.
    told = index.round() if spacing == "karras" else index.trunc()
    assert dpm.timesteps.tolist() == told.long().tolist()
    if steps > 1:  # Euler spans σ(0)…σ(T − 1) only with timestep_spacing="linspace", its default
        euler = scheduler(EulerDiscreteScheduler, name, **spacing_config(spacing))
        euler.set_timesteps(steps)
        torch.testing.assert_close(euler.sigmas.to(F64), sigmas, rtol=1e-6, atol=0)
        # fractional timesteps in float32, whose spacing near 999 is 6.1e-5
        torch.testing.assert_close(euler.timesteps.to(F64), index, rtol=0, atol=1e-3)


def test_diffusers_float32_alphas_cumprod_are_imagers_to_float32_rounding():
    # Reference: a float32 cumulative product of T rounded factors is within 2T·u relative of the
    # exact one (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1, γ_n).
    linear, cosine = SCHEDULES["linear"], SCHEDULES["cosine"]
    cases = [
        (linear, DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        (cosine, DDIMScheduler(trained_betas=cosine.betas.numpy())),
        (cosine, DDIMScheduler(beta_schedule="squaredcos_cap_v2")),
    ]
    for schedule, s in cases:
        torch.testing.assert_close(s.alphas_cumprod.to(F64), schedule.alphas_cumprod, rtol=2 * T * U32, atol=0)
    # squaredcos_cap_v2 is Imager's cosine (Nichol & Dhariwal 2021, Eq. 17, β ≤ 0.999): the betas
    # agree to float32 rounding (u, doubled for the float64 recomputation of β from ᾱ).
    torch.testing.assert_close(cases[2][1].betas.to(F64), cosine.betas, rtol=2 * U32, atol=0)
    # What float32 costs: 1 − ᾱ_0 = 1e-4 keeps few float32 digits, so diffusers' own σ_VE(0) is off by
    # 8e-5 relative. This is why ``scheduler`` hands diffusers Imager's float64 ᾱ.
    ac0 = cases[0][1].alphas_cumprod[0].to(F64)
    off = abs(float(((1 - ac0) / ac0).sqrt()) / linear.sigma_min - 1)
    assert 1e-5 < off < 1e-3, off


# --------------------------------------------------------------- where the conventions differ


def test_diffusers_linspace_with_one_step_denoises_at_timestep_0():
    # diffusers: np.linspace(0, T − 1, 1) = [0], one step from pure noise at the least noisy timestep.
    # Imager's one linspace step starts at the top, T − 1, as its trailing spacing does.
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        s = scheduler(cls, "linear", timestep_spacing="linspace")
        s.set_timesteps(1)
        assert s.timesteps.tolist() == [0]
    linear = SCHEDULES["linear"]
    assert imager_index(linear, linear.sampling_sigmas(1, "linspace")[:-1]).round().tolist() == [T - 1]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpm_solver_linspace_and_leading_use_a_grid_of_steps_plus_one(spacing, steps):
    # DPMSolverMultistepScheduler spaces N + 1 timesteps and drops the last: its N-step list is
    # Imager's (N + 1)-step list without its smallest nonzero σ.
    schedule = SCHEDULES["linear"]
    s = scheduler(DPMSolverMultistepScheduler, "linear", timestep_spacing=spacing)
    s.set_timesteps(steps)
    wider = schedule.sampling_sigmas(steps + 1, spacing)  # (steps + 2,)
    assert imager_index(schedule, wider[:-2]).round().long().tolist() == s.timesteps.tolist()
    torch.testing.assert_close(s.sigmas.to(F64), dpm_visited(schedule, spacing, steps), rtol=1e-6, atol=0)
    if steps > 1:
        own = imager_index(schedule, schedule.sampling_sigmas(steps, spacing)[:-1]).round().long()
        assert s.timesteps.tolist() != own.tolist()  # not Imager's N-step list


def dpm_visited(schedule: NoiseSchedule, spacing: str, steps: int) -> torch.Tensor:
    """The σ list DPMSolverMultistepScheduler visits, built from Imager's spacings."""
    if spacing in ("linspace", "leading"):
        wider = schedule.sampling_sigmas(steps + 1, spacing)
        return torch.cat([wider[:-2], wider[-1:]])
    return schedule.sampling_sigmas(steps, spacing)


def euler_visited(schedule: NoiseSchedule, spacing: str, steps: int, timesteps: torch.Tensor) -> torch.Tensor:
    """The σ list EulerDiscreteScheduler visits: for linspace, σ_VE interpolated linearly in σ at its
    fractional timesteps (np.interp); otherwise Imager's."""
    if spacing != "linspace":
        return schedule.sampling_sigmas(steps, spacing)
    t = timesteps.to(F64)
    lo = t.floor().long().clamp(max=schedule.num_steps - 2)
    w = t - lo
    sigmas = (1 - w) * schedule.ve_sigmas[lo] + w * schedule.ve_sigmas[lo + 1]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@pytest.mark.parametrize("steps", [7, 20, 50])
def test_euler_linspace_timesteps_are_fractional_and_sigmas_interpolated(steps):
    # EulerDiscreteScheduler keeps np.linspace(0, T − 1, N) unrounded (float32) and interpolates σ_VE
    # linearly between steps. Rounded, its timesteps are Imager's (and DDIM's) linspace steps.
    schedule = SCHEDULES["linear"]
    s = scheduler(EulerDiscreteScheduler, "linear", timestep_spacing="linspace")
    s.set_timesteps(steps)
    assert not torch.equal(s.timesteps, s.timesteps.round())
    imager = schedule.sampling_sigmas(steps, "linspace")
    assert imager_index(schedule, imager[:-1]).round().long().tolist() == s.timesteps.round().long().tolist()
    visited = euler_visited(schedule, "linspace", steps, s.timesteps)
    torch.testing.assert_close(s.sigmas.to(F64), visited, rtol=1e-6, atol=0)
    assert float(((visited - imager)[:-1] / imager[:-1]).abs().max()) > 3e-3  # not Imager's σ


def test_euler_karras_range_follows_its_timestep_spacing():
    # Euler converts the σ of its spacing's timesteps to Karras σs: with trailing spacing the range
    # ends at σ(T/N − 1), where Imager's (and DPM-Solver's) karras spacing ends at σ(0).
    schedule = SCHEDULES["linear"]
    s = scheduler(EulerDiscreteScheduler, "linear", timestep_spacing="trailing", use_karras_sigmas=True)
    s.set_timesteps(10)
    torch.testing.assert_close(s.sigmas[[0, -2]].to(F64), schedule.ve_sigmas[[T - 1, T // 10 - 1]], rtol=1e-6, atol=0)
    assert float(schedule.sampling_sigmas(10, "karras")[-2]) == pytest.approx(schedule.sigma_min, rel=1e-12)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_initial_noise_scales(spacing):
    # Imager starts from the VP prior, x = z·√(1 + σ_0²) in VE coordinates (registry.sample). DDIM and
    # DPM-Solver sample in VP coordinates with init_noise_sigma = 1: the same start. Euler samples in
    # VE coordinates and scales z by √(σ_max² + 1) for leading but by σ_max for linspace and trailing
    # (2e-5 smaller for the linear schedule's σ_max = 157): the parity tests start Euler from Imager's x.
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        s = scheduler(cls, "linear", timestep_spacing=spacing)
        s.set_timesteps(10)
        assert float(s.init_noise_sigma) == 1.0
    s = scheduler(EulerDiscreteScheduler, "linear", timestep_spacing=spacing)
    s.set_timesteps(10)
    sigma_max = float(s.sigmas.max())
    expected = math.sqrt(sigma_max**2 + 1) if spacing == "leading" else sigma_max
    assert float(s.init_noise_sigma) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("spacing, steps", [("trailing", 7), ("linspace", 10)])
def test_ddim_steps_to_t_minus_t_over_n_whatever_the_spacing(spacing, steps):
    # diffusers' DDIMScheduler.step goes from t to t − T//N. Where that is not the next listed timestep
    # (trailing with N not dividing T, linspace), the next network call labels a state at t − T//N with
    # the next timestep. Imager steps between listed σs, so the results differ; one-step Imager DDIMs
    # over the pairs (t, t − T//N), relabelled in between, reproduce diffusers.
    schedule, prediction = SCHEDULES["linear"], "v"
    s = scheduler(DDIMScheduler, "linear", timestep_spacing=spacing, clip_sample=False, prediction_type="v_prediction")
    s.set_timesteps(steps)
    listed = s.timesteps.tolist()
    targets = [t - T // steps for t in listed]
    assert targets[:-1] != listed[1:]
    if spacing == "trailing":  # 142 − 142 = 0: the last step ends at ᾱ_0, a noisy state, not at ᾱ = 1
        assert targets[-1] == 0
    z = noise()
    ours = run_diffusers(s, z, prediction, schedule)
    denoise = imager_denoiser(schedule, prediction)
    sigmas = schedule.sampling_sigmas(steps, spacing)
    assert float((sample_ddim(denoise, vp_prior_start(sigmas, z), sigmas) - ours).abs().max()) > 1e-2
    x_vp = z
    for t, target in zip(listed, targets, strict=True):
        end = schedule.ve_sigmas[target] if target >= 0 else schedule.ve_sigmas.new_zeros(())  # ᾱ = 1 past the end
        pair = torch.stack([schedule.ve_sigmas[t], end])
        x = sample_ddim(denoise, x_vp / schedule.alpha[t], pair)  # VP → VE at t, one DDIM step
        x_vp = x * (schedule.alpha[target] if target >= 0 else 1.0)  # VE → VP at t − T//N
    torch.testing.assert_close(x_vp, ours, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------ sampler parity


DDIM_CASES = [("trailing", 1), ("trailing", 10), ("trailing", 50), ("leading", 7), ("leading", 20)]


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("spacing, steps", DDIM_CASES)
@pytest.mark.parametrize("prediction", sorted(PREDICTION))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ddim_matches_diffusers(name, prediction, spacing, steps, set_alpha_to_one):
    # Reference: DDIMScheduler (η = 0, no clipping). Each of these lists steps from t to t − T//N = the
    # next listed timestep (test_ddim_steps_to_...), so both visit the same σs.
    schedule = SCHEDULES[name]
    s = scheduler(
        DDIMScheduler, name, timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
        prediction_type=PREDICTION[prediction],
    )  # fmt: skip
    s.set_timesteps(steps)
    sigmas = schedule.sampling_sigmas(steps, spacing)
    assert torch.equal(schedule.ve_sigmas[s.timesteps], sigmas[:-1])
    z = noise()
    theirs = run_diffusers(s, z, prediction, schedule)  # VP state; starts at z, init_noise_sigma = 1
    # End point: with set_alpha_to_one the last step goes to ᾱ = 1, σ = 0, and returns x̂0 as Imager
    # does. Without it diffusers stops at ᾱ_0 (σ_VE(0) > 0) and returns the VP state there: run Imager
    # to σ_VE(0) (a step from t = 0 to ᾱ_0 is the identity, so a repeated σ(0) is dropped) and scale by α_0.
    visited, scale = sigmas, 1.0
    if not set_alpha_to_one:
        end = schedule.ve_sigmas[:1]
        visited = sigmas[:-1] if torch.equal(sigmas[-2:-1], end) else torch.cat([sigmas[:-1], end])
        scale = schedule.alpha[0]
    ours = sample_ddim(imager_denoiser(schedule, prediction), vp_prior_start(sigmas, z), visited) * scale
    # DDIM keeps the sample's float64 (measured 5e-15); the contract is 1e-5, checked far tighter.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


DPM_CASES = [
    ("trailing", 1), ("trailing", 10), ("trailing", 20), ("karras", 10), ("exponential", 20), ("linspace", 10), ("leading", 20),
]  # fmt: skip


@pytest.mark.parametrize("spacing, steps", DPM_CASES)
@pytest.mark.parametrize("prediction", sorted(PREDICTION))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_dpmpp_2m_matches_diffusers(name, prediction, spacing, steps):
    # Reference: DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint, final σ = 0: first order
    # on the last step, as Imager's h = ∞ step). Imager runs on the σ list diffusers visits
    # (dpm_visited: Imager's own for trailing, karras, exponential).
    schedule = SCHEDULES[name]
    s = scheduler(
        DPMSolverMultistepScheduler, name, algorithm_type="dpmsolver++", solver_order=2,
        prediction_type=PREDICTION[prediction], **spacing_config(spacing),
    )  # fmt: skip
    s.set_timesteps(steps)
    s.set_begin_index(0)  # karras on the cosine schedule lists 999 twice; diffusers' lookup would start at the second
    visited = dpm_visited(schedule, spacing, steps)
    torch.testing.assert_close(s.sigmas.to(F64), visited, rtol=1e-6, atol=0)
    s.sigmas = visited.clone()  # float64: float32 σ alone moves the cosine eps case by 9e-6
    z = noise()
    theirs = run_diffusers(s, z, prediction, schedule)  # VP coordinates from z, init_noise_sigma = 1
    ours = sample_dpmpp_2m(imager_denoiser(schedule, prediction), vp_prior_start(visited, z), visited)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # diffusers steps in float32: measured ≤ 2e-6


EULER_CASES = [
    ("trailing", 1), ("trailing", 10), ("trailing", 50), ("leading", 20), ("karras", 10), ("exponential", 20), ("linspace", 20),
]  # fmt: skip


def euler_tolerance(prediction: str, x: torch.Tensor, visited: torch.Tensor) -> float:
    """1e-5, plus for eps-prediction the float32 cancellation in diffusers' x̂0 = x − σ·ε̂:
    EulerDiscreteScheduler.step casts the sample to float32 whatever its dtype, so x̂0 loses u·|x_0|
    (u = 2⁻²⁴, |x_0| up to σ_max·|z|), which the ODE carries to σ = 0 scaled by s/√(s² + σ_1²) ≤
    min(1, max s/σ_1); a factor 4 of room. v-prediction forms x̂0 = c_skip·x − c_out·v̂ without it."""
    if prediction != "eps":
        return 1e-5
    sigma_1 = float(visited[1])
    carried = min(1.0, float(S.max()) / sigma_1) if sigma_1 > 0 else 1.0
    return 1e-5 + 4 * U32 * float(x.abs().max()) * carried


@pytest.mark.parametrize("spacing, steps", EULER_CASES)
@pytest.mark.parametrize("prediction", sorted(PREDICTION))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_euler_matches_diffusers(name, prediction, spacing, steps):
    # Reference: EulerDiscreteScheduler (s_churn = 0). Both start from Imager's x = z·√(1 + σ_0²), not
    # diffusers' z·init_noise_sigma (test_initial_noise_scales); Imager runs on the σ list diffusers
    # visits (euler_visited: for linspace its interpolated σs).
    schedule = SCHEDULES[name]
    s = euler_scheduler(name, prediction, spacing, steps)
    visited = s.sigmas.to(F64)
    x = vp_prior_start(visited, noise())
    theirs = run_diffusers(s, x, prediction, schedule)
    ours = sample_euler(imager_denoiser(schedule, prediction), x, visited)
    # measured ≤ 2e-6, except eps-prediction from cosine's σ_max ≈ 2e4 (test_diffusers_euler_float32_...)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=euler_tolerance(prediction, x, visited))


def euler_scheduler(name: str, prediction: str, spacing: str, steps: int):
    """An EulerDiscreteScheduler whose σ list is checked against Imager's (1e-6) and then replaced by
    the float64 values, so that float32 σ storage does not enter the comparison."""
    s = scheduler(EulerDiscreteScheduler, name, prediction_type=PREDICTION[prediction], **spacing_config(spacing))
    s.set_timesteps(steps)
    s.set_begin_index(0)
    visited = euler_visited(SCHEDULES[name], spacing, steps, s.timesteps)
    torch.testing.assert_close(s.sigmas.to(F64), visited, rtol=1e-6, atol=0)
    s.sigmas = visited.clone()
    return s


@pytest.mark.parametrize("spacing, steps", [("trailing", 10), ("trailing", 50), ("linspace", 20)])
def test_diffusers_euler_float32_cancellation_at_cosines_sigma_max(spacing, steps):
    # The eps-prediction allowance of euler_tolerance is needed: from the cosine schedule's σ_max ≈ 2e4
    # diffusers' float32 x̂0 = x − σ·ε̂ misses the float64 result by more than 1e-5 (measured 5e-5 to
    # 2.4e-4), within the bound; the same run with v-prediction stays within 1e-5.
    schedule = SCHEDULES["cosine"]
    errors, bounds = {}, {}
    for prediction in ("eps", "v"):
        s = euler_scheduler("cosine", prediction, spacing, steps)
        visited = s.sigmas.to(F64)
        x = vp_prior_start(visited, noise())
        theirs = run_diffusers(s, x, prediction, schedule)
        errors[prediction] = float((sample_euler(imager_denoiser(schedule, prediction), x, visited) - theirs).abs().max())
        bounds[prediction] = euler_tolerance(prediction, x, visited)
    assert 1e-5 < errors["eps"] <= bounds["eps"], (errors, bounds)
    assert errors["v"] <= 1e-5, errors


# -------------------------------------------------------------------- the parity tests can fail


def dpmpp_2m_copy(denoise, x, sigmas, c: float = 1.0):
    """A local copy of sample_dpmpp_2m with the multistep coefficient 1/(2r) scaled by c (c = 1: Alg. 2)."""
    values = sigmas.tolist()
    x0_prev = h_prev = None
    for sigma, sigma_next in zip(values[:-1], values[1:], strict=True):
        x0_hat = denoise(x, x.new_full((len(x),), sigma))
        if sigma_next == 0:
            x = x0_hat
            continue
        h = math.log(sigma / sigma_next)
        if x0_prev is None:
            d = x0_hat  # the first step: DPM-Solver++(1)
        else:
            k = c / (2 * h_prev / h)  # 1/(2r), r = h_prev/h
            d = (1 + k) * x0_hat - k * x0_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        x0_prev, h_prev = x0_hat, h
    return x


def test_parity_tolerances_catch_broken_samplers():
    # Linear schedule, v-prediction, trailing 10 steps (parity errors ≤ 1e-6): each broken variant must
    # miss diffusers by more than 10 × the 1e-5 tolerance.
    schedule, prediction, z = SCHEDULES["linear"], "v", noise()
    denoise = imager_denoiser(schedule, prediction)
    sigmas = schedule.sampling_sigmas(10, "trailing")
    x = vp_prior_start(sigmas, z)
    off_by_one = torch.cat([schedule.ve_sigmas[imager_index(schedule, sigmas[:-1]).round().long() - 1], sigmas[-1:]])
    broken = {  # name -> (denoiser, σ list)
        "every timestep one step early": (denoise, off_by_one),
        "denoiser told a σ 1 % too large": (lambda x_, s_: denoise(x_, s_ * 1.01), sigmas),
        "x̂0 off by 1e-3 at σ > 1": (lambda x_, s_: denoise(x_, s_) * (1 + 1e-3 * (s_.reshape(-1, 1) > 1)), sigmas),
    }

    dpm = scheduler(
        DPMSolverMultistepScheduler, "linear", algorithm_type="dpmsolver++", solver_order=2,
        prediction_type="v_prediction", timestep_spacing="trailing",
    )  # fmt: skip
    dpm.set_timesteps(10)
    dpm.sigmas = sigmas.clone()
    ddim = scheduler(DDIMScheduler, "linear", timestep_spacing="trailing", clip_sample=False, prediction_type="v_prediction")
    ddim.set_timesteps(10)
    euler = euler_scheduler("linear", prediction, "trailing", 10)
    theirs = {"dpmpp_2m": run_diffusers(dpm, z, prediction, schedule), "ddim": run_diffusers(ddim, z, prediction, schedule)}
    theirs["euler"] = run_diffusers(euler, x, prediction, schedule)

    # the local copy of DPM-Solver++(2M) is faithful at c = 1, and a wrong multistep coefficient fails
    torch.testing.assert_close(dpmpp_2m_copy(denoise, x, sigmas), sample_dpmpp_2m(denoise, x, sigmas), rtol=0, atol=1e-12)
    torch.testing.assert_close(dpmpp_2m_copy(denoise, x, sigmas), theirs["dpmpp_2m"], rtol=0, atol=1e-5)
    for c in (0.9, 0.0, 2.0):  # 10 % off, first order (DDIM), double
        assert float((dpmpp_2m_copy(denoise, x, sigmas, c=c) - theirs["dpmpp_2m"]).abs().max()) > 1e-4, c
    for sampler, fn in (("ddim", sample_ddim), ("dpmpp_2m", sample_dpmpp_2m), ("euler", sample_euler)):
        torch.testing.assert_close(fn(denoise, x, sigmas), theirs[sampler], rtol=0, atol=1e-5)
        for what, (bad_denoise, bad_sigmas) in broken.items():
            assert float((fn(bad_denoise, x, bad_sigmas) - theirs[sampler]).abs().max()) > 1e-4, (sampler, what)
