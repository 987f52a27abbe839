"""The openmoji source's line-art style, and the caption format every source's captions go through."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imager import config
from imager.data import openmoji
from imager.data.config import OpenMojiSource
from imager.data.download import download
from imager.data.records import Sample
from imager.errors import ConfigError, SourceError
from tests.conftest import png_bytes

SVG = '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">{}</svg>'
COLOUR_GROUP = '<g id="color"><circle cx="36" cy="36" r="23" fill="#FCEA2B" stroke="#000" stroke-width="2"/></g>'


def dl_cfg(**download):
    return config.parse({"download": download}).download


def _dark(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int).max(-1) < 128  # (H, W): black and dark-grey pixels


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _chroma(image: Image.Image) -> int:
    arr = np.asarray(image).astype(int)
    return int((arr.max(-1) - arr.min(-1)).max())


# ---------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("code", ["2764", "1F600", "1F1EF-1F1F5", "1F468-200D-1F469-200D-1F467"])
def test_line_art_is_the_outline_of_the_colour_emoji_in_black(code):
    line = openmoji.render_line(openmoji.svg_path(code), 64)
    colour = openmoji.render(code, 64)
    assert line.mode == "RGB" and line.size == (64, 64)
    arr = np.asarray(line)
    assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()
    assert (arr.min(-1) == 255).mean() > 0.5  # mostly white paper
    dark = _dark(line)
    assert dark.mean() > 0.03  # the lines are there
    assert _chroma(line) < 30  # and only in black and grey
    # The lines sit where the colour image has its black outline (within a pixel: two rasterisers),
    # and far less so on another emoji's outline.
    on_own = (dark & _dilate(_dark(colour), 1)).sum() / dark.sum()
    other = openmoji.render("2764" if code == "1F600" else "1F600", 64)
    on_other = (dark & _dilate(_dark(other), 1)).sum() / dark.sum()
    assert on_own > 0.9 and on_other < 0.7


@pytest.mark.parametrize("code", ["2764", "1F1EF-1F1F5"])  # a red heart, the red disc of Japan
def test_line_art_leaves_the_colour_fills_white(code):
    colour = np.asarray(openmoji.render(code, 64)).astype(int)
    red = (colour[..., 0] > 150) & (colour[..., 1] < 100) & (colour[..., 2] < 100)
    inside = red & ~_dilate(_dark(openmoji.render(code, 64)), 2)  # red fill away from the outline
    assert inside.sum() > 50
    line = np.asarray(openmoji.render_line(openmoji.svg_path(code), 64))
    assert (line[inside] == 255).all()


def test_line_art_keeps_the_line_supplement():
    # The A button draws its letter in the colour group (white on red) and, for the black version,
    # in line-supplement; the line group alone is an empty square.
    image = openmoji.render_line(openmoji.svg_path("1F170"), 72)
    letter = _dark(image)[20:52, 20:52]  # inside the square's border (x, y 12..60 on the 72 grid)
    assert letter.mean() > 0.05


def test_line_art_size_follows_the_resolution():
    for resolution in (16, 72, 100):
        assert openmoji.render_line(openmoji.svg_path("1F600"), resolution).size == (resolution, resolution)


def test_a_wide_svg_is_centred_on_the_square():
    svg = SVG.format('<g id="line"><rect x="0" y="0" width="72" height="36" fill="#000"/></g>').replace("0 0 72 72", "0 0 72 36")
    dark = _dark(openmoji.render_line(svg, 64))
    assert dark[20:44].all() and not dark[:12].any() and not dark[52:].any()


def test_svg_text_or_path_render_the_same(tmp_path):
    text = openmoji.svg_path("2764").read_text(encoding="utf-8")
    (tmp_path / "heart.svg").write_text(text, encoding="utf-8")
    a = np.asarray(openmoji.render_line(text, 48))
    b = np.asarray(openmoji.render_line(tmp_path / "heart.svg", 48))
    assert (a == b).all() and _dark(Image.fromarray(a)).any()


def test_nothing_of_the_colour_group_reaches_the_image():
    # A black-stroked circle in the colour group and a red one in line: only the second is drawn.
    svg = SVG.format(
        COLOUR_GROUP
        + '<g id="skin"><rect x="0" y="0" width="72" height="72" fill="#b1b1b1"/></g>'
        + '<g id="line"><rect x="30" y="30" width="12" height="12" fill="#000000"/></g>'
    )
    arr = np.asarray(openmoji.render_line(svg, 72)).astype(int)
    assert (arr[32:40, 32:40] < 30).all()  # the line group's square, black
    outside = np.ones((72, 72), bool)
    outside[28:44, 28:44] = False
    assert (arr[outside] == 255).all()  # no circle, no skin rectangle
    text = openmoji.line_svg(svg)
    assert "FCEA2B" not in text and "b1b1b1" not in text and "#000000" in text


@pytest.mark.parametrize(
    "groups",
    [COLOUR_GROUP, COLOUR_GROUP + '<g id="line"/>', COLOUR_GROUP + '<g id="line"></g><g id="line-supplement"/>'],
)
def test_an_svg_without_line_art_is_skipped(tmp_path, groups):
    path = tmp_path / "nothing.svg"
    path.write_text(SVG.format(groups), encoding="utf-8")
    with pytest.raises(openmoji.LineArtError) as exc:
        openmoji.render_line(path, 32)
    assert exc.value.reason == "no_line_art"


@pytest.mark.parametrize(
    "svg",
    [
        "not xml at all",
        "",
        "<svg><g id='line'><path d='M0 0'/></svg>",  # not well-formed
        "<html><g id='line'><path d='M0 0'/></g></html>",  # not an SVG
        SVG.format('<g id="line"><path d="M0 0L9 9" stroke="#000"/></g>').replace('viewBox="0 0 72 72"', 'width="0" height="0"'),
    ],
)
def test_an_unreadable_svg_is_skipped(svg):
    with pytest.raises(openmoji.LineArtError) as exc:
        openmoji.render_line(svg, 32)
    assert exc.value.reason == "bad_svg"


def test_a_missing_or_undecodable_svg_file_is_skipped(tmp_path):
    (tmp_path / "latin1.svg").write_bytes(SVG.format('<g id="line"><text>caf\xe9</text></g>').encode("latin-1"))
    for path in (tmp_path / "absent.svg", tmp_path / "latin1.svg"):
        with pytest.raises(openmoji.LineArtError) as exc:
            openmoji.render_line(path, 32)
        assert exc.value.reason == "bad_svg"


def test_missing_resvg_is_a_one_line_source_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "resvg_py", None)  # makes `import resvg_py` fail
    with pytest.raises(SourceError, match="pip install resvg-py") as exc:
        openmoji.render_line(openmoji.svg_path("1F600"), 32)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------------- source


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_colour_style_is_the_font_rendering(monkeypatch):
    codes = ["1F1EF-1F1F5", "1F600", "2764-FE0F"]
    monkeypatch.setattr(openmoji, "hexcodes", lambda: codes)
    for cfg in (OpenMojiSource(), OpenMojiSource(style="color", font="colr1")):
        plan = openmoji.openmoji_plan(cfg, 40, None)
        samples = list(plan.items())
        assert plan.total == 3 and [s.key for s in samples] == codes
        assert [s.data for s in samples] == [_png(openmoji.render(c, 40, cfg.font)) for c in codes]


def test_line_style_pairs_with_the_colour_style_by_key():
    colour_plan, line_plan = openmoji.openmoji_plan(OpenMojiSource(), 24, 30), openmoji.openmoji_plan(OpenMojiSource(style="line"), 24, 30)
    colour = [s for s in colour_plan.items() if isinstance(s, Sample)]
    line = [s for s in line_plan.items() if isinstance(s, Sample)]
    assert colour_plan.total == line_plan.total == 30
    assert len(colour) > 10 and [s.key for s in line] == [s.key for s in colour]
    for c, ln in zip(colour, line, strict=True):
        assert (ln.caption, ln.ext, ln.licence) == (c.caption, c.ext, c.licence)
        assert ln.data != c.data
        image = Image.open(io.BytesIO(ln.data))
        assert image.mode == "RGB" and image.size == (24, 24) and _chroma(image) < 30


def test_line_style_download_counts_no_line_art(tmp_path, monkeypatch):
    monkeypatch.setattr(openmoji, "hexcodes", lambda: ["1F600", "2764", "E000"])
    (tmp_path / "empty.svg").write_text(SVG.format(COLOUR_GROUP + '<g id="line"/>'), encoding="utf-8")
    real = openmoji.svg_path
    monkeypatch.setattr(openmoji, "svg_path", lambda code: tmp_path / "empty.svg" if code == "2764" else real(code))
    report = download(dl_cfg(resolution=32, openmoji={"style": "line"}), tmp_path / "out")
    assert report["kept"] == 1 and report["skipped_by_reason"] == {"no_line_art": 1, "no_name": 1}
    [record] = map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())
    assert record["key"] == "1F600" and (record["width"], record["height"]) == (32, 32)


def test_style_is_validated():
    assert dl_cfg().openmoji.style == "color"
    with pytest.raises(ConfigError, match=r"download\.openmoji\.style"):
        dl_cfg(openmoji={"style": "outline"})


# ---------------------------------------------------------------------------- caption format


@pytest.mark.parametrize(
    "fmt, problem",
    [
        ("line art", "must contain the field {caption}"),
        ("{{caption}}", "must contain the field {caption}"),
        ("{caption}, {foo}", "{foo}"),
        ("{}: {caption}", "{}"),
        ("{caption!r}", "{caption!r}"),
        ("{caption", "not a valid format string"),
    ],
)
def test_caption_format_must_hold_only_the_caption_field(fmt, problem):
    with pytest.raises(ConfigError) as exc:
        dl_cfg(caption_format=fmt)
    message = str(exc.value)
    assert "download.caption_format" in message and problem in message and "\n" not in message


def test_caption_format_is_applied_to_every_written_caption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    captions = {"cat": "a red cat", "odd": "a {curly} 100% caption"}  # braces in a caption stay as they are
    for key, text in captions.items():
        (src / f"{key}.png").write_bytes(png_bytes())
        (src / f"{key}.txt").write_text(text)
    out = tmp_path / "out"
    download(dl_cfg(source="folder", caption_format="{caption}, line art", folder={"path": str(src)}), out)
    manifest = {r["key"]: r["caption"] for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    expected = {key: f"{text}, line art" for key, text in captions.items()}
    assert manifest == expected
    written = {key: (out / "images" / f"{key}.txt").read_text(encoding="utf-8") for key in captions}
    assert written == {key: text + "\n" for key, text in expected.items()}
    download(dl_cfg(source="folder", folder={"path": str(src)}), tmp_path / "plain")
    plain = [json.loads(line)["caption"] for line in (tmp_path / "plain" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(plain) == sorted(captions.values())


def test_params_file_keeps_the_defaults():
    params = config.load(Path(__file__).parents[2] / "params.yaml")
    assert params.download.caption_format == "{caption}" and params.download.openmoji.style == "color"
