"""Typed params: :class:`Params` gathers one pydantic model per params.yaml section.

Each section is defined by the package that owns it: ``download`` and ``shard`` in
:mod:`imager.data.config`, ``embed`` in :mod:`imager.text.config`, ``train_base`` and ``train_sr`` in
:mod:`imager.training.config`, ``evaluator``, ``evaluate`` and ``edits`` in :mod:`imager.evaluation.config`;
the shared ``tracking`` section is here.

``load(path)`` reads params.yaml and returns a validated, frozen :class:`Params`. Any bad value or
unknown key raises :class:`ConfigError` with one line that names the key, the problem and the value
given, e.g. ``params.yaml: shard.resolution: must be a positive multiple of 8, got 30``.

The library never reads params.yaml itself: stages call ``load`` and pass the typed sections in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from imager.data.config import Download, Shard
from imager.errors import ConfigError
from imager.evaluation.config import Edits, Evaluate, Evaluator
from imager.schema import SamplerName, Section
from imager.text.config import Embed
from imager.training.config import Control, Finetune, TrainBase, TrainSR

SAMPLERS = get_args(SamplerName)


# --------------------------------------------------------------------------------------- shared


class Tracking(Section):
    """MLflow tracking shared by every stage. The store is ``MLFLOW_TRACKING_URI`` when set,
    else ``mlflow.db`` in the project (what ``mlflow ui`` opens there)."""

    enabled: bool = True
    experiment: str = Field("imager", min_length=1)


class DatasetSpec(Section):
    """A further dataset through the same data stages (finetune/dvc.yaml runs download, shard and
    embed for each entry of ``datasets``): the keys given replace those of the top-level
    ``download``, ``shard`` and ``embed`` sections. A model fine-tuned on it reads the text encoder
    its base was trained with, so ``embed`` overrides are for such things as the grid prompts."""

    download: dict[str, Any] = {}
    shard: dict[str, Any] = {}
    embed: dict[str, Any] = {}


def overlay(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the keys of ``changes`` replaced, mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _overlaid(model: type[BaseModel], base: BaseModel, changes: dict[str, Any], where: str):
    try:
        return model.model_validate(overlay(base.model_dump(), changes))
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, where).replace(f"{where}: ", f"{where}.", 1)) from None


# ------------------------------------------------------------------------------------ top level


class Params(Section):
    seed: int = Field(0, ge=0)
    sampler: SamplerName = "dpmpp_2m_sde"  # read by the evaluation stage; `dvc exp run -S sampler=ddim`
    tracking: Tracking = Tracking()
    download: Download = Download()
    shard: Shard = Shard()
    embed: Embed = Embed()
    train_base: TrainBase = TrainBase()
    train_sr: TrainSR = TrainSR()
    evaluator: Evaluator = Evaluator()
    evaluate: Evaluate = Evaluate()
    edits: Edits = Edits()
    datasets: dict[str, DatasetSpec] = {}
    finetune: Finetune = Finetune()
    control: Control = Control()

    @model_validator(mode="after")
    def _resolvable(self) -> Params:
        for name in self.datasets:
            if not re.fullmatch(r"[A-Za-z0-9][\w-]*", name):
                raise ValueError(f"datasets: a name must be letters, digits, _ or -, got '{name}'")
            self.dataset_sections(name)
        if self.datasets and self.finetune.dataset not in self.datasets:
            raise ValueError(f"finetune.dataset: '{self.finetune.dataset}' is not one of datasets ({', '.join(self.datasets)})")
        self.finetune_base()
        self.finetune_lora()
        if self.control.variants and self.control.default not in self.control.variants:
            raise ValueError(f"control.default: '{self.control.default}' is not one of control.variants ({', '.join(self.control.variants)})")
        for name in self.control.variants:
            if not re.fullmatch(r"[A-Za-z0-9][\w-]*", name):
                raise ValueError(f"control.variants: a name must be letters, digits, _ or -, got '{name}'")
            self.control_train(name)
        if self.datasets and self.control.pairs not in self.datasets:
            raise ValueError(f"control.pairs: '{self.control.pairs}' is not one of datasets ({', '.join(self.datasets)})")
        return self

    def dataset_sections(self, name: str) -> tuple[Download, Shard, Embed]:
        """The download, shard and embed sections of ``datasets.<name>`` (the top-level ones for ``None``)."""
        if name not in self.datasets:
            raise ValueError(f"datasets: no dataset named '{name}' (known: {', '.join(self.datasets) or 'none'})")
        spec, where = self.datasets[name], f"datasets.{name}"
        return (
            _overlaid(Download, self.download, spec.download, f"{where}.download"),
            _overlaid(Shard, self.shard, spec.shard, f"{where}.shard"),
            _overlaid(Embed, self.embed, spec.embed, f"{where}.embed"),
        )

    def finetune_base(self) -> TrainBase:
        """``train_base`` with ``finetune.base``'s keys replaced: the full fine-tune."""
        return _overlaid(TrainBase, self.train_base, self.finetune.base, "finetune.base")

    def finetune_lora(self, rank: int | None = None) -> TrainBase:
        """``train_base`` with ``finetune.lora``'s keys replaced (and the adapter's rank, if given)."""
        changes = {"lora": {}, **self.finetune.lora}  # LoraSettings' defaults unless given
        cfg = _overlaid(TrainBase, self.train_base, changes, "finetune.lora")
        return cfg if rank is None else cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"rank": rank})})

    def control_train(self, name: str) -> TrainBase:
        """``train_base`` with ``control.variants.<name>``'s keys replaced: a control's training run."""
        if name not in self.control.variants:
            raise ValueError(f"control.variants: no variant named '{name}' (known: {', '.join(self.control.variants) or 'none'})")
        return _overlaid(TrainBase, self.train_base, {"control": {}, **self.control.variants[name]}, f"control.variants.{name}")


# ------------------------------------------------------------------------------------- messages


def _describe(err: dict[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    simple = {
        "extra_forbidden": "unknown key",
        "missing": "missing required key",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "int_type": "must be an integer",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "model_type": "must be a mapping of keys to values",
        "dict_type": "must be a mapping of keys to values",
    }
    if kind in simple:
        return simple[kind]
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        shown = f"{bound:g}" if isinstance(bound, (int, float)) else str(bound)
        return f"must be {bounds[kind]} {shown}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"][0].lower() + err["msg"][1:]


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line for the first error: ``<source>: <dotted.key>: <problem>, got <value>``."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    problem = _describe(err)
    nested = re.match(r"^([A-Za-z_][\w.]*): (.*)$", problem)
    if err["type"] == "value_error" and nested:  # a section-level check that names its own key
        loc = f"{loc}.{nested[1]}" if loc else nested[1]
        problem = nested[2]
    message = (f"{source}: {loc}: " if loc else f"{source}: ") + problem
    if err["type"] not in ("missing", "extra_forbidden", "model_type") and "input" in err:
        value = err["input"]
        if not isinstance(value, (dict, BaseModel)):
            message += f", got {value!r}" if isinstance(value, str) else f", got {value}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return message


def parse(data: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed mapping (``None`` means an empty file)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load(path: str | Path) -> Params:
    """Read and validate a params file; raise :class:`ConfigError` with one line on any problem."""
    path = Path(path)
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{name}: invalid YAML{where}: {problem}") from None
    return parse(data, name)
