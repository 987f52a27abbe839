"""What a source yields: a :class:`Sample` to keep, or a :class:`Skip` with its reason."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any

from PIL import Image

MANIFEST = "manifest.jsonl"  # the download step's record of every kept sample, read by the shard step
# Image formats Pillow names, mapped to the file extension written for them.
FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Skip reasons are report keys and MLflow metric names (``skipped_by_reason.<reason>``).
REASON = re.compile(r"[a-z0-9_]+")


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

    def __post_init__(self) -> None:
        check_reason(self.reason)


def _as_is(entries: Sequence[Any], results: Iterable[Any]) -> Iterator[Any]:
    return iter(results)


@dataclass(frozen=True)
class Plan:
    """How a source yields its samples: ``run(entries, shared)`` turns a run of entries into one
    result each, in order (a module-level function, so that Ray can run it on units of entries),
    and ``finish(entries, results)`` turns all the results, in entry order, into samples and skips
    (the in-order part, such as giving keys that must be unique). The download step runs ``run``
    over all entries here, or over units of them as Ray tasks: the samples are the same."""

    entries: Sequence[Any]
    run: Callable[[Sequence[Any], Any], Iterator[Any]]
    shared: Any = None
    finish: Callable[[Sequence[Any], Iterable[Any]], Iterator[Sample | Skip]] = _as_is
    before: tuple[Skip, ...] = ()  # skips found while listing the entries, reported first

    @property
    def total(self) -> int:
        return len(self.entries) + len(self.before)

    def items(self, results: Iterable[Any] | None = None) -> Iterator[Sample | Skip]:
        """The samples and skips in entry order, from ``results`` made elsewhere, or made here.

        The first result is made before this returns, so that the download step creates its
        temporary output folder only after it: the urls source fetches its whole list (or first
        unit) then, and a run killed while fetching leaves nothing but the fetch cache."""
        made = self.run(self.entries, self.shared) if results is None else results
        rest = self.finish(self.entries, made)
        head = list(islice(rest, 1))
        return chain(self.before, head, rest)


def check_reason(reason: str) -> str:
    """``reason`` itself when it is a valid skip reason (``[a-z0-9_]+``); a bug otherwise."""
    if not REASON.fullmatch(reason):
        raise ValueError(f"skip reason {reason!r} must match {REASON.pattern} (it is an MLflow metric name)")
    return reason


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
    except Exception:  # noqa: BLE001 - any header Pillow rejects: the shard step decides and counts it
        return None


def looks_like_image(data: bytes) -> bool:
    """True when Pillow recognises the header as an image format it can open: the test of the
    shard step's ``not_an_image``, without decoding a pixel. A header Pillow knows but refuses (a
    decompression bomb, a broken field) counts as an image here; the shard step says why it is
    skipped. No warnings filter: safe to call from the fetch threads."""
    try:
        Image.open(io.BytesIO(data)).close()
    except Image.UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 (DecompressionBombError, OSError, ValueError, ...)
        return True
    return True


def clean_caption(value: object) -> str | None:
    """A caption as one line of text: lists take their first entry, bytes (a caption file, a table
    column that is not all UTF-8) are read as UTF-8 with a leading BOM dropped, whitespace is
    collapsed. None when the bytes are not UTF-8 (the sample is skipped as ``caption_not_utf8``)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8-sig")
        except UnicodeDecodeError:
            return None
    return " ".join(str(value).split())
