"""The download and shard stages through the `imager` Typer app on a folder holding every kind of
input they skip or convert, with MLflow tracking on: every reason is a report key and a metric."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stages.app import app
from tests.conftest import png_bytes, tiny_params
from tests.unit.test_shard import png_with_size

runner = CliRunner()


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return saved(frames[0], fmt, save_all=True, append_images=frames[1:])


def palette() -> Image.Image:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return image


# file name -> (bytes, the reason the shard step skips it for; None: kept)
SHARD_INPUTS = {
    "rgb.png": (png_bytes((10, 20, 30)), None),
    "grey.png": (png_bytes(128, mode="L"), None),
    "grey_alpha.png": (png_bytes((128, 200), mode="LA"), None),
    "empty.png": (b"", "empty_file"),
    "truncated.png": (png_bytes(size=(64, 64))[:60], "truncated"),
    "page.png": (b"<!DOCTYPE html><html><body>Not Found</body></html>", "not_an_image"),
    "tiny.png": (png_bytes(size=(2, 2)), "bad_dimensions"),
    "bomb.png": (png_with_size(100_000, 100_000), "too_many_pixels"),
    "anim.gif": (animation("GIF"), "animated"),
    "anim.png": (animation("PNG"), "animated"),  # APNG
    "anim.webp": (animation("WEBP"), "animated"),
    "i16.png": (saved(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG"), "odd_mode_i16"),
    "i16b.tif": (saved(Image.fromarray(np.full((16, 16), 40000, dtype=">u2")), "TIFF"), "odd_mode_i16b"),
    "int32.tif": (saved(Image.fromarray(np.full((16, 16), 70000, dtype=np.int32)), "TIFF"), "odd_mode_i"),
    "float.tif": (saved(Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)), "TIFF"), "odd_mode_f"),
    "bilevel.png": (png_bytes(1, mode="1"), "odd_mode_1"),
    "cmyk.jpg": (png_bytes((0, 255, 255, 0), mode="CMYK", fmt="JPEG"), "odd_mode_cmyk"),
    "palette.png": (saved(palette(), "PNG"), "odd_mode_p"),
    # Pillow < 13 cannot read back the YCbCr TIFF it writes; its own IM format keeps the mode (Pillow opens by content).
    "ycbcr.tif": (saved(Image.new("YCbCr", (16, 16), (120, 100, 160)), "IM"), "odd_mode_ycbcr"),
    "lab.tif": (saved(Image.new("LAB", (16, 16), (50, 0, 0)), "TIFF"), "odd_mode_lab"),
    "gone.png": (png_bytes(), "missing_file"),  # deleted after download
}
# Kept and counted as converted when odd_modes is convert.
CONVERTED = {"animated", "odd_mode_i16", "odd_mode_i16b", "odd_mode_i", "odd_mode_f", "odd_mode_1", "odd_mode_cmyk",
             "odd_mode_p", "odd_mode_ycbcr", "odd_mode_lab"}  # fmt: skip
DOWNLOAD_SKIPS = {"caption_not_utf8": 1, "empty_caption": 1, "no_caption": 1, "unsupported_file": 1}


def every_kind_of_input(root: Path) -> None:
    """A folder source: every shard input with a caption, and one entry per download skip reason."""
    root.mkdir()
    for name, (data, _) in SHARD_INPUTS.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"a picture named {name}", encoding="utf-8")
    (root / "latin1.png").write_bytes(png_bytes())
    (root / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))  # caption_not_utf8
    (root / "blank.png").write_bytes(png_bytes())
    (root / "blank.txt").write_text("  \n")  # empty_caption
    (root / "uncaptioned.png").write_bytes(png_bytes())  # no_caption
    (root / "notes.json").write_text("{}")  # unsupported_file


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def metrics_of(experiment: str, stage: str) -> dict[str, float]:
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    [run] = [r for r in runs if r.data.tags["imager.stage"] == stage]
    assert run.info.status == "FINISHED"
    return run.data.metrics


@pytest.mark.parametrize("odd_modes", ["skip", "convert"])
def test_every_skip_reason_is_counted_and_logged_to_mlflow(tmp_path, write_params, monkeypatch, mlflow_uri, odd_modes):
    monkeypatch.chdir(tmp_path)
    experiment = f"data-reasons-{odd_modes}"
    every_kind_of_input(tmp_path / "photos")
    params = write_params(tiny_params(
        tracking={"enabled": True, "experiment": experiment},
        download={"source": "folder", "folder": {"path": str(tmp_path / "photos")}},
        shard={"resolution": 16, "odd_modes": odd_modes},
    ))  # fmt: skip

    d = invoke("download", "--params", str(params), "--out", "raw", "--report", "download.json")
    assert d.exit_code == 0, d.output
    download = json.loads(Path("download.json").read_text())
    assert download["skipped_by_reason"] == DOWNLOAD_SKIPS
    assert download["kept"] == len(SHARD_INPUTS)

    Path("raw/images/gone.png").unlink()
    s = invoke("shard", "--params", str(params), "--data", "raw", "--out", "shards", "--report", "shard.json")
    assert s.exit_code == 0, s.output
    shard = json.loads(Path("shard.json").read_text())
    reasons = [reason for _, reason in SHARD_INPUTS.values() if reason is not None]
    skipped = {r: reasons.count(r) for r in reasons if odd_modes == "skip" or r not in CONVERTED}
    converted = {r: reasons.count(r) for r in reasons if odd_modes == "convert" and r in CONVERTED}
    assert shard["skipped_by_reason"] == skipped
    assert shard["converted_by_mode"] == converted
    assert shard["kept"] == len(SHARD_INPUTS) - sum(skipped.values())

    mlflow.set_tracking_uri(mlflow_uri)
    logged = metrics_of(experiment, "download")
    assert {k: v for k, v in logged.items() if k.startswith("skipped_by_reason.")} == {
        f"skipped_by_reason.{r}": n for r, n in DOWNLOAD_SKIPS.items()
    }
    logged = metrics_of(experiment, "shard")
    assert {k: v for k, v in logged.items() if k.startswith(("skipped_by_reason.", "converted_by_mode."))} == {
        **{f"skipped_by_reason.{r}": n for r, n in skipped.items()},
        **{f"converted_by_mode.{r}": n for r, n in converted.items()},
    }


@pytest.mark.parametrize(
    "key, problem", [("urls.list", "file not found"), ("folder.captions", "file not found"), ("folder.path", "directory not found")]
)
def test_a_missing_file_named_in_params_is_one_line_naming_the_key(tmp_path, write_params, monkeypatch, key, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    missing = tmp_path / "nowhere" / "list.csv"
    source = {
        "urls.list": {"source": "urls", "urls": {"list": str(missing)}},
        "folder.captions": {"source": "folder", "folder": {"path": str(tmp_path / "photos"), "captions": str(missing)}},
        "folder.path": {"source": "folder", "folder": {"path": str(missing)}},
    }[key]
    params = write_params(tiny_params(download=source))
    result = runner.invoke(app, ["download", "--params", str(params), "--out", "raw", "--report", "r.json"])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: params.yaml: download.{key}: {missing}: {problem}"
    assert not (tmp_path / "raw").exists() and not (tmp_path / "r.json").exists()
