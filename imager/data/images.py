"""Decode and check one input image for sharding; say why when it cannot be used.

Reasons (the keys of the shard report's ``skipped_by_reason``, and MLflow metric names, so only
``[a-z0-9_]``): ``empty_file``, ``missing_file``, ``not_an_image``, ``truncated``,
``too_many_pixels`` (over Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``),
``bad_dimensions`` (outside [min_side, max_side] or too elongated), ``animated`` and
``odd_mode_<mode>`` (the Pillow mode lowercased, other characters dropped: ``odd_mode_cmyk``,
``odd_mode_i16`` for ``I;16``, ``odd_mode_p``, ... when ``odd_modes: skip``).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from imager.data.config import Shard
from imager.data.records import check_reason
from imager.errors import DataError

if TYPE_CHECKING:
    import torch

NORMAL_MODES = {"RGB", "RGBA", "L", "LA"}  # decoded without loss of meaning to RGB on white
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
}


class Rejected(Exception):  # noqa: N818 - a verdict on an input, not a failure
    """An input that is skipped; ``reason`` is the report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = check_reason(reason)


def odd_mode(mode: str) -> str:
    """The reason for an input in an odd Pillow mode: ``I;16`` -> ``odd_mode_i16``."""
    return "odd_mode_" + re.sub(r"[^a-z0-9]", "", mode.lower())


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB on a white background (alpha composited), from any mode Pillow can convert."""
    if im.mode.startswith("I;16"):
        im = im.convert("I")  # any byte order; "I" is the only 16/32-bit mode point() takes
    if im.mode == "I":
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit, keeping the range
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")


def decode(data: bytes, cfg: Shard) -> tuple[Image.Image, str | None]:
    """The image as RGB, and the reason it would have been skipped for when an odd input was
    converted (``odd_modes: convert``), else None; raises :class:`Rejected`."""
    if not data:
        raise Rejected("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # past Pillow's bomb limit (89 Mpx) this raises
            width, height = im.size
            short, long = min(width, height), max(width, height)
            if short < cfg.min_side or long > cfg.max_side or long / short > cfg.max_aspect:
                raise Rejected("bad_dimensions")
            animated = getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1
            odd = "animated" if animated else (None if im.mode in NORMAL_MODES else odd_mode(im.mode))
            if odd and cfg.odd_modes == "skip":
                raise Rejected(odd)
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejected("too_many_pixels") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not_an_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError):
        raise Rejected("truncated") from None
    return to_rgb(im), odd


def square(im: Image.Image, size: int, resample: str) -> Image.Image:
    """Resize the short side to ``size`` and centre-crop to ``size``²."""
    return ImageOps.fit(im, (size, size), method=RESAMPLE[resample], centering=(0.5, 0.5))


def decode_png(data: bytes, name: str = "PNG") -> torch.Tensor:
    """A shard's PNG bytes (8-bit RGB, :func:`encode_png`) -> (3, H, W) uint8 RGB."""
    import numpy as np
    import torch

    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as im:  # no format probing
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)  # (H, W, 3), owned
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: not a decodable PNG ({e}); shard again") from e
    return torch.from_numpy(arr).permute(2, 0, 1)


def encode_png(im: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes (no timestamps or other metadata)."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
