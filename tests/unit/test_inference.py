"""imager.inference: one model sampled on its own device and dtype, guidance against the null
condition or a negative prompt, thresholding, the cascade's batching and seeds, flat overrides."""

from __future__ import annotations

import pytest
import torch

from imager.diffusion import NoiseSchedule, ScheduleConfig
from imager.errors import ConfigError, SamplerError
from imager.inference import Cascade, CascadeSampling, SRSampling, Stage, StageSampling, check_sampling, resolve_device
from imager.inference.cascade import encode_negative
from imager.inference.config import with_overrides
from imager.models import UNet
from imager.text.base import TextEmbeddings
from tests.unit.test_unet import condition, randomized, tiny

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig(name="cosine", timesteps=100))


def stage(seed: int = 0, **config) -> Stage:
    torch.manual_seed(seed)
    model = randomized(UNet(tiny(null_embedding="learned", **config)), seed)
    return Stage(model=model, schedule=SCHEDULE, prediction="v", resolution=8)


def sr_stage(seed: int = 1) -> Stage:
    torch.manual_seed(seed)
    model = randomized(UNet(tiny(null_embedding="learned", super_resolution=True)), seed)
    return Stage(model=model, schedule=SCHEDULE, prediction="v", resolution=16, lowres=8, aug_level=0.1)


CFG = StageSampling(sampler="dpmpp_2m", steps=4, guidance=3.0)


def test_same_seed_same_images_other_seed_other_images():
    s, cond = stage(), condition(2)
    a, b, c = s.sample(cond, CFG, seed=5), s.sample(cond, CFG, seed=5), s.sample(cond, CFG, seed=6)
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.abs().max() <= 1


def test_negative_prompt_replaces_the_null_condition_in_guidance():
    s, cond = stage(), condition(2)
    plain = s.sample(cond, CFG, seed=0)
    null = tuple(t.detach().clone() for t in s.model.null_condition(2))
    assert torch.equal(s.sample(cond, CFG, seed=0, negative=null), plain)  # the null condition given explicitly
    other = condition(2, seed=9)
    negative = s.sample(cond, CFG, seed=0, negative=other)
    assert (negative - plain).abs().max() > 1e-3
    # A row with an all-False mask stands for "no negative prompt": it gets the null condition.
    mixed = (other[0].clone(), other[1].clone(), other[2].clone())
    mixed[1][1] = False
    out = s.sample(cond, CFG, seed=0, negative=mixed)
    assert torch.equal(out[0], negative[0]) and torch.equal(out[1], plain[1])
    # Without guidance the unconditional branch is never evaluated: the negative prompt changes nothing.
    no_cfg = CFG.model_copy(update={"guidance": 1.0})
    assert torch.equal(s.sample(cond, no_cfg, seed=0, negative=other), s.sample(cond, no_cfg, seed=0))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_threshold_bounds_every_x0_the_sampler_sees(mode):
    s, cond = stage(), condition(2)
    # Guidance 30 drives the guided x̂0 far outside [-1, 1] on these random weights.
    seen: dict[str, list[torch.Tensor]] = {"none": [], mode: []}
    for name in seen:
        cfg = CFG.model_copy(update={"guidance": 30.0, "threshold": name, "percentile": 0.9})
        s.sample(cond, cfg, seed=0, on_denoise=lambda x0, name=name: seen[name].append(x0.clone()))
    assert max(x.abs().max() for x in seen["none"]) > 1.5
    assert all(x.abs().max() <= 1 + 1e-6 for x in seen[mode])
    assert len(seen[mode]) == len(seen["none"]) == 4  # one per denoiser call of 4-step DPM-Solver++(2M)


def test_the_network_runs_in_its_own_dtype_and_the_state_stays_float32():
    s, cond = stage(), condition(2)
    ref = s.sample(cond, CFG, seed=0)
    s64 = Stage(model=s.model.double(), schedule=SCHEDULE, prediction="v", resolution=8)
    out = s64.sample(cond, CFG, seed=0)  # float32 condition in, float64 network
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


def test_sampler_options_reach_the_sampler_and_unknown_ones_fail_early():
    s, cond = stage(), condition(1)
    ddim = StageSampling(sampler="ddim", steps=4, guidance=1.0)
    assert not torch.equal(s.sample(cond, ddim, seed=0), s.sample(cond, ddim.model_copy(update={"eta": 1.0}), seed=0))
    with pytest.raises(SamplerError, match="sampler 'dpmpp_2m' takes no option 'eta'"):
        check_sampling(StageSampling(sampler="dpmpp_2m", eta=0.5))
    with pytest.raises(SamplerError, match="takes no option 's_churn'"):
        check_sampling(StageSampling(sampler="ddim", options={"s_churn": 1.0}))
    check_sampling(StageSampling(sampler="heun", options={"s_churn": 1.0}))


def test_cascade_batches_are_seeded_by_their_first_image():
    c = Cascade(stage(), sr_stage())
    cond = condition(4)
    cfg = CascadeSampling(sampler="ddim", base=StageSampling(steps=3), sr=SRSampling(steps=2), seed=10, batch_size=2)
    base, sr = c.generate(cond, cfg)
    assert base.shape == (4, 3, 8, 8) and sr.shape == (4, 3, 16, 16) and base.device.type == "cpu"
    one = cfg.model_copy(update={"batch_size": 4})
    first, _ = c.generate(tuple(t[:2] for t in cond), one)
    second, second_sr = c.generate(tuple(t[2:] for t in cond), one.model_copy(update={"seed": 12}))
    assert torch.equal(base, torch.cat([first, second])) and torch.equal(sr[2:], second_sr)
    low, none = c.generate(cond, cfg, use_sr=False)
    assert none is None and torch.equal(low, base)


def test_cascade_stage_settings_take_the_cascade_sampler_unless_they_name_one():
    cfg = CascadeSampling(sampler="ddim", sr=SRSampling(sampler="euler"))
    assert cfg.stage("base").sampler == "ddim" and cfg.stage("sr").sampler == "euler"


def test_encode_negative_marks_empty_prompts_for_the_null_condition():
    class Encoder:
        def encode(self, texts):
            n = len(texts)
            return TextEmbeddings(torch.ones(n, 3, 2), torch.ones(n, 3, dtype=torch.bool), torch.ones(n, 4))

    assert encode_negative(Encoder(), ["", "  "]) is None
    tokens, mask, pooled = encode_negative(Encoder(), ["blurry", ""])
    assert mask[0].all() and not mask[1].any() and tokens[1].abs().sum() == 0 and pooled[0].sum() == 4


def test_flat_overrides_name_the_option():
    cfg = CascadeSampling()
    out = with_overrides(cfg, {"steps": 7, "threshold": "dynamic", "sr_steps": 3, "seed": None})
    assert out.base.steps == 7 and out.sr.steps == 3 and out.base.threshold == out.sr.threshold == "dynamic"
    assert out.seed == cfg.seed
    with pytest.raises(ConfigError, match=r"^--sr-steps: input should be less than or equal to 1000, got 2000$"):
        with_overrides(cfg, {"sr_steps": 2000}, cli=True)
    with pytest.raises(ConfigError, match=r"^params: threshold: input should be 'none', 'static' or 'dynamic', got 'soft'$"):
        with_overrides(cfg, {"threshold": "soft"})
    with pytest.raises(ConfigError, match="params: colour: unknown option"):
        with_overrides(cfg, {"colour": 1})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="^--device: unknown device 'gpu'"):
        resolve_device("gpu", "--device")
    with pytest.raises(ConfigError, match="^device: 'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^params.yaml: evaluate.device: 'cuda' asked for, but torch sees no CUDA device"):
            resolve_device("cuda", "params.yaml: evaluate.device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_stage_gets_the_same_noise_and_close_images():
    s, cond = stage(), condition(2)
    cpu = s.sample(cond, CFG, seed=3)
    gpu = Stage(model=s.model.cuda(), schedule=SCHEDULE, prediction="v", resolution=8).sample(cond, CFG, seed=3)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


class HashEncoder:
    """A stand-in text encoder: a fixed random embedding per text, of the tiny models' shapes."""

    id, max_length, token_dim, pooled_dim = "hash", 6, 12, 10

    def encode(self, texts):
        rows = [torch.Generator().manual_seed(sum(map(ord, t)) + 1) for t in texts]
        tokens = torch.stack([torch.randn(6, 12, generator=g) for g in rows])
        pooled = torch.stack([torch.randn(10, generator=g) for g in rows])
        return TextEmbeddings(tokens, torch.ones(len(texts), 6, dtype=torch.bool), pooled)


def test_the_mlflow_model_takes_negative_prompts_and_sampling_params():
    import numpy as np
    import pandas as pd

    from imager.serving import CascadeModel

    model = CascadeModel()
    model.cascade, model.encoder = Cascade(stage(), sr_stage()), HashEncoder()
    model.sampling = CascadeSampling(sampler="ddim", base=StageSampling(steps=3, guidance=3.0), sr=SRSampling(steps=2), batch_size=4)
    plain = model.predict(None, ["red", "blue"])
    assert plain.shape == (2, 16, 16, 3) and plain.dtype == np.uint8
    negative = model.predict(None, ["red", "blue"], params={"negative_prompt": "green"})
    assert not np.array_equal(negative[0], plain[0]) and not np.array_equal(negative[1], plain[1])
    frame = model.predict(None, pd.DataFrame({"prompt": ["red", "blue"], "negative_prompt": ["green", None]}))
    assert np.array_equal(frame[0], negative[0]) and np.array_equal(frame[1], plain[1])
    assert np.array_equal(model.predict(None, "red"), plain[:1])
    assert not np.array_equal(model.predict(None, ["red", "blue"], params={"steps": 4, "seed": 1}), plain)
    with pytest.raises(ConfigError, match="params: threshold: input should be"):
        model.predict(None, ["red"], params={"threshold": "soft"})


def test_an_empty_prompt_row_samples_from_the_null_condition():
    from imager.inference import encode_prompts

    s = stage()
    cond, _ = encode_prompts(HashEncoder(), ["red", ""], allow_empty=True)
    assert cond[1][1].sum() == 0 and cond[1][0].all()  # the empty row: an all-False mask
    null = tuple(t.detach().clone() for t in s.model.null_condition(2))
    out, unconditional = s.sample(cond, CFG, seed=0), s.sample(null, CFG, seed=0)
    assert torch.equal(out[1], unconditional[1]) and not torch.allclose(out[0], unconditional[0])
    with pytest.raises(ConfigError, match="prompt 2 is empty"):
        encode_prompts(HashEncoder(), ["red", " "])
    assert torch.equal(encode_prompts(HashEncoder(), ["red", "blue"], allow_empty=True)[0][0], encode_prompts(HashEncoder(), ["red", "blue"])[0][0])
