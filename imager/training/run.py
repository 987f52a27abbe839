"""Train one model of the cascade end to end: what the train-base and train-sr stages call."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from imager.data.shard import read_samples, shard_paths
from imager.errors import ConfigError, DataError
from imager.inference.images import downsample, grid_image, to_unit
from imager.inference.sampling import Stage
from imager.io import atomic_dir
from imager.training.config import TrainBase, TrainSR
from imager.training.distributed import Dist
from imager.training.loop import Trainer
from imager.training.tasks import BaseTask, ControlTask, SRTask

log = logging.getLogger(__name__)


def ema_stage(trainer: Trainer) -> Stage:
    """The EMA model as it will be saved, ready to sample on the training device."""
    cfg = trainer.cfg
    lowres = cfg.lowres if trainer.task.super_resolution else None
    return Stage(model=trainer.ema.model, schedule=trainer.schedule, prediction=cfg.loss.prediction, resolution=cfg.resolution, lowres=lowres)


def base_grid(trainer: Trainer) -> Image.Image:
    cfg, cache = trainer.cfg, trainer.cache
    g = cfg.grid
    if not cache.prompts:
        raise DataError("the embedding cache has no prompts; set embed.prompts and re-run `imager embed`")
    k = len(cache.prompts)
    cond = tuple(c.repeat_interleave(g.per_prompt, 0) for c in (cache.prompt_tokens, cache.prompt_mask, cache.prompt_pooled))
    images = ema_stage(trainer).sample(cond, g, seed=g.seed).cpu()
    rows = [list(images[i * g.per_prompt : (i + 1) * g.per_prompt]) for i in range(k)]
    return grid_image(rows, cache.prompts)


def sr_grid(trainer: Trainer, shards_dir: Path) -> Image.Image:
    cfg, cache = trainer.cfg, trainer.cache
    g = cfg.grid
    split = "val" if shard_paths(shards_dir, "val") else "train"
    keys, captions, images = read_samples(shard_paths(shards_dir, split), 4)
    truth = downsample(to_unit(images), cfg.resolution)
    aug = torch.full((len(keys),), cfg.sample_aug_level)
    lowres = trainer.task.lowres(truth, aug, trainer.schedule, torch.Generator().manual_seed(g.seed))
    cond = cache.lookup(keys)
    sr = ema_stage(trainer).sample(cond, g, seed=g.seed, lowres=lowres, aug_level=aug).cpu()
    up = F.interpolate(F.avg_pool2d(truth, cfg.resolution // cfg.lowres), size=cfg.resolution, mode="nearest")
    rows = [[up[i], sr[i], truth[i]] for i in range(len(keys))]
    return grid_image(rows, [f"{c}  (lowres | SR | real)" for c in captions])


def control_grid(trainer: Trainer, shards_dir: Path) -> Image.Image:
    """Condition | result | real for a few held-out images (the validation split when there is one)."""
    from imager.models.control import ControlInput

    cfg, cache = trainer.cfg, trainer.cache
    g = cfg.grid
    split = "val" if shard_paths(shards_dir, "val") else "train"
    keys, captions, images = read_samples(shard_paths(shards_dir, split), 4)
    truth = downsample(to_unit(images), cfg.resolution)
    condition = trainer.task.condition(images, list(keys))
    ema = trainer.ema.model
    stage = Stage(model=ema.base, schedule=trainer.schedule, prediction=cfg.loss.prediction, resolution=cfg.resolution)
    out = stage.sample(cache.lookup(keys), g, seed=g.seed, control=[ControlInput(ema.control, condition)]).cpu()
    drawn = 1 - 2 * condition.expand(-1, 3, -1, -1)  # the line map as black lines on white
    rows = [[drawn[i], out[i], truth[i]] for i in range(len(keys))]
    return grid_image(rows, [f"{c}  (condition | result | real)" for c in captions])


def read_pairs(shards_dir: Path) -> dict[str, torch.Tensor]:
    """Every image of a paired dataset's shards (both splits), key -> uint8 (3, S, S)."""
    pairs: dict[str, torch.Tensor] = {}
    for split in ("train", "val"):
        paths = shard_paths(shards_dir, split)
        if paths:
            keys, _, images = read_samples(paths, None)
            pairs.update(zip(keys, images, strict=True))
    if not pairs:
        raise DataError(f"{shards_dir}: no shards of the paired dataset; run its data stages first")
    return pairs


def train_model(
    cfg: TrainBase | TrainSR,
    *,
    shards_dir: Path,
    cache_dir: Path,
    out: Path,
    ckpt_dir: Path,
    seed: int,
    dist: Dist,
    log_metrics: Callable[[dict[str, float], int], None],
    log_image: Callable[[Image.Image, str], None],
    probe: Callable[[Trainer], dict[str, float]] | None = None,
    pairs_dir: Path | None = None,
) -> dict[str, Any]:
    """Train (resuming from ``ckpt_dir`` when it matches), write ``out`` (EMA and raw weights, or
    the adapter of a LoRA run, and the final grid) atomically on rank 0, and return the summary for
    the report. ``probe`` measures the EMA model with each grid and at the end (``trainer.probes``)."""
    sr = isinstance(cfg, TrainSR)
    control = cfg.control is not None and not sr
    if control:
        lineart = cfg.control.condition == "lineart"
        if lineart and pairs_dir is None:
            raise ConfigError("control.condition: lineart needs the paired dataset's shards (--pairs)")
        task = ControlTask(cfg, pairs=read_pairs(pairs_dir) if lineart else None)
    else:
        task = SRTask(cfg) if sr else BaseTask(cfg)
    trainer = Trainer(cfg, task, shards_dir=shards_dir, cache_dir=cache_dir, ckpt_dir=ckpt_dir, seed=seed, dist=dist)
    make_grid = (lambda: sr_grid(trainer, shards_dir)) if sr else (lambda: control_grid(trainer, shards_dir)) if control else (lambda: base_grid(trainer))

    def measure(step: int) -> None:
        if probe is not None and all(p["step"] != step for p in trainer.probes):
            metrics = probe(trainer)
            trainer.probes.append({"step": step, **metrics})
            log_metrics({f"probe_{k}": v for k, v in metrics.items()}, step)

    def on_grid(step: int) -> None:
        log_image(make_grid(), f"grids/step-{step:07d}.png")
        measure(step)

    if dist.is_main:  # the start (a resumed run: its probe may have been due after the checkpoint)
        measure(trainer.step)
    summary = trainer.run(log_metrics, on_grid)
    if dist.is_main:
        measure(trainer.step)
        with atomic_dir(Path(out)) as tmp:
            trainer.save_final(tmp)
            grid = make_grid()
            grid.save(tmp / "grid.png")
        log_image(grid, "grids/final.png")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    counted = trainer.model.control if control else trainer.model
    summary = {**summary, "parameters": float(sum(p.numel() for n, p in counted.named_parameters() if ".lora_" not in n))}
    if cfg.lora is not None or cfg.init_from is not None:
        summary["trainable_parameters"] = float(trainable)
    summary.update(trainer.control_norms())
    if probe is not None:
        summary["probes"] = list(trainer.probes)
    return summary
