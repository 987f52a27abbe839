"""ControlNet and the adapter on a tiny UNet: exactly the base model untrained and at scale 0,
the window and weights of several controls, condition checks, save/load and the base check."""

from __future__ import annotations

import pytest
import torch

from imager.diffusion.config import ScheduleConfig
from imager.diffusion.schedule import NoiseSchedule
from imager.errors import CheckpointError, ConfigError, SamplerError
from imager.inference.conditions import condition_of, line_map, read_condition, resize_condition
from imager.inference.config import StageSampling
from imager.inference.sampling import Stage
from imager.models.config import ControlSettings, UNetConfig
from imager.models.control import (
    ControlInput,
    Controlled,
    ControlNet,
    build_control,
    control_residuals,
    load_control,
    read_control,
    save_control,
    skip_layout,
)
from imager.models.lora import weights_sha256
from imager.models.unet import UNet

ARCHS = ["controlnet", "adapter"]
TEXT = {"text_dim": 8, "pooled_dim": 8, "context_length": 4}


def tiny_base(seed: int = 0, **changes) -> UNet:
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), head_dim=8, norm_groups=4, null_embedding="learned", **TEXT, **changes)
    torch.manual_seed(seed)
    model = UNet(cfg)
    with torch.no_grad():  # a "trained" base: no zero layers left
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def inputs(b: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    t = torch.rand(b, generator=g)
    tokens, pooled = torch.randn(b, 4, 8, generator=g), torch.randn(b, 8, generator=g)
    mask = torch.ones(b, 4, dtype=torch.bool)
    condition = (torch.rand(b, 1, size, size, generator=g) > 0.8).float()
    return x, t, tokens, mask, pooled, condition


def trained(net: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """The control with its zero convolutions moved off zero, as training does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_control_gives_exactly_the_base_output(arch, patch):
    base = tiny_base(patch_size=patch)
    x, t, tokens, mask, pooled, condition = inputs()
    control = build_control(base, ControlSettings(arch=arch))
    residuals = control(x, t, tokens, mask, pooled, condition)
    assert len(residuals) == len(skip_layout(base)) and all(not r.any() for r in residuals)
    drop = torch.tensor([True, False])
    for kwargs in ({}, {"drop": drop}):
        expected = base(x, t, tokens, mask, pooled, **kwargs)
        assert torch.equal(Controlled(base, control)(x, t, tokens, mask, pooled, condition=condition, **kwargs), expected)
    trained(control)
    assert not torch.equal(Controlled(base, control)(x, t, tokens, mask, pooled, condition=condition), base(x, t, tokens, mask, pooled))


def test_controlnet_starts_as_a_copy_of_the_base_encoder():
    base = tiny_base()
    net = ControlNet.from_unet(base, ControlSettings())
    for name in ("time_mlp", "pooled_mlp", "conv_in", "down", "middle"):
        ours, theirs = getattr(net, name).state_dict(), getattr(base, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # a copy, not the same tensors: training the control leaves the base alone
    assert net.conv_in.weight.data_ptr() != base.conv_in.weight.data_ptr()


def test_adapter_is_much_smaller_than_controlnet():
    base = tiny_base()
    sizes = {arch: sum(p.numel() for p in build_control(base, ControlSettings(arch=arch)).parameters()) for arch in ARCHS}
    assert sizes["adapter"] < 0.5 * sizes["controlnet"], sizes


def stage(model: UNet) -> Stage:
    schedule = NoiseSchedule.from_config(ScheduleConfig(name="cosine", timesteps=100))
    return Stage(model=model, schedule=schedule, prediction="v", resolution=16)


SAMPLING = StageSampling(sampler="ddim", steps=4, guidance=3.0)


def cond(b: int = 2):
    _, _, tokens, mask, pooled, condition = inputs(b)
    return (tokens, mask, pooled), condition


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_zero_and_an_empty_window_sample_exactly_the_base(arch):
    base = tiny_base()
    net = trained(build_control(base, ControlSettings(arch=arch)))
    text, condition = cond()
    plain = stage(base).sample(text, SAMPLING, seed=3)
    assert torch.equal(stage(base).sample(text, SAMPLING, seed=3, control=[ControlInput(net, condition, 0.0)]), plain)
    assert torch.equal(stage(base).sample(text, SAMPLING, seed=3, control=[ControlInput(net, condition, 1.0, start=1.0, end=1.0)]), plain)
    assert not torch.equal(stage(base).sample(text, SAMPLING, seed=3, control=[ControlInput(net, condition, 1.0)]), plain)


def test_residuals_are_linear_in_the_scale_and_several_controls_add_up():
    base = tiny_base()
    a = trained(build_control(base, ControlSettings(arch="controlnet")), seed=4)
    b = trained(build_control(base, ControlSettings(arch="adapter")), seed=5)
    x, t, tokens, mask, pooled, condition = inputs()
    text = (tokens, mask, pooled)
    one = control_residuals([(a, condition, 1.0, 0.0, 1.0)], x, t, text)
    half = control_residuals([(a, condition, 0.5, 0.0, 1.0)], x, t, text)
    other = control_residuals([(b, condition, 2.0, 0.0, 1.0)], x, t, text)
    both = control_residuals([(a, condition, 1.0, 0.0, 1.0), (b, condition, 2.0, 0.0, 1.0)], x, t, text)
    for r1, rh, ro, rb in zip(one, half, other, both, strict=True):
        torch.testing.assert_close(rh, 0.5 * r1)
        torch.testing.assert_close(rb, r1 + ro)
    # the window: t = 0.9 is 10 % of the way to the image, so a control from 50 % on does not act on it
    late = control_residuals([(a, condition, 1.0, 0.5, 1.0)], x, torch.tensor([0.9, 0.2]), text)
    assert not late[0][0].any() and late[0][1].any()
    assert control_residuals([(a, condition, 1.0, 0.5, 1.0)], x, torch.tensor([0.9, 0.9]), text) is None


def test_condition_shape_and_channels_are_one_line_errors():
    base = tiny_base()
    net = build_control(base, ControlSettings())
    x, t, tokens, mask, pooled, condition = inputs()
    with pytest.raises(ValueError, match=r"^condition: expected \(2, 1, 16, 16\) \(a line map\), got \(2, 3, 16, 16\)$"):
        net(x, t, tokens, mask, pooled, condition.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match=r"^condition: expected \(2, 1, 16, 16\) like the image, got \(2, 1, 8, 8\)$"):
        net(x, t, tokens, mask, pooled, condition[..., :8, :8])
    with pytest.raises(ConfigError, match=r"^control: the condition must be a square line map \(B, 1, S, S\), got \(1, 3, 8, 8\)$"):
        resize_condition(torch.zeros(1, 3, 8, 8), 16)
    with pytest.raises(SamplerError, match=r"^control condition: expected shape \(2 or 1, 1, 16, 16\), got \(3, 1, 16, 16\)$"):
        stage(base).sample(cond()[0], SAMPLING, seed=0, control=[ControlInput(net, torch.zeros(3, 1, 16, 16))])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    base = tiny_base()
    net = trained(build_control(base, ControlSettings(arch=arch, hint_channels=(4,))))
    path = tmp_path / "control.safetensors"
    save_control(path, net, base_sha256=weights_sha256(base), extra={"step": 7})
    info = read_control(path)
    assert info.settings.arch == arch and info.base == base.config and info.extra == {"step": 7}
    assert info.parameters == sum(p.numel() for p in net.parameters())
    loaded = load_control(path, base)
    assert type(loaded) is type(net)
    x, t, tokens, mask, pooled, condition = inputs()
    for ours, theirs in zip(loaded(x, t, tokens, mask, pooled, condition), net(x, t, tokens, mask, pooled, condition), strict=True):
        assert torch.equal(ours, theirs)


def test_a_control_for_another_base_is_refused_in_one_line(tmp_path):
    base = tiny_base(seed=0)
    path = tmp_path / "c.safetensors"
    save_control(path, build_control(base, ControlSettings()), base_sha256=weights_sha256(base))
    with pytest.raises(CheckpointError, match=r"c\.safetensors: this controlnet was trained on other base weights \(sha256 \w{12}, the base model's is \w{12}\); use it with the base model it was trained on$"):
        load_control(path, tiny_base(seed=1))
    wider = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), head_dim=8, norm_groups=4, null_embedding="learned", **TEXT))
    with pytest.raises(CheckpointError, match=r"this controlnet was built for another base model \(base_channels: 8, the base model has 16\)$"):
        load_control(path, wider)


def test_bad_control_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="control file not found"):
        read_control(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_control(tmp_path / "junk.safetensors")
    from imager.models.checkpoint import save_model

    save_model(tiny_base(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"holds an imager model of kind 'unet', not a control"):
        read_control(tmp_path / "model.safetensors")


def test_controls_refuse_sr_and_diffusers_bases():
    with pytest.raises(ValueError, match="super-resolution model"):
        build_control(tiny_base(super_resolution=True), ControlSettings())
    with pytest.raises(ValueError, match="arch: imager"):
        ControlNet(UNetConfig(arch="diffusers", base_channels=8, channel_mults=(1, 2), attention_levels=(1,), head_dim=8, norm_groups=4, **TEXT), ControlSettings())


def test_line_maps():
    images = torch.ones(1, 3, 8, 8)  # white
    images[..., 2, :] = -1  # a black row
    lines = line_map(images, "lines", 0.25)
    assert lines[0, 0, 2].all() and lines.sum() == 8
    edges = line_map(images, "edges", 0.25)
    assert edges[0, 0, 1].all() and edges[0, 0, 3].all() and not edges[0, 0, 6].any()
    assert torch.equal(line_map(images, "ink", 0), lines)
    assert condition_of(images, "lines", 0.25, 4).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown kind"):
        line_map(images, "depth", 0.5)


def test_read_condition_from_a_sketch(tmp_path):
    import numpy as np
    from PIL import Image

    canvas = np.full((64, 64), 255, np.uint8)
    canvas[28:36, :] = 0  # a thick black stroke: rows 7 and 8 at 16 px
    Image.fromarray(canvas).save(tmp_path / "s.png")
    c = read_condition(tmp_path / "s.png", 16)
    assert c.shape == (1, 1, 16, 16) and c[0, 0, 7:9].min() == 1 and c[0, 0, :6].max() == 0
    notes: list[str] = []
    Image.fromarray(255 - canvas).save(tmp_path / "inv.png")
    assert torch.equal(read_condition(tmp_path / "inv.png", 16, notes=notes), c) and "light lines on a dark ground" in notes[-1]
    Image.fromarray(canvas[:, :40]).save(tmp_path / "wide.png")
    with pytest.raises(ConfigError, match=r"^control: the sketch must be square \(the model draws square images\), got 40x64$"):
        read_condition(tmp_path / "wide.png", 16)
    with pytest.raises(ConfigError, match=r"^control: .*missing\.png does not exist$"):
        read_condition(tmp_path / "missing.png", 16)


def test_checkpointing_reaches_the_frozen_base_and_gives_the_same_gradients():
    base = tiny_base().train()
    control = trained(build_control(base.requires_grad_(False), ControlSettings()))
    model = Controlled(base, control)
    x, t, tokens, mask, pooled, condition = inputs()
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        assert base.gradient_checkpointing is flag
        control.zero_grad()
        model(x, t, tokens, mask, pooled, condition=condition).square().mean().backward()
        grads.append([p.grad.clone() for p in control.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
