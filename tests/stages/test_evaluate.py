"""The evaluation half through the `imager` CLI on a tiny cascade: train-evaluator, evaluate (metrics
beside their ceilings, the sampler sweep, the grid, the MLflow pyfunc model and its round trip), and
`imager generate` (same seed, same image; clear errors)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from imager import config
from imager.errors import CheckpointError
from imager.inference import Cascade, encode_prompts
from imager.inference.cascade import encode_negative
from imager.inference.images import to_hwc
from imager.inference.metadata import file_sha256, read_params
from imager.text import load_text_encoder
from stages.app import app
from tests.stages.conftest import DATA_PARAMS

runner = CliRunner()

MODEL = {"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [1], "head_dim": 8, "norm_groups": 4}
TRAIN = {"steps": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 4, "model": MODEL, "grid": {"every": 0, "steps": 2, "per_prompt": 1}}
EVALUATE = {
    "prompts": 6, "batch_size": 4, "base": {"steps": 3, "guidance": 2.0}, "sr": {"steps": 2, "guidance": 1.0},
    "r_precision_k": 4, "grid_rows": 3,
    "sweep": {"samplers": ["ddim", "dpmpp_2m"], "steps": [2, 3], "reference_steps": 5, "prompts": 4},
}  # fmt: skip
PARAMS = {
    **DATA_PARAMS,
    "sampler": "dpmpp_2m",
    "train_base": {**TRAIN, "resolution": 8},
    "train_sr": {**TRAIN, "lowres": 8, "resolution": 16, "crop": 8},
    "evaluator": {"resolution": 16, "channels": [8, 16], "feature_dim": 8, "epochs": 2, "batch_size": 8},
    "evaluate": EVALUATE,
}


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def error_line(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def cascade(data, tmp_path_factory) -> dict:
    """A trained tiny base (8 px), SR (8 -> 16 px) and evaluator on the package's data set."""
    root = tmp_path_factory.mktemp("cascade")
    params = write(root / "params.yaml", PARAMS)
    common = ["--params", params, "--shards", data["shards"], "--embeddings", data["emb"]]
    for command, name in (("train-base", "base"), ("train-sr", "sr")):
        invoke(command, *common, "--out", root / name, "--checkpoints", root / f"{name}_ckpt", "--report", root / f"{name}.json")
    invoke("train-evaluator", *common, "--out", root / "evaluator", "--report", root / "evaluator.json")
    return {"root": root, "params": params, **{k: root / k for k in ("base", "sr", "evaluator")}}


def evaluate_args(data: dict, c: dict, params: Path, out: Path) -> list:
    return [
        "evaluate", "--params", params, "--shards", data["shards"], "--embeddings", data["emb"],
        "--base", c["base"], "--sr", c["sr"], "--evaluator", c["evaluator"],
        "--metrics", out / "evaluate.json", "--sweep", out / "sweep.json", "--curve", out / "curve.json",
        "--plot", out / "sweep.png", "--grid", out / "grid.png",
    ]  # fmt: skip


def test_evaluator_report_has_held_out_retrieval(cascade):
    report = json.loads((cascade["root"] / "evaluator.json").read_text())
    assert report["val_images"] > 0 and 0 <= report["val_top1_all"] <= 1
    assert report["val_top1_all_chance"] == pytest.approx(1 / report["val_images"], rel=0.5)
    assert (cascade["evaluator"] / "evaluator.safetensors").is_file()


def test_evaluate_end_to_end_with_pyfunc_round_trip(data, cascade, tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "bumpy-veep")
    params = write(tmp_path / "params.yaml", {**PARAMS, "tracking": {"enabled": True, "experiment": "evaluate-e2e"}})
    invoke(*evaluate_args(data, cascade, params, tmp_path))

    m = json.loads((tmp_path / "evaluate.json").read_text())
    val = json.loads((data["root"] / "shard.json").read_text())["val"]
    assert m["samples"] == min(EVALUATE["prompts"], val) and m["sampler"] == "dpmpp_2m"
    assert m["r_precision_chance"] == pytest.approx(1 / m["r_precision_k"])
    for name in ("fid_evaluator", "r_precision_evaluator", "clip_score_evaluator", "fid_evaluator_base", "r_precision_evaluator_base"):
        for key in (name, f"{name}_ceiling"):
            assert math.isfinite(m[key]), key
    assert 0 <= m["r_precision_evaluator"] <= 1 and 0 <= m["clip_score_evaluator"] <= 100
    assert m["fid_evaluator"] >= 0 and m["fid_evaluator_ceiling"] >= 0
    assert not any(k.endswith(("_inception", "_clip")) for k in m)  # no standard backbone configured
    assert not any("seconds" in k or "per_s" in k for k in m)  # run times go to MLflow, not the hashed report

    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["samples"] == EVALUATE["sweep"]["prompts"] and sweep["stage"] == "base"
    assert set(sweep["ddim"]) == set(sweep["dpmpp_2m"]) == {"2", "3"}
    assert set(sweep["ddpm (reference)"]) == {"5"} and "fid_evaluator" in sweep["ceiling"]
    assert "seconds" not in json.dumps(sweep)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [(r["sampler"], r["steps"]) for r in curve] == [("ddim", 2), ("ddim", 3), ("dpmpp_2m", 2), ("dpmpp_2m", 3), ("ddpm (reference)", 5)]
    for png in ("grid.png", "sweep.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"
            im.verify()

    # MLflow: the stage's run holds the metrics, the images and the cascade as a pyfunc model.
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=["evaluate-e2e"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["imager.stage"] == "evaluate"
    assert run.info.run_name == "evaluate · bumpy-veep"  # the DVC experiment shows in the UI's run list
    assert mlflow.get_experiment_by_name("evaluate-e2e").tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.metrics["fid_evaluator"] == pytest.approx(m["fid_evaluator"])
    assert run.data.metrics["sampling_seconds"] > 0 and run.data.metrics["sweep_seconds.ddpm_reference.5"] > 0
    assert run.data.params["sampler"] == "dpmpp_2m"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"shards", "embeddings"}
    assert all(len(d.dataset.digest) <= 36 and d.tags[0].value == "evaluation" for d in inputs.values())
    assert inputs["shards"].dataset.digest != inputs["embeddings"].dataset.digest
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/cascade")
    images = model.predict(["red heart", "green apple"])
    assert isinstance(images, np.ndarray) and images.shape == (2, 16, 16, 3) and images.dtype == np.uint8

    # The same images as the cascade sampled directly with the evaluation's settings.
    p = config.load(params)
    direct = Cascade.load(cascade["base"] / "model.safetensors", cascade["sr"] / "model.safetensors")
    encoder = load_text_encoder(p.embed)
    cond, _ = encode_prompts(encoder, ["red heart", "green apple"])
    _, sr = direct.generate(cond, p.evaluate.sampling(p.sampler))
    assert np.array_equal(images, to_hwc(sr).numpy())
    other = model.predict(["red heart", "green apple"], params={"seed": 7})
    assert not np.array_equal(images, other)

    # Negative prompts and thresholding through the model: the same images as the cascade given the
    # same settings. (This 4-step model barely reads its condition, so that they change the images is
    # shown on sensitive models in tests/unit/test_inference.py.)
    negative = model.predict(["red heart", "green apple"], params={"negative_prompt": "blue", "threshold": "static"})
    static = p.evaluate.sampling(p.sampler)
    static = static.model_copy(update={k: getattr(static, k).model_copy(update={"threshold": "static"}) for k in ("base", "sr")})
    _, sr_neg = direct.generate(cond, static, negative=encode_negative(encoder, ["blue", "blue"]))
    assert np.array_equal(negative, to_hwc(sr_neg).numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_evaluate_on_cuda_without_a_gpu_is_one_line(data, cascade, tmp_path):
    on_cuda = copy.deepcopy(PARAMS)
    on_cuda["evaluate"]["device"] = "cuda"
    line = error_line(*evaluate_args(data, cascade, write(tmp_path / "params.yaml", on_cuda), tmp_path))
    assert line == "error: params.yaml: evaluate.device: 'cuda' asked for, but torch sees no CUDA device; use cpu or auto"
    assert not (tmp_path / "evaluate.json").exists()


def test_evaluate_without_the_evaluator_is_one_line(data, cascade, tmp_path):
    c = {**cascade, "evaluator": tmp_path / "missing"}
    line = error_line(*evaluate_args(data, c, cascade["params"], tmp_path))
    assert "train-evaluator" in line
    assert not (tmp_path / "evaluate.json").exists()


# ---------------------------------------------------------------------------------- generate


def gen_args(c: dict, out: Path, *extra: str) -> list:
    return ["generate", "red heart", "--out", out, "--params", c["params"], "--base", c["base"] / "model.safetensors", "--sr", c["sr"] / "model.safetensors", *extra]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_same_seed_same_image(cascade, tmp_path):
    invoke(*gen_args(cascade, tmp_path / "a.png", "--seed", "3"))
    invoke(*gen_args(cascade, tmp_path / "b.png", "--seed", "3"))
    invoke(*gen_args(cascade, tmp_path / "c.png", "--seed", "4"))
    a, b, c = (pixels(tmp_path / f"{n}.png") for n in "abc")
    assert a.shape == (16, 16, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The PNG records what made it, the model files by their hashes (what `imager ui` restores).
    meta = read_params(tmp_path / "a.png")
    assert meta["prompt"] == "red heart" and meta["seed"] == 3 and meta["mode"] == "text" and meta["size"] == 16
    assert meta["base_sha256"] == file_sha256(cascade["base"] / "model.safetensors")
    assert meta["sr_sha256"] == file_sha256(cascade["sr"] / "model.safetensors")
    assert "batch_index" not in meta and read_params(tmp_path / "c.png")["seed"] == 4


def test_generate_options(cascade, tmp_path):
    out = invoke(*gen_args(cascade, tmp_path / "many.png", "--num", "2", "--sampler", "ddim", "--steps", "2"))
    assert {p.name for p in tmp_path.iterdir()} == {"many-0.png", "many-1.png"}
    assert "many-0.png" in out
    first, second = (read_params(tmp_path / f"many-{i}.png") for i in range(2))
    assert first["sampler"] == second["sampler"] == "ddim" and first["steps"] == 2
    assert (first["seed"], first["batch_index"], second["seed"], second["batch_index"]) == (0, 0, 0, 1)  # one batch, one seed
    invoke(*gen_args(cascade, tmp_path / "low.png", "--no-sr"))
    assert pixels(tmp_path / "low.png").shape == (8, 8, 3)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "base": c["root"] / "nowhere"}, "dvc repro train_base"),
        (lambda c: {**c, "sr": c["root"] / "nowhere"}, "dvc repro train_sr"),
        (lambda c: {**c, "sr": c["base"]}, "expected the super-resolution model"),
    ],
)
def test_generate_without_trained_models_says_which_command_makes_them(cascade, tmp_path, change, message):
    line = error_line(*gen_args(change(cascade), tmp_path / "x.png"))
    assert message in line and not (tmp_path / "x.png").exists()


def test_generate_passes_negative_prompt_threshold_and_device(cascade, tmp_path, monkeypatch):
    invoke(*gen_args(cascade, tmp_path / "neg.png", "--seed", "2", "--negative", "green apple", "--threshold", "dynamic", "--device", "cpu"))
    assert pixels(tmp_path / "neg.png").shape == (16, 16, 3)
    calls = []
    real = Cascade.generate

    def spy(self, cond, cfg, **kwargs):
        calls.append((self.device, cfg, kwargs))
        return real(self, cond, cfg, **kwargs)

    monkeypatch.setattr(Cascade, "generate", spy)
    invoke(*gen_args(cascade, tmp_path / "a.png", "--negative", "green apple", "--threshold", "dynamic", "--percentile", "0.5", "--steps", "2"))
    invoke(*gen_args(cascade, tmp_path / "b.png", "--negative", "  "))
    (device, cfg, kwargs), (_, _, no_negative) = calls
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert cfg.base.threshold == cfg.sr.threshold == "dynamic" and cfg.base.percentile == 0.5 and cfg.base.steps == 2
    tokens, mask, _ = kwargs["negative"]
    encoder = load_text_encoder(config.load(cascade["params"]).embed)
    assert tokens.shape[0] == 1 and torch.equal(tokens, encode_negative(encoder, ["green apple"])[0])
    assert no_negative["negative"] is None  # a blank negative prompt is the null condition


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "nope"], "--sampler: input should be 'ddpm', 'ddim', "),
        (["--out", "x.jpg"], "must be a .png"),
        (["--threshold", "soft"], "--threshold: input should be 'none', 'static' or 'dynamic', got 'soft'"),
        (["--spacing", "random"], "--spacing: input should be"),
        (["--sampler", "dpmpp_2m", "--eta", "0.5"], "sampler 'dpmpp_2m' takes no option 'eta'"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device: '"),
    ],
)
def test_generate_bad_options_are_one_line(cascade, tmp_path, args, message):
    base = gen_args(cascade, tmp_path / "x.png")
    line = error_line(*base, *args)
    assert message in line


def test_generate_empty_prompt_is_one_line(cascade, tmp_path):
    args = gen_args(cascade, tmp_path / "x.png")
    args[1] = "   "
    assert "prompt 1 is empty" in error_line(*args)


def test_generate_checks_the_encoder_matches_the_models(cascade, tmp_path):
    data = copy.deepcopy(PARAMS)
    data["embed"]["max_length"] = 6
    params = write(tmp_path / "params.yaml", data)
    args = gen_args({**cascade, "params": params}, tmp_path / "x.png")
    assert "max_length 6" in error_line(*args)


# From an image: the PNGs are compared with the input as the library brings it to the output size
# (prepare, then resize of the [-1, 1] tensor and to_uint8), so known pixels must match exactly.


def save_random(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Path:
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def save_mask(path: Path, white: np.ndarray) -> Path:
    Image.fromarray(np.where(white, 255, 0).astype(np.uint8), "L").save(path)
    return path


def spy_generate(monkeypatch) -> list:
    calls = []
    real = Cascade.generate

    def spy(self, cond, cfg, **kwargs):
        calls.append((cond, cfg, kwargs))
        return real(self, cond, cfg, **kwargs)

    monkeypatch.setattr(Cascade, "generate", spy)
    return calls


def test_generate_img2img_uses_the_image_deterministically(cascade, one_thread, tmp_path, monkeypatch, caplog):
    # The base stage's image is compared (--no-sr): this 4-step SR model barely reads its low-res
    # input, so what img2img changes in the base hardly reaches the 16 px PNG; --sr-strength does.
    image = save_random(tmp_path / "in.png", (24, 24))
    for name, extra in (("text", []), ("a", ["--init-image", image]), ("b", ["--init-image", image])):
        invoke(*gen_args(cascade, tmp_path / f"{name}.png", "--seed", "3", "--no-sr", *extra))
        invoke(*gen_args(cascade, tmp_path / f"{name}-sr.png", "--seed", "3", *(extra and [*extra, "--sr-strength", "0.5"])))
    for size, suffix in ((8, ""), (16, "-sr")):
        text, a, b = (pixels(tmp_path / f"{n}{suffix}.png") for n in ("text", "a", "b"))
        assert a.shape == (size, size, 3) and np.array_equal(a, b) and not np.array_equal(a, text)

    calls = spy_generate(monkeypatch)
    invoke(*gen_args(cascade, tmp_path / "many.png", "--num", "2", "--init-image", image))
    invoke(*gen_args(cascade, tmp_path / "sr.png", "--init-image", image, "--strength", "0.5", "--sr-strength", "0.6"))
    white = save_mask(tmp_path / "white.png", np.ones((24, 24), bool))
    invoke(*gen_args(cascade, tmp_path / "white.png", "--init-image", image, "--mask", white))
    (_, many, many_kw), (_, sr, sr_kw), (_, all_white, white_kw) = calls
    # One image for the whole batch; the seeds (and so the images) differ.
    assert many_kw["image"].shape == (1, 3, 24, 24) and many_kw["mask"] is None
    assert not np.array_equal(pixels(tmp_path / "many-0.png"), pixels(tmp_path / "many-1.png"))
    assert (many.strength, many.sr_strength) == (0.75, 1.0)  # img2img's default
    assert (sr.strength, sr.sr_strength) == (0.5, 0.6)
    assert all_white.strength == 1.0 and white_kw["mask"] is None  # all white: redrawn from text
    assert "--mask: is all white, so the whole image is repainted" in caplog.text
    assert "is not used" not in caplog.text  # img2img at its default strength uses the image


@pytest.mark.parametrize(("prompt", "extra"), [("red heart", []), ("red heart", ["--mask-blur", "2", "--resample", "2"]), ("", [])])
def test_generate_inpainting_keeps_the_known_pixels(cascade, one_thread, tmp_path, prompt, extra):
    """Also with an empty prompt: inpainting from the image alone (the null condition)."""
    from imager.inference.edit import prepare
    from imager.inference.images import resize, resize_mask

    image = save_random(tmp_path / "in.png", (32, 32), seed=1)
    white = np.zeros((32, 32), bool)
    white[8:24, 12:30] = True
    mask = save_mask(tmp_path / "mask.png", white)
    args = gen_args(cascade, tmp_path / "out.png", "--init-image", image, "--mask", mask, *extra)
    args[1] = prompt
    invoke(*args)
    out = pixels(tmp_path / "out.png")

    blur = float(extra[1]) if extra else 0.0
    edit = prepare(image, mask, mask_blur=blur)
    expected = to_hwc(resize(edit.image, 16))[0].numpy()
    keep = (resize_mask(edit.mask, 16) == 0)[0, 0].numpy()
    assert out.shape == (16, 16, 3) and keep.any() and not keep.all()
    assert np.array_equal(out[keep], expected[keep])
    assert not np.array_equal(out[~keep], expected[~keep])  # the white part was repainted


def test_generate_outpainting_paints_the_border(cascade, one_thread, tmp_path, caplog):
    tall = save_random(tmp_path / "tall.png", (12, 16), seed=2)
    invoke(*gen_args(cascade, tmp_path / "left.png", "--init-image", tall, "--outpaint", "left=4"))
    out = pixels(tmp_path / "left.png")
    assert out.shape == (16, 16, 3)  # the 16x16 canvas is the output size: no resize
    assert np.array_equal(out[:, 4:], pixels(tall))  # the image itself is kept, on the right
    assert not np.array_equal(out[:, :4], np.repeat(pixels(tall)[:, :1], 4, axis=1))  # the border is painted, not the edge repeated

    small = save_random(tmp_path / "small.png", (12, 12), seed=3)
    invoke(*gen_args(cascade, tmp_path / "all.png", "--init-image", small, "--outpaint", "4"))
    assert pixels(tmp_path / "all.png").shape == (16, 16, 3)  # a 20x20 canvas, at the cascade's resolution
    invoke(*gen_args(cascade, tmp_path / "wide.png", "--init-image", small, "--outpaint", "right=4"))
    assert "the 16x12 canvas is not square; extended to 16x16" in caplog.text


def test_generate_mask_without_white_writes_the_input_and_warns(cascade, one_thread, tmp_path, caplog):
    from imager.inference.edit import prepare
    from imager.inference.images import resize

    gray = save_random(tmp_path / "gray.png", (32, 32), mode="L", seed=4)
    black = save_mask(tmp_path / "black.png", np.zeros((16, 16), bool))
    invoke(*gen_args(cascade, tmp_path / "out.png", "--init-image", gray, "--mask", black, "--num", "2"))
    expected = to_hwc(resize(prepare(gray).image, 16))[0].numpy()
    for name in ("out-0.png", "out-1.png"):
        assert np.array_equal(pixels(tmp_path / name), expected)
    for note in ("--init-image: grayscale, converted to RGB", "--mask: 16x16 resized to the image's 32x32", "--mask: has no white, so nothing is repainted: the result is the input"):
        assert note in caplog.text


def test_cascade_rejects_mismatched_resolutions(cascade):
    base = Cascade.load(cascade["base"] / "model.safetensors").base
    sr = Cascade.load(cascade["base"] / "model.safetensors", cascade["sr"] / "model.safetensors").sr
    Cascade(base, sr)  # they agree
    sr.lowres = 4
    with pytest.raises(CheckpointError, match="the SR model takes 4 px inputs but the base model makes 8 px images"):
        Cascade(base, sr)


def test_evaluate_without_a_sweep_still_writes_every_output(data, cascade, tmp_path):
    """DVC expects every declared output: with `sweep.prompts: 0` the plot says there is no sweep."""
    off = copy.deepcopy(PARAMS)
    off["evaluate"]["sweep"]["prompts"] = 0
    invoke(*evaluate_args(data, cascade, write(tmp_path / "params.yaml", off), tmp_path))
    assert json.loads((tmp_path / "sweep.json").read_text()) == {} and json.loads((tmp_path / "curve.json").read_text()) == []
    with Image.open(tmp_path / "sweep.png") as im:
        im.verify()
    assert json.loads((tmp_path / "evaluate.json").read_text())["samples"] > 0


EDITS = {
    "images": 4, "grid_images": 1,
    "inpaint": {"masks": ["centre", "border"], "border": 2, "resample": 2},
    "img2img": {"strengths": [0.5, 1.0], "samplers": ["ddim", "dpmpp_2m"], "images": 4},
    "sketch": {"strength": 0.7},
}  # fmt: skip


def edits_args(data: dict, c: dict, params: Path, out: Path) -> list:
    return [
        "evaluate-edits", "--params", params, "--shards", data["shards"], "--embeddings", data["emb"],
        "--base", c["base"], "--sr", c["sr"], "--evaluator", c["evaluator"],
        "--metrics", out / "edits.json", "--curve", out / "strength.json", "--plot", out / "strength.png", "--grid", out / "grid.png",
    ]  # fmt: skip


def test_evaluate_edits_reports_every_edit_and_its_costs(data, cascade, tmp_path, one_thread):
    params = write(tmp_path / "params.yaml", {**PARAMS, "edits": EDITS})
    invoke(*edits_args(data, cascade, params, tmp_path))
    report = json.loads((tmp_path / "edits.json").read_text())
    assert set(report["inpaint"]) == {"centre", "centre_resample2", "border", "border_resample2"}
    for name, row in report["inpaint"].items():
        assert row["known_max_error"] == 0, name  # the overlay gives the known pixels back exactly
        assert row["known_max_error_before_overlay"] > 0, name  # the network alone does not
        assert math.isfinite(row["fid_evaluator"]) and 0 <= row["r_precision_evaluator"] <= 1
    steps = PARAMS["evaluate"]["base"]["steps"]
    # CFG is one forward pass per step; RePaint's resampling takes each step but the last twice.
    assert report["inpaint"]["centre"]["base_calls_per_batch"] == steps
    assert report["inpaint"]["centre_resample2"]["base_calls_per_batch"] == (steps - 1) * 2 + 1
    curve = json.loads((tmp_path / "strength.json").read_text())
    assert [(r["sampler"], r["strength"]) for r in curve] == [(s, x) for s in ("ddim", "dpmpp_2m") for x in (0.5, 1.0)]
    for sampler in ("ddim", "dpmpp_2m"):
        weak, full = (next(r for r in curve if r["sampler"] == sampler and r["strength"] == x) for x in (0.5, 1.0))
        assert weak["psnr"] > full["psnr"]  # a lower strength stays closer to the input
    assert set(report["sketch"]) == {"sketch", "text_only", "strength"} and 0 <= report["sketch"]["sketch"]["sketch_fscore"] <= 1
    for name in ("strength.png", "grid.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
    # The same params give the same files: nothing run-dependent is written.
    again = tmp_path / "again"
    again.mkdir()
    invoke(*edits_args(data, cascade, params, again))
    assert (again / "edits.json").read_text() == (tmp_path / "edits.json").read_text()


def test_evaluate_edits_bad_params_are_one_line(data, cascade, tmp_path):
    bad = {**PARAMS, "edits": {**EDITS, "img2img": {**EDITS["img2img"], "strengths": [0.0, 0.5]}}}
    line = error_line(*edits_args(data, cascade, write(tmp_path / "params.yaml", bad), tmp_path))
    assert "edits.img2img.strengths" in line and "(0, 1]" in line
    assert not (tmp_path / "edits.json").exists()


def test_evaluator_beats_chance_on_real_held_out_emoji(tmp_path):
    """Trained on 720 real OpenMoji images, the evaluator ranks the captions of 80 emoji it never
    saw far above chance: retrieval generalises through the frozen text embeddings."""
    from imager.evaluation.train import train_and_check

    params = write(tmp_path / "params.yaml", {
        "tracking": {"enabled": False, "experiment": "tests"},
        "download": {"source": "openmoji", "resolution": 32, "limit": 800},
        "shard": {"resolution": 32, "val_fraction": 0.1, "samples_per_shard": 400},
        "embed": {"encoder": "minilm", "max_length": 16, "batch_size": 128, "prompts": ["red heart"]},
    })  # fmt: skip
    p = ["--params", params]
    invoke("download", *p, "--out", tmp_path / "raw", "--report", tmp_path / "d.json")
    invoke("shard", *p, "--data", tmp_path / "raw", "--out", tmp_path / "shards", "--report", tmp_path / "s.json")
    invoke("embed", *p, "--shards", tmp_path / "shards", "--out", tmp_path / "emb", "--report", tmp_path / "e.json")
    cfg = config.parse({"evaluator": {"resolution": 32, "channels": [16, 32, 64], "feature_dim": 64, "epochs": 15, "batch_size": 64}}).evaluator
    report = train_and_check(cfg, shards_dir=tmp_path / "shards", cache_dir=tmp_path / "emb", out=tmp_path / "ev" / "evaluator.safetensors")
    k = next(key for key in report if key.startswith("val_r_precision_k") and not key.endswith("chance"))
    assert report["val_images"] >= 40
    assert report[k] > 5 * report[f"{k}_chance"], report
    assert report["val_top1_all"] > 5 * report["val_top1_all_chance"], report
