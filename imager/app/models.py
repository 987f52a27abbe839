"""The models the app can sample: model files (the workspace's trained cascade by default) and the
MLflow runs that logged a ``cascade`` model, loaded on first use and kept (least recently used
first out).

A loaded model is what sampling needs: the :class:`Cascade`, its text encoder, its default
sampling settings and its identity for the PNGs it makes (the files' SHA-256, or the MLflow run
and model URI); and, for LoRA adapters, the adapters an MLflow model was logged with and the digest
of each network's weights, which says which adapter files fit it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imager.errors import ConfigError
from imager.inference.config import CascadeSampling

log = logging.getLogger("imager")
METRICS = ("fid_evaluator", "r_precision_evaluator", "clip_score_evaluator")  # what the picker shows of an evaluate run


@dataclass(frozen=True)
class ModelSource:
    """Where a cascade comes from: two model files, or an MLflow model URI."""

    id: str
    label: str
    kind: str  # "files" or "mlflow"
    base: Path | None = None
    sr: Path | None = None
    uri: str | None = None
    run_id: str | None = None
    experiment: str | None = None
    metrics: dict[str, float] = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "label": self.label, "kind": self.kind}
        if self.kind == "files":
            out |= {"base": str(self.base), "sr": None if self.sr is None else str(self.sr)}
        else:
            out |= {"uri": self.uri, "run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics}
        return out


@dataclass
class LoadedModel:
    source: ModelSource
    cascade: Any  # imager.inference.Cascade
    encoder: Any  # a text encoder
    sampling: CascadeSampling
    identity: dict[str, str]
    adapters: list[Any] = field(default_factory=list)  # AdapterSpecs logged with an MLflow model: active in every job
    weights: dict[str, str] = field(default_factory=dict)  # stage -> lora.weights_sha256 of its network (the engine's worker fills it)


def weights_of(cascade: Any) -> dict[str, str]:
    """Stage -> the digest of its network's weights, the identity an adapter file names."""
    from imager.models.lora import weights_sha256

    stages = {"base": cascade.base, "sr": cascade.sr}
    return {name: weights_sha256(stage.model) for name, stage in stages.items() if stage is not None}


def files_source(base: str | Path, sr: str | Path | None, *, id: str = "workspace", label: str | None = None) -> ModelSource:
    base = Path(base)
    return ModelSource(id=id, label=label or f"{base.parent.name or base.name} (files)", kind="files", base=base, sr=None if sr is None else Path(sr))


def mlflow_source(uri: str, *, label: str | None = None) -> ModelSource:
    """A source for a model URI (``runs:/<id>/cascade``, ``models:/m-...``) or a run id."""
    uri = uri.strip()
    if not uri:
        raise ConfigError("model: an empty MLflow model URI")
    if "/" not in uri and ":" not in uri:  # a bare run id
        uri = f"runs:/{uri}/cascade"
    return ModelSource(id=f"mlflow:{uri}", label=label or uri, kind="mlflow", uri=uri)


def logged_cascades(limit: int = 50) -> list[ModelSource]:
    """The ``cascade`` models logged to the current MLflow tracking store, newest first, each with
    its run's experiment name and evaluation metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    models = mlflow.search_logged_models(
        experiment_ids=list(experiments), filter_string="name = 'cascade'", output_format="list",
        order_by=[{"field_name": "creation_time", "ascending": False}], max_results=limit,
    )  # fmt: skip
    out = []
    for m in models:
        metrics: dict[str, float] = {}
        run_name = m.source_run_id or m.model_id
        if m.source_run_id:
            try:
                run = client.get_run(m.source_run_id)
                metrics = {k: round(float(v), 4) for k, v in run.data.metrics.items() if k in METRICS}
                run_name = run.data.tags.get("imager.dvc_exp_name") or run.info.run_name or run_name
            except Exception as exc:  # noqa: BLE001 - a run deleted under its model: list the model without metrics
                log.debug("no run for model %s: %s", m.model_id, exc)
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.creation_timestamp / 1000))
        experiment = experiments.get(m.experiment_id, m.experiment_id)
        shown = ", ".join(f"{k.removesuffix('_evaluator')} {v:g}" for k, v in metrics.items())
        label = f"{experiment} / {run_name} ({when}{', ' + shown if shown else ''})"
        out.append(ModelSource(id=f"mlflow:{m.model_uri}", label=label, kind="mlflow", uri=m.model_uri, run_id=m.source_run_id,
                               experiment=experiment, metrics=metrics))  # fmt: skip
    return out


class ModelRegistry:
    """The sources the server offers and a cache of the loaded ones.

    ``sources``: the given models, the first one the default. ``params``: params.yaml's settings,
    which give model files their text encoder (``embed``) and sampling defaults (``sampler``,
    ``evaluate``); an MLflow model carries its own. ``search_mlflow``: also offer every cascade
    of the tracking store (listed again at most every ``refresh_s`` seconds). ``loader``: how a
    source becomes a :class:`LoadedModel` (tests give a tiny one).
    """

    def __init__(
        self,
        sources: list[ModelSource],
        *,
        params: Any = None,
        device: str = "auto",
        search_mlflow: bool = False,
        cache_size: int = 2,
        refresh_s: float = 30.0,
        loader: Callable[[ModelSource], LoadedModel] | None = None,
    ):
        self.sources = list(sources)
        self.params, self.device, self.search_mlflow = params, device, search_mlflow
        self.cache_size, self.refresh_s = max(1, cache_size), refresh_s
        self.loader = loader or self._load
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._listed: tuple[float, list[ModelSource]] = (-float("inf"), [])
        self._lock = threading.RLock()

    @property
    def default_id(self) -> str | None:
        listed = self.list()
        return listed[0].id if listed else None

    def list(self, refresh: bool = False) -> list[ModelSource]:
        found: list[ModelSource] = []
        if self.search_mlflow:
            with self._lock:
                when, cached = self._listed
                if refresh or time.monotonic() - when > self.refresh_s:
                    try:
                        cached = logged_cascades()
                    except Exception as exc:  # noqa: BLE001 - an unreachable tracking store hides its models, not the app
                        log.warning("MLflow models not listed: %s", exc)
                        cached = []
                    self._listed = (time.monotonic(), cached)
                found = cached
        given = {s.id for s in self.sources}
        return self.sources + [s for s in found if s.id not in given]

    def get(self, id: str | None) -> ModelSource:
        """The source of ``id`` (the default for None); NotFoundError for an id the server does not offer."""
        from imager.app.history import NotFoundError

        sources = self.list()
        if not sources:
            raise NotFoundError("model: the server has no model; train one with `dvc repro` or give --base/--sr or --model")
        if id is None or id == "":
            return sources[0]
        for s in sources:
            if s.id == id:
                return s
        sources = self.list(refresh=True)  # a model logged since the last listing
        for s in sources:
            if s.id == id:
                return s
        raise NotFoundError(f"model: no model '{id}'; GET /api/v1/models lists them")

    def load(self, id: str | None) -> LoadedModel:
        source = self.get(id)
        with self._lock:
            if source.id in self._cache:
                self._cache.move_to_end(source.id)
                return self._cache[source.id]
            model = self.loader(source)
            self._cache[source.id] = model
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return model

    def peek(self, id: str | None) -> LoadedModel | None:
        """The model of ``id`` if it is loaded, without loading it."""
        source = self.get(id)
        with self._lock:
            return self._cache.get(source.id)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def _load(self, source: ModelSource) -> LoadedModel:
        if source.kind == "files":
            return self._load_files(source)
        return self._load_mlflow(source)

    def _load_files(self, source: ModelSource) -> LoadedModel:
        from imager.inference import Cascade
        from imager.inference.metadata import file_sha256
        from imager.text import load_text_encoder

        if self.params is None:
            raise ConfigError("model files need params.yaml's embed and evaluate settings (--params)")
        cascade = Cascade.load(source.base, source.sr, device=self.device)  # type: ignore[arg-type]
        encoder = load_text_encoder(self.params.embed)
        cascade.check_encoder(encoder)
        identity = {"base_sha256": file_sha256(source.base)}  # type: ignore[arg-type]
        if source.sr is not None:
            identity["sr_sha256"] = file_sha256(source.sr)
        return LoadedModel(source, cascade, encoder, self.params.evaluate.sampling(self.params.sampler), identity)

    def _load_mlflow(self, source: ModelSource) -> LoadedModel:
        import mlflow.pyfunc

        try:
            model = mlflow.pyfunc.load_model(source.uri)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user needs the URI and the reason
            raise ConfigError(f"model: cannot load MLflow model '{source.uri}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        inner = model.unwrap_python_model()
        if not all(hasattr(inner, k) for k in ("cascade", "encoder", "sampling")):
            raise ConfigError(f"model: '{source.uri}' is not an Imager cascade model")
        run_id = source.run_id or getattr(model.metadata, "run_id", None)
        identity = {"model_uri": str(source.uri)} | ({"mlflow_run_id": run_id} if run_id else {})
        logged = [spec for _, spec in getattr(inner, "adapters", ())]
        return LoadedModel(source, inner.cascade, inner.encoder, inner.sampling, identity, adapters=logged)
