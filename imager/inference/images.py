"""Image tensors between the data (uint8), the models ([-1, 1]) and PNG files, and sample grids.

Every float image here is (B, 3, H, W) with values in [-1, 1]. Downsampling is area averaging
(an exact box filter for integer factors); upscaling for side-by-side grids is nearest-neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from imager.diffusion.schedule import NoiseSchedule

Tensor = torch.Tensor


def to_unit(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 [0, 255], clamped and rounded, as a saved PNG holds them (computed in float32)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_hwc(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU, ready for PIL or numpy."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu()


def downsample(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size) by area averaging; unchanged when already that size."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="area")


def resize(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, C, size, size): area averaging down, bicubic up (clamped)."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def resize_mask(mask: Tensor, size: int) -> Tensor:
    """(B, 1, H, W) in [0, 1] (1 = repaint) -> (B, 1, size, size): the largest value under each new
    pixel when shrinking (a pixel with any repainted part is repainted; kept pixels stay exactly
    kept), nearest when growing."""
    if mask.shape[-2:] == (size, size):
        return mask
    if mask.shape[-1] > size:
        return F.adaptive_max_pool2d(mask, (size, size))
    return F.interpolate(mask, size=(size, size), mode="nearest")


def upscale(images: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upscaling to ``size`` for side-by-side grids."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="nearest")


def noise_augment(low: Tensor, aug_level: Tensor, schedule: NoiseSchedule, gen: torch.Generator | None) -> Tensor:
    """``low`` (B, C, h, w) noised to ``aug_level`` (B,) in [0, 1] with the forward process of
    ``schedule``, x = α·low + σ·ε (Imagen's noise conditioning augmentation); level 0 leaves an
    image untouched. ε is drawn from ``gen`` on the generator's device and moved to ``low``'s, so a
    seed gives the same noise on every device."""
    alpha, sigma = schedule.alpha_sigma_at(aug_level.detach().to("cpu", torch.float64))  # (B,) each
    gen_device = gen.device if gen is not None else low.device
    noise = torch.randn(low.shape, generator=gen, device=gen_device, dtype=torch.float32).to(low)
    a, s = (v.to(low).view(-1, 1, 1, 1) for v in (alpha, sigma))
    noisy = a * low + s * noise
    return torch.where(aug_level.to(low.device).view(-1, 1, 1, 1) > 0, noisy, low)


def grid_image(rows: Sequence[Sequence[Tensor]], labels: Sequence[str], cell: int = 96) -> Image.Image:
    """A PNG-ready grid: one row per label, each row a sequence of (3, H, W) images in [-1, 1],
    upscaled (nearest) to ``cell`` pixels, with the label above the row."""
    label_h = 14
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * (cell + 4) + 4, len(rows) * (cell + label_h + 6) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = 4 + r * (cell + label_h + 6)
        draw.text((4, y), label[:60], fill=(0, 0, 0))
        for c, img in enumerate(row):
            arr = to_uint8(img).permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(arr).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(tile, (4 + c * (cell + 4), y + label_h))
    return canvas
