"""The cascade as one MLflow model (pyfunc): base + SR weights, the text encoder's params and the
sampling settings of the evaluation, so that

    model = mlflow.pyfunc.load_model("runs:/<run id>/cascade")
    images = model.predict(["red apple"])                          # (1, 64, 64, 3) uint8
    images = model.predict(["red apple"], params={"seed": 3, "steps": 50, "negative_prompt": "blurry"})
    images = model.predict(pd.DataFrame({"prompt": ["red apple"], "negative_prompt": ["green"]}))

works anywhere Imager is installed. It samples on CUDA when torch sees a GPU, else on the CPU.
The evaluate stage logs it (``StageRun.log_cascade``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from imager.inference.config import CascadeSampling

CONFIG = "cascade.json"
MODEL_CODE = """\
import mlflow.models

from imager.serving import CascadeModel

mlflow.models.set_model(CascadeModel())
"""
# Per-call options of predict(params=...): name -> MLflow type. The sampling ones are the flat names
# of imager.inference.config.OVERRIDES; negative_prompt applies to every prompt of the call.
OPTIONS: dict[str, str] = {
    "sampler": "string",
    "steps": "long",
    "guidance": "double",
    "threshold": "string",
    "percentile": "double",
    "sr_steps": "long",
    "sr_guidance": "double",
    "seed": "long",
    "batch_size": "long",
    "negative_prompt": "string",
}


def option_defaults(sampling: CascadeSampling) -> dict[str, Any]:
    """The default of each per-call option: the logged sampling settings."""
    base, sr = sampling.base, sampling.sr
    return {
        "sampler": sampling.sampler, "steps": base.steps, "guidance": base.guidance, "threshold": base.threshold,
        "percentile": base.percentile, "sr_steps": sr.steps, "sr_guidance": sr.guidance, "seed": sampling.seed,
        "batch_size": sampling.batch_size, "negative_prompt": "",
    }


def prompts_of(model_input: Any) -> tuple[list[str], list[str] | None]:
    """(prompts, negative prompts or None) from what pyfunc passes: a list/array of strings, a
    string, or a DataFrame (its ``prompt`` column, else its first column; and an optional
    ``negative_prompt`` column, one per prompt)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input], None
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        negative = None
        if "negative_prompt" in model_input.columns:
            negative = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in model_input["negative_prompt"].tolist()]
        return [str(v) for v in model_input[column].tolist()], negative
    return [str(v) for v in list(model_input)], None


# No type hints on predict: MLflow would replace our signature (and its params schema, the per-call
# options) with one inferred from them. (Its import-time reminder to add them cannot be silenced.)
class CascadeModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: prompts in, uint8 images (N, H, W, 3) out."""

    def load_context(self, context) -> None:
        from imager.inference import Cascade
        from imager.text import load_text_encoder
        from imager.text.config import Embed

        cfg = json.loads(Path(context.artifacts["config"]).read_text(encoding="utf-8"))
        self.cascade = Cascade.load(context.artifacts["base"], context.artifacts["sr"], device="auto")
        self.encoder = load_text_encoder(Embed.model_validate(cfg["embed"]))
        self.cascade.check_encoder(self.encoder)
        self.sampling = CascadeSampling.model_validate(cfg["sampling"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        from imager.inference.cascade import encode_negative, encode_prompts
        from imager.inference.config import with_overrides
        from imager.inference.images import to_hwc

        params = {k: v for k, v in (params or {}).items() if v is not None}
        negative_param = params.pop("negative_prompt", "")
        sampling = with_overrides(self.sampling, params)
        prompts, negatives = prompts_of(model_input)
        cond, _ = encode_prompts(self.encoder, prompts)
        negative = encode_negative(self.encoder, negatives if negatives is not None else [negative_param] * len(prompts))
        _, sr = self.cascade.generate(cond, sampling, negative=negative)
        return to_hwc(sr).numpy()


def signature(sampling: CascadeSampling):
    """Input: strings (prompts; a DataFrame may add negative_prompt); output: uint8 images; params: :data:`OPTIONS`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    defaults = option_defaults(sampling)
    params = ParamSchema([ParamSpec(name, kind, defaults[name]) for name, kind in OPTIONS.items()])
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


def log_cascade(base: Path, sr: Path, *, embed: dict[str, Any], sampling: CascadeSampling, workdir: Path, name: str = "cascade"):
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
    config.write_text(json.dumps({"embed": embed, "sampling": sampling.model_dump(mode="json")}, indent=2, sort_keys=True), encoding="utf-8")
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
