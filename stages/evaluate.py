"""`imager train-evaluator`, `imager evaluate` and `imager evaluate-edits`: the in-domain evaluator,
then the cascade's samples and metrics (FID, CLIP score, R-precision beside their real-image
ceilings), the sampler-vs-steps sweep, the cascade as one MLflow model, and the image edits
(inpainting, img2img, sketch) on held-out images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from stages._common import ParamsOption, finish, load_params, split_timings, tracked, user_errors

ShardsOpt = Annotated[Path, typer.Option(help="Shard directory (with index.json).")]
EmbOpt = Annotated[Path, typer.Option(help="Embedding cache directory (from `imager embed`).")]
EVALUATOR_FILE = "evaluator.safetensors"
MODEL_FILE = "model.safetensors"


@user_errors
def train_evaluator(
    shards: ShardsOpt,
    embeddings: EmbOpt,
    out: Annotated[Path, typer.Option(help=f"Output directory: {EVALUATOR_FILE}.")],
    report: Annotated[Path, typer.Option(help="Report JSON: training summary and held-out retrieval accuracy (run times go to MLflow).")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train the in-domain evaluator (params `evaluator`): a small image encoder tuned
    contrastively against the frozen caption embeddings of the training images."""
    from imager.evaluation.train import train_and_check

    p = load_params(params)
    with tracked("train-evaluator", p, {"evaluator": p.evaluator.model_dump()}, {"shards": shards, "embeddings": embeddings}) as run:
        started = time.perf_counter()
        summary = train_and_check(p.evaluator, shards_dir=shards, cache_dir=embeddings, out=out / EVALUATOR_FILE, log=run.log_metrics)
        summary, timings = split_timings(summary, "images_per_s", "seconds")
        finish(run, summary, report, started, prefix="summary.", timings=timings)


@user_errors
def evaluate(
    shards: ShardsOpt,
    embeddings: EmbOpt,
    base: Annotated[Path, typer.Option(help="Base model directory (from `imager train-base`).")],
    sr: Annotated[Path, typer.Option(help="Super-resolution model directory (from `imager train-sr`).")],
    evaluator: Annotated[Path, typer.Option(help="Evaluator directory (from `imager train-evaluator`).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON (DVC metrics): scores beside their ceilings.")],
    sweep: Annotated[Path, typer.Option(help="Sampler-vs-steps table JSON (DVC metrics).")],
    curve: Annotated[Path, typer.Option(help="Sampler-vs-steps rows JSON (DVC plot).")],
    plot: Annotated[Path, typer.Option(help="Sampler-vs-steps PNG.")],
    grid: Annotated[Path, typer.Option(help="Sample grid PNG: base | SR | real per held-out prompt.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Sample the cascade for held-out prompts with the top-level `sampler` and score it (params
    `evaluate`); sweep samplers and step counts; log the cascade as an MLflow pyfunc model."""
    from imager.evaluation.evaluator import load_evaluator
    from imager.evaluation.run import evaluate as run_evaluation
    from imager.inference import Cascade, check_sampling, resolve_device
    from imager.io import atomic_write_json
    from imager.text.cache import EmbeddingCache

    p = load_params(params)
    cfg = p.evaluate
    sections = {"sampler": p.sampler, "seed": p.seed, "evaluate": cfg.model_dump()}
    with tracked("evaluate", p, sections, {"shards": shards, "embeddings": embeddings}, context="evaluation") as run:
        started = time.perf_counter()
        sampling = cfg.sampling(p.sampler)
        for stage in ("base", "sr"):
            check_sampling(sampling.stage(stage))
        device = resolve_device(cfg.device, "params.yaml: evaluate.device")
        cascade = Cascade.load(base / MODEL_FILE, sr / MODEL_FILE, device=device)
        scorer = load_evaluator(evaluator / EVALUATOR_FILE)
        cache = EmbeddingCache(embeddings)
        result = run_evaluation(cascade, scorer, shards_dir=shards, cache=cache, cfg=cfg, sampler=p.sampler)
        for path in (sweep, curve, plot, grid):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sweep, result["sweep"])
        atomic_write_json(curve, result["curve"])
        _save_png(result["grid"], grid)
        _save_png(result["sweep_plot"], plot)
        run.log_dict(result["sweep"], "sweep.json")
        run.log_image(result["grid"], "evaluate_grid.png")
        run.log_image(result["sweep_plot"], "sampler_sweep.png")
        run.log_cascade(base / MODEL_FILE, sr / MODEL_FILE, embed=p.embed.model_dump(mode="json"), sampling=sampling)
        finish(run, {"sampler": p.sampler, **result["metrics"]}, metrics, started, timings=result["timings"])


@user_errors
def evaluate_edits(
    shards: ShardsOpt,
    embeddings: EmbOpt,
    base: Annotated[Path, typer.Option(help="Base model directory (from `imager train-base`).")],
    sr: Annotated[Path, typer.Option(help="Super-resolution model directory (from `imager train-sr`).")],
    evaluator: Annotated[Path, typer.Option(help="Evaluator directory (from `imager train-evaluator`).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON (DVC metrics): inpainting, img2img and sketch scores.")],
    curve: Annotated[Path, typer.Option(help="img2img strength-sweep rows JSON (DVC plot).")],
    plot: Annotated[Path, typer.Option(help="img2img strength trade-off PNG.")],
    grid: Annotated[Path, typer.Option(help="Picture grid PNG: input | mask | result for each edit.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Evaluate image-conditioned generation on held-out images (params `edits`, sampled with
    `evaluate.base`/`sr` and the top-level `sampler`): inpainting and outpainting with and without
    resampling, an img2img strength sweep, and sketch to image."""
    from imager.evaluation.edits import evaluate_edits as run_edits
    from imager.evaluation.evaluator import load_evaluator
    from imager.inference import Cascade, check_sampling, resolve_device
    from imager.io import atomic_write_json
    from imager.text.cache import EmbeddingCache

    p = load_params(params)
    cfg, ev = p.edits, p.evaluate
    sections = {"sampler": p.sampler, "edits": cfg.model_dump(), "evaluate": {k: ev.model_dump()[k] for k in ("base", "sr", "device", "batch_size", "r_precision_k")}}
    with tracked("evaluate-edits", p, sections, {"shards": shards, "embeddings": embeddings}, context="evaluation") as run:
        started = time.perf_counter()
        sampling = ev.sampling(p.sampler)
        for stage in ("base", "sr"):
            check_sampling(sampling.stage(stage))
        device = resolve_device(ev.device, "params.yaml: evaluate.device")
        cascade = Cascade.load(base / MODEL_FILE, sr / MODEL_FILE, device=device)
        scorer = load_evaluator(evaluator / EVALUATOR_FILE)
        result = run_edits(cascade, scorer, shards_dir=shards, cache=EmbeddingCache(embeddings), evaluate=ev, cfg=cfg, sampler=p.sampler)
        for path in (curve, plot, grid):
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(curve, result["curve"])
        _save_png(result["grid"], grid)
        _save_png(result["plot"], plot)
        run.log_image(result["grid"], "edits_grid.png")
        run.log_image(result["plot"], "img2img_strength.png")
        finish(run, result["metrics"], metrics, started, timings=result["timings"])


def _save_png(image, path: Path) -> None:
    """Write a PNG through a temporary file, so a killed run never leaves half an image."""
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
