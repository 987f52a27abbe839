"""The cascade as one MLflow model (pyfunc): base + SR weights, the text encoder's params and the
sampling settings of the evaluation, so that

    model = mlflow.pyfunc.load_model("runs:/<run id>/cascade")
    images = model.predict(["red apple"])                          # (1, 64, 64, 3) uint8
    images = model.predict(["red apple"], params={"seed": 3, "steps": 50, "negative_prompt": "blurry"})
    images = model.predict(pd.DataFrame({"prompt": ["red apple"], "negative_prompt": ["green"]}))

    photo, hole = Path("apple.png").read_bytes(), Path("hole.png").read_bytes()  # hole: white = repaint
    img2img = model.predict(pd.DataFrame({"prompt": ["red apple"], "image": [photo]}), params={"strength": 0.6})
    inpainted = model.predict(pd.DataFrame({"prompt": ["red apple"], "image": [photo], "mask": [hole]}))
    outpainted = model.predict(pd.DataFrame({"prompt": ["red apple"], "image": [photo]}), params={"outpaint": "left=16"})

works anywhere Imager is installed. It samples on CUDA when torch sees a GPU, else on the CPU.
The evaluate stage logs it (``StageRun.log_cascade``).

Images: a DataFrame's optional ``image`` and ``mask`` columns hold one per prompt, PNG/JPEG bytes
or uint8 arrays ((H, W, 3), (H, W, 4) RGBA, (H, W) gray), None for a row without; they are read and
checked by :func:`imager.inference.edit.prepare` (``mask_blur`` and ``outpaint`` go to it; outpaint
extends every row that has an image) and its notes are logged as warnings. A model loaded with
``mlflow.pyfunc.load_model`` takes bytes and arrays alike; through MLflow's REST server
(``dataframe_split`` JSON) a cell is base64 text, which the model decodes. A path is never read: a
request must not open the server's files. The result is at the cascade's resolution whatever the
input's size.

Seeds: a call without images is sampled in batches of ``batch_size``, the batch from row ``start``
seeded ``seed + start`` (as the evaluation samples). A row with an image is sampled alone, seeded
``seed + its row index``, so it gives the same image whatever rows surround it; a row without one
gives what it gives in the same call without the image columns.

LoRA adapters: ``log_cascade(..., adapters=[AdapterSpec(path, scale)])`` logs each adapter file
with the model (artifacts ``lora0``, ``lora1``, ...; their weights in its config), and the loaded
model applies them to every call: a fine-tuned cascade is one MLflow model like the default one.
The ``lora`` param adds adapters for one call, ``"FILE[:SCALE], ..."``, and re-weights a logged
one by its artifact name (``"lora0:0"`` turns it off). Those FILEs are read on the machine that runs
the model: a server that others call should log its adapters with the model instead.

    styled = model.predict(["red apple"], params={"lora": "pixel-art.safetensors:0.8"})

Sketch controls: ``log_cascade(..., controls=[FILE])`` logs control files (ControlNet or adapter, of
``imager train-control``) with the model (artifacts ``control0``, ``control1``, ...), loaded onto
its base model when the model loads (a control of another base model fails the load, not a call).
A sketch (dark lines on a light ground, square) steers every prompt of a call through the
``control`` param (base64 PNG/JPEG), or one row through a DataFrame's ``control`` column (bytes, an
array or base64, like ``image``; such a row is sampled alone, as a row with an image is);
``control_scale`` (default 1), ``control_start`` and ``control_end`` (the part of the sampling it
acts on, default 0 to 1) apply to both, and ``controlnet`` picks the logged control (default: the
first).

    sketch = base64.b64encode(Path("apple-lines.png").read_bytes()).decode()
    drawn = model.predict(["red apple"], params={"control": sketch, "control_scale": 0.8})
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

from imager.errors import ConfigError, ImagerError
from imager.inference.config import CascadeSampling

if TYPE_CHECKING:
    from torch import Tensor

    from imager.inference.adapters import AdapterSpec
    from imager.inference.edit import EditInput
    from imager.inference.sampling import Cond
    from imager.models.control import ControlBase, ControlInput

log = logging.getLogger("imager")
CONFIG = "cascade.json"
MODEL_CODE = """\
import mlflow.models

from imager.serving import CascadeModel

mlflow.models.set_model(CascadeModel())
"""
# Per-call options of predict(params=...): name -> MLflow type. The sampling ones are the flat names
# of imager.inference.config.OVERRIDES; negative_prompt applies to every prompt of the call, the
# EDIT_OPTIONS to every row with an image, lora (FILE[:SCALE], comma-separated) to the whole call,
# the CONTROL_OPTIONS to the call's sketch (control, base64) and the rows' sketches (a control column).
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
    "strength": "double",
    "sr_strength": "double",
    "resample": "long",
    "mask_blur": "double",
    "outpaint": "string",
    "lora": "string",
    "control": "string",
    "controlnet": "string",
    "control_scale": "double",
    "control_start": "double",
    "control_end": "double",
}
EDIT_OPTIONS = ("mask_blur", "outpaint")  # how the input images are prepared, not sampling settings
CONTROL_OPTIONS = ("control", "controlnet", "control_scale", "control_start", "control_end")
COLUMNS = ("prompt", "negative_prompt", "image", "mask", "control")


def option_defaults(sampling: CascadeSampling) -> dict[str, Any]:
    """The default of each per-call option: the logged sampling settings."""
    base, sr = sampling.base, sampling.sr
    return {
        "sampler": sampling.sampler, "steps": base.steps, "guidance": base.guidance, "threshold": base.threshold,
        "percentile": base.percentile, "sr_steps": sr.steps, "sr_guidance": sr.guidance, "seed": sampling.seed,
        "batch_size": sampling.batch_size, "negative_prompt": "", "strength": sampling.strength, "sr_strength": sampling.sr_strength,
        "resample": sampling.resample, "mask_blur": 0.0, "outpaint": "", "lora": "",
        "control": "", "controlnet": "", "control_scale": 1.0, "control_start": 0.0, "control_end": 1.0,
    }  # fmt: skip


def _missing(value: Any) -> bool:
    """None, NaN or pd.NA: no value in this row's cell."""
    import pandas as pd

    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def prompts_of(model_input: Any) -> tuple[list[str], list[str] | None]:
    """(prompts, negative prompts or None) from what pyfunc passes: a list/array of strings, a
    string, or a DataFrame (its ``prompt`` column, else its first column that is not one of
    :data:`COLUMNS`; and an optional ``negative_prompt`` column, one per prompt)."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input], None
    if isinstance(model_input, pd.DataFrame):
        others = [c for c in model_input.columns if c not in COLUMNS]
        column = "prompt" if "prompt" in model_input.columns else (others[0] if others else None)
        if column is None:
            raise ConfigError(f"prompt: the DataFrame has no prompt column (columns: {', '.join(map(str, model_input.columns))})")
        negative = None
        if "negative_prompt" in model_input.columns:
            negative = ["" if _missing(v) else str(v) for v in model_input["negative_prompt"].tolist()]
        return [str(v) for v in model_input[column].tolist()], negative
    return [str(v) for v in list(model_input)], None


def edits_of(model_input: Any, n: int, names: tuple[str, ...] = ("image", "mask")) -> list[list[Any]]:
    """The cells of each column of ``names``, one per row: a DataFrame's cells, None where a row
    has none (None, NaN) and for every row of other inputs."""
    import pandas as pd

    columns = model_input.columns if isinstance(model_input, pd.DataFrame) else ()
    return [[None if _missing(v) else v for v in model_input[c].tolist()] if c in columns else [None] * n for c in names]


def image_source(value: Any, what: str) -> Any:
    """A cell as :func:`~imager.inference.edit.prepare` takes it: bytes and arrays as they are, a
    string as base64 (MLflow's REST encoding of binary data). Never a path (a request must not read
    the server's files): anything else is a ConfigError naming ``what``."""
    from PIL import Image

    if isinstance(value, bytes | bytearray | memoryview | np.ndarray | Image.Image):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except ValueError:
            raise ConfigError(f"{what}: a string must be base64-encoded PNG/JPEG bytes (paths are not read)") from None
    raise ConfigError(f"{what}: expected PNG/JPEG bytes or a uint8 array (H, W, 3), (H, W, 4) or (H, W), got {type(value).__name__}")


def lora_specs(text: Any, logged: Sequence[tuple[str, AdapterSpec]] = ()) -> list[AdapterSpec]:
    """The adapters of a call: the ``logged`` ones (artifact name, spec) at their weights, then the
    ``lora`` param's comma-separated ``FILE[:SCALE]``; an entry naming a logged adapter's artifact
    sets that adapter's weight instead. A ConfigError naming ``params: lora`` for a bad entry."""
    from imager.inference.adapters import AdapterSpec, parse_spec

    if not isinstance(text, str):
        raise ConfigError(f"params: lora: expected 'FILE[:SCALE], ...', got {type(text).__name__}")
    weights = {name: spec.scale for name, spec in logged}
    extra = []
    for item in (t for t in text.split(",") if t.strip()):
        try:
            spec = parse_spec(item)
        except ConfigError as exc:
            raise ConfigError(f"params: lora: {str(exc).removeprefix('--lora: ')}") from None
        if str(spec.path) in weights:
            weights[str(spec.path)] = spec.scale
        else:
            extra.append(spec)
    return [AdapterSpec(spec.path, weights[name]) for name, spec in logged] + extra


def _rows(cond: Cond | None, start: int, count: int) -> Cond | None:
    return None if cond is None else tuple(t[start : start + count] for t in cond)  # type: ignore[return-value]


# No type hints on predict: MLflow would replace our signature (and its params schema, the per-call
# options) with one inferred from them. (Its import-time reminder to add them cannot be silenced.)
class CascadeModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: prompts (and images, masks) in, uint8 images (N, H, W, 3) out."""

    adapters: tuple[tuple[str, AdapterSpec], ...] = ()  # the logged ones: (artifact name, file and weight)
    controls: tuple[tuple[str, ControlBase], ...] = ()  # the logged controls: (artifact name, network on the base)

    def load_context(self, context) -> None:
        from imager.inference import Cascade
        from imager.text import load_text_encoder
        from imager.text.config import Embed

        cfg = json.loads(Path(context.artifacts["config"]).read_text(encoding="utf-8"))
        self.cascade = Cascade.load(context.artifacts["base"], context.artifacts["sr"], device="auto")
        self.encoder = load_text_encoder(Embed.model_validate(cfg["embed"]))
        self.cascade.check_encoder(self.encoder)
        self.sampling = CascadeSampling.model_validate(cfg["sampling"])
        self.adapters = logged_adapters(cfg, context.artifacts)
        self.use_adapters(lora_specs("", self.adapters), "model")  # a logged adapter that does not fit fails the load, not a call
        self.controls = logged_controls(cfg, context.artifacts, self.cascade.base.model)  # so does a control

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        from imager.inference.cascade import encode_negative, encode_prompts
        from imager.inference.config import with_overrides
        from imager.inference.images import to_hwc

        params = {k: v for k, v in (params or {}).items() if v is not None}
        negative_param = params.pop("negative_prompt", "")
        edit_params = {k: params.pop(k) for k in EDIT_OPTIONS if k in params}
        control_params = {k: params.pop(k) for k in CONTROL_OPTIONS if k in params}
        adapters = lora_specs(params.pop("lora", ""), self.adapters)
        sampling = with_overrides(self.sampling, params)
        prompts, negatives = prompts_of(model_input)
        edits = self.edits(model_input, len(prompts), sampling, **edit_params)
        control, row_controls = self.control_inputs(model_input, len(prompts), **control_params)
        for i, prompt in enumerate(prompts):  # a row with an image or a sketch may go without text
            if i not in edits and not control and i not in row_controls and not prompt.strip():
                raise ConfigError(f"prompt {i + 1} is empty; give a text such as 'red apple', or an image to edit")
        self.use_adapters(adapters, "params: lora")
        cond, _ = encode_prompts(self.encoder, prompts, allow_empty=True)
        negative = encode_negative(self.encoder, negatives if negatives is not None else [negative_param] * len(prompts))
        return to_hwc(self.sample(cond, sampling, negative, edits, control, row_controls)).numpy()

    def use_adapters(self, specs: list[AdapterSpec], what: str) -> None:
        """Exactly ``specs`` active on the cascade (none: the model as trained, bit for bit); a
        one-line error naming ``what`` for a file that is not an adapter of this cascade."""
        from imager.inference.adapters import use_adapters

        try:
            use_adapters(self.cascade, specs)
        except ImagerError as exc:
            raise type(exc)(f"{what}: {str(exc).removeprefix('--lora: ')}") from None

    def edits(self, model_input: Any, n: int, sampling: CascadeSampling, *, mask_blur: Any = 0.0, outpaint: Any = "") -> dict[int, EditInput]:
        """Row index -> the prepared image and mask of each row with an image; every row checked
        (a ConfigError naming the column and row, or the param) before anything is sampled."""
        from imager.inference.edit import parse_outpaint, prepare

        try:
            blur = float(mask_blur)
        except (TypeError, ValueError):
            raise ConfigError(f"params: mask_blur: expected a number of pixels, got {mask_blur!r}") from None
        if not blur >= 0:
            raise ConfigError(f"params: mask_blur: must be >= 0 pixels, got {mask_blur}")
        pad = parse_outpaint(outpaint if isinstance(outpaint, str | Mapping) else str(outpaint), "params: outpaint")
        images, masks = edits_of(model_input, n)
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if mask is not None and image is None:
                raise ConfigError(f"mask (row {i + 1}): a mask needs an image in the image column (the pixels it keeps)")
        plain = [i for i, image in enumerate(images) if image is None]
        if pad is not None and len(plain) == n:
            raise ConfigError("params: outpaint: no row has an image to extend; give an image column")
        strengths = {"strength": sampling.strength} | ({"sr_strength": sampling.sr_strength} if self.cascade.sr is not None else {})
        for name, strength in strengths.items():
            if strength < 1 and plain:
                row = plain[0] + 1
                raise ConfigError(f"params: {name}: {strength} redraws part of an input image, but row {row} has none; give it an image or use {name} 1")
        edits = {}
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if image is None:
                continue
            image_what, mask_what = f"image (row {i + 1})", f"mask (row {i + 1})"
            edit = prepare(
                image_source(image, image_what), None if mask is None else image_source(mask, mask_what),
                outpaint_pad=pad, mask_blur=blur, image_what=image_what, mask_what=mask_what,
            )  # fmt: skip
            notes = list(edit.notes)
            if edit.mask is None and all(s == 1 for s in strengths.values()):
                notes.append(f"{image_what}: not used at strength 1 without a mask: the image is drawn from noise; give a strength < 1")
            for note in notes:
                log.warning("%s", note)
            edits[i] = edit
        return edits

    def control_inputs(
        self, model_input: Any, n: int, *, control: Any = "", controlnet: Any = "", control_scale: Any = 1.0, control_start: Any = 0.0,
        control_end: Any = 1.0,
    ) -> tuple[list[ControlInput], dict[int, list[ControlInput]]]:  # fmt: skip
        """(the call's control, row index -> its own control) from the ``control`` param and column,
        each sketch read at the base resolution; a ConfigError naming the param, or the column and
        row, before anything is sampled."""
        from imager.inference.conditions import check_window, read_condition
        from imager.models.control import ControlInput

        try:
            scale, start, end = float(control_scale), float(control_start), float(control_end)
        except (TypeError, ValueError):
            raise ConfigError("params: control_scale, control_start, control_end: expected numbers") from None
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"params: control_scale: must be a number >= 0, got {control_scale}")
        check_window(start, end, "params: control_start/control_end")
        (cells,) = edits_of(model_input, n, ("control",))
        given = not (control is None or (isinstance(control, str | bytes) and not control))
        sketches = [(None, "params: control", control)] if given else []
        sketches += [(i, f"control (row {i + 1})", cell) for i, cell in enumerate(cells) if cell is not None]
        if not sketches:
            return [], {}
        net = self.control_net(controlnet, sketches[0][1])
        inputs: dict[int | None, list[ControlInput]] = {}
        for i, what, sketch in sketches:
            notes: list[str] = []
            condition = read_condition(image_source(sketch, what), self.cascade.base.resolution, what, notes)
            for note in notes:
                log.warning("%s", note)
            inputs[i] = [ControlInput(net, condition, scale, start, end)]
        call = inputs.pop(None, [])
        return call, inputs  # type: ignore[return-value]

    def control_net(self, name: Any, what: str) -> ControlBase:
        """The logged control ``name`` (its artifact name; empty: the first); a ConfigError naming
        ``what`` for a model logged without controls, or ``params: controlnet`` for another name."""
        if not self.controls:
            raise ConfigError(f"{what}: this model was logged without a control; log one with log_cascade(..., controls=[FILE])")
        if name in (None, ""):
            return self.controls[0][1]
        found = dict(self.controls).get(name)
        if found is None:
            raise ConfigError(f"params: controlnet: no logged control '{name}'; this model has {', '.join(k for k, _ in self.controls)}")
        return found

    def sample(
        self, cond: Cond, sampling: CascadeSampling, negative: Cond | None, edits: dict[int, EditInput], control: Sequence[ControlInput] = (),
        row_controls: Mapping[int, Sequence[ControlInput]] | None = None,
    ) -> Tensor:  # fmt: skip
        """(N, 3, R, R) in [-1, 1]. Rows without an image or a sketch of their own come from their
        batches sampled as in a call without them (a row's noise depends on its batch, so such a
        batch is sampled whole, its other rows too); each row with an image or its own sketch is
        sampled alone, seeded seed + its index. ``control``: the call's, on every row without its own."""
        import torch

        row_controls = row_controls or {}
        alone = set(edits) | set(row_controls)
        n, size = cond[0].shape[0], sampling.batch_size
        out: list[Tensor | None] = [None] * n
        for start in range(0, n, size):
            rows = range(start, min(start + size, n))
            if all(i in alone for i in rows):
                continue
            seeded = sampling.model_copy(update={"seed": sampling.seed + start})
            batch = self._generate(_rows(cond, start, len(rows)), seeded, _rows(negative, start, len(rows)), control)
            for i in rows:
                if i not in alone:
                    out[i] = batch[i - start]
        for i in sorted(alone):
            one = sampling.model_copy(update={"seed": sampling.seed + i})
            edit = edits.get(i)
            image = {} if edit is None else {"image": edit.image, "mask": edit.mask}
            out[i] = self._generate(_rows(cond, i, 1), one, _rows(negative, i, 1), row_controls.get(i, control), **image)[0]
        return torch.stack(out)  # type: ignore[arg-type]

    def _generate(self, cond: Cond, sampling: CascadeSampling, negative: Cond | None, control: Sequence[ControlInput] = (), **image: Tensor | None) -> Tensor:
        base, sr = self.cascade.generate(cond, sampling, negative=negative, control=control, **image)  # type: ignore[arg-type]
        return sr if sr is not None else base


def logged_adapters(cfg: Mapping[str, Any], artifacts: Mapping[str, str]) -> tuple[tuple[str, AdapterSpec], ...]:
    """The adapters logged with the model: (artifact name, its local file at the logged weight)."""
    from imager.inference.adapters import AdapterSpec

    return tuple((a["artifact"], AdapterSpec(Path(artifacts[a["artifact"]]), float(a["scale"]))) for a in cfg.get("adapters", []))


def logged_controls(cfg: Mapping[str, Any], artifacts: Mapping[str, str], base: Any) -> tuple[tuple[str, ControlBase], ...]:
    """The controls logged with the model, each loaded onto ``base``: (artifact name, network); a
    one-line CheckpointError naming ``controls`` for one built for another base model."""
    from imager.models.control import load_control

    out = []
    for c in cfg.get("controls", []):
        try:
            out.append((c["artifact"], load_control(artifacts[c["artifact"]], base)))
        except ImagerError as exc:
            raise type(exc)(f"controls: {c['artifact']}: {exc}") from None
    return tuple(out)


def signature(sampling: CascadeSampling):
    """No input schema; output: uint8 images; params: :data:`OPTIONS`.

    The input is a list of prompts or a DataFrame of :data:`COLUMNS` (only ``prompt`` required),
    and no MLflow column schema takes both: an unnamed string column keeps only a DataFrame's first
    column (dropping negative_prompt, image and mask), and named columns reject a plain list
    ("missing inputs ['prompt']"). :meth:`CascadeModel.predict` checks its input itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    defaults = option_defaults(sampling)
    params = ParamSchema([ParamSpec(name, kind, defaults[name]) for name, kind in OPTIONS.items()])
    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]), params=params)


def _pinned(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


def log_cascade(
    base: Path, sr: Path, *, embed: dict[str, Any], sampling: CascadeSampling, workdir: Path, name: str = "cascade",
    adapters: list[AdapterSpec] | None = None, controls: list[Path] | None = None,
):
    """Log the cascade as a pyfunc model in the active MLflow run; returns its model info.

    ``adapters``: LoRA adapter files logged with it (``lora0``, ``lora1``, ...) and applied at their
    weights by every call; ``controls``: control files logged with it (``control0``, ...) for the
    ``control`` param and column. Each is checked against the models first, so that a model that
    cannot load is never logged."""
    from importlib.metadata import PackageNotFoundError, requires

    import imager
    from imager.models import read_checkpoint_meta

    try:  # the installed package's own requirements, without extras
        reqs = [r.split(";")[0].strip() for r in requires("imager") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        reqs = []
    if any(read_checkpoint_meta(path)[0].arch == "diffusers" for path in (base, sr)):  # the baseline network
        reqs.append(_pinned("diffusers"))
    lora = {f"lora{i}": spec for i, spec in enumerate(adapters or [])}
    if lora:
        check_adapters(base, sr, list(lora.values()))
        reqs.append(_pinned("peft"))
    control = {f"control{i}": Path(path) for i, path in enumerate(controls or [])}
    if control:
        check_controls(base, list(control.values()))
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / CONFIG
    settings = {"embed": embed, "sampling": sampling.model_dump(mode="json")}
    if lora:  # a model without adapters keeps the config it always had
        settings["adapters"] = [{"artifact": k, "scale": spec.scale} for k, spec in lora.items()]
    if control:
        settings["controls"] = [{"artifact": k} for k in control]
    config.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
    code = workdir / "cascade_model.py"  # MLflow's models-from-code: the model is this code, not a pickle
    code.write_text(MODEL_CODE, encoding="utf-8")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(code),
        artifacts={"base": str(base), "sr": str(sr), "config": str(config)} | {k: str(spec.path) for k, spec in lora.items()}
        | {k: str(path) for k, path in control.items()},
        signature=signature(sampling),
        code_paths=[str(Path(imager.__file__).parent)],  # the model carries the library's code
        pip_requirements=reqs,
    )


def check_adapters(base: Path, sr: Path, adapters: list[AdapterSpec]) -> None:
    """Load the adapters onto the cascade as the logged model will: a one-line error naming
    ``adapters`` for a file that is not an adapter of these models."""
    from imager.inference import Cascade
    from imager.inference.adapters import use_adapters

    try:
        use_adapters(Cascade.load(base, sr), adapters)
    except ImagerError as exc:
        raise type(exc)(f"adapters: {str(exc).removeprefix('--lora: ')}") from None


def check_controls(base: Path, controls: list[Path]) -> None:
    """Load the control files onto the base model as the logged model will: a one-line error naming
    ``controls`` for a file that is not a control of this base model."""
    from imager.models import load_model
    from imager.models.control import load_control

    model = load_model(base)
    for path in controls:
        try:
            load_control(path, model)
        except ImagerError as exc:
            raise type(exc)(f"controls: {exc}") from None
