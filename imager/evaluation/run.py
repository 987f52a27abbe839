"""The evaluate stage's logic: sample the cascade for held-out prompts, score the samples beside the
same scores of real held-out images (each metric's ceiling), and sweep samplers and step counts.

Sets (all from the shards, fixed by ``evaluate.seed``):

    prompts    ``evaluate.prompts`` val samples drawn at random; one image each, from their captions
    reference  every val image: the real set FID compares against
    ceiling    real images scored the way samples are: as many train images as prompts for FID
               (not in the reference), the prompts' own real images for R-precision and CLIP score

Metric names say which backbone scored them: ``*_evaluator`` (the in-domain evaluator, always),
``*_inception`` and ``*_clip`` (standard backbones, only when their weights are on disk).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from imager.data.shard import read_samples, shard_paths
from imager.errors import DataError
from imager.evaluation.config import Backbones, Evaluate
from imager.evaluation.metrics import FID, HFClip, InceptionFeatures, clip_score, r_precision
from imager.inference.cascade import Cascade
from imager.inference.images import downsample, grid_image, to_unit, upscale
from imager.text.cache import EmbeddingCache

log = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass
class HeldOut:
    """The evaluation sets; images in [-1, 1] at the shard resolution."""

    captions: list[str]  # the N prompts (val captions)
    cond: tuple[Tensor, Tensor, Tensor]  # their cached text embeddings
    real: Tensor  # (N, 3, S, S) the prompts' own real images
    reference: Tensor  # (V, 3, S, S) every val image: what FID compares against
    ceiling: Tensor  # (N, 3, S, S) train images: the real-vs-real FID
    pool: list[str]  # distinct val captions: the R-precision candidates
    pool_emb: Tensor  # (M, P) their pooled text embeddings
    targets: Tensor  # (N,) index of each prompt's caption in the pool


def held_out(shards_dir: Path, cache: EmbeddingCache, cfg: Evaluate) -> HeldOut:
    val = shard_paths(shards_dir, "val")
    if not val:
        raise DataError(f"{shards_dir}: no validation shards; set shard.val_fraction > 0 and re-run `imager shard`")
    keys, captions, images = read_samples(val)
    if len(keys) < 2:
        raise DataError(f"{shards_dir}: only {len(keys)} validation sample; evaluation needs at least 2")
    gen = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.prompts, len(keys))
    pick = torch.randperm(len(keys), generator=gen)[:n].sort().values
    _, _, train_images = read_samples(shard_paths(shards_dir, "train"))
    c_pick = torch.randperm(train_images.shape[0], generator=gen)[:n].sort().values
    first: dict[str, str] = {}
    for k, c in zip(keys, captions, strict=True):
        first.setdefault(c, k)
    pool = sorted(first)
    index = {c: i for i, c in enumerate(pool)}
    prompts = [captions[i] for i in pick.tolist()]
    tokens, mask, pooled = cache.lookup([keys[i] for i in pick.tolist()])
    return HeldOut(
        captions=prompts,
        cond=(tokens.float(), mask, pooled.float()),
        real=to_unit(images[pick]),
        reference=to_unit(images),
        ceiling=to_unit(train_images[c_pick]),
        pool=pool,
        pool_emb=cache.lookup([first[c] for c in pool])[2].float(),
        targets=torch.tensor([index[c] for c in prompts]),
    )


class Scorer:
    """Scores images at one resolution with every available backbone. The reference set is
    area-downsampled to that resolution once, so samples and real sets pass the same resize."""

    def __init__(self, evaluator: torch.nn.Module, data: HeldOut, cfg: Evaluate, resolution: int, backbones: Backbones):
        self.evaluator, self.data, self.cfg, self.resolution = evaluator, data, cfg, resolution
        ref = downsample(data.reference, resolution)
        self.fid = {"evaluator": FID(evaluator, batch_size=cfg.batch_size)}
        if backbones.inception:
            self.fid["inception"] = FID(InceptionFeatures(backbones.inception), batch_size=cfg.batch_size)
        for metric in self.fid.values():
            metric.add_real(ref)
        self.clip = HFClip(backbones.clip) if backbones.clip else None
        self.k = min(cfg.r_precision_k, len(data.pool))

    def _batched(self, fn: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.cat([fn(b) for b in images.split(self.cfg.batch_size)])

    def score(self, images: Tensor, targets: Tensor, *, fid: Tensor | None = None, clip: bool = True) -> dict[str, float]:
        """FID of ``fid`` (default: ``images``) against the reference, and R-precision and CLIP score
        of ``images`` (N, 3, r, r) for the captions ``targets`` (N,) of the pool."""
        d = self.data
        images = downsample(images, self.resolution)
        fid_set = images if fid is None else downsample(fid, self.resolution)
        out = {f"fid_{name}": metric.score(fid_set) for name, metric in self.fid.items()}
        emb = self._batched(self.evaluator.embed, images)
        out["r_precision_evaluator"] = r_precision(emb, d.pool_emb, targets, self.k, torch.Generator().manual_seed(self.cfg.seed))
        out["clip_score_evaluator"] = clip_score(emb, d.pool_emb[targets])
        if self.clip is not None and clip:
            img = self._batched(self.clip.embed_images, images)
            texts = self.clip.embed_texts(d.pool)
            out["r_precision_clip"] = r_precision(img, texts, targets, self.k, torch.Generator().manual_seed(self.cfg.seed))
            out["clip_score_clip"] = clip_score(img, texts[targets])
        return out

    def ceiling(self, m: int, clip: bool = True) -> dict[str, float]:
        """The same scores for real images: m train images for FID, the first m prompts' own
        images for R-precision and CLIP score."""
        d = self.data
        return self.score(d.real[:m], d.targets[:m], fid=d.ceiling[:m], clip=clip)


def evaluate(cascade: Cascade, evaluator: torch.nn.Module, *, shards_dir: Path, cache: EmbeddingCache, cfg: Evaluate, sampler: str) -> dict[str, Any]:
    """What the stage writes: ``metrics`` (flat, for DVC), ``sweep`` (table), ``curve`` (plot rows),
    ``grid`` and ``sweep_plot`` (PIL images; the plot says so when there is no sweep), and
    ``timings`` (seconds and images/s: for MLflow, kept out of the files so that they are reproducible)."""
    if cascade.sr is None:
        raise DataError("evaluation needs the super-resolution model too")
    data = held_out(shards_dir, cache, cfg)
    n = len(data.captions)
    for key, metrics in (("inception", "fid_inception"), ("clip", "clip_score_clip and r_precision_clip")):
        if getattr(cfg.backbones, key) is None:
            log.info("evaluate.backbones.%s is not set: no %s (standard weights are never downloaded)", key, metrics)
    high = Scorer(evaluator, data, cfg, cascade.resolution, cfg.backbones)
    low = Scorer(evaluator, data, cfg, cascade.base.resolution, Backbones())

    started = time.perf_counter()
    with tqdm(total=n, desc=f"evaluate: cascade ({sampler})", unit="img") as bar:
        base, sr = cascade.generate(data.cond, cfg.sampling(sampler), on_batch=bar.update)
    seconds = time.perf_counter() - started
    assert sr is not None

    metrics: dict[str, Any] = {
        "samples": n,
        "reference_images": int(data.reference.shape[0]),
        "r_precision_k": high.k,
        "r_precision_chance": 1 / high.k,
    }
    for suffix, scorer, images in (("", high, sr), ("_base", low, base)):
        scored, ceiling = scorer.score(images, data.targets), scorer.ceiling(n)
        for name, value in scored.items():
            metrics[f"{name}{suffix}"] = value
            metrics[f"{name}{suffix}_ceiling"] = ceiling[name]

    rows = torch.linspace(0, n - 1, min(cfg.grid_rows, n)).round().long().unique().tolist()  # spread over the set
    grid = grid_image(
        [[upscale(base[i : i + 1], cascade.resolution)[0], sr[i], data.real[i]] for i in rows],
        [f"{data.captions[i]}  (base | SR | real)" for i in rows],
    )
    sweep, curve, sweep_seconds = run_sweep(cascade, data, cfg, sampler, low if cfg.sweep.stage == "base" else high)
    plot = sweep_plot(curve, sweep) if curve else no_sweep_plot()
    timings = {"sampling_seconds": seconds, "images_per_second": n / seconds, **sweep_seconds}
    return {"metrics": metrics, "timings": timings, "sweep": sweep, "curve": curve, "grid": grid, "sweep_plot": plot}


def run_sweep(
    cascade: Cascade, data: HeldOut, cfg: Evaluate, sampler: str, scorer: Scorer
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """(table, plot rows, seconds per entry): FID and R-precision of each (sampler, steps) on the first
    ``sweep.prompts`` prompts, the many-step reference, and the real-image ceiling at the same count.
    Same prompts and seeds for every entry, so differences come from the sampler alone."""
    sw = cfg.sweep
    m = min(sw.prompts, len(data.captions))
    if m == 0:
        return {}, [], {}
    cond = tuple(c[:m] for c in data.cond)
    targets = data.targets[:m]
    runs = [(s, k, s) for s in sw.samplers for k in sw.steps] + [(sw.reference_sampler, sw.reference_steps, f"{sw.reference_sampler} (reference)")]
    sampling = cfg.sampling(sampler)
    sr_fixed = sampling.stage("sr")  # the SR stage keeps the evaluation's sampler: the sweep varies the base
    table: dict[str, Any] = {"samples": m, "stage": sw.stage}
    curve, seconds = [], {}
    with tqdm(total=len(runs) * m, desc="evaluate: sampler sweep", unit="img") as bar:
        for name, steps, label in runs:
            started = time.perf_counter()
            run = sampling.model_copy(update={"base": cfg.base.model_copy(update={"sampler": name, "steps": steps}), "sr": sr_fixed})
            base, sr = cascade.generate(cond, run, use_sr=sw.stage == "cascade", on_batch=bar.update)
            images = sr if sw.stage == "cascade" else base
            scores = scorer.score(images, targets, clip=False)
            row = {"sampler": label, "steps": steps, "fid_evaluator": scores["fid_evaluator"], "r_precision_evaluator": scores["r_precision_evaluator"]}
            curve.append(row)  # plot rows: no timings, so identical runs give identical files
            table.setdefault(label, {})[str(steps)] = {k: row[k] for k in ("fid_evaluator", "r_precision_evaluator")}
            seconds[f"sweep_seconds.{label.replace(' (reference)', '_reference')}.{steps}"] = time.perf_counter() - started
    ceiling = scorer.ceiling(m, clip=False)
    table["ceiling"] = {"fid_evaluator": ceiling["fid_evaluator"], "r_precision_evaluator": ceiling["r_precision_evaluator"]}
    return table, curve, seconds


def sweep_plot(curve: list[dict[str, Any]], table: dict[str, Any]) -> Image.Image:
    """FID and R-precision against steps (log scale), one line per sampler, the reference dashed
    and the real-image ceiling dotted."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    names = list(dict.fromkeys(r["sampler"] for r in curve))
    for ax, key, label in ((axes[0], "fid_evaluator", "FID (evaluator), lower is better"), (axes[1], "r_precision_evaluator", "R-precision (evaluator)")):
        for name in names:
            pts = [(r["steps"], r[key]) for r in curve if r["sampler"] == name]
            if name.endswith("(reference)"):
                ax.axhline(pts[0][1], linestyle="--", color="grey", label=f"{name}, {pts[0][0]} steps")
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.axhline(table["ceiling"][key], linestyle=":", color="black", label="real images")
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in curve if not r["sampler"].endswith("(reference)")})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("steps")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Sampler vs steps ({table['stage']} model, {table['samples']} held-out prompts)")
    return figure_image(fig)


def no_sweep_plot() -> Image.Image:
    """What the plot file holds when the sweep is off (DVC expects the file either way)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (400, 60), "white")
    ImageDraw.Draw(image).text((10, 22), "no sampler sweep (evaluate.sweep.prompts: 0)", fill=(0, 0, 0))
    return image


def figure_image(fig) -> Image.Image:
    """A matplotlib figure, laid out tightly, as an RGB PIL image (the figure is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")
