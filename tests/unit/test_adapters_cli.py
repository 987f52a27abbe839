"""`imager generate --lora FILE[:SCALE]`: LoRA adapters on a tiny random cascade (32 px base, 64 px
SR, 3 steps). Weight 0 is the model without the adapter exactly, weights add up, a merged adapter
draws the same image up to rounding, a bad or foreign adapter is one line and writes nothing, and
the PNG names the adapters that made it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imager.inference.metadata import file_sha256, read_params
from imager.models import load_model
from imager.models import lora as L
from imager.models.config import LoraSettings
from stages.app import app
from tests.app.conftest import write_models
from tests.conftest import tiny_params
from tests.unit.test_inference import HashEncoder

runner = CliRunner()
SAMPLING = ("--sampler", "ddim", "--steps", "3", "--sr-steps", "3", "--guidance", "3", "--sr-guidance", "1", "--seed", "5")


def make_adapter(model_file: Path, out: Path, *, stage: str = "base", seed: int = 1, rank: int = 4, noise: float = 0.3) -> Path:
    """An adapter file for the model in ``model_file``, with non-zero B weights as training would
    leave them (a fresh adapter changes nothing)."""
    model = load_model(model_file).eval()
    sha = L.weights_sha256(model)  # of the base weights: before anything is injected
    settings = LoraSettings(rank=rank)
    L.inject(model, settings, "x")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in L.lora_layers(model).values():
            w = layer.lora_B["x"].weight
            w.copy_(noise * torch.randn(w.shape, generator=gen))
    L.save_adapter(out, model, settings=settings, base_sha256=sha, stage=stage, name="x", extra={"step": 1})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-cli")
    base, sr = write_models(root / "models")
    other_base, _ = write_models(root / "other", seed=3)
    return {
        "base": base, "sr": sr,
        "a": make_adapter(base, root / "a.safetensors", seed=1),
        "b": make_adapter(base, root / "b.safetensors", seed=2),
        "up": make_adapter(sr, root / "up.safetensors", stage="sr", seed=4),
        "foreign": make_adapter(other_base, root / "foreign.safetensors", seed=1),
    }  # fmt: skip


@pytest.fixture
def cli(models, tmp_path, write_params, monkeypatch, one_thread):
    """Run `imager generate` on the tiny cascade (the tests' stand-in text encoder); returns
    (exit code, output, pixels of the PNG or None)."""
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    params = write_params(tiny_params())
    counter = iter(range(1000))

    def run(*args: str, out: Path | None = None) -> tuple[int, str, np.ndarray | None]:
        out = out or tmp_path / f"out-{next(counter)}.png"
        argv = ["generate", "red apple", "--out", out, "--params", params, "--base", models["base"], "--sr", models["sr"], "--device", "cpu", *SAMPLING, *args]
        result = runner.invoke(app, [str(a) for a in argv])
        if not out.exists():
            return result.exit_code, result.output, None
        with Image.open(out) as im:
            return result.exit_code, result.output, np.asarray(im.convert("RGB"))

    run.tmp = tmp_path  # type: ignore[attr-defined]
    return run


def image(cli, *args: str) -> np.ndarray:
    code, output, pixels = cli(*args)
    assert code == 0 and pixels is not None, output
    return pixels


def test_weight_zero_is_the_model_without_the_adapter_and_weight_one_differs(cli, models):
    plain = image(cli)
    assert plain.shape == (64, 64, 3)
    assert np.array_equal(image(cli, "--lora", f"{models['a']}:0"), plain)
    with_a = image(cli, "--lora", str(models["a"]))  # no weight: 1
    assert not np.array_equal(with_a, plain)
    assert np.array_equal(image(cli, "--lora", f"{models['a']}:1"), with_a)
    assert not np.array_equal(image(cli, "--lora", f"{models['a']}:0.5"), with_a)
    assert not np.array_equal(image(cli, "--lora", f"{models['up']}:1"), plain)  # an adapter of the SR model


def test_several_adapters_each_with_its_weight(cli, models):
    a, b = f"{models['a']}", f"{models['b']}"
    both = image(cli, "--lora", f"{a}:0.8", "--lora", f"{b}:0.6")
    assert not np.array_equal(both, image(cli, "--lora", f"{a}:0.8"))
    assert not np.array_equal(both, image(cli, "--lora", f"{b}:0.6"))
    swapped = image(cli, "--lora", f"{b}:0.6", "--lora", f"{a}:0.8")  # the same sum in another order: other rounding
    assert np.abs(both.astype(int) - swapped.astype(int)).max() <= 2
    assert np.array_equal(image(cli, "--lora", f"{a}:0.8", "--lora", f"{b}:0"), image(cli, "--lora", f"{a}:0.8"))


def test_merged_adapters_draw_the_same_image_up_to_rounding(cli, models):
    args = ("--lora", f"{models['a']}:0.8", "--lora", f"{models['b']}:0.6", "--lora", f"{models['up']}:0.7")
    unmerged, merged = image(cli, *args), image(cli, *args, "--merge-lora")
    assert not np.array_equal(unmerged, image(cli))
    assert np.abs(unmerged.astype(int) - merged.astype(int)).max() <= 2


def test_the_png_lists_the_adapters_and_one_without_them_lists_none(cli, models):
    out = cli.tmp / "apple.png"
    code, output, _ = cli("--lora", f"{models['a']}:0.8", "--lora", f"{models['up']}:1.5", out=out)
    assert code == 0, output
    meta = read_params(out)
    assert meta["adapters"] == [
        {"file": str(models["a"]), "scale": 0.8, "sha256": file_sha256(models["a"]), "stage": "base", "rank": 4},
        {"file": str(models["up"]), "scale": 1.5, "sha256": file_sha256(models["up"]), "stage": "sr", "rank": 4},
    ]
    with Image.open(out) as im:
        assert json.loads(im.text["adapters"]) == meta["adapters"]  # a text chunk of its own, as every parameter
    plain = cli.tmp / "plain.png"
    assert cli(out=plain)[0] == 0
    with Image.open(plain) as im:
        assert "adapters" not in read_params(plain) and "adapters" not in im.text


def test_an_sr_adapter_with_no_sr_is_left_out_with_a_warning(cli, models, caplog):
    with caplog.at_level(logging.WARNING, logger="imager"):
        code, output, pixels = cli("--no-sr", "--lora", str(models["up"]))
    assert code == 0 and pixels is not None, output
    assert f"--lora {models['up']} adapts the super-resolution model, which --no-sr leaves out" in caplog.text
    assert np.array_equal(pixels, image(cli, "--no-sr"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{foreign}", "error: --lora: {foreign}: this adapter was trained on another base model (weights "),
        ("{dir}/missing.safetensors", "error: --lora: {dir}/missing.safetensors: adapter not found"),
        ("{base}", "error: --lora: {base}: not an Imager LoRA adapter (no imager_adapter metadata); a model file goes to --base/--sr, not --lora"),
        ("{dir}/junk.safetensors", "error: --lora: {dir}/junk.safetensors: not a readable safetensors file"),
        ("{a}:1e9", "error: --lora: '{a}:1e9': the scale must be a number in [-100, 100]"),
        ("{a}:nan", "error: --lora: '{a}:nan': the scale must be a number in [-100, 100]"),
    ],
)
def test_a_bad_adapter_is_one_line_and_writes_no_image(cli, models, spec, message):
    (cli.tmp / "junk.safetensors").write_bytes(b"not safetensors")
    names = {k: str(v) for k, v in models.items()} | {"dir": str(cli.tmp)}
    out = cli.tmp / "bad.png"
    code, output, pixels = cli("--lora", spec.format(**names), out=out)
    assert code == 1 and pixels is None and not out.exists(), output
    assert not any(p.name.endswith(".tmp") for p in cli.tmp.iterdir())
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**names)), output


def test_help_documents_the_adapter_options():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "--lora" in result.output and "--merge-lora" in result.output and "FILE[:SCALE]" in result.output
