"""MLflow tracking: with imager.serving (the cascade as an MLflow model), the only module of the
library that imports mlflow.

Each stage run is one MLflow run named after the stage, holding its params section (flattened),
its counts and timings as metrics and its report as an artifact, with these tags:

    imager.stage          download, shard, embed, ...
    imager.git_commit     HEAD of the project's git repository (``imager.git_dirty`` when edited)
    imager.dvc_exp_name   DVC_EXP_NAME, set by ``dvc exp run``
    imager.pipeline_run   an id shared by the stages of one pipeline run
    imager.version.<pkg>  the installed version of imager, torch, transformers, open_clip_torch, diffusers

A run under ``dvc exp run`` is named ``<stage> · <experiment>`` so that the MLflow UI tells the
experiments apart; the data a run read (shards, embedding cache) is logged as its dataset inputs,
named by their DVC hash. The experiment is marked as a model-development one, so the UI opens on its
runs. Metric names are made valid for MLflow (``[A-Za-z0-9_-. /:]``; anything else becomes ``_``).

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<project>/mlflow.db`` (the project
is DVC_ROOT under DVC, else the working directory): the store ``mlflow ui`` opens in the project.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG_STAGE, TAG_COMMIT, TAG_DIRTY = "imager.stage", "imager.git_commit", "imager.git_dirty"
TAG_EXP, TAG_PIPELINE = "imager.dvc_exp_name", "imager.pipeline_run"
PIPELINE_ENV = "IMAGER_PIPELINE_RUN"
# The versions that decide the numbers (a new torch or transformers may change embeddings and
# weights in their last bits), recorded as tags ``imager.version.<package>``.
TAG_VERSION, VERSIONED = "imager.version", ("imager", "torch", "transformers", "open_clip_torch", "diffusers")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on runs, not on GenAI traces
_INVALID_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_name(name: str) -> str:
    """``name`` with every character MLflow rejects in a metric name replaced by ``_``."""
    return _INVALID_METRIC_CHARS.sub("_", name)


def run_name(stage: str) -> str:
    """``<stage> · <DVC experiment>`` under ``dvc exp run``, else the stage."""
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{stage} · {exp}" if exp else stage


def dataset_digest(path: Path) -> str:
    """The DVC hash of ``path`` (a DVC output of this project) as dvc.lock records it (``<md5>.dir`` for
    a folder), when its recorded size and file count match what is on disk; else ``sha256-<28 hex>``
    of its files' names and bytes. At most 36 characters, MLflow's limit for a dataset digest."""
    import yaml

    path = Path(path)
    root = project_root()
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (ValueError, OSError, yaml.YAMLError):
        lock = {}
        rel = None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else ([path] if path.is_file() else [])
    size = sum(f.stat().st_size for f in files)
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            same = out.get("nfiles", len(files)) == len(files) and out.get("size", -1) == size
            if out.get("path") == rel and out.get("md5") and same:
                return str(out["md5"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" if path.is_dir() else b"")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return f"sha256-{h.hexdigest()[:28]}"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; None becomes "null"."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def pipeline_run_id() -> str:
    """One id for all the stages of one pipeline run.

    ``IMAGER_PIPELINE_RUN`` when set; else derived from the ``dvc`` process this stage runs under
    (every stage of one ``dvc repro`` / ``dvc exp run`` is its child); else a fresh id.
    """
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None:
            head = proc.cmdline()[:3]
            if any(Path(part).name == "dvc" for part in head[:2]) or head[1:3] == ["-m", "dvc"]:
                seed = f"{proc.pid}:{proc.create_time()}:{os.uname().nodename}"
                return hashlib.sha256(seed.encode()).hexdigest()[:16]
            proc = proc.parent()
    except Exception:  # noqa: BLE001 - psutil missing or a process vanished: fall back to a fresh id
        pass
    return uuid.uuid4().hex[:16]


def run_tags(stage: str) -> dict[str, str]:
    tags = {TAG_STAGE: stage, TAG_PIPELINE: pipeline_run_id()}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[TAG_COMMIT] = commit
        tags[TAG_DIRTY] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    if os.environ.get("DVC_EXP_NAME"):
        tags[TAG_EXP] = os.environ["DVC_EXP_NAME"]
    tags |= {f"{TAG_VERSION}.{name}": v for name in VERSIONED if (v := _version(name))}
    return tags


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


class StageRun:
    """What a stage logs into its MLflow run; every method is a no-op when tracking is off."""

    def __init__(self, mlflow_module=None):
        self._mlflow = mlflow_module

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.active:
            numeric = {metric_name(k): float(v) for k, v in flatten(metrics).items() if _is_number(v)}
            self._mlflow.log_metrics(numeric, step=step)

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        if self.active:
            self._mlflow.log_dict(dict(obj), name)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image as a PNG artifact (e.g. ``grids/step-0000500.png``)."""
        if self.active:
            self._mlflow.log_image(image, artifact_file=artifact_file)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_cascade(
        self, base: Path, sr: Path, *, embed: Mapping[str, Any], sampling: Any, adapters: list[Any] | None = None,
        controls: list[Path] | None = None, name: str = "cascade",
    ) -> str | None:  # fmt: skip
        """The cascade (with LoRA ``adapters``: AdapterSpecs, and sketch ``controls``: control files,
        logged with it) as a pyfunc model named ``name`` in this run; returns its model URI."""
        if not self.active:
            return None
        import tempfile

        from imager.serving import log_cascade

        extra = ({"adapters": adapters} if adapters else {}) | ({"controls": [Path(c) for c in controls]} if controls else {})
        with tempfile.TemporaryDirectory(prefix="imager-cascade-") as tmp:
            info = log_cascade(Path(base), Path(sr), embed=dict(embed), sampling=sampling, workdir=Path(tmp), name=name, **extra)
        log.info("cascade logged as MLflow model %s", info.model_uri)
        return info.model_uri


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("True", "False")


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    *,
    experiment: str,
    enabled: bool = True,
    datasets: Mapping[str, Path] | None = None,
    context: str = "training",
) -> Iterator[StageRun]:
    """An MLflow run for one stage; marked FAILED (and re-raised) if the stage raises.

    ``datasets`` (name -> path) are logged as the run's inputs with ``context`` (training, evaluation)."""
    if not enabled:
        yield StageRun(None)
        return
    import mlflow

    for name in ("mlflow", "alembic"):  # after the import: mlflow sets its own level on import
        logging.getLogger(name).setLevel(logging.WARNING)

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    with mlflow.start_run(run_name=run_name(stage), tags=run_tags(stage)) as run:
        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))
        for name, path in (datasets or {}).items():
            _log_dataset(mlflow, name, Path(path), context)
        log.info("mlflow run %s (%s) in %s", run.info.run_id, stage, tracking_uri())
        yield StageRun(mlflow)


def _log_dataset(mlflow, name: str, path: Path, context: str) -> None:
    """``path`` as a dataset input of the active run: its name, its DVC hash and where it lies."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=dataset_digest(path))
    mlflow.log_input(dataset, context=context)
