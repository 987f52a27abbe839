"""How sure a FID ratio is: a delete-one jackknife over prompts and reference images.

A FID from a few hundred images moves with the draw of prompts, noise and reference images as much
as with the sampler. ``python -m benchmarks --fid`` therefore gives each FID ratio an interval. The
ratio is recomputed with one reference image left out, for each reference image, and with one
prompt left out (all its images, one per noise seed), for each prompt, every sampler on the same
leave-out (paired). The two-sample jackknife variance (Efron & Tibshirani 1993, ch. 11, one term
per independent sample) gives a standard error, and the interval is ratio ± z·se.

Why not the bootstrap: resampling with replacement repeats images, which adds FID's small-sample
upward bias a second time and pulls every resampled ratio towards 1, so its intervals come out too
narrow. Leaving images out adds no duplicates (docs/training.md compares the two on Gaussian data).

Glossary:
    reference   (N, F) evaluator features of the held-out images
    samples     name -> (M, F) features of one sampler's images, M = clusters × repeats, repeat-major:
                row i belongs to cluster i % clusters (the bench's prompts, once per noise seed)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from imager.evaluation.metrics import FID

Tensor = torch.Tensor


class _Features(nn.Module):
    """Features pass through: :class:`FID` of given feature vectors."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def frechet_distance_features(real_feats: Tensor, fake_feats: Tensor) -> float:
    """FID of two feature sets (N, F) and (M, F), through the library's :class:`FID` (torchmetrics),
    the same computation as the point values the Scorer gives."""
    if real_feats.ndim != 2 or fake_feats.ndim != 2 or real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"expected (N, F) and (M, F) features, got {tuple(real_feats.shape)} and {tuple(fake_feats.shape)}")
    fid = FID(_Features(real_feats.shape[1]), batch_size=4096)
    fid.add_real(real_feats)
    return fid.score(fake_feats)


@dataclass(frozen=True)
class Jackknife:
    """One sample set's FID against the reference, and its leave-one-out recomputations."""

    fid: float  # on everything
    without_reference: Tensor  # (N,) float64: reference row i left out
    without_cluster: Tensor  # (clusters,) float64: every row of cluster j left out


def jackknife_fids(reference: Tensor, samples: dict[str, Tensor], *, clusters: int) -> dict[str, Jackknife]:
    """:class:`Jackknife` FIDs of every sample set against ``reference``, the same leave-outs for all.

    FIDs are :func:`frechet_distance_features`, the formula of the bench's point values."""
    n = reference.shape[0]
    if clusters < 2 or n < 3:
        raise ValueError(f"jackknife: needs >= 2 clusters and >= 3 reference rows, got {clusters} and {n}")
    for name, feats in samples.items():
        if feats.ndim != 2 or feats.shape[0] % clusters or feats.shape[1] != reference.shape[1]:
            raise ValueError(f"jackknife: {name}: expected ({clusters} × repeats, {reference.shape[1]}) features, got {tuple(feats.shape)}")
    out = {}
    for name, feats in samples.items():
        cluster_of = torch.arange(feats.shape[0]) % clusters
        out[name] = Jackknife(
            fid=frechet_distance_features(reference, feats),
            without_reference=torch.tensor([frechet_distance_features(reference[torch.arange(n) != i], feats) for i in range(n)],
                                           dtype=torch.float64),
            without_cluster=torch.tensor([frechet_distance_features(reference, feats[cluster_of != j]) for j in range(clusters)],
                                         dtype=torch.float64),
        )
    return out


def _jackknife_variance(values: Tensor) -> float:
    """Delete-one jackknife variance of a statistic from its m leave-one-out values: (m−1)/m · Σ (θ_i − θ̄)²."""
    m = values.numel()
    return (m - 1) / m * (values - values.mean()).pow(2).sum().item()


def ratio_standard_error(ours: Jackknife, theirs: Jackknife) -> float:
    """Jackknife standard error of ours.fid / theirs.fid: the reference's and the prompts' terms added."""
    return (_jackknife_variance(ours.without_reference / theirs.without_reference)
            + _jackknife_variance(ours.without_cluster / theirs.without_cluster)) ** 0.5


def ratio_interval(ours: Jackknife, theirs: Jackknife, level: float = 0.95) -> tuple[float, float]:
    """ours.fid / theirs.fid ± z·se, z the normal quantile of ``level`` (1.96 at 95 %)."""
    if not 0 < level < 1:
        raise ValueError(f"ratio_interval: level must be in (0, 1), got {level}")
    ratio, z = ours.fid / theirs.fid, statistics.NormalDist().inv_cdf((1 + level) / 2)
    se = ratio_standard_error(ours, theirs)
    return ratio - z * se, ratio + z * se


__all__ = ["Jackknife", "frechet_distance_features", "jackknife_fids", "ratio_interval", "ratio_standard_error"]
