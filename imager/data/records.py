"""What a source yields: a :class:`Sample` to keep, or a :class:`Skip` with its reason."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image

# Image formats Pillow names, mapped to the file extension written for them.
FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    """One image with its caption, as raw file bytes (decoded and checked later, by the shard step).

    ``key`` is unique within a source and safe as a webdataset key (letters, digits, ``_``, ``-``).
    ``origin`` says where the bytes came from (a package file, a path, a URL).
    """

    key: str
    caption: str
    data: bytes
    licence: str
    origin: str
    ext: str | None = None  # file extension to write; sniffed from the bytes when None


@dataclass(frozen=True)
class Skip:
    """An entry of the source that is not kept, and why (a short snake_case reason)."""

    reason: str
    origin: str = ""


def safe_key(text: str) -> str:
    """A webdataset-safe key: anything but letters, digits, ``_`` and ``-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text).strip("_") or "sample"


def short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def image_info(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from the header alone, or None if Pillow cannot identify it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format or "", im.width, im.height
    except Exception:  # any header Pillow rejects: the shard step decides and counts it
        return None


def clean_caption(value: object) -> str:
    """A caption as one line of text: lists take their first entry, whitespace is collapsed."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if value is None:
        return ""
    return " ".join(str(value).split())
