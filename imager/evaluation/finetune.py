"""How fine-tuning is measured: style, content, forgetting and cost, for full fine-tuning and LoRA.

On held-out samples of the fine-tuning dataset (``finetune.evaluate.prompts`` val captions such as
"red heart, line art", each with its real image):

    style        the line-art score (imager.evaluation.style) of the cascade's 64 px samples, beside
                 that of the real images of the dataset and of the default (colour) data
    content      edge F-score between the samples' lines and the real image's lines (the sketch
                 metric of the edit evaluation: dark pixels, matched within ``edits.sketch.tolerance``
                 px) and the evaluator's R-precision and FID against the dataset's real images

On held-out captions of the default data (``forgetting_prompts``): the evaluator's FID and
R-precision of the base model, of LoRA at scale 0 (its images must equal the base model's bit for
bit: checked, and reported), of LoRA at scale 1 and of the fully fine-tuned model.

During training, :func:`style_probe` measures the EMA model's style on a few held-out prompts with
each grid, which gives the steps each method needs to reach the style.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imager.data.shard import read_samples, shard_paths
from imager.errors import DataError
from imager.evaluation.config import Backbones, Edits, Evaluate
from imager.evaluation.edits import edge_fscore, sketch_of
from imager.evaluation.run import Scorer, held_out
from imager.evaluation.style import colourful_share, line_art_score
from imager.inference.adapters import AdapterSpec, use_adapters
from imager.inference.cascade import Cascade
from imager.inference.images import downsample, grid_image, to_unit, upscale
from imager.text.cache import EmbeddingCache
from imager.training.config import FinetuneEval

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def style_of(images: Tensor, cfg: FinetuneEval) -> Tensor:
    return line_art_score(images, chroma=cfg.chroma, dark=cfg.dark, light=cfg.light)


def style_probe(shards_dir: Path, cache: EmbeddingCache, cfg: FinetuneEval) -> Callable[[Any], dict[str, float]]:
    """A probe for :func:`imager.training.run.train_model`: the mean style of the EMA model's samples
    for ``cfg.probe_prompts`` held-out captions (seeded choice), and that of their real images."""
    from imager.training.run import ema_stage

    split = "val" if shard_paths(shards_dir, "val") else "train"
    keys, _, images = read_samples(shard_paths(shards_dir, split))
    gen = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(len(keys), generator=gen)[: cfg.probe_prompts].sort().values.tolist()
    cond = tuple(c.float() if c.is_floating_point() else c for c in cache.lookup([keys[i] for i in pick]))
    real = to_unit(images[pick])

    def probe(trainer) -> dict[str, float]:
        real_style = float(style_of(downsample(real, trainer.cfg.resolution), cfg).mean())
        samples = ema_stage(trainer).sample(cond, trainer.cfg.grid, seed=cfg.seed).cpu()
        return {"style": float(style_of(samples, cfg).mean()), "style_real": real_style}

    return probe


def steps_to_style(probes: list[dict[str, float]], reach: float) -> int | None:
    """The first probed step whose style reaches ``reach`` × the real images' (None: never)."""
    for p in sorted(probes, key=lambda p: p["step"]):
        if p["style"] >= reach * p["style_real"]:
            return int(p["step"])
    return None


@dataclass
class Variant:
    name: str  # base, full, lora_r4, ...
    cascade: Cascade
    adapters: list[AdapterSpec]


def _generate(variant: Variant, cond: tuple[Tensor, ...], sampling, desc: str, *, scale: float | None = None) -> Tensor:
    specs = [AdapterSpec(s.path, s.scale if scale is None else scale) for s in variant.adapters]
    use_adapters(variant.cascade, specs)
    n = cond[0].shape[0]
    with tqdm(total=n, desc=desc, unit="img") as bar:
        _, sr = variant.cascade.generate(cond, sampling, on_batch=bar.update)
    return sr


def evaluate_finetune(
    variants: list[Variant], evaluator: torch.nn.Module, *, data_shards: Path, data_cache: EmbeddingCache,
    colour_shards: Path, colour_cache: EmbeddingCache, evaluate: Evaluate, edits: Edits, cfg: FinetuneEval, sampler: str,
) -> dict[str, Any]:
    """``metrics`` (flat, for DVC), ``table`` (one row per variant), ``grid`` (PIL) and ``timings``."""
    sampling = evaluate.sampling(sampler)
    ecfg = evaluate.model_copy(update={"prompts": cfg.prompts, "seed": cfg.seed})
    data = held_out(data_shards, data_cache, ecfg)
    colour_cfg = evaluate.model_copy(update={"prompts": cfg.forgetting_prompts, "seed": cfg.seed})
    colour = held_out(colour_shards, colour_cache, colour_cfg)
    if any(v.cascade.sr is None for v in variants):
        raise DataError("the fine-tuning evaluation samples the whole cascade: it needs the super-resolution model")
    resolution = variants[0].cascade.resolution
    scorer = Scorer(evaluator, data, ecfg, resolution, Backbones())
    colour_scorer = Scorer(evaluator, colour, colour_cfg, resolution, Backbones())
    sketch = edits.sketch
    real = downsample(data.real, resolution)
    real_lines, _ = sketch_of(real, sketch.threshold)

    def content_and_style(images: Tensor, targets: Tensor) -> dict[str, float]:
        lines, _ = sketch_of(images, sketch.threshold)
        scored = scorer.score(images, targets)
        return {
            "style": float(style_of(images, cfg).mean()),
            "colourful": float(colourful_share(images, chroma=cfg.chroma).mean()),
            "edge_f": float(edge_fscore(real_lines, lines, sketch.tolerance).mean()),
            "fid_evaluator": scored["fid_evaluator"],
            "r_precision_evaluator": scored["r_precision_evaluator"],
        }

    n = len(data.captions)
    table: dict[str, dict[str, Any]] = {
        "real": {
            "style": float(style_of(real, cfg).mean()),
            "colourful": float(colourful_share(real, chroma=cfg.chroma).mean()),
            **{k: v for k, v in scorer.ceiling(n).items() if k in ("fid_evaluator", "r_precision_evaluator")},
        },
        "real_colour": {
            "style": float(style_of(downsample(colour.real, resolution), cfg).mean()),
            "colourful": float(colourful_share(downsample(colour.real, resolution), chroma=cfg.chroma).mean()),
        },
    }
    samples: dict[str, Tensor] = {}
    timings: dict[str, float] = {}
    base_colour: Tensor | None = None
    for v in variants:
        started = time.perf_counter()
        images = _generate(v, data.cond, sampling, f"finetune eval: {v.name}")
        timings[f"{v.name}_sampling_seconds"] = time.perf_counter() - started
        samples[v.name] = images
        row = content_and_style(images, data.targets)
        forget = _generate(v, colour.cond, sampling, f"forgetting: {v.name}")
        scored = colour_scorer.score(forget, colour.targets)
        row |= {"forgetting_fid_evaluator": scored["fid_evaluator"], "forgetting_r_precision_evaluator": scored["r_precision_evaluator"]}
        if v.name == "base":
            base_colour = forget
        if v.adapters and v is _main_lora(variants):
            at_zero = _generate(v, colour.cond, sampling, f"forgetting: {v.name} at scale 0", scale=0.0)
            row["scale0_equals_base"] = bool(base_colour is not None and torch.equal(at_zero, base_colour))
        table[v.name] = row
        use_adapters(v.cascade, [])

    metrics: dict[str, Any] = {"prompts": n, "forgetting_prompts": len(colour.captions), "sampler": sampler}
    for name, row in table.items():
        for key, value in row.items():
            metrics[f"{name}.{key}"] = value
    shown = torch.linspace(0, n - 1, min(cfg.grid_rows, n)).round().long().unique().tolist()
    names = [v.name for v in variants]
    grid = grid_image(
        [[samples[name][i] for name in names] + [upscale(real[i : i + 1], resolution)[0]] for i in shown],
        [f"{data.captions[i]}  ({' | '.join(names)} | real)" for i in shown],
    )
    return {"metrics": metrics, "table": table, "grid": grid, "timings": timings}


def _main_lora(variants: list[Variant]) -> Variant | None:
    return next((v for v in variants if v.adapters), None)
