"""`imager generate`'s image options: every bad input or option is one line naming the option, found
before any model loads (Cascade.load is made to fail loudly), and no PNG is written. The runs with a
trained cascade are in tests/stages/test_evaluate.py."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from imager.inference import Cascade
from stages.app import app
from tests.conftest import png_bytes, tiny_params

runner = CliRunner()


@pytest.fixture
def files(tmp_path, write_params, monkeypatch) -> dict:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(Cascade, "load", no_model)
    (tmp_path / "image.png").write_bytes(png_bytes((200, 40, 40), size=(16, 16)))
    (tmp_path / "wide.png").write_bytes(png_bytes(255, size=(16, 8), mode="L"))
    (tmp_path / "x.png").write_bytes(b"not a png")
    return {"dir": tmp_path, "params": write_params(tiny_params()), "out": tmp_path / "out.png"}


def error_line(f: dict, *args: str) -> str:
    argv = ["generate", "red heart", "--out", f["out"], "--params", f["params"], *args]
    result = runner.invoke(app, [str(a) for a in argv])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert not f["out"].exists() and not any(p.name.endswith(".tmp") for p in f["dir"].iterdir())
    return lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init-image", "{dir}/x.png"], "error: --init-image: {dir}/x.png is not an image Pillow can read"),
        (["--init-image", "{dir}/image.png", "--mask", "{dir}/x.png"], "error: --mask: {dir}/x.png is not an image Pillow can read"),
        (["--init-image", "{dir}/missing.png"], "error: --init-image: {dir}/missing.png does not exist"),
        (
            ["--init-image", "{dir}/image.png", "--mask", "{dir}/wide.png"],
            "error: --mask: 16x8 has another shape than the image (16x16); give a mask of the image's size",
        ),
        (["--init-image", "{dir}/image.png", "--strength", "0"], "error: --strength: input should be greater than 0, got 0.0"),
        (["--init-image", "{dir}/image.png", "--strength", "1.5"], "error: --strength: input should be less than or equal to 1, got 1.5"),
        (["--init-image", "{dir}/image.png", "--sr-strength", "0"], "error: --sr-strength: input should be greater than 0, got 0.0"),
        (["--init-image", "{dir}/image.png", "--mask", "{dir}/image.png", "--resample", "0"], "error: --resample: input should be greater than or equal to 1"),
        (["--init-image", "{dir}/image.png", "--mask", "{dir}/image.png", "--mask-blur", "-1"], "error: --mask-blur: must be >= 0 pixels, got -1.0"),
        (["--init-image", "{dir}/image.png", "--outpaint", "left=x"], "error: --outpaint: left=x is not a whole number of pixels"),
        (["--init-image", "{dir}/image.png", "--outpaint", "middle=4"], "error: --outpaint: unknown side 'middle'; use left, top, right, bottom"),
        (["--init-image", "{dir}/image.png", "--outpaint", "left 4"], "error: --outpaint: 'left 4' is not SIDE=PIXELS"),
        (["--init-image", "{dir}/image.png", "--outpaint", "0"], "error: --outpaint: every side is 0"),
        (["--init-image", "{dir}/image.png", "--outpaint", " "], "error: --outpaint: is empty"),
    ],
)
def test_bad_image_input_is_one_line_naming_the_option(files, args, message):
    line = error_line(files, *(a.format(**files) for a in args))
    assert line.startswith(message.format(**files)), line


@pytest.mark.parametrize(
    "args",
    [["--mask", "{dir}/image.png"], ["--outpaint", "16"], ["--strength", "0.5"], ["--sr-strength", "0.5"], ["--mask-blur", "2"], ["--mask-blur", "0"]],
)
def test_image_options_need_an_init_image(files, args):
    option = args[0]
    line = error_line(files, *(a.format(**files) for a in args))
    assert line == f"error: {option}: needs --init-image (the image to edit); give one, or leave out {option}"


def test_help_documents_the_image_options_and_the_img2img_default():
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for option in ("--init-image", "--mask", "--strength", "--sr-strength", "--resample", "--mask-blur", "--outpaint"):
        assert option in result.output
    assert "Image input" in result.output and "0.75 (AUTOMATIC1111's) for img2img, 1 with --mask or --outpaint" in result.output


def test_a_usable_input_gets_past_the_checks(files, caplog):
    """The fixture's inputs are valid: with them the run reaches the model (so the cases above fail
    on what they change, not on the fixture)."""
    argv = ["generate", "red heart", "--out", files["out"], "--params", files["params"]]
    argv += ["--init-image", files["dir"] / "image.png", "--mask", files["dir"] / "image.png", "--outpaint", "left=4", "--mask-blur", "1"]
    result = runner.invoke(app, [str(a) for a in argv])
    assert isinstance(result.exception, AssertionError) and "a model was loaded" in str(result.exception)
    assert not files["out"].exists()
    assert "no effect" not in caplog.text and "is not used" not in caplog.text


@pytest.mark.parametrize(
    "args, warning",
    [
        (["--resample", "2"], "--resample has no effect without a mask to repaint (--mask or --outpaint)"),
        (["--mask-blur", "2"], "--mask-blur has no effect without a mask (--mask or --outpaint)"),
        (["--sr-strength", "0.5", "--no-sr"], "--sr-strength has no effect with --no-sr"),
        (["--strength", "1"], "--init-image is not used at --strength 1 without a mask: the image is drawn from noise"),
    ],
)
def test_an_image_option_without_effect_is_a_warning(files, caplog, args, warning):
    argv = ["generate", "red heart", "--out", files["out"], "--params", files["params"], "--init-image", files["dir"] / "image.png", *args]
    result = runner.invoke(app, [str(a) for a in argv])
    assert isinstance(result.exception, AssertionError)  # it went on to load the model
    assert warning in caplog.text
