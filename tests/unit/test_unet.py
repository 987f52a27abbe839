"""imager.models: the text-conditional UNet, its config, its null condition and its checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from imager.config import format_validation_error
from imager.diffusion import (
    LossConfig,
    NoiseSchedule,
    ScheduleConfig,
    diffusion_loss,
    q_sample,
)
from imager.errors import CheckpointError
from imager.models import UNet, UNetConfig, load_model, read_checkpoint_meta, save_model
from imager.models.blocks import timestep_embedding
from tests.conftest import REPO

TINY = {
    "base_channels": 16, "channel_mults": (1, 2), "num_res_blocks": 1, "attention_levels": (1,), "norm_groups": 8,
    "head_dim": 8, "text_dim": 12, "pooled_dim": 10, "context_length": 6,
}  # fmt: skip
L, D, P = 6, 12, 10


def tiny(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY, **overrides})


def randomized(model: UNet, seed: int = 0) -> UNet:
    """Fill the zero-initialised layers with noise: a fresh UNet outputs exactly 0 (zero conv_out,
    identity attention), so dependence on an input is only visible in a model with trained-like weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def condition(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, L, D) zero at padding, mask (B, L) with 2..L real tokens, pooled (B, P)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(L) < torch.randint(2, L + 1, (b, 1), generator=gen)
    tokens = torch.randn(b, L, D, generator=gen) * mask[..., None]
    return tokens, mask, torch.randn(b, P, generator=gen)


def inputs(b: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens, mask, pooled = condition(b, seed)
    return {"x": torch.randn(b, 3, *size, generator=gen), "t": torch.rand(b, generator=gen), "tokens": tokens, "mask": mask, "pooled": pooled}


def sr_inputs(b: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 100)
    low = (size[0] // 2, size[1] // 2)
    return {**inputs(b, size, seed), "lowres": torch.rand(b, 3, *low, generator=gen) * 2 - 1, "aug_level": torch.rand(b, generator=gen)}


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


# ------------------------------------------------------------------------------------ embedding


def test_timestep_embedding_is_cos_sin_of_scaled_time():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 9)  # odd dim: one zero column of padding
    assert emb.shape == (3, 9) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 5))  # cos 0 = 1, sin 0 = 0
    # first frequency is 1: the pair is (cos 1000 t, sin 1000 t), ADM's integer-timestep scale
    torch.testing.assert_close(emb[1, [0, 4]], torch.tensor([math.cos(500.0), math.sin(500.0)]), atol=1e-4, rtol=0)
    assert emb.abs().max() <= 1.0 and torch.all(emb[:, -1] == 0)


# ---------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("levels", [(1,), (0, 1)])
def test_base_output_shape(levels):
    model = UNet(tiny(attention_levels=levels, out_channels=4)).eval()
    out = model(**inputs(3))
    assert out.shape == (3, 4, 16, 16) and out.dtype == torch.float32
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: a fresh model predicts 0


def test_sr_model_is_fully_convolutional_over_crop_sizes():
    model = randomized(UNet(tiny(super_resolution=True)))
    for size in [(16, 16), (24, 32)]:
        out = model(**sr_inputs(2, size))
        assert out.shape == (2, 3, *size) and torch.isfinite(out).all()
    # lowres already at x's size (an aligned crop of the upsampled image) is used as is
    args = sr_inputs(2, (16, 16))
    args["lowres"] = torch.nn.functional.interpolate(args["lowres"], size=(16, 16), mode="bilinear", align_corners=False)
    assert model(**args).shape == (2, 3, 16, 16)


def test_sr_output_depends_on_lowres_and_aug_level():
    model = randomized(UNet(tiny(super_resolution=True)))
    args = sr_inputs()
    with torch.no_grad():
        ref = model(**args)
        assert differs(model(**{**args, "lowres": args["lowres"].flip(-1)}), ref)
        assert differs(model(**{**args, "aug_level": 1 - args["aug_level"]}), ref)


def test_output_depends_on_time_tokens_and_pooled():
    model = randomized(UNet(tiny()))
    args = inputs()
    with torch.no_grad():
        ref = model(**args)
        torch.testing.assert_close(model(**args), ref, atol=0, rtol=0)  # deterministic in eval mode
        assert differs(model(**{**args, "t": 1 - args["t"]}), ref)
        # (a random change: a constant shift of a token would vanish in the tokens' LayerNorm)
        assert differs(model(**{**args, "tokens": args["tokens"] + torch.randn(2, L, D) * args["mask"][..., None]}), ref)
        assert differs(model(**{**args, "pooled": -args["pooled"]}), ref)


# -------------------------------------------------------------------------------------- masking


def test_padding_tokens_change_nothing_real_tokens_do():
    model = randomized(UNet(tiny(attention_levels=(0, 1))))
    args = inputs(4)
    mask = args["mask"] = torch.arange(L) < torch.tensor([[1], [2], [3], [5]])  # every row has padding
    args["tokens"] = args["tokens"] * mask[..., None]
    with torch.no_grad():
        ref = model(**args)
        padded = args["tokens"] + 100.0 * torch.randn(4, L, D) * ~mask[..., None]
        torch.testing.assert_close(model(**{**args, "tokens": padded}), ref, atol=1e-6, rtol=1e-6)
        real = args["tokens"] + torch.randn(4, L, D) * mask[..., None]
        assert differs(model(**{**args, "tokens": real}), ref)


def test_all_padding_row_stays_finite():
    model = randomized(UNet(tiny()))
    args = inputs(2)
    args["mask"] = torch.zeros(2, L, dtype=torch.bool)
    with torch.no_grad():
        assert torch.isfinite(model(**args)).all()


# --------------------------------------------------------------------------------- null condition


def test_learned_null_drop_equals_explicit_null_and_trains():
    model = randomized(UNet(tiny(null_embedding="learned")))
    names = dict(model.named_parameters())
    assert {"null_tokens", "null_pooled"} <= set(names) and "null_mask" in model.state_dict()
    assert 0 < model.null_tokens.abs().max() < 1  # initialised small (then randomized() left it: not all zero)
    args = inputs(4)
    null_tokens, null_mask, null_pooled = model.null_condition(4)
    assert null_tokens.shape == (4, L, D) and null_mask.shape == (4, L) and null_pooled.shape == (4, P)
    assert null_mask.all()
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = model(**args, drop=drop)
        uncond = model(args["x"], args["t"], null_tokens, null_mask, null_pooled)
        cond = model(**args)
    torch.testing.assert_close(mixed[drop], uncond[drop], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[~drop], cond[~drop], atol=1e-6, rtol=1e-6)
    model(**args, drop=drop).square().mean().backward()
    assert model.null_tokens.grad.abs().sum() > 0 and model.null_pooled.grad.abs().sum() > 0


def test_cached_null_comes_from_the_cache_and_is_saved():
    model = randomized(UNet(tiny()))
    args = inputs(3)
    with pytest.raises(RuntimeError, match="set_null_condition"):
        model(**args, drop=torch.ones(3, dtype=torch.bool))
    empty_tokens, empty_mask, empty_pooled = condition(1, seed=7)
    model.set_null_condition(empty_tokens[0].half(), empty_mask[0], empty_pooled[0].half())  # cache is fp16
    state = model.state_dict()
    assert {"null_tokens", "null_mask", "null_pooled", "null_is_set"} <= set(state)
    assert "null_tokens" not in dict(model.named_parameters())
    torch.testing.assert_close(state["null_tokens"], empty_tokens[0].half().float(), atol=0, rtol=0)
    with torch.no_grad():
        dropped = model(**args, drop=torch.ones(3, dtype=torch.bool))
        explicit = model(args["x"], args["t"], *model.null_condition(3))
    torch.testing.assert_close(dropped, explicit, atol=1e-6, rtol=1e-6)


def test_set_null_condition_checks_its_inputs():
    model = UNet(tiny())
    tokens, mask, pooled = condition(1)
    with pytest.raises(ValueError, match=r"tokens must have shape \(6, 12\), got \(5, 12\)"):
        model.set_null_condition(tokens[0, :5], mask[0], pooled[0])
    with pytest.raises(ValueError, match="mask must be bool"):
        model.set_null_condition(tokens[0], mask[0].float(), pooled[0])
    with pytest.raises(ValueError, match="null_embedding is 'learned'"):
        UNet(tiny(null_embedding="learned")).set_null_condition(tokens[0], mask[0], pooled[0])


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x": torch.randn(2, 3, 15, 16)}, "x: H and W must be multiples of 2"),
        ({"x": torch.randn(2, 1, 16, 16)}, r"x: expected \(B, 3, H, W\)"),
        ({"tokens": torch.randn(2, L, D + 1)}, "tokens: expected .* D = text_dim"),
        ({"tokens": torch.randn(2, L + 1, D)}, "tokens: expected .*L = context_length"),
        ({"mask": torch.ones(2, L)}, "mask: expected dtype torch.bool"),
        ({"pooled": torch.randn(2, P + 1)}, "pooled: expected"),
        ({"t": torch.rand(3)}, r"t: expected \(B,\) = \(2,\)"),
        ({"lowres": torch.randn(2, 3, 8, 8)}, "given to a base model"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    with pytest.raises(ValueError, match=message):
        UNet(tiny())(**{**inputs(2), **change})


def test_sr_model_requires_lowres_and_aug_level():
    model = UNet(tiny(super_resolution=True))
    with pytest.raises(ValueError, match="lowres .* and aug_level .* are required"):
        model(**inputs(2))
    with pytest.raises(ValueError, match=r"lowres: expected \(2, 3, h, w\)"):
        model(**{**sr_inputs(2), "lowres": torch.randn(2, 1, 8, 8)})


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attention_levels": (2,)}, "cfg: attention_levels: level 2 is out of range for 2 levels in channel_mults (valid: 0..1)"),
        ({"base_channels": 20}, "cfg: base_channels: must be a multiple of norm_groups (8), got 20"),
        ({"head_dim": 12}, "cfg: head_dim: must divide the 32 channels of attention level 1, got 12"),
        ({"channel_mults": ()}, "cfg: channel_mults: must list at least one level, got ()"),
        ({"channel_mults": (1, 0)}, "cfg: channel_mults: every multiplier must be a positive integer, got (1, 0)"),
        ({"attention_levels": (1, 1)}, "cfg: attention_levels: levels must not repeat, got (1, 1)"),
        ({"dropout": 1.0}, "cfg: dropout: must be < 1, got 1.0"),
        ({"null_embedding": "zeros"}, "cfg: null_embedding: must be one of 'cached' or 'learned', got 'zeros'"),
        ({"text_dims": 12}, "cfg: text_dims: unknown key"),
        ({"arch": "diffusers", "efficient": True},
         "cfg: efficient: Imagen's Efficient U-Net order is Imager's own (arch: imager), not diffusers'"),
        ({"arch": "ddpm"}, "cfg: arch: must be one of 'imager' or 'diffusers', got 'ddpm'"),
        ({"arch": "diffusers", "patch_size": 2},
         "cfg: patch_size: patches are Imager's own network's (arch: imager); diffusers' takes 1"),
        ({"patch_size": 0}, "cfg: patch_size: must be >= 1, got 0"),
    ],
)
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ValidationError) as info:
        tiny(**change)
    assert format_validation_error(info.value, "cfg") == message


def test_config_defaults_round_trip_and_resolution_multiple():
    cfg = UNetConfig()
    assert cfg.resolution_multiple == 4 and cfg.channels == (64, 128, 128)
    assert UNetConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert UNetConfig.model_validate({"channel_mults": [1, 2, 2, 4], "attention_levels": [3, 1]}).attention_levels == (1, 3)
    with pytest.raises(ValidationError):
        cfg.base_channels = 32  # frozen


# ---------------------------------------------------------------------- Efficient U-Net order


def block_input_sides(model: UNet, args: dict) -> list[int]:
    """The spatial side of every ResBlock's input in one forward pass, in call order."""
    from imager.models.blocks import ResBlock

    sides: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _, a: sides.append(a[0].shape[-1])) for m in model.modules() if isinstance(m, ResBlock)]
    with torch.no_grad():
        model(**args)
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize("sr", [False, True])
def test_efficient_order_runs_every_block_at_half_the_side_with_the_same_parameters(sr):
    standard, efficient = tiny(super_resolution=sr), tiny(super_resolution=sr, efficient=True)
    assert (standard.resolution_multiple, efficient.resolution_multiple) == (2, 4)
    args = sr_inputs(2, (16, 16)) if sr else inputs(2, (16, 16))
    a, b = randomized(UNet(standard)), randomized(UNet(efficient))
    assert sorted(set(block_input_sides(a, args))) == [8, 16]
    assert sorted(set(block_input_sides(b, args))) == [4, 8]  # level 0 at 8 px, level 1 (and middle) at 4 px
    out = b(**args)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(b) / count(a) - 1) < 0.05  # the same blocks; one more down/up-sampling conv pair
    with pytest.raises(ValueError, match=r"x: H and W must be multiples of 4"):
        b(**(sr_inputs(2, (8, 10)) if sr else inputs(2, (8, 10))))


def test_efficient_order_adds_the_stem_features_at_full_resolution():
    """The stem's full-resolution features reach the output layers: without them the prediction
    changes, and a one-pixel change of x still changes the prediction at that pixel."""
    torch.manual_seed(0)
    model = randomized(UNet(tiny(efficient=True)))
    args = inputs()
    with torch.no_grad():
        ref = model(**args)
        x = args["x"].clone()
        x[:, :, 5, 6] += 1.0
        assert (model(**{**args, "x": x}) - ref).abs()[:, :, 5, 6].max() > 1e-4
        stem_skip = model.stem_skip
        model.stem_skip = _Zero()
        assert differs(model(**args), ref)
        model.stem_skip = stem_skip
        torch.testing.assert_close(model(**args), ref, atol=0, rtol=0)


@pytest.mark.parametrize("sr", [False, True])
def test_patches_run_the_network_at_a_pth_of_the_side(sr):
    """patch_size 2: every layer, stem and output conv included, runs at half the side; space-to-depth
    in and depth-to-space out keep each output pixel tied to its own patch position."""
    plain, patched = tiny(super_resolution=sr), tiny(super_resolution=sr, patch_size=2)
    assert (plain.resolution_multiple, patched.resolution_multiple) == (2, 4)
    args = sr_inputs(2, (16, 16)) if sr else inputs(2, (16, 16))
    model = randomized(UNet(patched))
    assert sorted(set(block_input_sides(model, args))) == [4, 8]
    sides = []
    hooks = [m.register_forward_pre_hook(lambda _, a: sides.append(a[0].shape[-1])) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        out = model(**args)
    for h in hooks:
        h.remove()
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all() and max(sides) == 8
    assert model.conv_in.in_channels == 4 * (6 if sr else 3) and model.conv_out.out_channels == 4 * 3
    # depth-to-space: output channel c·4 + 2i + j of conv_out is pixel (2y + i, 2x + j) of channel c
    with torch.no_grad():
        model.conv_out.weight[1:].zero_()
        model.conv_out.bias[1:].zero_()
        only = model(**args)
    assert only[:, 0, 0::2, 0::2].abs().max() > 1e-4 and only[:, 0, 1::2].abs().max() == 0 and only[:, 1:].abs().max() == 0
    with pytest.raises(ValueError, match=r"x: H and W must be multiples of 4"):
        model(**(sr_inputs(2, (8, 10)) if sr else inputs(2, (8, 10))))


class _Zero(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_config_imports_without_torch():
    code = "import sys; from imager.models import UNetConfig; UNetConfig(); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("sr, efficient, patch", [(False, False, 1), (True, False, 1), (False, True, 1), (True, False, 2)])
def test_save_load_gives_identical_outputs(tmp_path, sr, efficient, patch):
    cfg = tiny(super_resolution=sr, null_embedding="cached", efficient=efficient, patch_size=patch)
    model = randomized(UNet(cfg))
    tokens, mask, pooled = condition(1, seed=3)
    model.set_null_condition(tokens[0], mask[0], pooled[0])
    path = tmp_path / "ckpt" / "model.safetensors"
    save_model(model, path, extra={"step": 12, "objective": "eps"})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary left behind

    loaded = load_model(path)
    assert loaded.config == cfg and not loaded.training
    assert read_checkpoint_meta(path) == (cfg, {"step": 12, "objective": "eps"})
    args = sr_inputs(3) if sr else inputs(3)
    drop = torch.tensor([True, False, False])
    with torch.no_grad():
        assert torch.equal(loaded(**args), model(**args))
        assert torch.equal(loaded(**args, drop=drop), model(**args, drop=drop))  # null condition came back


def test_load_errors_name_the_file(tmp_path):
    def error_of(path) -> str:
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message
        return message

    assert "checkpoint not found" in error_of(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    assert "not a readable safetensors file" in error_of(garbage)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    assert "no imager metadata" in error_of(bare)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"imager": json.dumps({"imager_model": "unet", "config": {"head_dim": 0}})})
    assert "invalid model config in metadata: head_dim" in error_of(wrong)
    small = tmp_path / "small.safetensors"
    state = UNet(tiny()).state_dict()
    save_file(dict(state), str(small), metadata={"imager": json.dumps({"imager_model": "unet", "config": tiny(base_channels=32).model_dump(mode="json")})})
    assert "weights do not match the stored config" in error_of(small)


# -------------------------------------------------------------------------------------- overfit


def shapes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n images (n, 3, size, size) in [-1, 1]: a coloured square or disc on a coloured background."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for i in range(n):
        bg, fg = torch.rand(2, 3, 1, 1, generator=gen) * 2 - 1
        cy, cx = torch.randint(4, size - 4, (2,), generator=gen).tolist()
        r = int(torch.randint(2, 5, (1,), generator=gen))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        square = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        images.append(torch.where(disc if i % 2 else square, fg, bg))
    return torch.stack(images)


@pytest.mark.slow  # trains a model: the full suite only
def test_tiny_model_overfits_eight_images():
    """eps-prediction on the library's cosine schedule (imager.diffusion: q_sample + diffusion_loss):
    the loss on a fixed set of (t, eps) draws must fall at least 10×. A fresh model predicts 0, so
    the loss starts at E[eps^2] = 1; this setup reaches ~0.05 (~19×)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x0 = shapes(8, 16, gen)  # (8, 3, 16, 16)
    tokens, mask, pooled = condition(8, seed=1)
    model = UNet(tiny(null_embedding="learned"))
    schedule = NoiseSchedule.from_config(ScheduleConfig(name="cosine"))
    objective = LossConfig(prediction="eps", weighting="uniform")

    def loss(x0, index, eps, tokens, mask, pooled) -> torch.Tensor:
        alpha, sigma = schedule.alpha[index].float(), schedule.sigma[index].float()  # (B,)
        x_t = q_sample(x0, alpha, sigma, eps)
        out = model(x_t, schedule.t_of_index(index).float(), tokens, mask, pooled)
        return diffusion_loss(out, x0, eps, alpha, sigma, objective).mean()

    k = 8  # fixed evaluation draws per image
    fixed = torch.Generator().manual_seed(1)
    i_eval, eps_eval = torch.randint(0, 1000, (8 * k,), generator=fixed), torch.randn(8 * k, 3, 16, 16, generator=fixed)
    cond_eval = (tokens.repeat(k, 1, 1), mask.repeat(k, 1), pooled.repeat(k, 1))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            value = loss(x0.repeat(k, 1, 1, 1), i_eval, eps_eval, *cond_eval).item()
        model.train()
        return value

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch, cond = x0.repeat(2, 1, 1, 1), (tokens.repeat(2, 1, 1), mask.repeat(2, 1), pooled.repeat(2, 1))
    for _ in range(300):
        value = loss(batch, torch.randint(0, 1000, (len(batch),)), torch.randn_like(batch), *cond)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    after = evaluate()
    assert before == pytest.approx(1.0, abs=0.05)
    assert after < before / 10, f"loss fell only from {before:.4f} to {after:.4f}"
