"""imager.models.lora: LoRA adapters on Imager's UNet (and the diffusers baseline) through peft."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from imager.errors import CheckpointError, ConfigError
from imager.models import UNet
from imager.models import lora as L
from imager.models.config import LoraSettings
from tests.unit.test_unet import inputs, randomized, tiny


def model(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomized(UNet(tiny()), seed)


def out(m, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return m(**inputs(2, seed=seed))


def model_with(targets) -> UNet:
    m = model()
    L.inject(m, LoraSettings(rank=2, targets=targets), "t")
    return m


def trained_like(m, name: str, seed: int) -> None:
    """Give adapter ``name`` non-zero B weights, as training would (a fresh adapter's B is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in L.lora_layers(m).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(0.2 * torch.randn(w.shape, generator=gen))


def adapted(tmp_path, seed: int, rank: int = 4, targets="attention", base_seed: int = 0):
    """An adapter file with non-zero weights trained (in spirit) on ``model(base_seed)``."""
    m = model(base_seed)
    sha = L.weights_sha256(m)
    settings = LoraSettings(rank=rank, targets=targets)
    L.inject(m, settings, "x")
    trained_like(m, "x", seed)
    path = tmp_path / f"lora-{seed}-{rank}.safetensors"
    L.save_adapter(path, m, settings=settings, base_sha256=sha, stage="base", name="x", extra={"step": 7})
    return path


def test_inject_freezes_the_base_and_a_fresh_adapter_changes_nothing():
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    reference = out(m)
    n = L.inject(m, LoraSettings(rank=2), "a")
    from imager.models.blocks import SpatialAttention

    blocks = sum(isinstance(x, SpatialAttention) for x in model().modules())
    assert blocks >= 2 and n == 5 * blocks  # qkv, out1, q, kv, out2 of every attention block
    trainable = dict((k, p) for k, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(".lora_" in k for k in trainable)
    assert torch.equal(out(m), reference)  # B starts at zero
    after = {L._plain_name(k): v for k, v in m.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_training_the_adapter_leaves_the_base_weights_bit_identical():
    m = model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    L.inject(m, LoraSettings(rank=4, dropout=0.1), "a")
    m.train()
    opt = torch.optim.AdamW(L.trainable_parameters(m), lr=1e-2)
    for step in range(3):
        loss = m(**inputs(2, seed=step)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    changed = {L._plain_name(k): v for k, v in m.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(changed[k], base[k]) for k in base)
    assert any(layer.lora_B["a"].weight.abs().sum() > 0 for layer in L.lora_layers(m).values())


def test_save_load_round_trip_and_scale_zero_is_the_base(tmp_path):
    path = adapted(tmp_path, seed=1)
    f = L.read_adapter(path)
    assert f.stage == "base" and f.settings.rank == 4 and f.extra == {"step": 7} and len(f.layers) == len(L.lora_layers(model_with("attention")))
    m = model()
    reference = out(m)
    L.load_adapter(m, f, "x", base_sha256=L.weights_sha256(m))
    L.set_scales(m, {"x": 1.0})
    with_adapter = out(m)
    assert not torch.equal(with_adapter, reference)
    L.set_scales(m, {"x": 0.0})
    assert torch.equal(out(m), reference)
    # the saved tensors are what was loaded
    state = L.adapter_state(m, "x")
    assert state.keys() == f.tensors.keys() and all(torch.equal(state[k], f.tensors[k]) for k in state)


def test_scale_is_linear_in_the_adapter_delta(tmp_path):
    f = L.read_adapter(adapted(tmp_path, seed=1))
    m = model()
    L.load_adapter(m, f, "x", base_sha256=L.weights_sha256(m))
    layer = next(iter(L.lora_layers(m).values()))
    x = torch.randn(3, layer.get_base_layer().in_features)
    with torch.no_grad():
        L.set_scales(m, {"x": 0.0})
        y0 = layer(x)
        L.set_scales(m, {"x": 1.0})
        y1 = layer(x)
        L.set_scales(m, {"x": 0.5})
        yh = layer(x)
    torch.testing.assert_close(yh - y0, 0.5 * (y1 - y0), rtol=1e-5, atol=1e-6)


def test_several_adapters_with_weights_add_up(tmp_path):
    fa, fb = (L.read_adapter(adapted(tmp_path, seed=s)) for s in (1, 2))
    m = model()
    sha = L.weights_sha256(m)
    L.load_adapter(m, fa, "a", base_sha256=sha)
    L.load_adapter(m, fb, "b", base_sha256=sha)
    layer = next(iter(L.lora_layers(m).values()))
    x = torch.randn(3, layer.get_base_layer().in_features)
    with torch.no_grad():
        L.set_scales(m, {"a": 0.0, "b": 0.0})
        y0 = layer(x)
        L.set_scales(m, {"a": 0.7, "b": 0.0})
        ya = layer(x)
        L.set_scales(m, {"a": 0.0, "b": 1.5})
        yb = layer(x)
        L.set_scales(m, {"a": 0.7, "b": 1.5})
        both = layer(x)
    torch.testing.assert_close(both - y0, (ya - y0) + (yb - y0), rtol=1e-5, atol=1e-6)
    L.set_scales(m, {"a": 0.7, "b": 1.5})
    assert not torch.equal(out(m), out(model()))


def test_merge_then_unmerge_gives_back_the_base_bit_for_bit(tmp_path):
    m = model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    sha = L.weights_sha256(m)
    for s, name in ((1, "a"), (2, "b")):
        L.load_adapter(m, L.read_adapter(adapted(tmp_path, seed=s)), name, base_sha256=sha)
    L.set_scales(m, {"a": 0.8, "b": 0.3})
    unmerged_out = out(m)
    L.merge(m)
    assert L.is_merged(m)
    torch.testing.assert_close(out(m), unmerged_out, rtol=1e-4, atol=1e-5)  # same model, other rounding
    assert L.weights_sha256(m) != sha
    with pytest.raises(ConfigError, match="unmerge"):
        L.set_scales(m, {"a": 1.0})
    L.unmerge(m)
    assert not L.is_merged(m) and L.weights_sha256(m) == sha
    after = {L._plain_name(k): v for k, v in m.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert torch.equal(out(m), unmerged_out)
    L.set_scales(m, {"a": 0.0, "b": 0.0})
    assert torch.equal(out(m), out(model()))


def test_an_adapter_on_another_base_is_refused(tmp_path):
    path = adapted(tmp_path, seed=1, base_seed=0)
    other = model(seed=5)
    with pytest.raises(CheckpointError, match="trained on another base model") as err:
        L.load_adapter(other, L.read_adapter(path), "x", base_sha256=L.weights_sha256(other))
    assert "\n" not in str(err.value)
    assert not L.lora_layers(other)  # nothing injected


def test_conv_targets_and_explicit_names():
    m = model()
    n = L.inject(m, LoraSettings(rank=2, targets="attention_conv"), "c")
    convs = [p for p in L.lora_layers(m) if p.endswith(("conv1", "conv2"))]
    assert convs and n == len(L.lora_layers(m))
    m2 = model()
    assert L.inject(m2, LoraSettings(rank=2, targets=("kv",)), "k") == len(L.lora_layers(model_with("attention"))) // 5
    with pytest.raises(ConfigError, match="lora.targets: no layer"):
        L.inject(model(), LoraSettings(rank=2, targets=("nonexistent_layer",)), "z")


def test_diffusers_arch_takes_the_attention_preset():
    pytest.importorskip("diffusers")
    from imager.models.factory import build_denoiser

    torch.manual_seed(0)
    m = build_denoiser(tiny(arch="diffusers"))
    n = L.inject(m, LoraSettings(rank=2), "d")
    assert n > 0 and all(p.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for p in L.lora_layers(m))


def test_an_untrained_adapter_is_known_to_have_no_effect(tmp_path, caplog):
    from imager.inference import Cascade
    from imager.inference.adapters import AdapterSpec, use_adapters
    from tests.app.conftest import write_models

    trained = L.read_adapter(adapted(tmp_path, seed=1))
    assert trained.has_effect
    m = model()
    settings = LoraSettings(rank=2)
    sha = L.weights_sha256(m)
    L.inject(m, settings, "fresh")
    L.save_adapter(tmp_path / "fresh.safetensors", m, settings=settings, base_sha256=sha, stage="base", name="fresh")
    assert not L.read_adapter(tmp_path / "fresh.safetensors").has_effect
    base, sr = write_models(tmp_path / "models")
    cascade = Cascade.load(base, sr)
    m2 = cascade.base.model
    sha2 = L.weights_sha256(m2)
    L.inject(m2, settings, "fresh")
    L.save_adapter(tmp_path / "fresh2.safetensors", m2, settings=settings, base_sha256=sha2, stage="base", name="fresh")
    cascade = Cascade.load(base, sr)
    with caplog.at_level("WARNING", logger="imager.inference.adapters"):
        use_adapters(cascade, [AdapterSpec(tmp_path / "fresh2.safetensors", 1.0)])
    assert "has no effect: its B weights are all zero" in caplog.text


def test_bad_adapter_files(tmp_path):
    with pytest.raises(CheckpointError, match="adapter not found"):
        L.read_adapter(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        L.read_adapter(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not an Imager LoRA adapter"):
        L.read_adapter(tmp_path / "model.safetensors")
    meta = {"imager_adapter": "lora", "stage": "base", "base_sha256": "0", "rank": 0, "alpha": 1, "dropout": 0, "targets": "attention"}
    save_file({"a.lora_A.weight": torch.zeros(1, 2)}, str(tmp_path / "bad.safetensors"), metadata={"imager": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="invalid adapter metadata"):
        L.read_adapter(tmp_path / "bad.safetensors")


def test_settings_validation():
    assert LoraSettings().target_names("imager") == ("qkv", "out1", "q", "kv", "out2")
    assert LoraSettings(rank=8).scale_alpha == 8.0 and LoraSettings(rank=8, alpha=4).scale_alpha == 4.0
    for bad in ({"rank": 0}, {"dropout": 1.0}, {"targets": []}, {"targets": "everything"}):
        with pytest.raises(ValidationError):
            LoraSettings(**bad)


def test_a_malformed_adapter_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    f = L.read_adapter(adapted(tmp_path, seed=1))
    key = next(k for k in f.tensors if k.endswith("lora_B.weight"))
    bad = L.AdapterFile(f.path, f.stage, f.base_sha256, f.settings, {**f.tensors, key: torch.zeros(3, 1)}, f.extra)
    m = model()
    reference = out(m)
    with pytest.raises(CheckpointError, match="lora_B.weight is shape"):
        L.load_adapter(m, bad, "x", base_sha256=L.weights_sha256(m))
    assert "x" not in L.adapter_names(m) and torch.equal(out(m), reference)
    L.load_adapter(m, f, "x", base_sha256=L.weights_sha256(m))  # the name is free again
    assert "x" in L.adapter_names(m)
