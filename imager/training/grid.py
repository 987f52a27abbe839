"""Sample grids: images from the EMA model for fixed prompts, written as one captioned PNG."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from imager.diffusion.schedule import NoiseSchedule
from imager.samplers import cfg_net, model_denoiser, sample
from imager.training.tasks import to_uint8

Tensor = torch.Tensor


@torch.no_grad()
def sample_model(
    model,
    schedule: NoiseSchedule,
    prediction: str,
    cond: tuple[Tensor, Tensor, Tensor],
    *,
    resolution: int,
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
    spacing: str | None = None,
    lowres: Tensor | None = None,
    aug_level: Tensor | None = None,
) -> Tensor:
    """(B, 3, R, R) samples in [-1, 1] for the text condition ``cond`` = (tokens, mask, pooled),
    with classifier-free guidance against the model's null condition."""
    model.eval()
    tokens, mask, pooled = (c.float() if c.is_floating_point() else c for c in cond)
    batch = tokens.shape[0]
    null = model.null_condition(batch)
    if lowres is None:
        net = lambda x, t, tk, mk, pl: model(x, t, tk, mk, pl)  # noqa: E731
        extra: tuple[Tensor, ...] = ()
    else:
        net = lambda x, t, tk, mk, pl, lo, aug: model(x, t, tk, mk, pl, lowres=lo, aug_level=aug)  # noqa: E731
        extra = (lowres, aug_level)
    guided = cfg_net(net, (tokens, mask, pooled, *extra), (*null, *extra), guidance)
    denoise = model_denoiser(guided, schedule, prediction)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.out_channels, resolution, resolution)
    return sample(denoise, shape, schedule, sampler=sampler, steps=steps, spacing=spacing, generator=gen).clamp(-1, 1)


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
