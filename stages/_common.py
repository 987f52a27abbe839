"""What every stage shares: option types, logging, and turning user errors into one line."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from imager import config
from imager.errors import ConfigError, ImagerError
from imager.io import atomic_write_json
from imager.tracking import StageRun, stage_run

F = TypeVar("F", bound=Callable[..., Any])

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Params file (validated against imager.config).", show_default=True)
]

DatasetOption = Annotated[
    str | None,
    typer.Option("--dataset", help="A name under `datasets` in params.yaml: its download/shard/embed keys replace the top-level ones."),
]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("mlflow", "alembic", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def user_errors(fn: F) -> F:
    """Run a stage; an :class:`ImagerError` prints ``error: <one line>`` and exits with status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except ImagerError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; outputs were left as they were before the run", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def load_params(path: Path) -> config.Params:
    return config.load(path)


def data_sections(p: config.Params, dataset: str | None) -> tuple[Any, Any, Any]:
    """The (download, shard, embed) sections of ``datasets.<dataset>``, or the top-level ones."""
    if dataset is None:
        return p.download, p.shard, p.embed
    try:
        return p.dataset_sections(dataset)
    except ValueError as exc:
        raise ConfigError(f"--dataset: {exc}") from None


def stage_name(stage: str, dataset: str | None) -> str:
    """The MLflow run name: ``download``, or ``download@lineart`` for a further dataset (as DVC names it)."""
    return stage if dataset is None else f"{stage}@{dataset}"


def finish(
    run: StageRun, report: dict[str, Any], report_path: Path, started: float, prefix: str = "", timings: dict[str, float] | None = None
) -> None:
    """Write the report (DVC metrics) and log it with the timing. A training stage passes
    ``prefix="summary."`` so that its totals do not join the per-step curves of the same names.

    ``timings`` (seconds, images/s, a resumed run's first step) go to MLflow and the log only: the
    report is a hashed DVC output, and keeping what differs between runs out of it lets two runs of
    the same pipeline write identical files."""
    atomic_write_json(report_path, report)
    seconds = time.perf_counter() - started
    run.log_metrics({f"{prefix}{k}": v for k, v in {**report, **(timings or {}), "seconds": seconds}.items()})
    run.log_dict({**report, "timings": {**(timings or {}), "seconds": seconds}}, "report.json")
    logging.getLogger("imager").info("report written to %s (%.1f s)", report_path, seconds)


def split_timings(summary: dict[str, Any], *keys: str) -> tuple[dict[str, Any], dict[str, float]]:
    """(the summary without ``keys``, those keys' values): what the report holds and what only MLflow gets."""
    return {k: v for k, v in summary.items() if k not in keys}, {k: float(summary[k]) for k in keys if k in summary}


def tracked(stage: str, params: config.Params, sections: dict[str, Any], datasets: dict[str, Path] | None = None, context: str = "training"):
    """The MLflow run of a stage, logging exactly the params sections the stage depends on and the
    ``datasets`` it reads (name -> path) as its inputs."""
    return stage_run(
        stage, sections, experiment=params.tracking.experiment, enabled=params.tracking.enabled, datasets=datasets, context=context
    )
