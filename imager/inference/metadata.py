"""Generation parameters in a PNG's text chunks: what made an image travels with it.

Every image Imager writes (``imager generate``, the web app's history) carries its parameters:
one ``tEXt`` chunk per parameter, readable by any PNG tool (``exiftool``, ``identify -verbose``,
Pillow's ``Image.open(p).text``), and the whole set as JSON in the ``imager`` chunk, which is what
:func:`read_params` reads back (types included), so an image can be made again from its file::

    save_png("apple.png", pixels, {"prompt": "red apple", "seed": 3, "sampler": "ddim", "steps": 20})
    read_params(Path("apple.png").read_bytes())   # {"prompt": "red apple", "seed": 3, ...}

The model is identified by its files' SHA-256 (``base_sha256``, ``sr_sha256``) or by the MLflow
model it came from (``mlflow_run_id``, ``model_uri``), and the LoRA adapters applied to it by
``adapters`` (each file, weight, SHA-256, stage and rank); ``imager_version`` is the package's version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from imager.errors import ConfigError

CHUNK = "imager"  # the JSON of every parameter
MAX_TEXT = 64 * 1024  # a chunk larger than this is not ours: refuse it rather than parse it


def imager_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imager")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_params(
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    sampling: Any,
    use_sr: bool,
    mode: str,
    size: int,
    identity: Mapping[str, str],
    mask: bool = False,
    mask_blur: float | None = None,
    outpaint: str | None = None,
    adapters: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The parameters an image records: the request as it was sampled (``sampling``, a
    :class:`~imager.inference.config.CascadeSampling`, with every default filled in), the model's
    ``identity``, the LoRA ``adapters`` that changed it (:func:`~imager.inference.adapters.adapter_record`)
    and Imager's version; None values are left out, so an image made without adapters records none."""
    import time

    edit = mode != "text"
    params = {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "sampler": sampling.sampler,
        "steps": sampling.base.steps, "guidance": sampling.base.guidance, "threshold": sampling.base.threshold,
        "sr_steps": sampling.sr.steps if use_sr else None, "sr_guidance": sampling.sr.guidance if use_sr else None, "use_sr": use_sr,
        "mode": mode, "strength": sampling.strength if edit else None, "sr_strength": sampling.sr_strength if edit and use_sr else None,
        "resample": sampling.resample if mask else None, "mask_blur": mask_blur if edit else None, "outpaint": outpaint if edit else None,
        "size": size, **extra, "adapters": adapters or None, **identity, "imager_version": imager_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    return {k: v for k, v in params.items() if v is not None}


def png_info(params: Mapping[str, Any]):
    """A ``PngInfo`` with one text chunk per parameter (None and empty values left out) and the
    JSON of all of them in the ``imager`` chunk."""
    from PIL.PngImagePlugin import PngInfo

    clean = {k: v for k, v in params.items() if v is not None}
    info = PngInfo()
    for key, value in clean.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if text != "":
            info.add_text(key, text)
    info.add_text(CHUNK, json.dumps(clean, sort_keys=True))
    if "prompt" in clean:
        info.add_text("Description", str(clean["prompt"]))  # the standard PNG keyword viewers show
    info.add_text("Software", f"Imager {clean.get('imager_version', imager_version())}")
    return info


def png_bytes(pixels: np.ndarray, params: Mapping[str, Any] | None = None) -> bytes:
    """PNG bytes of uint8 ``pixels`` (H, W, 3), with ``params`` in its text chunks when given."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", pnginfo=None if params is None else png_info(params))
    return buf.getvalue()


def save_png(path: str | Path, pixels: np.ndarray, params: Mapping[str, Any] | None = None) -> Path:
    """Write the PNG atomically (a hidden temporary file renamed over ``path``): a reader never
    sees half a file, and an interrupted write leaves no file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(png_bytes(pixels, params))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_params(source: bytes | str | Path, what: str = "PNG") -> dict[str, Any]:
    """The parameters an Imager PNG carries (its ``imager`` chunk); a ConfigError naming ``what``
    for a file that is not a PNG or carries none. Only the text chunks are read: the pixels are
    never decoded, so a decompression bomb costs nothing here."""
    from PIL import Image, UnidentifiedImageError

    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "PNG":
            raise ConfigError(f"{what}: is a {im.format} image; parameters are read from Imager's PNGs")
        text = dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"{what}: not a readable PNG ({exc})") from None
    raw = text.get(CHUNK)
    if raw is None:
        raise ConfigError(f"{what}: carries no Imager parameters (no '{CHUNK}' text chunk); only images made by Imager can be restored")
    if len(raw) > MAX_TEXT:
        raise ConfigError(f"{what}: its '{CHUNK}' chunk is {len(raw)} characters, more than {MAX_TEXT}")
    try:
        params = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{what}: its '{CHUNK}' chunk is not valid JSON") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{what}: its '{CHUNK}' chunk is not a JSON object")
    return params
