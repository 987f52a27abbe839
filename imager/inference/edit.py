"""Input images and masks for image-conditioned generation, read and checked the same way for
``imager generate``, the MLflow model and the edit evaluation.

- An image is a path, PNG/JPEG bytes, a PIL image or an array ((H, W) gray, (H, W, 3) RGB or
  (H, W, 4) RGBA; uint8, or floats in [0, 1]). Gray becomes RGB and transparency is composited on
  white, as the data stages do. A non-square image is centre-cropped to a square (the models are
  square), unless it is outpainted.
- A mask is the same kinds of input, read as gray: white (> 127) = repaint, black (or transparent)
  = keep. One of
  another size with the image's aspect ratio is resized (nearest) to it; another aspect is an error.
  ``mask_blur`` feathers its edge into the repainted side, so kept pixels stay exactly kept.
- Outpainting pads the canvas (``left=16,top=8`` or ``16`` for every side, in the image's pixels)
  by repeating the edge pixels and repaints the padding; a canvas that is not square is completed
  to a square by padding its short side equally on both ends (also repainted).

:func:`prepare` does all of it and returns an :class:`EditInput` whose ``notes`` say, one line
each, what was done to the input (resized, cropped, converted, nothing to repaint, ...).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from imager.data.images import to_rgb
from imager.errors import ConfigError

Tensor = torch.Tensor
SIDES = ("left", "top", "right", "bottom")
MAX_SIDE = 4096  # the largest canvas accepted (inputs are resized to the model's few dozen pixels)


@dataclass
class EditInput:
    """A prepared edit: ``image`` (1, 3, S, S) in [-1, 1] and ``mask`` (1, 1, S, S) in [0, 1]
    (1 = repaint) or None (img2img of the whole image), with ``notes`` for the user."""

    image: Tensor
    mask: Tensor | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def nothing_to_repaint(self) -> bool:
        return self.mask is not None and not bool(self.mask.any())


def _name(source: Any) -> str:
    return str(source) if isinstance(source, str | Path) else type(source).__name__


def open_image(source: Any, what: str) -> Image.Image:
    """A PIL image from a path, bytes, a PIL image or an array; a one-line ConfigError naming
    ``what`` (the option or column) for anything unreadable."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray | list):
        return _from_array(np.asarray(source), what)
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{what}: {path} does not exist")
        data = path.read_bytes()
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        raise ConfigError(f"{what}: expected a path, image bytes or an array, got {type(source).__name__}")
    if not data:
        raise ConfigError(f"{what}: {_name(source)} is empty, not an image")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({exc})"
        raise ConfigError(f"{what}: {_name(source)} is {reason}") from None
    im = ImageOps.exif_transpose(im)
    if max(im.size) > MAX_SIDE:
        raise ConfigError(f"{what}: {im.size[0]}x{im.size[1]} is larger than {MAX_SIDE} px on a side")
    return im


def _from_array(arr: np.ndarray, what: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ConfigError(f"{what}: an array must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ConfigError(f"{what}: a float array must hold values in [0, 1]")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ConfigError(f"{what}: an integer array must hold values in 0..255")
        arr = arr.astype(np.uint8)
    if min(arr.shape[:2]) < 1 or max(arr.shape[:2]) > MAX_SIDE:
        raise ConfigError(f"{what}: {arr.shape[1]}x{arr.shape[0]} is not a usable image size")
    return Image.fromarray(np.ascontiguousarray(arr))


def read_image(source: Any, what: str = "image", notes: list[str] | None = None) -> Image.Image:
    """The image as RGB (gray converted, transparency composited on white; said in ``notes``)."""
    im = open_image(source, what)
    if notes is not None and im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            notes.append(f"{what}: transparency composited on white")
        elif im.mode in ("L", "1", "I", "I;16", "F"):
            notes.append(f"{what}: grayscale, converted to RGB")
    return to_rgb(im)


def read_mask(source: Any, size: tuple[int, int], what: str = "mask", notes: list[str] | None = None) -> Image.Image:
    """The mask as a binary L image of ``size`` (W, H): 255 = repaint (white, > 127 in the input),
    0 = keep. Another size of the same aspect ratio is resized (nearest), said in ``notes``."""
    im = open_image(source, what)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # White strokes drawn on a transparent layer: what is transparent is kept (black).
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    gray = im.convert("L")
    if gray.size != size:
        (w, h), (iw, ih) = gray.size, size
        if abs(w * ih - h * iw) > max(w, iw):  # more than a pixel's rounding apart
            raise ConfigError(f"{what}: {w}x{h} has another shape than the image ({iw}x{ih}); give a mask of the image's size")
        gray = gray.resize(size, Image.Resampling.NEAREST)
        if notes is not None:
            notes.append(f"{what}: {w}x{h} resized to the image's {iw}x{ih}")
    return gray.point(lambda v: 255 if v > 127 else 0)


def parse_outpaint(spec: str | Mapping[str, int] | None, what: str = "outpaint") -> dict[str, int] | None:
    """``"16"`` (every side), ``"left=16,top=8"`` or a mapping -> {side: pixels}; None for none."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    elif spec.strip().isdigit():
        items = [(side, spec.strip()) for side in SIDES]
    else:
        items = []
        for part in spec.split(","):
            side, eq, value = part.strip().partition("=")
            if not eq:
                raise ConfigError(f"{what}: '{part.strip()}' is not SIDE=PIXELS; e.g. left=16,top=8, or 16 for every side")
            items.append((side.strip(), value.strip()))
    pad = dict.fromkeys(SIDES, 0)
    seen: set[str] = set()
    for side, value in items:
        if side not in pad:
            raise ConfigError(f"{what}: unknown side '{side}'; use {', '.join(SIDES)}")
        if side in seen:
            raise ConfigError(f"{what}: {side} is given twice")
        seen.add(side)
        try:
            pixels = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: {side}={value} is not a whole number of pixels") from None
        if pixels < 0:
            raise ConfigError(f"{what}: {side}={pixels} must be >= 0")
        pad[side] = pixels
    if not any(pad.values()):
        raise ConfigError(f"{what}: every side is 0; give at least one border, e.g. left=16")
    return pad


def _pad_edge(im: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    arr = np.asarray(im)
    widths = ((top, bottom), (left, right)) + (((0, 0),) if arr.ndim == 3 else ())
    return Image.fromarray(np.pad(arr, widths, mode="edge"))


def outpaint(image: Image.Image, mask: Image.Image | None, pad: Mapping[str, int], notes: list[str] | None = None) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask): ``image`` padded by ``pad`` (edge pixels repeated) and then to a square, with
    the padding to repaint (white) and the image's own pixels kept unless ``mask`` repaints them."""
    left, top, right, bottom = (pad.get(s, 0) for s in SIDES)
    w, h = image.size
    cw, ch = w + left + right, h + top + bottom
    if max(cw, ch) > MAX_SIDE:
        raise ConfigError(f"outpaint: the canvas would be {cw}x{ch}, larger than {MAX_SIDE} px on a side")
    if cw != ch:  # the models are square: the short side is extended on both ends, and repainted too
        extra = abs(cw - ch)
        if cw < ch:
            left, right = left + extra // 2, right + extra - extra // 2
        else:
            top, bottom = top + extra // 2, bottom + extra - extra // 2
        if notes is not None:
            notes.append(f"outpaint: the {cw}x{ch} canvas is not square; extended to {max(cw, ch)}x{max(cw, ch)} (that padding is outpainted too)")
    canvas = _pad_edge(image, left, top, right, bottom)
    inner = mask if mask is not None else Image.new("L", image.size, 0)
    full = Image.new("L", canvas.size, 255)
    full.paste(inner, (left, top))
    return canvas, full


def feather(mask: Image.Image, blur: float) -> Image.Image:
    """The binary ``mask`` (255 = repaint) with its edge blurred by a Gaussian of ``blur`` px into
    the repainted side only: 1 − max(keep, blur(keep)), so that kept pixels stay exactly 0."""
    if blur <= 0:
        return mask
    keep = ImageChops.invert(mask)
    return ImageChops.invert(ImageChops.lighter(keep, keep.filter(ImageFilter.GaussianBlur(blur))))


def _crop_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def to_tensor(im: Image.Image) -> Tensor:
    """An RGB or L PIL image -> (1, C, H, W) float32: RGB in [-1, 1], L in [0, 1]."""
    arr = torch.from_numpy(np.array(im, dtype=np.uint8))
    if arr.ndim == 2:
        return (arr.float() / 255)[None, None]
    return (arr.permute(2, 0, 1).float() / 127.5 - 1)[None]


def prepare(
    image: Any,
    mask: Any = None,
    *,
    outpaint_pad: str | Mapping[str, int] | None = None,
    mask_blur: float = 0.0,
    image_what: str = "image",
    mask_what: str = "mask",
) -> EditInput:
    """Read, check and square an edit's inputs (module docstring); ConfigError on bad input."""
    if mask_blur < 0:
        raise ConfigError(f"mask_blur: must be >= 0, got {mask_blur}")
    notes: list[str] = []
    im = read_image(image, image_what, notes)
    m = read_mask(mask, im.size, mask_what, notes) if mask is not None else None
    pad = parse_outpaint(outpaint_pad)
    if pad is not None:
        im, m = outpaint(im, m, pad, notes)
    elif im.size[0] != im.size[1]:
        notes.append(f"{image_what}: {im.size[0]}x{im.size[1]} is not square; centre-cropped to {min(im.size)}x{min(im.size)}")
        im, m = _crop_square(im), None if m is None else _crop_square(m)
    if m is not None:
        values = np.asarray(m)
        if not values.any():
            notes.append(f"{mask_what}: has no white, so nothing is repainted: the result is the input")
        elif values.all():
            notes.append(f"{mask_what}: is all white, so the whole image is repainted (text to image, or img2img with a strength)")
            m = None
        else:
            m = feather(m, mask_blur)
    return EditInput(image=to_tensor(im), mask=None if m is None else to_tensor(m), notes=notes)
