"""``python -m benchmarks`` (``make bench``): Imager vs diffusers (training, sampling), the embedding
cache vs on-the-fly encoding, and shards vs a PNG folder, measured in one process on this machine.

Not a pipeline stage: it reads params.yaml (the base model, its resolution and batch, the text
encoder) and, when present, the pipeline's shards, embedding cache and trained models. Every run
writes its results to benchmarks/results/latest.json and latest.md (:data:`RESULTS`, git-ignored);
only ``--publish`` also writes the committed report, docs/benchmarks.json and docs/benchmarks.md
(:data:`PUBLISHED`), so trying the benchmark never changes the tracked files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imager.errors import ConfigError
from stages._common import ParamsOption, load_params, user_errors

RESULTS = Path(__file__).resolve().parent / "results"  # git-ignored: the latest run's latest.json and latest.md
PUBLISHED = Path(__file__).resolve().parents[1] / "docs"  # the committed benchmarks.json and benchmarks.md

app = typer.Typer(name="benchmarks", add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
@user_errors
def bench(
    json_out: Annotated[Path | None, typer.Option("--json", help="Results JSON: machine, settings, every comparison with its ratio. Default: benchmarks/results/latest.json (git-ignored).", show_default=False)] = None,
    markdown: Annotated[Path | None, typer.Option(help="Results as a markdown table. Default: benchmarks/results/latest.md (git-ignored).", show_default=False)] = None,
    publish: Annotated[bool, typer.Option("--publish", help="Also write the committed report, docs/benchmarks.json and docs/benchmarks.md (not with --quick).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes, 2 repeats: a seconds-long smoke run, not a measurement.")] = False,
    repeats: Annotated[int | None, typer.Option(min=1, help="Recorded rounds per comparison (medians over them). Default 5 (quick: 2).")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Unrecorded warm-up rounds first. Default 2 (quick: 1).")] = None,
    batch: Annotated[int | None, typer.Option(min=1, help="Training/cache/data batch. Default: train_base.batch_size.")] = None,
    sampling_batch: Annotated[int | None, typer.Option(min=1, help="Sampling batch. Default 32.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, max=1000, help="Sampling steps. Default 20.")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only these comparisons (repeatable): training, sampling, cache, data, ui, quality, finetune; distributed (the data stages on Ray) runs only when named.")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Also DPM-Solver++ 20 vs DDPM 1000 steps in FID (needs trained base model + evaluator; slow).")] = False,
    fid_prompts: Annotated[int | None, typer.Option(min=2, help="Held-out prompts for --fid. Default: evaluate.sweep.prompts.")] = None,
    fid_seeds: Annotated[int | None, typer.Option(min=1, help="Noise seeds for --fid (their images are scored together). Default 3 (quick: 2).")] = None,
    quality: Annotated[str | None, typer.Option(help="DVC experiment trained with train_base.model.arch=diffusers: adds quality at equal compute.")] = None,
    quality_ours: Annotated[str, typer.Option(help="The DVC experiment (or workspace) --quality is compared with.")] = "workspace",
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda[:i].")] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads. Default: train_base.threads, else torch's.")] = None,
    shards: Annotated[Path, typer.Option(help="Shard directory; a small synthetic set is made when it has no index.json.")] = Path("data/shards"),
    embeddings: Annotated[Path, typer.Option(help="Embedding cache; one is built for the benchmark's captions if it does not fit.")] = Path("data/embeddings"),
    base_model: Annotated[Path, typer.Option(help="Trained base model (--fid, ui).")] = Path("data/models/base/model.safetensors"),
    sr_model: Annotated[Path, typer.Option(help="Trained SR model (ui).")] = Path("data/models/sr/model.safetensors"),
    evaluator: Annotated[Path, typer.Option(help="Trained evaluator (--fid).")] = Path("data/models/evaluator/evaluator.safetensors"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Benchmark Imager against diffusers and the simple alternatives; write JSON + markdown and print the table."""
    import torch

    from benchmarks.run import COMPARISONS, OPT_IN, QUICK_MODEL, BenchPaths, BenchSettings, run_bench
    from imager.inference.sampling import resolve_device
    from imager.io import atomic_write_json, atomic_write_text
    from imager.models.diffusers_unet import require_diffusers

    chosen = tuple(only) if only else tuple(c for c in COMPARISONS if c not in OPT_IN)
    unknown = [c for c in chosen if c not in COMPARISONS]
    if unknown:
        raise ConfigError(f"--only: unknown comparison '{unknown[0]}'; valid: {', '.join(COMPARISONS)}")
    if chosen == ("quality",) and quality is None:
        raise ConfigError("--only quality needs --quality EXPERIMENT (a `dvc exp run -S train_base.model.arch=diffusers` run)")
    if publish and quick:
        raise ConfigError("--publish: a --quick run is a smoke test, not a measurement; drop --quick to update docs/benchmarks.md")
    outputs = [(json_out or RESULTS / "latest.json", markdown or RESULTS / "latest.md")]
    if publish:
        outputs.append((PUBLISHED / "benchmarks.json", PUBLISHED / "benchmarks.md"))
    run_on = resolve_device(device)
    if set(chosen) - {"quality", "finetune", "distributed"}:
        require_diffusers()  # the one-line install hint before anything slow
    p = load_params(params)
    tb = p.train_base
    if threads or tb.threads:
        torch.set_num_threads(threads or tb.threads)
    base = {"resolution": tb.resolution, "batch_size": tb.batch_size, "guidance": p.evaluate.base.guidance,
            "shuffle_buffer": tb.shuffle_buffer, "synthetic_resolution": p.shard.resolution, "fid_prompts": p.evaluate.sweep.prompts}
    given = {"repeats": repeats, "warmup": warmup, "batch_size": batch, "sampling_batch": sampling_batch, "sampling_steps": steps,
             "fid_prompts": fid_prompts, "fid_seeds": fid_seeds, "quality": quality}
    overrides = {"fid": fid, "only": chosen, "quality_ours": quality_ours, "tracking_experiment": p.tracking.experiment,
                 **{k: v for k, v in given.items() if v is not None}}
    settings = BenchSettings.quick_run(**overrides) if quick else BenchSettings(**{**base, **overrides})
    if fid:
        for path, what in ((base_model, "--base-model"), (evaluator, "--evaluator"), (embeddings / "meta.json", "--embeddings")):
            if not path.is_file():
                raise ConfigError(f"{what}: {path} not found; --fid needs the trained pipeline (`dvc repro`)")
    report = run_bench(
        QUICK_MODEL if quick else tb.model, tb.schedule, tb.loss.prediction, p.embed, p.evaluate, settings=settings,
        paths=BenchPaths(shards=shards, embeddings=embeddings, base_model=base_model, evaluator=evaluator, sr_model=sr_model, params=params),
        device=run_on,
    )
    for json_path, markdown_path in outputs:
        atomic_write_json(json_path, report.to_json())
        atomic_write_text(markdown_path, report.markdown())
    _print_table(report)
    for json_path, markdown_path in outputs:
        typer.echo(f"wrote {json_path} and {markdown_path}")


def _print_table(report) -> None:
    from rich.console import Console
    from rich.table import Table

    from benchmarks.report import HEADER

    table = Table(title="python -m benchmarks", show_lines=False)
    for name in HEADER:  # the two value columns wrap; the title, ratio and mark stay whole
        table.add_column(name, overflow="fold", no_wrap=name not in ("Imager", "Baseline"))
    for row in report.rows():
        table.add_row(*row)
    console = Console(width=max(Console().width, 160))
    console.print(table)
    for note in report.notes:
        console.print(f"- {note}", highlight=False)


if __name__ == "__main__":
    app()
