"""A measured style statistic: how much of an image is line art (ink on paper).

A pixel is *ink* when it is achromatic (max(R, G, B) − min(R, G, B) below ``chroma``) and dark
(luminance below ``dark``), *paper* when achromatic and light (luminance above ``light``). The
line-art score of an image is the share of its pixels that are ink or paper: near 1 for a black
line drawing on white, lower for a colour image (its fills are chromatic or mid-grey), whatever
the content. It needs no trained model, so it judges the fine-tunes the same way it judges the
real images of both styles.
"""

from __future__ import annotations

import torch

from imager.evaluation.edits import luminance

Tensor = torch.Tensor


def line_art_score(images: Tensor, *, chroma: float, dark: float, light: float) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B,) share of ink-or-paper pixels."""
    unit = (images.float().clamp(-1, 1) + 1) / 2
    achromatic = (unit.amax(dim=1, keepdim=True) - unit.amin(dim=1, keepdim=True)) < chroma
    lum = luminance(images.float())
    return (achromatic & ((lum < dark) | (lum > light))).float().mean(dim=(1, 2, 3))


def colourful_share(images: Tensor, *, chroma: float) -> Tensor:
    """(B,) share of chromatic pixels: 0 for line art."""
    unit = (images.float().clamp(-1, 1) + 1) / 2
    return ((unit.amax(dim=1) - unit.amin(dim=1)) >= chroma).float().mean(dim=(1, 2))
