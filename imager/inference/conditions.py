"""Condition images of the trained controls (imager.models.control): line maps, 1 = line, 0 = paper.

One definition serves training (from each training image or its paired line art), the evaluation
(the held-out sketches) and sampling (a user's sketch), so the control always sees the same kind of
map: made at the image's own resolution, then area-averaged to the model's (thin lines become soft).

- ``lines``: the pixels darker than a threshold (OpenMoji draws its outlines in black);
- ``edges``: the Sobel gradient magnitude of the luminance above a threshold (any image);
- ``lineart`` and a user's sketch: the ink of a drawing, 1 − luminance (dark lines on a light ground).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imager.errors import ConfigError
from imager.inference.images import downsample

Tensor = torch.Tensor
_BT601 = (0.299, 0.587, 0.114)


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1] (ITU-R BT.601 weights)."""
    weights = torch.tensor(_BT601, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images.clamp(-1, 1) + 1) / 2 * weights).sum(dim=1, keepdim=True)


def sobel_magnitude(gray: Tensor) -> Tensor:
    """(B, 1, H, W) -> (B, 1, H, W): the Sobel gradient magnitude, scaled so a black-to-white step is 1."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device) / 4
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grad.pow(2).sum(dim=1, keepdim=True).sqrt()


def line_map(images: Tensor, kind: str, threshold: float) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) float in {0, 1} at the same size: ``lines`` (luminance
    below ``threshold``), ``edges`` (Sobel magnitude above it) or ``ink`` (1 − luminance, soft)."""
    gray = luminance(images.float())
    if kind == "lines":
        return (gray < threshold).float()
    if kind == "edges":
        return (sobel_magnitude(gray) > threshold).float()
    if kind in ("ink", "lineart"):
        return 1 - gray
    raise ValueError(f"condition: unknown kind '{kind}' (lines, edges, lineart)")


def condition_of(images: Tensor, kind: str, threshold: float, size: int) -> Tensor:
    """The control's input for (B, 3, S, S) images in [-1, 1]: the line map at S, area-averaged to ``size``."""
    return downsample(line_map(images, kind, threshold), size)


def read_condition(source: Any, size: int, what: str = "control", notes: list[str] | None = None) -> Tensor:
    """A sketch (path, bytes, PIL image or array; dark lines on a light ground, transparency on white)
    as the control's input (1, 1, size, size) in [0, 1]; a one-line ConfigError for an unreadable or
    non-square image. A drawing that is mostly dark (light lines on black) is inverted, said in ``notes``."""
    from imager.inference.edit import read_image, to_tensor

    im = read_image(source, what, notes)
    w, h = im.size
    if w != h:
        raise ConfigError(f"{what}: the sketch must be square (the model draws square images), got {w}x{h}")
    ink = line_map(to_tensor(im), "ink", 0.0)
    if float(ink.mean()) > 0.5:
        ink = 1 - ink
        if notes is not None:
            notes.append(f"{what}: mostly dark, read as light lines on a dark ground")
    return resize_condition(ink, size, what)


def resize_condition(condition: Tensor, size: int, what: str = "control") -> Tensor:
    """A line map (B, 1, S, S) in [0, 1] at ``size``: area-averaged down, bilinear up; a one-line
    ConfigError for any other shape."""
    if condition.ndim != 4 or condition.shape[1] != 1 or condition.shape[-1] != condition.shape[-2]:
        raise ConfigError(f"{what}: the condition must be a square line map (B, 1, S, S), got {tuple(condition.shape)}")
    condition = condition.float()
    if condition.shape[-1] >= size:
        return downsample(condition, size)
    return F.interpolate(condition, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def check_window(start: float, end: float, what: str = "control") -> None:
    """A one-line ConfigError unless 0 <= start <= end <= 1 (fractions of the way from noise to the image)."""
    if not (0 <= start <= end <= 1):
        raise ConfigError(f"{what}: the window must satisfy 0 <= start <= end <= 1, got start {start:g}, end {end:g}")


def load_controls(
    base: Any, sketches: list[tuple[Any, float]], files: list[Path], *, start: float = 0.0, end: float = 1.0, size: int,
    what: str = "--control", notes: list[str] | None = None,
) -> tuple[list[Any], list[dict[str, Any]]]:  # fmt: skip
    """The controls of one request: each sketch (path, bytes, image or array; with its weight) read
    as a line map at ``size`` and paired with a control file (one file: used for every sketch),
    loaded onto ``base`` (another base is refused). Returns the
    :class:`~imager.models.control.ControlInput` list and what an image records of them."""
    import hashlib

    from imager.errors import CheckpointError
    from imager.models.control import ControlInput, load_control

    check_window(start, end, what)
    if not sketches:
        return [], []
    if len(files) not in (1, len(sketches)):
        raise ConfigError(f"{what}: {len(sketches)} sketches but {len(files)} control files; give one file for all or one per sketch")
    inputs, record, nets = [], [], {}
    for i, (sketch, scale) in enumerate(sketches):
        file = Path(files[i if len(files) > 1 else 0])
        if file not in nets:
            try:
                nets[file] = load_control(file, base)
            except CheckpointError as exc:
                raise CheckpointError(f"{what}: {exc}") from None
        condition = read_condition(sketch, size, what, notes)
        inputs.append(ControlInput(nets[file], condition, float(scale), start, end))
        entry = {"control": file.name, "control_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "arch": nets[file].settings.arch}
        if isinstance(sketch, str | Path):
            entry["sketch"] = Path(sketch).name
        record.append({**entry, "scale": float(scale), "start": start, "end": end})
    return inputs, record
