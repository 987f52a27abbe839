"""`imager train-control`, `imager evaluate-control`: sketch conditioning trained on the frozen base
model (params `control`), measured against the training-free SDEdit baseline.

The stages of control/dvc.yaml (`dvc repro control/dvc.yaml`). train-control runs unchanged under
torchrun and resumes from its checkpoints like train-base.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from imager.tracking import StageRun
from stages._common import ParamsOption, finish, load_params, split_timings, tracked, user_errors

CONTROL = "control.safetensors"
MODEL = "model.safetensors"


@user_errors
def train_control(
    shards: Annotated[Path, typer.Option(help="Shards of the training data (data/shards; a folder of your own through the download stage).")],
    embeddings: Annotated[Path, typer.Option(help="Their embedding cache (data/embeddings).")],
    base: Annotated[Path, typer.Option(help="The trained base model (a model folder or file, or an MLflow URI): frozen, the control learns on it.")],
    out: Annotated[Path, typer.Option(help="Output directory: control.safetensors (EMA), control_raw.safetensors, grid.png.")],
    checkpoints: Annotated[Path, typer.Option(help="Training-state checkpoints; a rerun resumes from the latest that matches.")],
    report: Annotated[Path, typer.Option(help="Metrics JSON: loss, steps, trainable parameters, zero-convolution norms.")],
    variant: Annotated[str, typer.Option(help="The entry of control.variants to train.")] = "controlnet",
    pairs: Annotated[Path | None, typer.Option(help="Shards of the dataset paired by key (condition: lineart).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train a ControlNet or an adapter (params `train_base` with `control.variants.VARIANT`'s keys
    replaced) on the frozen base model: each training image's line map (or its paired line art) is
    the condition. Use it with `imager generate --control SKETCH.png --controlnet DIR`."""
    from imager.errors import ConfigError
    from imager.io import atomic_write_json
    from imager.training.distributed import init_distributed, shutdown
    from imager.training.run import train_model

    p = load_params(params)
    try:
        cfg = p.control_train(variant)
    except ValueError as exc:
        raise ConfigError(f"--variant: {exc}") from None
    cfg = cfg.model_copy(update={"init_from": str(base)})
    dist = init_distributed()
    try:
        sections = {"train": cfg.model_dump(mode="json"), "control": p.control.model_dump(mode="json"), "seed": p.seed}
        run_ctx = tracked(f"train-control@{variant}", p, sections, {"shards": shards, "embeddings": embeddings}) if dist.is_main else contextlib.nullcontext(StageRun(None))
        with run_ctx as run:
            started = time.perf_counter()
            summary = train_model(
                cfg, shards_dir=shards, cache_dir=embeddings, out=out, ckpt_dir=checkpoints, seed=p.seed, dist=dist,
                log_metrics=lambda m, step: run.log_metrics(m, step=step), log_image=run.log_image, pairs_dir=pairs,
            )
            if not dist.is_main:
                return
            summary["file_bytes"] = float((out / CONTROL).stat().st_size)
            result, timings = split_timings(summary, "images_per_second", "wall_seconds", "resumed_from_step")
            run.log_metrics({f"summary.{k}": v for k, v in {**result, **timings, "seconds": time.perf_counter() - started}.items()})
            run.log_dict({**result, "timings": timings}, "report.json")
            run.log_artifact(out / CONTROL, "model")
            atomic_write_json(report, {"variant": variant, "arch": cfg.control.arch, "condition": cfg.control.condition, **result})
    finally:
        shutdown(dist)


@user_errors
def evaluate_control(
    shards: Annotated[Path, typer.Option(help="Shards of the default data (their held-out split: the sketches).")],
    embeddings: Annotated[Path, typer.Option(help="Their embedding cache.")],
    base: Annotated[Path, typer.Option(help="Base model directory (from `imager train-base`).")],
    sr: Annotated[Path, typer.Option(help="Super-resolution model directory (from `imager train-sr`).")],
    controls: Annotated[Path, typer.Option(help="The controls' directory: one folder per variant (from `imager train-control`).")],
    evaluator: Annotated[Path, typer.Option(help="Evaluator directory (from `imager train-evaluator`).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON (DVC metrics): fidelity, R-precision, FID per method and scale.")],
    grid: Annotated[Path, typer.Option(help="Picture grid PNG: sketch | SDEdit | each control | real.")],
    plot: Annotated[Path, typer.Option(help="PNG: the default control's fidelity, R-precision and FID against the scale.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Measure text alone, SDEdit on the sketch and each trained control on the held-out sketches of
    the edit evaluation (sketch fidelity, R-precision, FID), and the default control against its
    conditioning scale; log the cascade with the default control to MLflow."""
    from imager.evaluation.control import Trained
    from imager.evaluation.control import evaluate_control as run_eval
    from imager.evaluation.evaluator import load_evaluator
    from imager.inference import Cascade, check_sampling, resolve_device
    from imager.models.control import load_control
    from imager.text.cache import EmbeddingCache
    from stages.evaluate import EVALUATOR_FILE, _save_png

    p = load_params(params)
    ev, c = p.evaluate, p.control
    sections = {"sampler": p.sampler, "evaluate": ev.model_dump(), "edits": p.edits.model_dump(), "control": c.model_dump(mode="json")}
    with tracked("evaluate-control", p, sections, {"shards": shards, "embeddings": embeddings}, context="evaluation") as run:
        started = time.perf_counter()
        sampling = ev.sampling(p.sampler)
        for stage in ("base", "sr"):
            check_sampling(sampling.stage(stage))
        cascade = Cascade.load(base / MODEL, sr / MODEL, device=resolve_device(ev.device, "params.yaml: evaluate.device"))
        trained = []
        for name in c.variants:
            net = load_control(controls / name / CONTROL, cascade.base.model)
            trained.append(Trained(name, net, sum(q.numel() for q in net.parameters())))
        result = run_eval(
            cascade, load_evaluator(evaluator / EVALUATOR_FILE), trained, default=c.default, scales=c.evaluate.scales,
            shards_dir=shards, cache=EmbeddingCache(embeddings), evaluate=ev, edits=p.edits, sampler=p.sampler,
        )  # fmt: skip
        for path, image, name in ((grid, result["grid"], "control_grid.png"), (plot, result["plot"], "control_scale.png")):
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_png(image, path)
            run.log_image(image, name)
        run.log_dict({"curve": result["curve"]}, "control_scale.json")
        run.log_cascade(base / MODEL, sr / MODEL, embed=p.embed.model_dump(mode="json"), sampling=sampling, name="cascade")
        run.log_artifact(controls / c.default / CONTROL, "control")
        finish(run, result["metrics"], metrics, started, timings=result["timings"])
