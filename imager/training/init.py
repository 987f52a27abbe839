"""Where a fine-tuning run starts: the weights of a trained model (``init_from``).

``init_from`` names a model file of a training stage (``data/models/base/model.safetensors``, or
its folder), or an MLflow URI: a train stage's artifact (``runs:/<run>/model/model.safetensors``)
or a logged cascade (``models:/<id>``, ``runs:/<run>/cascade``), whose base or SR file is taken as
the stage needs. The network built from params must have the same shape: the first difference is
a one-line error. Only the weights carry over; the optimizer, the LR schedule and the step count
start afresh, and the EMA starts from the weights loaded (a training stage saves its EMA weights as
``model.safetensors``, so a fine-tune continues from the model that was evaluated).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imager.errors import CheckpointError
from imager.models.base import Denoiser
from imager.models.checkpoint import load_model, read_checkpoint_meta

# UNetConfig fields a fine-tune may change: they alter no weight's shape or meaning.
MAY_DIFFER = frozenset({"dropout"})
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class InitSource:
    source: str  # as given
    path: Path  # the local model file
    sha256: str  # of that file: part of the resume fingerprint and of the output's record

    def record(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256}


def resolve(source: str, stage: str) -> InitSource:
    """The local model file ``source`` names for ``stage`` (``base`` or ``sr``)."""
    from imager.inference.metadata import file_sha256

    if source.startswith(MLFLOW_SCHEMES):
        path = _from_mlflow(source, stage)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise CheckpointError(f"init_from: {source}: model file not found (a training stage's model.safetensors, its folder, or an MLflow URI)")
    return InitSource(source, path, file_sha256(path))


def _from_mlflow(uri: str, stage: str) -> Path:
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 (MLflow raises many types for a bad URI)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"init_from: {uri}: cannot download from MLflow ({first[:200]})") from None
    if local.is_file():
        return local
    if (local / "MLmodel").is_file():  # a logged cascade: its base or SR artifact
        from mlflow.models import Model

        artifacts = Model.load(str(local)).flavors.get("python_function", {}).get("artifacts", {})
        if stage in artifacts:
            return local / artifacts[stage]["path"]
        raise CheckpointError(f"init_from: {uri}: this MLflow model has no '{stage}' model")
    if (local / "model.safetensors").is_file():
        return local / "model.safetensors"
    raise CheckpointError(f"init_from: {uri}: no model.safetensors in these MLflow artifacts")


def load_into(model: Denoiser, init: InitSource) -> None:
    """Copy the weights of ``init`` into ``model`` (built from params), after checking the shapes."""
    config, _ = read_checkpoint_meta(init.path)
    mine = model.config.model_dump()
    theirs = config.model_dump()
    for key, value in mine.items():
        if key not in MAY_DIFFER and theirs.get(key) != value:
            raise CheckpointError(
                f"init_from: {init.source}: the model does not match the params: {key} is {_show(theirs.get(key))} there, {_show(value)} here"
            )
    source = load_model(init.path).state_dict()
    target = model.state_dict()
    for name, value in target.items():  # the configs agree, so this only catches a foreign file
        if name not in source or source[name].shape != value.shape:
            got = tuple(source[name].shape) if name in source else "missing"
            raise CheckpointError(f"init_from: {init.source}: {name} is {got} there, {tuple(value.shape)} here")
    with torch.no_grad():
        model.load_state_dict({k: v.to(target[k].dtype) for k, v in source.items()}, strict=True)


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
