"""`imager generate --prompts FILE --out DIR`: a captioned dataset from a prompt list on a tiny
random cascade. Each image is the one `imager generate` makes for its prompt and seed; a run
stopped after a chunk and started again makes only the rest and ends with the same pixels; the
folder reads back through the folder source and the shard step; other settings, mixed options and
bad files are one line each and change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imager import config
from imager.data.download import download
from imager.data.shard import read_index
from imager.inference.metadata import read_params
from imager.io import read_jsonl
from stages.app import app
from tests.app.conftest import write_models
from tests.conftest import tiny_params
from tests.unit.test_adapters_cli import SAMPLING
from tests.unit.test_inference import HashEncoder

runner = CliRunner()
PROMPTS = "# fruit\nred apple\n\ngreen pear\n  yellow   banana \n"
TEXTS = ["red apple", "green pear", "yellow banana"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return write_models(tmp_path_factory.mktemp("dataset-models") / "models")


@pytest.fixture
def cli(models, tmp_path, write_params, monkeypatch, one_thread):
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    params = write_params(tiny_params())
    (tmp_path / "prompts.txt").write_text(PROMPTS)

    def run(*args) -> tuple[int, str]:
        argv = ["generate", "--params", params, "--base", models[0], "--sr", models[1], "--device", "cpu", *SAMPLING, *args]
        result = runner.invoke(app, [str(a) for a in argv])
        return result.exit_code, result.output

    return run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def images_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: pixels(p) for p in sorted((folder / "images").glob("*.png"))}


def test_each_image_is_what_generate_makes_for_its_prompt_and_seed(cli, tmp_path):
    out = tmp_path / "set"
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--num", "2", "--chunk", "1", "--out", out)
    assert code == 0, output
    assert "6 images of 3 prompts" in output and "6 made now, 0 already there" in output
    records = read_jsonl(out / "manifest.jsonl")
    assert [r["key"] for r in records] == [f"p{i:06d}_{j:03d}" for i in range(3) for j in range(2)]
    for rec in records:
        i, j = rec["prompt_index"], rec["image_index"]
        assert rec["caption"] == TEXTS[i] == (out / "images" / f"{rec['key']}.txt").read_text().strip()
        assert (rec["source"], rec["licence"], rec["width"], rec["height"]) == ("generated", "CC BY-SA 4.0", 64, 64)
        # the same image through the one-prompt path: chunk i's noise is drawn from seed 5 + its first image's index
        single = tmp_path / f"single-{i}.png"
        code, output = cli(TEXTS[i], "--num", "2", "--seed", str(5 + 2 * i), "--out", single)
        assert code == 0, output
        assert np.array_equal(pixels(out / rec["file"]), pixels(single.with_name(f"single-{i}-{j}.png")))
        params = read_params((out / rec["file"]).read_bytes())
        assert params["prompt"] == TEXTS[i] and params["seed"] == rec["seed"] == 5 + 2 * i
    settings = json.loads((out / "generate.json").read_text())
    assert settings["per_prompt"] == 2 and settings["sampling"]["base"]["steps"] == 3 and "base_sha256" in settings


def test_a_stopped_run_makes_only_the_rest_and_the_same_pixels(cli, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli("--prompts", tmp_path / "prompts.txt", "--chunk", "2", "--out", whole)[0] == 0
    import imager.inference.dataset as dataset

    real, calls = dataset.write_chunk, []

    def dies_after_one(out, chunk, pngs, licence):
        calls.append(chunk.first)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped in the middle of the run, after the first chunk
        return real(out, chunk, pngs, licence)

    monkeypatch.setattr(dataset, "write_chunk", dies_after_one)
    code, _ = cli("--prompts", tmp_path / "prompts.txt", "--chunk", "2", "--out", parts)
    assert code != 0 and len(read_jsonl(parts / "manifest.jsonl")) == 2
    monkeypatch.setattr(dataset, "write_chunk", real)
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--chunk", "2", "--out", parts)
    assert code == 0 and "1 made now, 2 already there" in output, output
    a, b = images_of(whole), images_of(parts)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--chunk", "2", "--out", parts)
    assert code == 0 and "0 made now, 3 already there" in output


def test_the_folder_reads_back_as_data(cli, tmp_path):
    out = tmp_path / "set"
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--num", "2", "--format", "webdataset", "--out", out)
    assert code == 0, output
    index = read_index(out / "shards")
    assert index["splits"]["train"]["count"] == 6 and index["resolution"] == 64
    cfg = config.parse({"download": {"source": "folder", "folder": {"path": str(out / "images")}}}).download
    report = download(cfg, tmp_path / "raw")
    assert report["kept"] == 6 and report["skipped"] == 0
    got = {r["key"]: r["caption"] for r in read_jsonl(tmp_path / "raw" / "manifest.jsonl")}
    assert got == {r["key"]: r["caption"] for r in read_jsonl(out / "manifest.jsonl")}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["red apple", "--prompts", "{prompts}", "--out", "{out}"], "give a PROMPT or --prompts FILE, not both"),
        (["--prompts", "{prompts}", "--out", "{out}", "--init-image", "{prompts}"], "--init-image: not with --prompts (a dataset is made from text alone)"),
        (["--prompts", "{prompts}"], "--out: give the folder of the dataset, e.g. --out data/synthetic"),
        (["--prompts", "{prompts}", "--out", "{out}", "--format", "zip"], "--format: must be folder or webdataset, got 'zip'"),
        (["--prompts", "{missing}", "--out", "{out}"], "--prompts: {missing}: file not found"),
        (["--prompts", "{empty}", "--out", "{out}"], "--prompts: {empty}: no prompts (one per line; # starts a comment)"),
        (["--prompts", "{prompts}", "--out", "{file}"], "--out: {file} is a file; give a folder for the dataset"),
        (["--out", "{out}"], "give a PROMPT (e.g. 'red apple') or --prompts FILE (a dataset from a prompt list)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "file").write_text("x")
    paths = {"prompts": tmp_path / "prompts.txt", "out": tmp_path / "set", "missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "file": tmp_path / "file"}
    code, output = cli(*[a.format(**paths) for a in args])
    assert code != 0
    assert output.strip().splitlines()[-1] == f"error: {message.format(**paths)}"
    assert not (tmp_path / "set").exists()


def test_other_settings_in_the_same_folder_are_refused(cli, tmp_path):
    out = tmp_path / "set"
    assert cli("--prompts", tmp_path / "prompts.txt", "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--out", out, "--guidance", "2")
    assert code != 0
    assert output.strip().splitlines()[-1].startswith(f"error: --out: {out} holds images made with other settings (sampling: ")
    (tmp_path / "more.txt").write_text(PROMPTS + "blue plum\n")
    code, output = cli("--prompts", tmp_path / "more.txt", "--out", out)
    assert code != 0 and "(prompts_sha256: " in output
    assert {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.png").write_bytes(b"")
    code, output = cli("--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "busy")
    assert output.strip().splitlines()[-1] == f"error: --out: {tmp_path / 'busy'} is not empty and holds no generate.json; give a new or empty folder"
