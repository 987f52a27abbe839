"""Parts of training checked against hand-computed references: the learning-rate schedule, the EMA
warm-up, noise-conditioning augmentation, the super-resolution crop grid, and the fp16 loss scale
across a resume.

References:
- lr_at: linear warm-up lr·(step + 1)/warmup, then with p = (step − warmup)/(steps − warmup)
  constant lr, cosine lr·(m + (1 − m)·(1 + cos πp)/2) or linear lr·(m + (1 − m)·(1 − p)), m = min_lr_ratio,
  evaluated at p = 1/4, 1/2, 3/4, 1 where cos πp is exact (±√2/2, 0, −1);
- EMA: ema_k = d_k·ema_{k−1} + (1 − d_k)·w_k with d_k = min(max_decay, (1 + k)/(10 + k)), in exact
  fractions;
- noise_augment: the forward process x = α·low + σ·ε (Imagen §2.5), α and σ of the level from
  NoiseSchedule.alpha_sigma_at, checked by its sample mean and standard deviation (5 standard errors);
- SR crops: an area-average of a crop at a lowres-aligned offset is the crop of the area-average.
"""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from imager import config
from imager.diffusion import NoiseSchedule, ScheduleConfig
from imager.inference import images
from imager.training import loop
from imager.training.config import TrainSR
from imager.training.distributed import Dist
from imager.training.ema import EMA
from imager.training.state import latest_checkpoint
from imager.training.tasks import BaseTask, SRTask
from tests.stages.conftest import data  # noqa: F401  (fixture: tiny OpenMoji shards + minilm embeddings)

F64 = torch.float64
COSINE = NoiseSchedule.from_config(ScheduleConfig(name="cosine"))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ learning rate


def train_cfg(**optim):
    optim = {"lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1, **optim}
    return config.parse({"train_base": {"steps": 110, "optim": optim}}).train_base


def test_lr_warms_up_linearly_from_lr_over_warmup():
    # Reference: lr·(step + 1)/warmup for step < warmup (10 steps): 1e-4 at step 0, lr at step 9.
    for decay in ("constant", "cosine", "linear"):
        cfg = train_cfg(decay=decay)
        for step, expected in ((0, 1e-4), (4, 5e-4), (9, 1e-3), (10, 1e-3)):
            assert loop.lr_at(step, cfg) == pytest.approx(expected, rel=1e-12), (decay, step)


@pytest.mark.parametrize(
    "decay, shape",
    [
        # p = (step − 10)/100 at steps 35, 60, 85, 110 and the last optimizer step 109 (p = 0.99)
        ("constant", {35: 1.0, 60: 1.0, 85: 1.0, 110: 1.0, 109: 1.0}),
        (
            "cosine",
            {35: (2 + math.sqrt(2)) / 4, 60: 0.5, 85: (2 - math.sqrt(2)) / 4, 110: 0.0, 109: (1 + math.cos(0.99 * math.pi)) / 2},
        ),
        ("linear", {35: 0.75, 60: 0.5, 85: 0.25, 110: 0.0, 109: 0.01}),
    ],
)
def test_lr_decays_to_min_lr_ratio_at_the_end(decay, shape):
    # Reference: lr·(m + (1 − m)·shape(p)), m = 0.1; min_lr_ratio·lr is reached at step = steps (110),
    # the schedule's end; the last update (step 109) uses p = 0.99.
    cfg = train_cfg(decay=decay)
    for step, value in shape.items():
        assert loop.lr_at(step, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * value), rel=1e-12, abs=0), (step, value)


def test_lr_without_warmup_starts_at_lr():
    cfg = train_cfg(decay="linear", warmup_steps=0)
    assert loop.lr_at(0, cfg) == pytest.approx(1e-3, rel=1e-12)
    assert loop.lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)  # p = 55/110


# ------------------------------------------------------------------------------------- EMA


class Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=F64))
        self.register_buffer("b", torch.zeros((), dtype=F64))


def test_ema_decay_warms_up_to_its_cap():
    # Reference: d(step) = min(max_decay, (1 + step)/(10 + step)); with max_decay 0.9 the cap binds from
    # step 80 on (81/90 = 0.9).
    ema = EMA(Scalar(), 0.9)
    for step, expected in ((0, 1 / 10), (1, 2 / 11), (5, 6 / 15), (79, 80 / 89), (80, 0.9), (10_000, 0.9)):
        assert ema.decay(step) == pytest.approx(expected, rel=1e-15), step
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\), got 1.0"):
        EMA(Scalar(), 1.0)


def test_ema_weights_follow_the_warm_up_recurrence():
    # Reference: the recurrence with d_1 = 2/11, d_2 = 3/12, d_3 = 4/13 (Trainer updates with the step
    # just completed, 1, 2, 3), from the copied initial weight 0, in exact fractions.
    model = Scalar()
    ema = EMA(model, 0.999)
    assert ema.model is not model and not ema.model.training and not ema.model.w.requires_grad
    expected = Fraction(0)
    for step, (weight, buffer) in enumerate([(1, 5), (2, 6), (4, 7)], start=1):
        with torch.no_grad():
            model.w.fill_(weight)
            model.b.fill_(buffer)
        ema.update(model, step)
        d = Fraction(1 + step, 10 + step)
        expected = d * expected + (1 - d) * weight
        assert float(ema.model.w) == pytest.approx(float(expected), rel=1e-14, abs=0), step
        assert float(ema.model.b) == buffer  # buffers are copied, not averaged
    assert expected == Fraction(471, 143)  # 9/11 → 75/44 → 471/143, by hand


# ---------------------------------------------------------------------------- noise_augment


def test_noise_augment_level_0_is_the_input_exactly():
    low = torch.rand(4, 3, 8, 8, generator=gen(0)) * 2 - 1
    levels = torch.tensor([0.0, 0.3, 0.0, 0.7])
    out = images.noise_augment(low, levels, COSINE, gen(1))
    assert torch.equal(out[[0, 2]], low[[0, 2]])
    assert not torch.allclose(out[[1, 3]], low[[1, 3]])
    assert torch.equal(images.noise_augment(low, torch.zeros(4), COSINE, gen(1)), low)


def test_noise_augment_draws_the_forward_process_at_the_level():
    # Reference: x = α·low + σ·ε, (α, σ) = COSINE.alpha_sigma_at(level). Per image of n = 3·64·64 values,
    # (x − α·low) has mean 0 within 5σ/√n and standard deviation σ within 5/√(2n) relative.
    low = torch.rand(4, 3, 64, 64, generator=gen(2)) * 2 - 1
    levels = torch.tensor([0.05, 0.3, 0.6, 0.95])
    out = images.noise_augment(low, levels, COSINE, gen(3))
    alpha, sigma = (v.float() for v in COSINE.alpha_sigma_at(levels.double()))
    n = low[0].numel()
    for i in range(4):
        residual = out[i] - alpha[i] * low[i]
        assert abs(float(residual.mean())) <= 5 * float(sigma[i]) / math.sqrt(n), i
        assert abs(float(residual.std()) / float(sigma[i]) - 1) <= 5 / math.sqrt(2 * n), i
    # the levels span the schedule: the first keeps most of the image, the last is mostly noise
    assert float(alpha[0]) > 0.99 and float(alpha[3]) < 0.1


def test_noise_augment_same_seed_same_output():
    low = torch.rand(2, 3, 8, 8, generator=gen(4)) * 2 - 1
    levels = torch.tensor([0.2, 0.5])
    a, b, c = (images.noise_augment(low, levels, COSINE, gen(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ------------------------------------------------------------------------------ SR crop grid


def test_sr_crops_sit_on_the_lowres_grid():
    # 16 px outputs from 4 px inputs (factor 4), 8 px crops: offsets in {0, 4, 8} on each axis. Channel 0
    # of every image encodes its pixel position (value y·16 + x), so a crop's corner gives its offset.
    cfg = TrainSR(lowres=4, resolution=16, crop=8, max_aug_level=0.0)
    factor, crop = 4, 8
    position = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    batch = torch.randint(0, 256, (64, 3, 16, 16), generator=gen(7), dtype=torch.uint8)
    batch[:, 0] = position
    full = images.to_unit(batch)  # (64, 3, 16, 16) in [-1, 1], the resolution of the shards
    seen = set()
    for draw in range(4):
        x0, extra = SRTask(cfg).inputs(batch, COSINE, gen(10 + draw))
        assert x0.shape == (64, 3, crop, crop) and extra["lowres"].shape == (64, 3, 2, 2)
        corner = ((x0[:, 0, 0, 0] + 1) * 127.5).round().long()  # (64,) y·16 + x
        offsets = torch.stack([corner // 16, corner % 16], 1)  # (64, 2)
        assert bool((offsets % factor == 0).all()) and int(offsets.max()) <= 16 - crop, offsets.tolist()
        seen |= {tuple(o) for o in offsets.tolist()}
        pooled_full = F.avg_pool2d(full, factor)  # (64, 3, 4, 4): the low-res grid of the whole image
        for i, (y, x) in enumerate(offsets.tolist()):
            torch.testing.assert_close(x0[i], full[i, :, y : y + crop, x : x + crop], rtol=0, atol=0)
            cell = pooled_full[i, :, y // factor : (y + crop) // factor, x // factor : (x + crop) // factor]
            torch.testing.assert_close(extra["lowres"][i], cell, rtol=1e-6, atol=1e-6)  # aug level 0: no noise
    assert seen == {(y, x) for y in (0, 4, 8) for x in (0, 4, 8)}  # every aligned offset is drawn
    # the check can fail: a crop one pixel off the grid does not pool to a cell of the low-res grid
    shifted = F.avg_pool2d(full[:1, :, 1 : 1 + crop, 0:crop], factor)
    assert not torch.allclose(shifted[0], F.avg_pool2d(full, factor)[0, :, 0:2, 0:2])


# ------------------------------------------------------------------------ fp16 loss scale resume


MODEL = {"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [1], "head_dim": 8, "norm_groups": 4, "dropout": 0.1}
SCALER = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "_growth_tracker": 0}


def fp16_trainer(data, ckpt, scaler_state=None):  # noqa: F811
    cfg = config.parse({"train_base": {
        "steps": 6, "batch_size": 4, "resolution": 8, "log_every": 3, "checkpoint_every": 3, "precision": "fp16",
        "model": MODEL, "grid": {"every": 0}, "optim": {"warmup_steps": 2},
    }}).train_base  # fmt: skip
    trainer = loop.Trainer(
        cfg, BaseTask(cfg), shards_dir=data["shards"], cache_dir=data["emb"], ckpt_dir=ckpt, seed=0, dist=Dist()
    )
    assert trainer.scaler.is_enabled()
    if scaler_state is not None:
        trainer.scaler.load_state_dict(scaler_state)
    return trainer


def state(trainer) -> dict[str, torch.Tensor]:
    return {**trainer.model.state_dict(), **{f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()}}


def test_fp16_loss_scale_survives_a_resume_bit_exactly(data, tmp_path):  # noqa: F811
    # In 6 clean steps the default scaler (2¹⁶, growing every 2000 steps) never changes, and a resume
    # that dropped its state would pass unnoticed. Both runs start from a scaler at 2⁹ that doubles
    # every 2 steps: at the step-3 checkpoint it is at 2¹⁰ with 1 step towards the next doubling.
    straight = fp16_trainer(data, tmp_path / "straight", SCALER)
    straight.run(lambda metrics, step: None)
    reference, final_scaler = state(straight), straight.scaler.state_dict()
    assert final_scaler["scale"] == 4096.0  # 2⁹ doubled after steps 2, 4 and 6 (no overflow)

    ckpt = tmp_path / "straight"
    saved = json.loads((ckpt / "step-00000003" / "state.json").read_text())["grad_scaler"]
    assert (saved["scale"], saved["_growth_tracker"], saved["growth_interval"]) == (1024.0, 1, 2)

    def resumed_run(name: str, drop_scaler: bool = False):
        run = tmp_path / name
        shutil.copytree(ckpt, run)
        shutil.rmtree(run / "step-00000006")  # what a kill after the step-3 checkpoint leaves
        (run / "latest").write_text("step-00000003\n")
        if drop_scaler:  # the checkpoint without its loss scale: the resume starts a fresh scaler
            meta = json.loads((run / "step-00000003" / "state.json").read_text())
            (run / "step-00000003" / "state.json").write_text(json.dumps({**meta, "grad_scaler": None}))
        trainer = fp16_trainer(data, run)
        assert trainer.resumed_from == 3 and latest_checkpoint(run).name == "step-00000003"
        start_scale = trainer.scaler.get_scale()
        trainer.run(lambda metrics, step: None)
        return trainer, start_scale

    resumed, start_scale = resumed_run("resumed")
    assert start_scale == 1024.0
    assert resumed.scaler.state_dict() == final_scaler
    after = state(resumed)
    differ = [k for k in reference if not torch.equal(reference[k], after[k])]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ, e.g. {differ[0]}"

    # The comparison can fail: the same resume without the saved scaler ends elsewhere.
    fresh, start_scale = resumed_run("fresh", drop_scaler=True)
    assert start_scale == 65536.0
    assert any(not torch.equal(reference[k], v) for k, v in state(fresh).items())
