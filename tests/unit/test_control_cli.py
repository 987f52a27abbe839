"""`imager generate --control SKETCH[:SCALE]`: a control on a tiny random cascade. Scale 0 is the
model without the control exactly, the sketch changes the image, two controls at once, a foreign
control or a bad sketch is one line and writes nothing, and the PNG records the controls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imager.inference.metadata import read_params
from imager.models import load_model
from imager.models.config import ControlSettings
from imager.models.control import build_control, save_control
from imager.models.lora import weights_sha256
from stages.app import app
from tests.app.conftest import write_models
from tests.conftest import tiny_params
from tests.unit.test_adapters_cli import SAMPLING
from tests.unit.test_control import trained
from tests.unit.test_inference import HashEncoder

runner = CliRunner()


def make_control(model_file: Path, out: Path, arch: str = "controlnet", seed: int = 2) -> Path:
    base = load_model(model_file)
    save_control(out, trained(build_control(base, ControlSettings(arch=arch)), seed=seed), base_sha256=weights_sha256(base))
    return out


def sketch(path: Path, rows: slice = slice(20, 28), size: int = 64) -> Path:
    canvas = np.full((size, size), 255, np.uint8)
    canvas[rows, 8:56] = 0
    Image.fromarray(canvas).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("control-cli")
    base, sr = write_models(root / "models")
    other, _ = write_models(root / "other", seed=3)
    return {
        "base": base, "sr": sr, "net": make_control(base, root / "net.safetensors"),
        "adapter": make_control(base, root / "adapter.safetensors", "adapter", seed=5),
        "foreign": make_control(other, root / "foreign.safetensors"), "sketch": sketch(root / "s.png"),
        "other_sketch": sketch(root / "t.png", slice(40, 48)),
    }  # fmt: skip


@pytest.fixture
def cli(files, tmp_path, write_params, monkeypatch, one_thread):
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    params = write_params(tiny_params())
    counter = iter(range(1000))

    def run(*args: str) -> tuple[int, str, np.ndarray | None, Path]:
        out = tmp_path / f"out-{next(counter)}.png"
        argv = ["generate", "red apple", "--out", out, "--params", params, "--base", files["base"], "--sr", files["sr"], "--device", "cpu", *SAMPLING, *args]
        result = runner.invoke(app, [str(a) for a in argv])
        if not out.exists():
            return result.exit_code, result.output, None, out
        with Image.open(out) as im:
            return result.exit_code, result.output, np.asarray(im.convert("RGB")), out

    return run


def test_scale_zero_is_the_model_without_control_and_a_sketch_changes_the_image(cli, files):
    code, output, plain, _ = cli()
    assert code == 0, output
    code, output, off, _ = cli("--control", f"{files['sketch']}:0", "--controlnet", files["net"])
    assert code == 0, output
    assert np.array_equal(off, plain)
    code, output, on, path = cli("--control", str(files["sketch"]), "--controlnet", files["net"])
    assert code == 0, output
    assert not np.array_equal(on, plain)
    recorded = read_params(path)["controls"]
    assert recorded[0]["control"] == "net.safetensors" and recorded[0]["scale"] == 1.0 and recorded[0]["sketch"] == "s.png"
    assert recorded[0]["arch"] == "controlnet" and (recorded[0]["start"], recorded[0]["end"]) == (0.0, 1.0)
    _, _, other, _ = cli("--control", str(files["other_sketch"]), "--controlnet", files["net"])
    assert not np.array_equal(other, on)  # the image follows the sketch given


def test_two_controls_at_once_and_a_window(cli, files):
    args = ("--control", f"{files['sketch']}:1", "--control", f"{files['other_sketch']}:0.5", "--controlnet", files["net"], "--controlnet", files["adapter"])
    code, output, both, path = cli(*args)
    assert code == 0, output
    assert [c["arch"] for c in read_params(path)["controls"]] == ["controlnet", "adapter"]
    _, _, first, _ = cli("--control", f"{files['sketch']}:1", "--controlnet", files["net"])
    assert not np.array_equal(both, first)
    # an empty window (the controls act nowhere) is the plain model again
    _, _, plain, _ = cli()
    code, output, never, _ = cli(*args, "--control-start", "1", "--control-end", "1")
    assert code == 0, output
    assert np.array_equal(never, plain)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--control", "{foreign_sketch}", "--controlnet", "{foreign}"), r"^--control: .*foreign\.safetensors: this controlnet was trained on other base weights"),
        (("--control", "{missing}", "--controlnet", "{net}"), r"^--control: .*missing\.png does not exist$"),
        (("--control", "{wide}", "--controlnet", "{net}"), r"^--control: the sketch must be square \(the model draws square images\), got 40x64$"),
        (("--control", "{sketch}:x2", "--controlnet", "{net}"), r"^--control: .*s\.png:x2 does not exist$"),
        (("--control", "{sketch}", "--controlnet", "{sketch}"), r"^--controlnet: .*s\.png: not a readable safetensors file"),
        (("--control", "{sketch}", "--controlnet", "{net}", "--control-start", "0.8", "--control-end", "0.2"), r"^--control-start/--control-end: the window must satisfy 0 <= start <= end <= 1, got start 0.8, end 0.2$"),
        (("--control", "{sketch}", "--control", "{sketch}", "--control", "{sketch}", "--controlnet", "{net}", "--controlnet", "{net}"), r"^--control: 3 sketches but 2 control files"),
    ],
    ids=["foreign-base", "missing-sketch", "not-square", "bad-scale", "not-a-control", "bad-window", "count"],
)
def test_bad_control_input_is_one_line_and_writes_nothing(cli, files, tmp_path, args, message):
    import re

    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((64, 40), 255, np.uint8)).save(wide)
    names = {**{k: str(v) for k, v in files.items()}, "foreign_sketch": str(files["sketch"]), "missing": str(tmp_path / "missing.png"), "wide": str(wide)}
    code, output, image, _ = cli(*[a.format(**names) for a in args])
    lines = output.strip().splitlines()
    assert code != 0 and image is None, output
    assert len(lines) == 1 and re.search(message, lines[0].removeprefix("error: ")), output


def test_a_control_file_is_checked_before_the_model_loads(cli, files, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr("imager.inference.Cascade.load", no_models)
    code, output, _, _ = cli("--control", str(files["sketch"]), "--controlnet", str(files["sketch"]))
    assert code != 0 and "--controlnet" in output


def test_the_untrained_control_changes_nothing(cli, files, tmp_path):
    base = load_model(files["base"])
    fresh = tmp_path / "fresh.safetensors"
    save_control(fresh, build_control(base, ControlSettings()), base_sha256=weights_sha256(base))
    _, _, plain, _ = cli()
    code, output, same, _ = cli("--control", str(files["sketch"]), "--controlnet", fresh)
    assert code == 0, output
    assert np.array_equal(same, plain)
