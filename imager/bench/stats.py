"""How sure a FID ratio is: a paired bootstrap over prompts and reference images.

A FID from a few hundred images moves with the draw of prompts, noise and reference images as much
as with the sampler. ``imager bench --fid`` therefore gives each FID ratio an interval: every
bootstrap draw resamples the prompts (each drawn prompt brings its images from every noise seed) and,
independently, the reference images, and scores every sampler on that same draw, so the per-draw
ratios keep the pairing of the comparison (same prompts, same noise). The interval is the central
``level`` share of those ratios (the percentile bootstrap, Efron & Tibshirani 1993, ch. 13).

Glossary:
    reference   (N, F) evaluator features of the held-out images
    samples     name -> (M, F) features of one sampler's images, M = clusters × repeats, repeat-major:
                row i belongs to cluster i % clusters (the bench's prompts, once per noise seed)
    draws       bootstrap resamples
"""

from __future__ import annotations

import torch

from imager.evaluation.metrics import frechet_distance_features

Tensor = torch.Tensor


def bootstrap_fids(reference: Tensor, samples: dict[str, Tensor], *, clusters: int, draws: int, seed: int = 0) -> dict[str, Tensor]:
    """FID of every sample set against ``reference`` on ``draws`` paired bootstrap resamples: name -> (draws,).

    Each draw takes N reference rows with replacement, and ``clusters`` clusters with replacement with
    all the rows of each, the same rows for every sample set. FIDs are torchmetrics' (the formula the
    bench's point values use, :func:`imager.evaluation.metrics.frechet_distance_features`)."""
    if clusters < 1 or draws < 1:
        raise ValueError(f"bootstrap: clusters and draws must be >= 1, got {clusters} and {draws}")
    for name, feats in samples.items():
        if feats.ndim != 2 or feats.shape[0] % clusters or feats.shape[1] != reference.shape[1]:
            raise ValueError(f"bootstrap: {name}: expected ({clusters} × repeats, {reference.shape[1]}) features, got {tuple(feats.shape)}")
    generator = torch.Generator().manual_seed(seed)
    out = {name: torch.empty(draws, dtype=torch.float64) for name in samples}
    n = reference.shape[0]
    for d in range(draws):
        ref_rows = torch.randint(n, (n,), generator=generator)
        picked = torch.randint(clusters, (clusters,), generator=generator)
        for name, feats in samples.items():
            repeats = feats.shape[0] // clusters
            rows = (picked[None, :] + clusters * torch.arange(repeats)[:, None]).reshape(-1)  # every repeat of each pick
            out[name][d] = frechet_distance_features(reference[ref_rows], feats[rows])
    return out


def ratio_interval(ours: Tensor, theirs: Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of the paired ratios ``ours / theirs`` (percentile bootstrap)."""
    if ours.shape != theirs.shape or ours.ndim != 1 or ours.numel() < 2:
        raise ValueError(f"ratio_interval: expected two equal (draws >= 2,) tensors, got {tuple(ours.shape)} and {tuple(theirs.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"ratio_interval: level must be in (0, 1), got {level}")
    ratios = ours.double() / theirs.double()
    tail = (1 - level) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


__all__ = ["bootstrap_fids", "ratio_interval"]
