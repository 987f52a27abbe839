"""Decode and check one input image for sharding; say why when it cannot be used.

Reasons (the keys of the shard report's ``skipped_by_reason``):
``empty_file``, ``missing_file``, ``not_an_image``, ``truncated``, ``too_many_pixels`` (over
Pillow's decompression-bomb limit, ``PIL.Image.MAX_IMAGE_PIXELS``), ``bad_dimensions`` (outside [min_side, max_side] or too elongated),
``animated`` and ``odd_mode:<MODE>`` (CMYK, 16-bit, palette, ... when ``odd_modes: skip``).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageOps

from imager.config import Shard
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


class Rejected(Exception):
    """An input that is skipped; ``reason`` is the report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB on a white background (alpha composited), from any mode Pillow can convert."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit, keeping the range
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")


def decode(data: bytes, cfg: Shard) -> tuple[Image.Image, str | None]:
    """The image as RGB, and a note when an odd mode was converted; raises :class:`Rejected`."""
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
            odd = "animated" if animated else (None if im.mode in NORMAL_MODES else f"odd_mode:{im.mode}")
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
    return _to_rgb(im), (f"converted:{odd}" if odd else None)


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
