"""`imager train-base` and `imager train-sr`: train the two models of the cascade.

Both run unchanged under torchrun (`torchrun --nproc_per_node N imager train-base ...`): gloo on
CPUs, nccl on GPUs; only rank 0 writes outputs, checkpoints and MLflow records.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from imager.tracking import StageRun
from stages._common import ParamsOption, finish, load_params, split_timings, tracked, user_errors

ShardsOpt = Annotated[Path, typer.Option(help="Shard directory (with index.json).")]
EmbOpt = Annotated[Path, typer.Option(help="Embedding cache directory (from `imager embed`).")]
OutOpt = Annotated[Path, typer.Option(help="Output: model.safetensors (EMA), model_raw.safetensors, grid.png.")]
CkptOpt = Annotated[Path, typer.Option(help="Training-state checkpoints; a rerun resumes from the latest that matches.")]
ReportOpt = Annotated[Path, typer.Option(help="Metrics JSON: final loss, steps, parameters (run times go to MLflow).")]


InitOpt = Annotated[
    str | None,
    typer.Option(help="Fine-tune: start from this model (a training stage's model folder or file, or an MLflow URI); overrides the params' init_from."),
]


def _train(section: str, shards: Path, embeddings: Path, out: Path, checkpoints: Path, report: Path, params: Path, init_from: str | None = None) -> None:
    from imager.training.distributed import init_distributed, shutdown
    from imager.training.run import train_model

    p = load_params(params)
    cfg = getattr(p, section)
    if init_from is not None:
        cfg = cfg.model_copy(update={"init_from": init_from})
    dist = init_distributed()
    try:
        run_ctx = tracked(section.replace("_", "-"), p, {section: cfg.model_dump(), "seed": p.seed}, {"shards": shards, "embeddings": embeddings}) if dist.is_main else contextlib.nullcontext(StageRun(None))
        with run_ctx as run:
            started = time.perf_counter()
            summary = train_model(
                cfg, shards_dir=shards, cache_dir=embeddings, out=out, ckpt_dir=checkpoints, seed=p.seed, dist=dist,
                log_metrics=lambda m, step: run.log_metrics(m, step=step), log_image=run.log_image,
            )
            if dist.is_main:
                # Run times, and the step a resumed run started from, describe this run, not its result.
                summary, timings = split_timings(summary, "images_per_second", "wall_seconds", "resumed_from_step")
                finish(run, summary, report, started, prefix="summary.", timings=timings)
                for name in ("model.safetensors", "adapter.safetensors"):  # a LoRA run writes the adapter
                    if (out / name).is_file():
                        run.log_artifact(out / name, "model")
    finally:
        shutdown(dist)


@user_errors
def train_base(
    shards: ShardsOpt, embeddings: EmbOpt, out: OutOpt, checkpoints: CkptOpt, report: ReportOpt,
    init_from: InitOpt = None, params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the base text-to-image model (params `train_base`) on the shards and cached embeddings."""
    _train("train_base", shards, embeddings, out, checkpoints, report, params, init_from)


@user_errors
def train_sr(
    shards: ShardsOpt, embeddings: EmbOpt, out: OutOpt, checkpoints: CkptOpt, report: ReportOpt,
    init_from: InitOpt = None, params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the super-resolution model (params `train_sr`): lowres -> resolution, with noise augmentation."""
    _train("train_sr", shards, embeddings, out, checkpoints, report, params, init_from)
