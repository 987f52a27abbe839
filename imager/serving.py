"""The cascade as one MLflow model (pyfunc): base + SR weights, the text encoder's params and the
sampling defaults, so that

    model = mlflow.pyfunc.load_model("runs:/<run id>/cascade")
    images = model.predict(["red apple"])                          # (1, 64, 64, 3) uint8
    images = model.predict(["red apple"], params={"seed": 3, "steps": 50})

works anywhere Imager is installed. The evaluate stage logs it (``StageRun.log_cascade``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from imager.config import Params

CONFIG = "cascade.json"
MODEL_CODE = """\
import mlflow.models

from imager.serving import CascadeModel

mlflow.models.set_model(CascadeModel())
"""
# Per-call options of predict(params=...): name -> (type, MLflow type name)
OPTIONS: dict[str, tuple[type, str]] = {
    "sampler": (str, "string"),
    "steps": (int, "long"),
    "guidance": (float, "double"),
    "sr_steps": (int, "long"),
    "sr_guidance": (float, "double"),
    "seed": (int, "long"),
    "batch_size": (int, "long"),
}


def sampling_defaults(p: Params) -> dict[str, Any]:
    """The evaluation's sampling settings: what the model and `imager generate` use by default."""
    e = p.evaluate
    return {
        "sampler": p.sampler, "steps": e.base.steps, "guidance": e.base.guidance, "sr_steps": e.sr.steps,
        "sr_guidance": e.sr.guidance, "aug_level": e.sr.aug_level, "seed": e.seed, "batch_size": e.batch_size,
    }


def prompts_of(model_input: Any) -> list[str]:
    """A list of prompts from what pyfunc passes: a list/array of strings, a string, or a
    DataFrame (its ``prompt`` column, else its only column)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    return [str(v) for v in list(model_input)]


# No type hints on predict: MLflow would replace our signature (and its params schema, the per-call
# options) with one inferred from them. (Its import-time reminder to add them cannot be silenced.)
class CascadeModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: prompts in, uint8 images (N, H, W, 3) out."""

    def load_context(self, context) -> None:
        from imager.cascade import Cascade
        from imager.config import Embed
        from imager.text.base import load_text_encoder

        cfg = json.loads(Path(context.artifacts["config"]).read_text(encoding="utf-8"))
        self.cascade = Cascade.load(context.artifacts["base"], context.artifacts["sr"])
        self.encoder = load_text_encoder(Embed.model_validate(cfg["embed"]))
        self.cascade.check_encoder(self.encoder)
        self.defaults = cfg["sampling"]

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        from imager.cascade import encode_prompts
        from imager.training.tasks import to_uint8

        s = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        cond, _ = encode_prompts(self.encoder, prompts_of(model_input))
        _, sr = self.cascade.generate(
            cond, sampler=s["sampler"], base_steps=int(s["steps"]), base_guidance=float(s["guidance"]),
            sr_steps=int(s["sr_steps"]), sr_guidance=float(s["sr_guidance"]), aug_level=float(s["aug_level"]),
            seed=int(s["seed"]), batch_size=int(s["batch_size"]),
        )
        return to_uint8(sr).permute(0, 2, 3, 1).numpy()


def signature(defaults: dict[str, Any]):
    """Input: strings (prompts); output: uint8 images; params: :data:`OPTIONS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec(name, kind, typ(defaults[name])) for name, (typ, kind) in OPTIONS.items()])
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=params,
    )


def _pinned(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def log_cascade(base: Path, sr: Path, *, embed: dict[str, Any], sampling: dict[str, Any], workdir: Path, name: str = "cascade"):
    """Log the cascade as a pyfunc model in the active MLflow run; returns its model info."""
    from importlib.metadata import PackageNotFoundError, requires

    import imager
    from imager.models import read_checkpoint_meta

    try:  # the installed package's own requirements, without extras
        reqs = [r.split(";")[0].strip() for r in requires("imager") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        reqs = []
    if any(read_checkpoint_meta(path)[0].arch == "diffusers" for path in (base, sr)):  # the baseline network
        reqs.append(_pinned("diffusers"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / CONFIG
    config.write_text(json.dumps({"embed": embed, "sampling": sampling}, indent=2, sort_keys=True), encoding="utf-8")
    code = workdir / "cascade_model.py"  # MLflow's models-from-code: the model is this code, not a pickle
    code.write_text(MODEL_CODE, encoding="utf-8")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(code),
        artifacts={"base": str(base), "sr": str(sr), "config": str(config)},
        signature=signature(sampling),
        code_paths=[str(Path(imager.__file__).parent)],  # the model carries the library's code
        pip_requirements=reqs,
    )
