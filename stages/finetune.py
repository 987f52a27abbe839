"""`imager finetune`, `imager train-lora`, `imager evaluate-finetune`: adapt the trained base model
to another dataset (params `finetune`, `datasets`) and measure what it gained and what it forgot.

The stages of finetune/dvc.yaml (`dvc repro finetune/dvc.yaml`). Both training commands run
unchanged under torchrun, resume from their checkpoints like train-base, and start from the model
given by --init-from (a training stage's model folder or file, or an MLflow URI).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from imager.tracking import StageRun
from stages._common import ParamsOption, finish, load_params, split_timings, tracked, user_errors

ShardsOpt = Annotated[Path, typer.Option(help="Shards of the fine-tuning dataset (data/datasets/NAME/shards).")]
EmbOpt = Annotated[Path, typer.Option(help="Its embedding cache (data/datasets/NAME/embeddings).")]
InitOpt = Annotated[str | None, typer.Option(help="The model to start from: a training stage's model folder or file, or an MLflow URI; default: the params' init_from.")]
CkptOpt = Annotated[Path, typer.Option(help="Training-state checkpoints; a rerun resumes from the latest that matches.")]
ADAPTER = "adapter.safetensors"
MODEL = "model.safetensors"


def _train(stage: str, cfg, p, *, shards: Path, embeddings: Path, out: Path, checkpoints: Path, init_from: str | None) -> dict[str, Any]:
    """One training run with the style probe; returns its report (timings go to MLflow only)."""
    from imager.errors import ConfigError
    from imager.evaluation.finetune import steps_to_style, style_probe
    from imager.text.cache import EmbeddingCache
    from imager.training.distributed import init_distributed, shutdown
    from imager.training.run import train_model

    init = init_from or cfg.init_from
    if init is None:
        raise ConfigError("--init-from: the model to fine-tune is required (or set init_from in the params)")
    cfg = cfg.model_copy(update={"init_from": init})
    fe = p.finetune.evaluate
    dist = init_distributed()
    try:
        sections = {"train": cfg.model_dump(mode="json"), "finetune": p.finetune.model_dump(mode="json"), "seed": p.seed}
        run_ctx = tracked(stage, p, sections, {"shards": shards, "embeddings": embeddings}) if dist.is_main else contextlib.nullcontext(StageRun(None))
        with run_ctx as run:
            started = time.perf_counter()
            probe = style_probe(shards, EmbeddingCache(embeddings), fe)
            summary = train_model(
                cfg, shards_dir=shards, cache_dir=embeddings, out=out, ckpt_dir=checkpoints, seed=p.seed, dist=dist,
                log_metrics=lambda m, step: run.log_metrics(m, step=step), log_image=run.log_image, probe=probe,
            )
            if not dist.is_main:
                return {}
            probes = summary.pop("probes")
            reached = steps_to_style(probes, fe.reach)
            summary |= {
                "steps_to_style": float(reached) if reached is not None else -1.0,
                "style_final": probes[-1]["style"],
                "style_real": probes[-1]["style_real"],
                "style_by_step": {str(int(q["step"])): q["style"] for q in sorted(probes, key=lambda q: q["step"])},
                "file_bytes": float(sum(f.stat().st_size for f in out.glob("*.safetensors") if "_raw" not in f.name)),
            }
            report, timings = split_timings(summary, "images_per_second", "wall_seconds", "resumed_from_step")
            flat = {k: v for k, v in report.items() if isinstance(v, (int, float))}
            run.log_metrics({f"summary.{k}": v for k, v in {**flat, **timings, "seconds": time.perf_counter() - started}.items()})
            run.log_dict({**report, "timings": timings}, "report.json")
            for name in (MODEL, ADAPTER):
                if (out / name).is_file():
                    run.log_artifact(out / name, "model")
            return report
    finally:
        shutdown(dist)


@user_errors
def finetune(
    shards: ShardsOpt, embeddings: EmbOpt,
    out: Annotated[Path, typer.Option(help="Output directory: model.safetensors (EMA), model_raw.safetensors, grid.png.")],
    checkpoints: CkptOpt,
    report: Annotated[Path, typer.Option(help="Metrics JSON: loss, steps, parameters, steps to the style.")],
    init_from: InitOpt = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Fine-tune every weight of the base model (params `train_base` with `finetune.base`'s keys
    replaced) on a dataset: weights and EMA start from --init-from, the optimizer, LR schedule and
    step count afresh."""
    from imager.io import atomic_write_json

    p = load_params(params)
    result = _train("finetune-base", p.finetune_base(), p, shards=shards, embeddings=embeddings, out=out, checkpoints=checkpoints, init_from=init_from)
    if result:
        atomic_write_json(report, result)


@user_errors
def train_lora(
    shards: ShardsOpt, embeddings: EmbOpt,
    out: Annotated[Path, typer.Option(help="Output directory: rank-R/adapter.safetensors (+ grid.png) for each rank.")],
    checkpoints: CkptOpt,
    report: Annotated[Path, typer.Option(help="Metrics JSON per rank: loss, trainable parameters, adapter size, steps to the style.")],
    init_from: InitOpt = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Train LoRA adapters on the base model (params `train_base` with `finetune.lora`'s keys
    replaced): `finetune.lora.lora.rank`, then each of `finetune.extra_ranks`. Only the adapters
    train; the base weights stay as they are. Use one with `imager generate --lora FILE[:SCALE]`."""
    from imager.io import atomic_write_json

    p = load_params(params)
    main = p.finetune_lora().lora.rank
    results = {}
    for rank in (main, *p.finetune.extra_ranks):
        result = _train(
            f"train-lora@r{rank}", p.finetune_lora(rank), p, shards=shards, embeddings=embeddings,
            out=out / f"rank-{rank}", checkpoints=checkpoints / f"rank-{rank}", init_from=init_from,
        )
        if result:
            results[f"r{rank}"] = result
    if results:
        atomic_write_json(report, {"rank": main, **results})


@user_errors
def evaluate_finetune(
    shards: ShardsOpt, embeddings: EmbOpt,
    colour_shards: Annotated[Path, typer.Option(help="Shards of the default data: the forgetting test's prompts.")],
    colour_embeddings: Annotated[Path, typer.Option(help="Their embedding cache.")],
    base: Annotated[Path, typer.Option(help="Base model directory (from `imager train-base`).")],
    sr: Annotated[Path, typer.Option(help="Super-resolution model directory (from `imager train-sr`).")],
    full: Annotated[Path, typer.Option(help="The fully fine-tuned base model's directory (from `imager finetune`).")],
    lora: Annotated[Path, typer.Option(help="The adapters' directory (from `imager train-lora`).")],
    evaluator: Annotated[Path, typer.Option(help="Evaluator directory (from `imager train-evaluator`).")],
    metrics: Annotated[Path, typer.Option(help="Metrics JSON (DVC metrics): style, content, forgetting, cost per variant.")],
    grid: Annotated[Path, typer.Option(help="Picture grid PNG: base | full | LoRA ranks | real, per held-out prompt.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Measure the fine-tunes on held-out samples of the fine-tuning dataset (style, edge F-score,
    R-precision) and on the default data's held-out captions (forgetting), sampled with the
    evaluation's settings; log the fine-tuned and the LoRA-adapted cascades to MLflow."""
    from imager.evaluation.evaluator import load_evaluator
    from imager.evaluation.finetune import Variant
    from imager.evaluation.finetune import evaluate_finetune as run_eval
    from imager.inference import Cascade, check_sampling, resolve_device
    from imager.inference.adapters import AdapterSpec
    from imager.models import load_model
    from imager.models.lora import read_adapter
    from imager.text.cache import EmbeddingCache
    from stages.evaluate import EVALUATOR_FILE, _save_png

    p = load_params(params)
    ev, fe = p.evaluate, p.finetune.evaluate
    sections = {"sampler": p.sampler, "evaluate": ev.model_dump(), "edits": p.edits.model_dump(), "finetune": p.finetune.model_dump(mode="json")}
    with tracked("evaluate-finetune", p, sections, {"shards": shards, "embeddings": embeddings}, context="evaluation") as run:
        started = time.perf_counter()
        sampling = ev.sampling(p.sampler)
        for stage in ("base", "sr"):
            check_sampling(sampling.stage(stage))
        device = resolve_device(ev.device, "params.yaml: evaluate.device")
        cascade = Cascade.load(base / MODEL, sr / MODEL, device=device)
        tuned = Cascade.load(full / MODEL, sr / MODEL, device=device)
        main = p.finetune_lora().lora.rank
        ranks = (main, *p.finetune.extra_ranks)
        adapters = {r: lora / f"rank-{r}" / ADAPTER for r in ranks}
        variants = [Variant("base", cascade, []), Variant("full", tuned, [])]
        variants += [Variant(f"lora_r{r}", cascade, [AdapterSpec(adapters[r], 1.0)]) for r in ranks]
        result = run_eval(
            variants, load_evaluator(evaluator / EVALUATOR_FILE), data_shards=shards, data_cache=EmbeddingCache(embeddings),
            colour_shards=colour_shards, colour_cache=EmbeddingCache(colour_embeddings), evaluate=ev, edits=p.edits, cfg=fe, sampler=p.sampler,
        )
        cost = {"full": {"trainable_parameters": sum(p.numel() for p in load_model(full / MODEL).parameters()), "file_bytes": (full / MODEL).stat().st_size}}
        for r in ranks:
            f = read_adapter(adapters[r])
            cost[f"lora_r{r}"] = {"trainable_parameters": f.parameters, "file_bytes": adapters[r].stat().st_size}
        out = dict(result["metrics"])
        for name, row in cost.items():
            out |= {f"{name}.{k}": v for k, v in row.items()}
        grid.parent.mkdir(parents=True, exist_ok=True)
        _save_png(result["grid"], grid)
        run.log_image(result["grid"], "finetune_grid.png")
        embed = p.dataset_sections(p.finetune.dataset)[2].model_dump(mode="json")
        run.log_cascade(full / MODEL, sr / MODEL, embed=embed, sampling=sampling, name="cascade_finetuned")
        run.log_cascade(base / MODEL, sr / MODEL, embed=embed, sampling=sampling, adapters=[AdapterSpec(adapters[main], 1.0)], name="cascade_lora")
        finish(run, out, metrics, started, timings=result["timings"])
