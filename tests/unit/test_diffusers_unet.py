"""imager.models.diffusers_unet: diffusers' UNet2DConditionModel behind Imager's network interface."""

from __future__ import annotations

import sys

import pytest
import torch

from imager.errors import ConfigError
from imager.models import UNet, build_denoiser, load_model, save_model
from imager.models.diffusers_unet import DiffusersUNet, diffusers_unet_kwargs
from tests.unit.test_unet import D, L, condition, differs, inputs, randomized, sr_inputs, tiny

diffusers = pytest.importorskip("diffusers")


def baseline(**overrides) -> DiffusersUNet:
    torch.manual_seed(0)
    return build_denoiser(tiny(arch="diffusers", **overrides))


def test_arch_picks_the_network_and_mirrors_the_config():
    assert type(build_denoiser(tiny())) is UNet
    model = baseline()
    assert type(model) is DiffusersUNet
    net = model.net
    assert tuple(net.config.block_out_channels) == (16, 32) and net.config.layers_per_block == 1
    assert list(net.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert net.config.cross_attention_dim == D
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(model) / count(UNet(tiny())) - 1) < 0.25  # matched shape, not matched parameters exactly


def test_forward_is_the_diffusers_model_at_1000_t_with_the_token_mask():
    """The wrapper feeds the plain diffusers model t·1000 and the tokens with their padding mask."""
    model = randomized(baseline())
    plain = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(model.config)).eval()
    plain.load_state_dict(model.net.state_dict())
    args = inputs(3)
    with torch.no_grad():
        ours = model(**args)
        theirs = plain(args["x"], args["t"] * 1000, encoder_hidden_states=args["tokens"], encoder_attention_mask=args["mask"]).sample
    assert ours.shape == (3, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_padding_tokens_change_nothing_and_dropped_rows_get_the_null_condition():
    model = randomized(baseline(null_embedding="learned"))
    args = inputs(2)
    with torch.no_grad():
        ref = model(**args)
        noise = torch.randn(2, L, D) * ~args["mask"][..., None]
        torch.testing.assert_close(model(**{**args, "tokens": args["tokens"] + noise}), ref, atol=1e-5, rtol=0)
        assert differs(model(**{**args, "t": 1 - args["t"]}), ref)
        null_tokens, null_mask, null_pooled = model.null_condition(2)
        explicit = model(**{**args, "tokens": null_tokens, "mask": null_mask, "pooled": null_pooled})
        drop = torch.tensor([True, False])
        dropped = model(**args, drop=drop)
    torch.testing.assert_close(dropped[0], explicit[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(dropped[1], ref[1], atol=1e-6, rtol=0)


def test_sr_variant_reads_lowres_and_aug_level():
    model = randomized(baseline(super_resolution=True))
    assert model.net.config.in_channels == 6 and model.net.config.class_embed_type == "timestep"
    args = sr_inputs()
    with torch.no_grad():
        ref = model(**args)
        assert ref.shape == (2, 3, 16, 16)
        assert differs(model(**{**args, "lowres": args["lowres"].flip(-1)}), ref)
        assert differs(model(**{**args, "aug_level": 1 - args["aug_level"]}), ref)


@pytest.mark.parametrize("sr", [False, True])
def test_save_load_round_trip(tmp_path, sr):
    model = randomized(baseline(super_resolution=sr))
    tokens, mask, pooled = condition(1, seed=3)
    model.set_null_condition(tokens[0], mask[0], pooled[0])
    path = tmp_path / "model.safetensors"
    save_model(model, path, extra={"step": 3})
    loaded = load_model(path)
    assert type(loaded) is DiffusersUNet and loaded.config == model.config
    args = sr_inputs(2) if sr else inputs(2)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        assert torch.equal(loaded(**args, drop=drop), model(**args, drop=drop))


def test_gradient_checkpointing_reaches_the_diffusers_model():
    model = baseline()
    assert not model.net.is_gradient_checkpointing
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing and model.net.is_gradient_checkpointing
    model.train()
    model(**inputs(2)).square().mean().backward()  # runs with recomputation
    model.gradient_checkpointing = False
    assert not model.net.is_gradient_checkpointing


def test_missing_diffusers_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError, match=r"^model\.arch: diffusers needs the diffusers package, .*pip install 'imager\[bench\]'$"):
        build_denoiser(tiny(arch="diffusers"))
