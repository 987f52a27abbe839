"""Image-conditioned generation: img2img strength, RePaint replacement and resampling, the overlay
of known pixels in a stage and the cascade, and the reading of edit inputs (images, masks, outpainting).

References used below:
- img2img's start (SDEdit; diffusers' ``get_timesteps``): with ``init_timestep = int(steps · strength)``
  the run takes the schedule from ``t_start = steps − init_timestep`` on (here at least one step), from
  x = init + σ_start·z with z the generator's first draw;
- RePaint (Lugmayr et al. 2022, Alg. 1): the network's input is the known image noised to the
  current σ by fresh unit noise where mask = 0, the sampler's state where mask = 1; a jump back from
  σ_s to σ_t adds √(σ_t² − σ_s²)·z, so that with the oracle D ≡ x0 and DDIM (x_s − x0 = σ_s·ε) the
  state is x0 + σ_t·(unit noise) again at every call;
- Gaussian data per pixel and channel, x0 ~ N(μ_c, s_c²): E[x0 | x] = μ + s²/(s² + σ²)·(x − μ), a
  denoiser that acts pixel by pixel, so a masked run's repainted region evolves exactly like an
  unmasked run's when the sampler draws no noise of its own.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from imager.diffusion import NoiseSchedule, ScheduleConfig
from imager.errors import ConfigError, SamplerError
from imager.inference import Cascade, CascadeSampling, SRSampling, Stage, StageSampling
from imager.inference.edit import feather, outpaint, parse_outpaint, prepare, read_image, read_mask, to_tensor
from imager.inference.images import resize, resize_mask
from imager.inference.sampling import overlay_known
from imager.samplers import SAMPLERS, repaint_denoiser, sample, sample_ddim, sample_resampled, strength_sigmas
from tests.unit.test_inference import sr_stage, stage
from tests.unit.test_unet import condition

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads cost more than they save on 2 cores

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig(name="cosine", timesteps=100))
SPACINGS = ("linspace", "leading", "trailing", "karras", "exponential")
DETERMINISTIC = ("ddim", "dpmpp_2m", "euler", "heun")  # draw no noise of their own
FIRST_ORDER = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_ancestral")  # one call per step
MU = torch.tensor([-0.3, 0.1, 0.4]).view(1, 3, 1, 1)  # per-channel data mean μ_c
S = torch.tensor([0.3, 0.5, 0.8]).view(1, 3, 1, 1)  # per-channel data std s_c


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(μ_c, s_c²) per pixel: the optimal denoiser, pixel by pixel."""
    mu, s = MU.to(x), S.to(x)
    var = sigma.to(x).view(-1, 1, 1, 1) ** 2  # (B, 1, 1, 1)
    return mu + s**2 / (s**2 + var) * (x - mu)


class Recorder:
    """A denoiser that remembers every (x, σ) it is called with."""

    def __init__(self, denoise=gaussian):
        self.denoise, self.calls = denoise, []

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return self.denoise(x, sigma)

    @property
    def sigmas(self) -> list[float]:
        return [float(s[0]) for _, s in self.calls]


def calls_per_run(name: str, steps: int) -> int:
    """Denoiser calls of ``steps`` steps ending at σ = 0: Heun corrects every step but the last."""
    return 2 * steps - 1 if name == "heun" else steps


def image(size: int = 8, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=gen(seed)) * 2 - 1  # (B, 3, S, S) in [-1, 1]


def half_mask(size: int = 8, cols: int | None = None) -> torch.Tensor:
    """(1, 1, S, S), 1 (repaint) on the first ``cols`` columns (half by default), 0 (keep) elsewhere."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., : size // 2 if cols is None else cols] = 1
    return mask


# ----------------------------------------------------------------------------- strength -> start


def expected_tail(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """diffusers' img2img ``get_timesteps`` on the σ grid, with at least one step."""
    steps = sigmas.shape[0] - 1
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return sigmas[min(t_start, steps - 1) :]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [7, 10, 20])
def test_strength_keeps_the_last_int_steps_times_strength_steps(spacing, steps):
    sigmas = SCHEDULE.sampling_sigmas(steps, spacing)  # (steps + 1,)
    for strength in (0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.99):
        tail = strength_sigmas(sigmas, strength)
        assert torch.equal(tail, expected_tail(sigmas, strength)), strength
        assert tail.shape[0] == max(1, int(steps * strength)) + 1 and tail[-1] == 0
    assert torch.equal(strength_sigmas(sigmas, 1.0), sigmas)  # strength 1: every step, from σ_0
    for tiny in (0.001, 1e-9, 0.5 / steps):  # int(steps · strength) = 0: one step, the last
        tail = strength_sigmas(sigmas, tiny)
        assert tail.tolist() == [float(sigmas[-2]), 0.0] and tail[0] > 0


@pytest.mark.parametrize("strength", [0, -0.5, 1.0001, 2, math.nan, math.inf])
def test_strength_outside_zero_one_is_a_sampler_error(strength):
    sigmas = SCHEDULE.sampling_sigmas(10, "trailing")
    with pytest.raises(SamplerError, match=r"^strength: must be in \(0, 1\]"):
        strength_sigmas(sigmas, strength)
    init = image()
    with pytest.raises(SamplerError, match="strength"):
        sample(gaussian, init.shape, SCHEDULE, sampler="ddim", steps=10, init=init, strength=strength)


# ---------------------------------------------------------------------------- sample() from init


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("strength", [0.3, 0.55, 0.001])
def test_img2img_starts_at_the_tail_from_the_image_noised_with_the_first_draw(name, strength):
    steps, init = 10, image(batch=2)
    rec = Recorder()
    sample(rec, init.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(7), init=init, strength=strength)
    sigmas = SCHEDULE.sampling_sigmas(steps, SAMPLERS[name].default_spacing)
    sigma_start = float(sigmas[steps - max(1, int(steps * strength))])
    z = torch.randn(init.shape, generator=gen(7))  # the first draw of a generator of the same seed
    x, sigma = rec.calls[0]
    assert sigma.tolist() == pytest.approx([sigma_start] * 2, rel=1e-6)
    torch.testing.assert_close(x, init + sigma_start * z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_img2img_start_for_every_spacing(spacing):
    steps, strength, init = 8, 0.4, image()
    rec = Recorder()
    sample(rec, init.shape, SCHEDULE, sampler="ddim", steps=steps, spacing=spacing, generator=gen(3), init=init, strength=strength)
    tail = expected_tail(SCHEDULE.sampling_sigmas(steps, spacing), strength)  # the 3 last steps
    assert rec.sigmas == pytest.approx(tail[:-1].tolist(), rel=1e-6)
    z = torch.randn(init.shape, generator=gen(3))
    torch.testing.assert_close(rec.calls[0][0], init + float(tail[0]) * z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strength_one_with_an_image_is_text_to_image_with_the_same_noise(name):
    init = image(batch=2)
    plain = sample(gaussian, init.shape, SCHEDULE, sampler=name, steps=6, generator=gen(11))
    given = sample(gaussian, init.shape, SCHEDULE, sampler=name, steps=6, generator=gen(11), init=init, strength=1.0)
    assert torch.equal(plain, given)
    other = sample(gaussian, init.shape, SCHEDULE, sampler=name, steps=6, generator=gen(11), init=init, strength=0.5)
    assert not torch.equal(plain, other)


def test_every_registered_sampler_has_its_call_count_here():
    assert set(SAMPLERS) == set(FIRST_ORDER) | {"heun"}  # a new sampler needs its per-step cost above


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("strength", [1.0, 0.5, 0.001])
def test_denoiser_calls_match_each_samplers_cost_over_the_steps_run(name, strength):
    steps, init = 10, image()
    rec = Recorder()
    sample(rec, init.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(0), init=init, strength=strength)
    run = max(1, int(steps * strength))  # 10, 5, 1
    assert len(rec.calls) == calls_per_run(name, run)


# --------------------------------------------------------------------------------------- RePaint


def test_repaint_denoiser_shows_the_known_image_noised_by_the_generators_draws():
    known, x = image(16, batch=4, seed=2), 5 * image(16, batch=4, seed=3)
    mask = half_mask(16)
    mask[..., 0, -1] = 0.25  # one feathered pixel: a blend of the two
    sigma = torch.tensor([0.5, 2.0, 10.0, 300.0])
    rec = Recorder(lambda x_, s_: torch.zeros_like(x_))
    wrapped = repaint_denoiser(rec, known, mask, gen(5))
    wrapped(x, sigma)
    wrapped(x, sigma)
    s = sigma.view(-1, 1, 1, 1)
    draws = gen(5)
    for x_in, _ in rec.calls:
        z = torch.randn(x.shape, generator=draws)  # fresh for every call, from the generator
        torch.testing.assert_close(x_in, mask * x + (1 - mask) * (known + s * z), rtol=1e-6, atol=1e-4)
        repaint = (mask == 1).expand_as(x)
        assert torch.equal(x_in[repaint], x[repaint])
    z0 = (rec.calls[0][0] - known) / s
    z1 = (rec.calls[1][0] - known) / s
    keep = (mask == 0).expand_as(x)
    assert abs(torch.corrcoef(torch.stack([z0[keep], z1[keep]]))[0, 1]) < 0.1  # independent draws


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_repaint_inputs_are_noised_known_pixels_and_the_samplers_own_state(name):
    steps, known, mask = 6, image(16, batch=4, seed=2), half_mask(16)
    keep, repaint = (mask == 0).expand_as(known), (mask == 1).expand_as(known)
    masked, plain = Recorder(), Recorder()
    sample(masked, known.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(4), init=known, mask=mask)
    sample(plain, known.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(4))
    assert len(masked.calls) == len(plain.calls) == calls_per_run(name, steps)
    for (x_in, sigma), (x_plain, _) in zip(masked.calls, plain.calls, strict=True):
        z = ((x_in - known) / sigma.view(-1, 1, 1, 1))[keep]  # 1536 values per call
        assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1, float(sigma[0])
        # The denoiser acts pixel by pixel and these samplers draw no noise: the repainted region
        # is exactly the unmasked run's state.
        assert torch.equal(x_in[repaint], x_plain[repaint])


@pytest.mark.parametrize("name", FIRST_ORDER)
@pytest.mark.parametrize(("resample", "strength"), [(2, 1.0), (3, 1.0), (3, 0.6)])
def test_resampling_takes_each_step_r_times_but_the_last(name, resample, strength):
    steps, known, mask = 5, image(seed=2), half_mask()
    rec = Recorder()
    sample(rec, known.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(0), init=known, mask=mask, strength=strength, resample=resample)
    run = max(1, int(steps * strength))
    assert len(rec.calls) == (run - 1) * resample + 1
    tail = expected_tail(SCHEDULE.sampling_sigmas(steps, SAMPLERS[name].default_spacing), strength)
    expected = [s for s in tail[:-2].tolist() for _ in range(resample)] + [float(tail[-2])]  # σ_t again after each jump
    assert rec.sigmas == pytest.approx(expected, rel=1e-6)


def test_heun_resampled_repeats_its_two_call_steps():
    steps, resample, known = 4, 3, image(seed=2)
    rec = Recorder()
    sample(rec, known.shape, SCHEDULE, sampler="heun", steps=steps, generator=gen(0), init=known, mask=half_mask(), resample=resample)
    assert len(rec.calls) == (steps - 1) * resample * 2 + 1


def test_the_jump_back_restores_the_noise_level_of_the_step_start():
    # Oracle D ≡ x0 and DDIM: x_s − x0 = σ_s·ε after a step; the jump must bring it back to σ_t·(unit noise).
    x0 = torch.randn(4, 3, 32, 32, generator=gen(1), dtype=torch.float64)
    sigmas = SCHEDULE.sampling_sigmas(5, "karras")
    x = x0 + float(sigmas[0]) * torch.randn(x0.shape, generator=gen(2), dtype=torch.float64)
    rec = Recorder(lambda x_, s_: x0)
    sample_resampled(sample_ddim, rec, x, sigmas, resample=3, generator=gen(3))
    assert len(rec.calls) == 4 * 3 + 1
    for x_in, sigma in rec.calls:
        eps = (x_in - x0) / sigma.view(-1, 1, 1, 1)
        assert abs(float(eps.std()) - 1) < 0.05, float(sigma[0])


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m_sde"])
def test_resample_one_is_the_plain_sampler(name):
    steps, known, mask = 6, image(seed=2), half_mask()
    fn = SAMPLERS[name].fn
    out = sample(gaussian, known.shape, SCHEDULE, sampler=name, steps=steps, generator=gen(9), init=known, mask=mask, resample=1)
    # The same run built by hand: the prior start, the RePaint wrapper, the sampler over every σ.
    g = gen(9)
    sigmas = SCHEDULE.sampling_sigmas(steps, SAMPLERS[name].default_spacing)
    x = torch.randn(known.shape, generator=g) * math.sqrt(1 + float(sigmas[0]) ** 2)
    by_hand = fn(repaint_denoiser(gaussian, known, mask, g), x, sigmas, generator=g)
    assert torch.equal(out, by_hand)
    assert torch.equal(sample_resampled(fn, gaussian, x, sigmas, resample=1, generator=gen(1)), fn(gaussian, x, sigmas, generator=gen(1)))
    with pytest.raises(SamplerError, match="resample: must be >= 1"):
        sample_resampled(fn, gaussian, x, sigmas, resample=0)


def test_a_mask_or_a_low_strength_without_an_image_is_an_error():
    with pytest.raises(SamplerError, match="need an init image"):
        sample(gaussian, (1, 3, 8, 8), SCHEDULE, sampler="ddim", steps=4, mask=half_mask())
    with pytest.raises(SamplerError, match="need an init image"):
        sample(gaussian, (1, 3, 8, 8), SCHEDULE, sampler="ddim", steps=4, strength=0.5)


# ---------------------------------------------------------------------------------- Stage.sample

STAGE_CFG = StageSampling(sampler="dpmpp_2m", steps=4, guidance=3.0)


def test_overlay_known_keeps_zeros_exactly_and_blends_a_feathered_edge():
    x, known = image(seed=3), image(seed=4)
    mask = half_mask()
    mask[..., 5] = 0.25
    out = overlay_known(x, known, mask)
    keep, repaint, edge = (mask == 0).expand_as(x), (mask == 1).expand_as(x), ((mask > 0) & (mask < 1)).expand_as(x)
    assert torch.equal(out[keep], known[keep]) and torch.equal(out[repaint], x[repaint])
    torch.testing.assert_close(out[edge], (0.25 * x + 0.75 * known)[edge])


def test_overlay_known_follows_the_devices_of_the_samples():
    # The cascade overlays CPU known images and masks on samples from the model's device; the meta
    # device stands in for a GPU here (mixing it with CPU tensors fails like CUDA does).
    x = torch.zeros(2, 3, 8, 8, device="meta")
    out = overlay_known(x, image(), half_mask())
    assert out.device == x.device and out.shape == x.shape


def test_stage_inpainting_returns_the_known_pixels_exactly_only_with_the_overlay():
    s, cond = stage(), condition(2)
    init, mask = image(seed=5), half_mask()
    keep = (mask == 0).expand(2, 3, 8, 8)
    known = init.expand(2, 3, 8, 8)
    out = s.sample(cond, STAGE_CFG, seed=0, init=init, mask=mask, resample=2)
    raw = s.sample(cond, STAGE_CFG, seed=0, init=init, mask=mask, resample=2, overlay=False)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[keep], known[keep])
    assert (raw[keep] - known[keep]).abs().max() > 0  # the network's x̂0 alone does not give them back
    assert torch.equal(out[~keep], raw[~keep])  # the overlay touches nothing else
    assert (out[~keep] - known[~keep]).abs().max() > 1e-3  # and the masked region was repainted


def test_stage_editing_is_deterministic_per_seed():
    s, cond = stage(), condition(2)
    init, mask = image(seed=5), half_mask()
    for strength, m in ((1.0, mask), (0.5, None)):
        a, b = (s.sample(cond, STAGE_CFG, seed=3, init=init, mask=m, strength=strength) for _ in range(2))
        c = s.sample(cond, STAGE_CFG, seed=4, init=init, mask=m, strength=strength)
        assert torch.equal(a, b) and not torch.allclose(a, c)


def test_stage_needs_an_image_for_a_low_strength_or_a_mask():
    s, cond = stage(), condition(1)
    with pytest.raises(SamplerError, match="strength 0.5 needs an input image"):
        s.sample(cond, STAGE_CFG, seed=0, strength=0.5)
    with pytest.raises(SamplerError, match="a mask needs an init image"):
        s.sample(cond, STAGE_CFG, seed=0, mask=half_mask())
    with pytest.raises(SamplerError, match=r"^init image: expected shape .*, got \(1, 3, 16, 16\)$"):
        s.sample(cond, STAGE_CFG, seed=0, init=image(16), mask=half_mask())


def test_resize_mask_keeps_a_pixel_kept_only_when_all_of_it_is_kept():
    mask = torch.rand(2, 1, 32, 32, generator=gen(8)).gt(0.9).float()  # scattered repainted pixels
    small = resize_mask(mask, 8)
    blocks = mask.view(2, 1, 8, 4, 8, 4).amax(dim=(3, 5))  # any repainted pixel in the 4x4 block
    assert torch.equal(small, blocks) and (small == 0).any()
    assert torch.equal(resize_mask(small, 32), small.repeat_interleave(4, -1).repeat_interleave(4, -2))  # nearest up


# ------------------------------------------------------------------------------ Cascade.generate

CASCADE_CFG = CascadeSampling(sampler="ddim", base=StageSampling(steps=3), sr=SRSampling(steps=2), seed=3, batch_size=2)


def test_cascade_inpainting_keeps_the_known_pixels_at_both_resolutions():
    c, cond = Cascade(stage(), sr_stage()), condition(2)
    big, mask = image(32, seed=6), half_mask(32, cols=13)  # the edge falls inside an 8 px pixel
    base, sr = c.generate(cond, CASCADE_CFG, image=big, mask=mask)
    for out, size in ((base, 8), (sr, 16)):
        assert out.shape == (2, 3, size, size)
        keep = (resize_mask(mask, size) == 0).expand_as(out)
        known = resize(big, size).expand_as(out)
        assert keep.any() and (~keep).any()
        assert torch.equal(out[keep], known[keep]), size
    raw_base, raw_sr = c.generate(cond, CASCADE_CFG, image=big, mask=mask, overlay=False)
    keep = (resize_mask(mask, 8) == 0).expand_as(base)
    assert (raw_base[keep] - resize(big, 8).expand_as(base)[keep]).abs().max() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cascade_inpainting_on_cuda_keeps_the_known_pixels():
    c, cond = Cascade(stage(), sr_stage()), condition(2)
    for s in (c.base, c.sr):
        s.model.cuda()
    big, mask = image(32, seed=6), half_mask(32, cols=13)  # CPU inputs, as edit.prepare makes them
    base, sr = c.generate(cond, CASCADE_CFG, image=big, mask=mask)
    for out, size in ((base, 8), (sr, 16)):
        keep = (resize_mask(mask, size) == 0).expand_as(out)
        torch.testing.assert_close(out[keep], resize(big, size).expand_as(out)[keep], rtol=0, atol=1e-6)


def test_cascade_with_nothing_to_repaint_returns_the_resized_image_without_sampling(monkeypatch):
    c, cond = Cascade(stage(), sr_stage()), condition(2)
    big = image(32, seed=6)

    def refuse(*args, **kwargs):
        raise AssertionError("sampled although nothing is repainted")

    monkeypatch.setattr(Stage, "sample", refuse)
    base, sr = c.generate(cond, CASCADE_CFG, image=big, mask=torch.zeros(1, 1, 32, 32))
    assert torch.equal(base, resize(big, 8).expand(2, -1, -1, -1))
    assert torch.equal(sr, resize(big, 16).expand(2, -1, -1, -1))


def test_cascade_image_at_strength_one_without_a_mask_is_text_to_image():
    c, cond = Cascade(stage(), sr_stage()), condition(2)
    plain = c.generate(cond, CASCADE_CFG)
    given = c.generate(cond, CASCADE_CFG, image=image(32, seed=6))
    assert torch.equal(plain[0], given[0]) and torch.equal(plain[1], given[1])


# ----------------------------------------------------------------------------------- edit inputs


def rgb_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def unit(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1], computed here independently of to_tensor."""
    return torch.from_numpy(arr.astype(np.float64) / 127.5 - 1).permute(2, 0, 1)[None].float()


def test_unreadable_or_missing_inputs_name_the_option(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ConfigError, match=r"^--init-image: .*notes\.txt is not an image Pillow can read$"):
        prepare(text, image_what="--init-image")
    with pytest.raises(ConfigError, match=r"^--init-image: .*missing\.png does not exist$"):
        prepare(tmp_path / "missing.png", image_what="--init-image")
    with pytest.raises(ConfigError, match=r"^--mask: .*notes\.txt is not an image"):
        prepare(png(rgb_array(8, 8)), text, mask_what="--mask")
    with pytest.raises(ConfigError, match="^image: bytes is empty"):
        prepare(b"")


def test_gray_and_rgba_images_become_rgb_with_a_note():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = prepare(Image.fromarray(gray, "L"))
    assert out.image.shape == (1, 3, 8, 8) and any("grayscale, converted to RGB" in n for n in out.notes)
    expected = torch.from_numpy(gray.astype(np.float64) / 127.5 - 1).float()
    for c in range(3):
        torch.testing.assert_close(out.image[0, c], expected, rtol=0, atol=1e-6)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = rgb_array(8, 8)
    rgba[:4, ..., 3] = 255  # the top half opaque, the bottom half fully transparent
    out = prepare(rgba)
    assert any("transparency composited on white" in n for n in out.notes)
    assert torch.equal(out.image[..., 4:, :], torch.ones(1, 3, 4, 8))  # transparent -> white
    torch.testing.assert_close(out.image[..., :4, :], unit(rgba[:4, :, :3]), rtol=0, atol=1e-6)  # opaque pixels unchanged
    notes: list[str] = []
    assert read_image(Image.fromarray(rgb_array(8, 8)), notes=notes).mode == "RGB" and notes == []


def test_a_mask_of_the_same_aspect_is_resized_another_aspect_is_an_error():
    small = np.zeros((16, 16), dtype=np.uint8)
    small[:, :5] = 255
    notes: list[str] = []
    m = read_mask(small, (32, 32), notes=notes)
    assert m.size == (32, 32) and notes == ["mask: 16x16 resized to the image's 32x32"]
    expected = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # nearest, factor 2
    assert np.array_equal(np.asarray(m), expected)
    out = prepare(rgb_array(32, 32), small)
    assert any("16x16 resized" in n for n in out.notes)
    assert torch.equal(out.mask, torch.from_numpy(expected / 255).float()[None, None])
    with pytest.raises(ConfigError, match=r"^--mask: 32x16 has another shape than the image \(32x32\)"):
        prepare(rgb_array(32, 32), np.zeros((16, 32), dtype=np.uint8), mask_what="--mask")


def test_masks_with_no_white_or_all_white_are_said():
    none = prepare(rgb_array(8, 8), np.zeros((8, 8), dtype=np.uint8))
    assert none.nothing_to_repaint and none.mask is not None
    assert any("has no white, so nothing is repainted" in n for n in none.notes)
    full = prepare(rgb_array(8, 8), np.full((8, 8), 255, dtype=np.uint8))
    assert full.mask is None and not full.nothing_to_repaint
    assert any("is all white" in n for n in full.notes)
    gray = np.full((8, 8), 127, dtype=np.uint8)  # not white: > 127 repaints
    gray[0, 0] = 128
    some = prepare(rgb_array(8, 8), gray)
    assert not some.nothing_to_repaint and float(some.mask.sum()) == 1 and some.mask[0, 0, 0, 0] == 1


def test_a_non_square_image_is_centre_cropped_with_its_mask():
    arr = rgb_array(40, 32)
    mask = np.zeros((32, 40), dtype=np.uint8)
    mask[:, 20:] = 255
    out = prepare(arr, mask)
    assert out.notes == ["image: 40x32 is not square; centre-cropped to 32x32"]
    torch.testing.assert_close(out.image, unit(arr[:, 4:36]), rtol=0, atol=1e-6)
    assert torch.equal(out.mask, torch.from_numpy(mask[:, 4:36] / 255).float()[None, None])


def test_parse_outpaint():
    assert parse_outpaint("16") == {"left": 16, "top": 16, "right": 16, "bottom": 16}
    assert parse_outpaint("left=16,top=8") == {"left": 16, "top": 8, "right": 0, "bottom": 0}
    assert parse_outpaint(" right = 4 ") == {"left": 0, "top": 0, "right": 4, "bottom": 0}
    assert parse_outpaint(None) is None and parse_outpaint("  ") is None
    for spec, message in (
        ("left=x", "^outpaint: left=x is not a whole number of pixels$"),
        ("up=3", "^outpaint: unknown side 'up'; use left, top, right, bottom$"),
        ("0", "^outpaint: every side is 0"),
        ("left=0,top=0", "^outpaint: every side is 0"),
        ("left=-1", "^outpaint: left=-1 must be >= 0$"),
        ("left16", "^outpaint: 'left16' is not SIDE=PIXELS"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_outpaint(spec)


def test_outpaint_pads_to_a_square_and_repaints_only_the_padding():
    arr = rgb_array(32, 32)
    notes: list[str] = []
    canvas, mask = outpaint(Image.fromarray(arr), None, {"left": 16}, notes)
    assert canvas.size == mask.size == (48, 48)  # 48x32, completed to a square: 8 rows above and below
    assert notes == ["outpaint: the 48x32 canvas is not square; extended to 48x48 (that padding is outpainted too)"]
    c, m = np.asarray(canvas), np.asarray(mask)
    assert np.array_equal(c[8:40, 16:], arr)  # the original pixels, exactly
    assert np.array_equal(c[8:40, :16], np.repeat(arr[:, :1], 16, axis=1))  # the edge column repeated
    assert np.array_equal(c[:8, 16:], np.repeat(arr[:1], 8, axis=0)) and np.array_equal(c[40:, 16:], np.repeat(arr[-1:], 8, axis=0))
    expected = np.full((48, 48), 255, dtype=np.uint8)
    expected[8:40, 16:] = 0
    assert np.array_equal(m, expected)
    out = prepare(arr, outpaint_pad="left=16")
    assert out.image.shape == (1, 3, 48, 48)
    torch.testing.assert_close(out.image[..., 8:40, 16:], unit(arr), rtol=0, atol=1e-6)
    assert torch.equal(out.mask, torch.from_numpy(expected / 255).float()[None, None])
    every = prepare(arr, outpaint_pad="16")
    assert every.image.shape == (1, 3, 64, 64) and not every.notes
    torch.testing.assert_close(every.image[..., 16:48, 16:48], unit(arr), rtol=0, atol=1e-6)
    assert float(every.mask[..., 16:48, 16:48].sum()) == 0 and float(every.mask.min()) == 0


def test_feather_keeps_kept_pixels_and_softens_the_repaint_side():
    binary = np.zeros((16, 16), dtype=np.uint8)
    binary[:, 8:] = 255
    soft = np.asarray(feather(Image.fromarray(binary), 2.0)).astype(int)
    assert (soft[:, :8] == 0).all()  # kept pixels stay exactly kept
    assert ((soft[:, 8] > 0) & (soft[:, 8] < 255)).all()  # the repaint side next to the edge is blended
    assert (soft[:, 15] == 255).all() and (np.diff(soft[:, 8:], axis=1) >= 0).all()  # rising to 255 away from it
    assert feather(Image.fromarray(binary), 0) is not None and np.array_equal(np.asarray(feather(Image.fromarray(binary), 0)), binary)
    out = prepare(rgb_array(16, 16), binary, mask_blur=2.0)
    torch.testing.assert_close(out.mask[0, 0], torch.from_numpy(soft / 255).float(), rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="^mask_blur: must be >= 0"):
        prepare(rgb_array(16, 16), binary, mask_blur=-1)


def test_arrays_bytes_and_paths_give_the_same_tensors(tmp_path):
    arr = rgb_array(16, 16, seed=4)
    path = tmp_path / "in.png"
    path.write_bytes(png(arr))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[3:9, 2:12] = 255
    (tmp_path / "mask.png").write_bytes(png(mask))
    ref = prepare(path, tmp_path / "mask.png")
    torch.testing.assert_close(ref.image, unit(arr), rtol=0, atol=1e-6)
    assert torch.equal(ref.image, to_tensor(Image.fromarray(arr)))
    for source, m in (
        (str(path), str(tmp_path / "mask.png")),
        (arr, mask),
        (arr / 255.0, mask / 255.0),
        (arr.astype(np.float32) / 255, mask > 0),
        (png(arr), png(mask)),
        (Image.fromarray(arr), Image.fromarray(mask)),
    ):
        out = prepare(source, m)
        assert torch.equal(out.image, ref.image) and torch.equal(out.mask, ref.mask), type(source)
    with pytest.raises(ConfigError, match=r"^image: a float array must hold values in \[0, 1\]"):
        prepare(arr * 2.0)
