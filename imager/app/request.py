"""What a client may ask of the app: one generation request, its limits, its parameters on a PNG.

:class:`GenerateRequest` is the body of ``POST /api/v1/generate`` and what the web form builds; the
server's :class:`Limits` bound it (prompt length, steps, images, upload size) and
:func:`check_request` turns every problem into one :class:`ConfigError` line naming the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imager.errors import ConfigError

if TYPE_CHECKING:
    from imager.inference.adapters import AdapterSpec

Mode = Literal["text", "img2img", "inpaint", "outpaint", "sketch"]
IMG2IMG_STRENGTH = 0.75  # AUTOMATIC1111's default denoising strength: keeps the layout, redraws the detail
SEED_MAX = 2**31 - 1
MAX_ADAPTERS = 16  # as imager.inference.adapters.MAX_ADAPTERS, without importing torch here
CONTROL_SCALE_MAX = 2.0  # past twice the trained strength a control only burns its lines in
CONTROL_FIELDS = ("controlnet", "control_scale", "control_start", "control_end")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; a shared server on a small machine needs all of them."""

    prompt_chars: int = 500  # the encoder reads a few dozen tokens; longer is a mistake or abuse
    steps: int = 200
    images: int = 8
    upload_bytes: int = 8 * 1024 * 1024
    queue: int = 32  # requests waiting at once; more get "the queue is full"


class GenerateRequest(BaseModel):
    """One request: text to image, or an edit of ``image`` (base64 PNG/JPEG, a data URL too).

    Unset sampling fields take the model's defaults (params.yaml's ``sampler`` and ``evaluate``,
    or the settings an MLflow model was logged with). ``seed`` None draws a random seed, which the
    job reports; image ``i`` of the request is made with ``seed + i`` alone, so any image is made
    again from its own seed with ``num_images`` 1. ``lora``: adapters of the server's adapter folders
    as ``NAME[:SCALE]`` (``GET /api/v1/adapters`` lists them), each at its weight (default 1).
    ``control``: a sketch (base64 PNG/JPEG, dark lines on a light ground, square) that steers the
    base model through ``controlnet``, a control of the server's control folders (``GET
    /api/v1/controls`` lists them; default: the server's default one), at ``control_scale`` from
    ``control_start`` to ``control_end`` of the sampling (fractions of the way from noise to the image).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=100)
    sr_steps: int | None = Field(None, ge=1)
    sr_guidance: float | None = Field(None, ge=0, le=100)
    threshold: Literal["none", "static", "dynamic"] | None = None
    num_images: int = Field(1, ge=1)
    use_sr: bool = True
    mode: Mode | None = None  # None: img2img with an image, inpaint with a mask, outpaint with outpaint, else text
    image: str | None = None
    mask: str | None = None
    strength: float | None = Field(None, gt=0, le=1)
    sr_strength: float | None = Field(None, gt=0, le=1)
    resample: int | None = Field(None, ge=1, le=20)
    mask_blur: float = Field(0.0, ge=0, le=64)
    outpaint: str | None = None
    model: str | None = None
    lora: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(default_factory=list, max_length=MAX_ADAPTERS)
    control: str | None = None
    controlnet: str | None = Field(None, min_length=1, max_length=1024)
    control_scale: float = Field(1.0, ge=0, le=CONTROL_SCALE_MAX)
    control_start: float = Field(0.0, ge=0, le=1)
    control_end: float = Field(1.0, ge=0, le=1)
    preview_every: int = Field(1, ge=1, le=1000)

    def resolved_mode(self) -> Mode:
        if self.mode is not None:
            return self.mode
        if self.image is None:
            return "text"
        if self.outpaint:
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"

    def resolved_strength(self) -> float:
        """The base stage's strength: the request's, else 0.75 for img2img and sketch, else 1."""
        if self.strength is not None:
            return self.strength
        return IMG2IMG_STRENGTH if self.resolved_mode() in ("img2img", "sketch") else 1.0


def parse_request(data: Any) -> GenerateRequest:
    """A :class:`GenerateRequest` from JSON-like data; a one-line ConfigError for the first problem."""
    if isinstance(data, GenerateRequest):
        return data
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


def validation_message(exc: ValidationError) -> str:
    """The first error of a pydantic validation as ``field: message``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "request"
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = f"unknown field; the fields are {', '.join(GenerateRequest.model_fields)}"
    return f"{where}: {msg}"


def check_request(req: GenerateRequest, limits: Limits) -> None:
    """A ConfigError naming the field for anything :class:`Limits` refuses or that cannot be made."""
    mode = req.resolved_mode()
    if len(req.prompt) > limits.prompt_chars:
        raise ConfigError(f"prompt: {len(req.prompt)} characters, more than the limit of {limits.prompt_chars}")
    if len(req.negative_prompt) > limits.prompt_chars:
        raise ConfigError(f"negative_prompt: {len(req.negative_prompt)} characters, more than the limit of {limits.prompt_chars}")
    for name in ("steps", "sr_steps"):
        value = getattr(req, name)
        if value is not None and value > limits.steps:
            raise ConfigError(f"{name}: {value} is more than the limit of {limits.steps}")
    if req.num_images > limits.images:
        raise ConfigError(f"num_images: {req.num_images} is more than the limit of {limits.images}")
    if mode == "text":
        if not req.prompt.strip() and req.control is None:  # a sketch alone may guide
            raise ConfigError("prompt: is empty; give a text such as 'red apple', or an image to edit")
        for name in ("mask", "outpaint", "strength", "sr_strength"):
            if getattr(req, name) not in (None, "") and not (name.endswith("strength") and getattr(req, name) == 1):
                raise ConfigError(f"{name}: needs an image to edit; give one, or leave out {name}")
    elif req.image is None:
        raise ConfigError(f"image: mode '{mode}' needs an image")
    if mode == "inpaint" and req.mask is None:
        raise ConfigError("mask: mode 'inpaint' needs a mask (white = repaint)")
    if mode == "outpaint" and not (req.outpaint or "").strip():
        raise ConfigError("outpaint: mode 'outpaint' needs the border to add, e.g. 'left=16,top=8' or '16'")
    check_control(req)
    for name in ("image", "mask", "control"):
        value = getattr(req, name)
        if value is not None:
            size = len(value) * 3 // 4
            if size > limits.upload_bytes:
                raise ConfigError(f"{name}: {size / 1e6:.1f} MB, more than the limit of {limits.upload_bytes / 1e6:.1f} MB")
    lora_specs(req)


def check_control(req: GenerateRequest) -> None:
    """A ConfigError naming the field for control settings without a sketch or a window that is not one."""
    if req.control is None:
        for name in CONTROL_FIELDS:
            if getattr(req, name) != GenerateRequest.model_fields[name].default:
                raise ConfigError(f"{name}: needs a sketch to follow; give one as control, or leave out {name}")
    elif req.control_start > req.control_end:
        raise ConfigError(f"control_start: {req.control_start:g} is after control_end {req.control_end:g}; the control acts from start to end")


def lora_specs(req: GenerateRequest) -> list[AdapterSpec]:
    """The request's adapters as (name, weight) specs, the names not resolved yet; a ConfigError
    naming ``lora`` for an entry that is not ``NAME[:SCALE]`` with a weight in [-100, 100]."""
    from imager.inference.adapters import parse_spec

    specs = []
    for text in req.lora:
        try:
            specs.append(parse_spec(text))
        except ConfigError as exc:
            raise ConfigError(f"lora: {str(exc).removeprefix('--lora: ')}") from None
    return specs


DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,")


def decode_upload(text: str, what: str, limits: Limits) -> bytes:
    """The bytes of a base64 upload (a data URL's header is dropped); a ConfigError naming ``what``."""
    text = DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: not base64; send the PNG/JPEG bytes base64-encoded (a data: URL works too)") from None
    if not data:
        raise ConfigError(f"{what}: is empty")
    if len(data) > limits.upload_bytes:
        raise ConfigError(f"{what}: {len(data) / 1e6:.1f} MB, more than the limit of {limits.upload_bytes / 1e6:.1f} MB")
    return data


# The request fields a history PNG carries and "use these parameters" gives back to the form (and
# lora, from the PNG's adapters; the control settings, from its controls: not the sketch).
RECALLED = (
    "prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "sr_steps", "sr_guidance", "threshold", "use_sr", "mode",
    "strength", "sr_strength", "resample", "mask_blur", "outpaint", "model",
)  # fmt: skip


def recalled(params: dict[str, Any]) -> dict[str, Any]:
    """The request fields of an image's parameters (the rest describe the result, not the request)."""
    found = {k: params[k] for k in RECALLED if k in params}
    lora = recalled_lora(params.get("adapters"))
    return found | ({"lora": lora} if lora else {}) | recalled_control(params.get("controls"))


def recalled_lora(adapters: Any) -> list[str]:
    """``NAME:SCALE`` of each adapter an image records; an entry that is not one (a PNG is anyone's
    file) is left out rather than failing the whole restore."""
    out = []
    for a in adapters if isinstance(adapters, list) else []:
        if isinstance(a, dict) and isinstance(a.get("file"), str) and isinstance(a.get("scale"), int | float) and not isinstance(a.get("scale"), bool):
            out.append(f"{a['file']}:{a['scale']:g}")
    return out[:MAX_ADAPTERS]


def recalled_control(controls: Any) -> dict[str, Any]:
    """The control settings of the first control an image records (the app makes one), as request
    fields; nothing for an image without one or with a record that is not one."""
    first = controls[0] if isinstance(controls, list) and controls else None
    if not isinstance(first, dict) or not isinstance(first.get("control"), str):
        return {}
    numbers = {f"control_{k}": first.get(k) for k in ("scale", "start", "end")}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()):
        return {}
    return {"controlnet": first["control"]} | {k: float(v) for k, v in numbers.items()}
