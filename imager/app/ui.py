"""The web page of ``imager ui``: a Gradio form over the engine, and nothing more.

Every button ends in one engine call (:meth:`Engine.submit`, :meth:`Engine.cancel`, the history),
through the plain functions of this module, which the tests call without a browser; the Gradio
callbacks in :func:`build_ui` only convert between components and those functions.

A form is a dict of field name -> component value: the :class:`GenerateRequest` fields, plus
``image`` (the upload of img2img and outpainting), ``editor`` (the inpainting canvas: a dict of
``background``, ``layers``, ``composite``; the drawn layers' opaque pixels are the mask) and
``sketch`` (the drawing canvas, sent as mode ``sketch``); ``lora`` is one text of the LoRA adapters,
``name:weight, name:weight`` (the adapters the server offers are listed under it); ``control`` is
the canvas of the sketch control (sent, composited on white, as the request's ``control`` when
something is drawn), with ``controlnet``, ``control_scale``, ``control_start``, ``control_end``.
Gradio is imported by :func:`build_ui` alone, so the functions cost no Gradio import.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imager.app.engine import FINISHED, Engine, Job, milestone
from imager.app.history import Entry, NotFoundError
from imager.app.request import IMG2IMG_STRENGTH, recalled
from imager.errors import ConfigError

if TYPE_CHECKING:
    import gradio as gr

MODES = (("Text → image", "text"), ("Image → image", "img2img"), ("Inpaint", "inpaint"), ("Outpaint", "outpaint"), ("Sketch → image", "sketch"))
SKETCH_STRENGTH = 0.8  # a sketch is a layout, not a picture: redraw more of it than of a photo
STRENGTH_FIELD = {"img2img": "strength", "sketch": "sketch_strength"}  # inpaint and outpaint repaint at strength 1
SKETCH_SIZE = 256  # the drawing canvas; the engine resizes it to the model's few dozen pixels
# The control canvas' brush radius: the sketch is shrunk to the base model's 32 px (8 canvas pixels
# each), and a line thinner than one of them fades into the paper.
CONTROL_BRUSH = 6
HISTORY_SHOWN = 48
FRAME_S = 0.1  # at most ten page updates a second: enough to watch, and the browser keeps up
# The models make a few dozen pixels: show them large and sharp, not blurred by the browser's scaling.
STYLE = """<style>
#preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#gallery img, #history img, #editor canvas, #sketch canvas, #control canvas { image-rendering: pixelated; }
</style>"""
STAGES = {"base": "base", "sr": "super-resolution"}
# The form fields "use these parameters" and a dropped PNG set, in the order of build_ui's outputs.
RESTORED = (
    "model", "mode", "prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "num_images", "use_sr", "sr_steps",
    "sr_guidance", "threshold", "strength", "sketch_strength", "sr_strength", "mask_blur", "resample", "outpaint", "lora",
    "controlnet", "control_scale", "control_start", "control_end",
)  # fmt: skip
CONTROL_DEFAULTS = {"control_scale": 1.0, "control_start": 0.0, "control_end": 1.0}


# --- the form -> a request ---------------------------------------------------------------------
def request_from_form(form: dict[str, Any]) -> dict[str, Any]:
    """The engine request of a form; the engine checks it (a ConfigError naming the field)."""
    mode = form.get("mode") or "text"
    use_sr = bool(form.get("use_sr", True))
    data: dict[str, Any] = {
        "prompt": form.get("prompt") or "", "negative_prompt": form.get("negative_prompt") or "", "seed": _seed(form.get("seed")),
        "sampler": form.get("sampler") or None, "steps": _whole(form.get("steps")), "guidance": form.get("guidance"),
        "threshold": form.get("threshold") or None, "num_images": _whole(form.get("num_images")) or 1, "use_sr": use_sr,
        "model": form.get("model") or None, "mode": mode, "preview_every": _whole(form.get("preview_every")) or 1,
        "lora": lora_entries(form.get("lora")) or None,
    }  # fmt: skip
    if use_sr:
        data |= {"sr_steps": _whole(form.get("sr_steps")), "sr_guidance": form.get("sr_guidance")}
    if mode != "text":
        data["sr_strength"] = form.get("sr_strength")
    if mode in ("inpaint", "outpaint"):
        data |= {"mask_blur": form.get("mask_blur") or 0.0, "resample": _whole(form.get("resample"))}
    if mode in ("img2img", "outpaint"):
        data["image"] = png_base64(form.get("image"))
        if mode == "img2img":
            data["strength"] = form.get("strength")
        else:
            data["outpaint"] = form.get("outpaint") or ""
    elif mode == "inpaint":
        data["image"], data["mask"] = editor_image_and_mask(form.get("editor"))
    elif mode == "sketch":
        data |= {"image": sketch_png(form.get("sketch")), "strength": form.get("sketch_strength")}
    control = control_png(form.get("control"))
    if control is not None:  # an empty canvas: no control, whatever its settings say
        data |= {"control": control, "controlnet": form.get("controlnet") or None} | {k: form.get(k) for k in CONTROL_DEFAULTS}
    return {k: v for k, v in data.items() if v is not None}


def lora_entries(text: Any) -> list[str]:
    """The adapters of the form's text, ``name:weight, name`` -> one entry each (the engine checks them)."""
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


def _seed(value: Any) -> Any:
    """None (random) for a blank field or -1; the number otherwise (the engine checks its range)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _whole(value)
    return None if value == -1 else value


def _whole(value: Any) -> Any:
    """An int for a whole number (Gradio's numbers and sliders give floats); anything else as it is."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def to_pil(image: Any) -> Image.Image | None:
    """A PIL image of what a Gradio image component gives (array, PIL image or file path)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
    return Image.open(Path(image))


def png_base64(image: Any) -> str | None:
    image = to_pil(image)
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def editor_image_and_mask(value: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """The inpainting canvas as (image, mask) base64 PNGs: the uploaded background, and white
    wherever a drawn layer is not transparent (the brush's colour does not matter)."""
    background = to_pil((value or {}).get("background"))
    if background is None:
        return None, None  # the engine says that inpainting needs an image
    mask = np.zeros((background.height, background.width), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        layer = to_pil(layer)
        if layer is not None:
            alpha = np.asarray(layer.convert("RGBA").resize(background.size, Image.Resampling.NEAREST))[..., 3]
            mask |= alpha > 0
    if not mask.any():
        raise ConfigError("mask: nothing is painted; paint over the part of the image to repaint")
    if background.mode == "RGBA" and background.getchannel("A").getextrema() == (255, 255):
        background = background.convert("RGB")  # the editor's RGBA of an opaque upload: nothing to composite
    return png_base64(background), png_base64(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))


def sketch_png(value: dict[str, Any] | None) -> str | None:
    """The drawing canvas as a base64 PNG on white; a ConfigError for an empty canvas."""
    composite = to_pil((value or {}).get("composite"))
    if composite is not None:
        rgba = composite.convert("RGBA")
        composite = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    if composite is None or bool((np.asarray(composite) == 255).all()):
        raise ConfigError("sketch: the canvas is empty; draw something to turn into an image")
    return png_base64(composite)


def control_png(value: dict[str, Any] | None) -> str | None:
    """The control canvas as a base64 PNG on white; None for an empty (all white) canvas."""
    composite = to_pil((value or {}).get("composite"))
    if composite is None:
        return None
    rgba = composite.convert("RGBA")
    composite = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return None if bool((np.asarray(composite) == 255).all()) else png_base64(composite)


# --- a job -> page updates ---------------------------------------------------------------------
@dataclass
class Frame:
    """One update of the page's job: what changed since the previous frame."""

    job: str
    state: str  # queued, running, done, cancelled, failed
    text: str  # the progress line
    fraction: float
    seed: int | None
    preview: bytes | None = None  # PNG of a preview not shown yet
    images: list[Entry] | None = None  # the finished images, when their list changed
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def generate(engine: Engine, form: dict[str, Any], poll_s: float = 1.0, frame_s: float = FRAME_S) -> Iterator[Frame]:
    """Submit the form (a ConfigError before anything is queued) and follow the job."""
    job = engine.submit(request_from_form(form))
    yield from follow(engine, job, poll_s, frame_s)


def follow(engine: Engine, job: Job, poll_s: float = 1.0, frame_s: float = FRAME_S) -> Iterator[Frame]:
    """A frame per change of the job (at most one per ``frame_s``, at least one per ``poll_s``)
    until it ends; the last frame carries the final images, preview and seed whatever was shown
    before. A follower closed before the end (the page went away) stops the job: nobody would
    see its images appear."""
    version, shown_preview, shown_images, last, previous = -1, 0, 0, -float("inf"), None
    try:
        while True:
            version = engine.wait(job, version, poll_s)
            info = job.describe()  # one snapshot: the job may finish while this frame is built
            if not milestone(info, previous):  # a step of the same stage: at most one frame per frame_s
                pause = last + frame_s - time.monotonic()
                if pause > 0:
                    engine.wait_milestone(job, previous, pause)
                    info = job.describe()
                    version = info["version"]
            last, previous = time.monotonic(), info
            done = info["state"] in FINISHED
            frame = Frame(job.id, info["state"], progress_line(info), info["progress"]["fraction"], info["seed"], error=info["error"], notes=info["notes"])
            if (info["preview_count"] != shown_preview or done) and job.preview is not None:
                frame.preview, shown_preview = job.preview, info["preview_count"]
            if len(job.results) != shown_images or done:
                frame.images = list(job.results)
                shown_images = len(frame.images)
            yield frame
            if done:
                return
    finally:
        if not job.finished_state:
            engine.cancel(job.id)


def progress_line(info: dict[str, Any]) -> str:
    """One line of a job's :meth:`Job.describe`: queue position, stage, step, image, ETA."""
    state, p, n = info["state"], info["progress"], info["num_images"]
    kept = len(info["images"])
    if state == "queued":
        return f"queued: position {info['position']}" + (" (next)" if info["position"] == 1 else "")
    if state == "done":
        return f"done: {kept} image{'s' * (kept != 1)} in {p['elapsed_s'] or 0:.1f} s, seed {info['seed']}"
    if state == "cancelled":
        return f"stopped: {kept} of {n} image{'s' * (n != 1)} kept"
    if state == "failed":
        return f"failed: {info['error']}"
    if p["stage"] in STAGES:
        line = f"{STAGES[p['stage']]}: step {p['step']}/{p['steps']} · image {p['image'] + 1}/{n}"
        return line + (f" · ETA {p['eta_s']:.1f} s" if p["eta_s"] is not None else "")
    if p["stage"] == "saving":
        return f"saving image {p['image'] + 1}/{n}"
    return "loading the model"


def progress_html(frame: Frame | None) -> str:
    if frame is None:
        return '<div class="imager-progress" data-state="idle"></div>'
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in frame.notes)
    return (
        f'<div class="imager-progress" data-state="{frame.state}" data-job="{frame.job}">'
        f'<progress max="100" value="{round(100 * frame.fraction)}" style="width:100%"></progress>'
        f'<div class="imager-line">{html.escape(frame.text)}</div>{f"<ul>{notes}</ul>" if notes else ""}</div>'
    )


def stop(engine: Engine, job_id: str | None) -> bool:
    """Stop the page's job (the generate loop then reports it stopped); False when there is none."""
    if not job_id:
        return False
    try:
        engine.cancel(job_id)
    except NotFoundError:
        return False
    return True


# --- history, parameters, models ---------------------------------------------------------------
def history_items(engine: Engine, limit: int = HISTORY_SHOWN) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """The newest images as gallery items (their PNG text chunks kept: Gradio copies them when it
    saves a PNG, so a downloaded image still carries its parameters) and their names."""
    entries = engine.history.entries(limit)
    return [(Image.open(e.path), e.params.get("prompt", "")) for e in entries], [e.name for e in entries]


def params_from_png(data: bytes, what: str, engine: Engine) -> dict[str, Any]:
    """The parameters of an uploaded PNG; a ConfigError for one without Imager parameters."""
    from imager.inference.metadata import read_params

    limit = engine.limits.upload_bytes
    if len(data) > limit:
        raise ConfigError(f"{what}: {len(data) / 1e6:.1f} MB, more than the limit of {limit / 1e6:.1f} MB")
    return read_params(data, what)


def form_from_params(params: dict[str, Any], model_ids: list[str], control_names: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The form values that make an image again (``num_images`` 1: image i was made from its own
    seed) and notes for what cannot be restored: the input image or sketch, a model or control
    this server lacks (``control_names``: the controls it offers)."""
    found = recalled(params)
    plain = ("prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "use_sr", "sr_steps", "sr_guidance", "threshold", "mask_blur", "outpaint")
    form = {k: found[k] for k in plain if k in found}
    notes = []
    if form.get("sampler") not in (None, *_samplers()):
        notes.append(f"the sampler '{form.pop('sampler')}' is not known here; the selected sampler is kept")
    mode = found.get("mode", "text")
    form |= {"mode": mode, "num_images": 1, "sr_strength": found.get("sr_strength"), "resample": found.get("resample")}
    form["lora"] = ", ".join(found.get("lora", []))  # none: the field is emptied, or the adapters of the last image would stay
    if "strength" in found and mode in STRENGTH_FIELD:
        form[STRENGTH_FIELD[mode]] = found["strength"]
    model = found.get("model")
    if model in model_ids:
        form["model"] = model
    elif model:
        notes.append(f"the model '{params.get('model_label', model)}' is not offered here; the selected model is kept")
    if mode != "text":
        notes.append(f"mode {mode}: add the input image again (a PNG keeps its parameters, not the image it was made from)")
    form |= {k: found.get(k, v) for k, v in CONTROL_DEFAULTS.items()}  # none: the defaults, or the last image's would stay
    control = found.get("controlnet")
    if control is not None:
        if control in (control_names or []):
            form["controlnet"] = control
        else:
            notes.append(f"the control '{control}' is not offered here; the selected control is kept")
        notes.append("sketch control: draw the sketch again (a PNG keeps its parameters, not the sketch)")
    return form, notes


def _samplers() -> list[str]:
    from imager.samplers import SAMPLERS

    return sorted(SAMPLERS)


def model_choices(engine: Engine, refresh: bool = False) -> list[tuple[str, str]]:
    return [(s.label, s.id) for s in engine.models.list(refresh=refresh)]


def adapter_note(engine: Engine, model: str | None) -> str:
    """The adapters the server offers, as the markdown under the form's LoRA field."""
    try:
        listed = engine.available_adapters(model)
    except ConfigError as exc:
        return html.escape(str(exc))
    if not listed["adapters"]:
        return "No LoRA adapters on this server (`imager ui --lora-dir DIR` offers a folder of them)."
    fits = {True: "", False: ", trained on another model", None: ""}
    lines = [f"- `{a['name'].replace('`', '')}` ({a['stage']}, rank {a['rank']}{fits[a['fits']]})" for a in listed["adapters"]]
    return "Adapters of this server, to give as `name:weight, ...` (weight 1 if left out):\n\n" + "\n".join(lines)


def control_choices(engine: Engine, model: str | None) -> tuple[list[tuple[str, str]], str | None]:
    """The controls the server offers as dropdown choices (label, name), and the default one's name."""
    try:
        listed = engine.available_controls(model)
    except ConfigError:
        return [], None
    fits = {True: "", False: ", trained on another model", None: ""}
    choices = [(f"{c['name']} ({c['arch']}, {c['condition']}{fits[c['fits']]})", c["name"]) for c in listed["controls"]]
    return choices, listed["default"]


def form_defaults(defaults: dict[str, Any] | None) -> dict[str, Any]:
    """The form's initial sampling values: ``defaults`` over the library's own."""
    from imager.inference import CascadeSampling

    s = CascadeSampling()
    own = {"sampler": s.sampler, "steps": s.base.steps, "guidance": s.base.guidance, "threshold": s.base.threshold,
           "sr_steps": s.sr.steps, "sr_guidance": s.sr.guidance}  # fmt: skip
    return own | {k: v for k, v in (defaults or {}).items() if v is not None}


# --- the page ----------------------------------------------------------------------------------
# The form's components, in the order of the generate endpoint's parameters (gradio_client's names).
FORM = (
    "prompt", "negative_prompt", "mode", "model", "seed", "sampler", "steps", "guidance", "num_images", "threshold", "use_sr",
    "sr_steps", "sr_guidance", "sr_strength", "strength", "sketch_strength", "outpaint", "mask_blur", "resample", "preview_every", "lora",
    "controlnet", "control_scale", "control_start", "control_end",
)  # fmt: skip


def build_ui(engine: Engine, defaults: dict[str, Any] | None = None) -> gr.Blocks:
    """The page: the form and the live output side by side, the history below. ``defaults``: the
    form's initial sampling values (params.yaml's sampler, steps, guidance, threshold, sr_*)."""
    import gradio as gr

    with gr.Blocks(title="Imager", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# Imager\nText to image with a diffusion cascade, and edits of an image. Every image keeps its parameters.")
        c: dict[str, Any] = {"job": gr.State(None), "names": gr.State([]), "selected": gr.State(None)}
        with gr.Row():
            with gr.Column(scale=5):
                _form(c, engine, form_defaults(defaults))
            with gr.Column(scale=4):
                c["progress"] = gr.HTML(progress_html(None), label="Progress", head=STYLE, elem_id="progress")
                c["preview"] = gr.Image(label="Live preview", type="pil", format="png", interactive=False, height=256, elem_id="preview")
                c["gallery"] = gr.Gallery(label="Images", format="png", columns=4, fit_columns=False, elem_id="gallery")
                with gr.Row():
                    c["seed_used"] = gr.Textbox(label="Seed used", interactive=False, placeholder="shown after generating", elem_id="seed_used")
                    c["reuse_seed"] = gr.Button("Use this seed", size="sm")
        _history(c)
        _wire(page, c, engine)
    return page


def _form(c: dict[str, Any], engine: Engine, d: dict[str, Any]) -> None:
    import gradio as gr

    from imager.app.request import SEED_MAX

    steps_max = max(engine.limits.steps, d["steps"], d["sr_steps"])
    with gr.Row():
        choices = model_choices(engine)
        c["model"] = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Model", scale=5, elem_id="model")
        c["refresh_models"] = gr.Button("↻ Models", scale=1, size="sm")
    c["mode"] = gr.Radio([(label, mode) for label, mode in MODES], value="text", label="Mode", elem_id="mode")
    c["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="red apple", elem_id="prompt")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", placeholder="what to steer away from", elem_id="negative_prompt")
    c["image"] = gr.Image(label="Image to edit", type="pil", sources=["upload", "clipboard"], visible=False, elem_id="image")
    c["strength"] = gr.Slider(0.05, 1, value=IMG2IMG_STRENGTH, step=0.05, label="Strength (1: redraw everything)", visible=False, elem_id="strength")
    c["outpaint"] = gr.Textbox(
        value="16", label="Border to add, in the image's pixels", placeholder="16 (every side) or left=16,top=8", visible=False, elem_id="outpaint"
    )
    c["editor"] = gr.ImageEditor(
        label="Image to inpaint: paint over what to repaint", type="pil", image_mode="RGBA", sources=["upload", "clipboard"], layers=False,
        transforms=(), brush=gr.Brush(colors=["rgba(255, 0, 128, 0.6)"], color_mode="fixed"), format="png", visible=False, elem_id="editor",
    )  # fmt: skip
    white = {"background": np.full((SKETCH_SIZE, SKETCH_SIZE, 3), 255, dtype=np.uint8), "layers": [], "composite": None}
    c["sketch"] = gr.Sketchpad(
        value=white, label="Sketch", type="pil", image_mode="RGB", canvas_size=(SKETCH_SIZE, SKETCH_SIZE), layers=False, format="png", visible=False, elem_id="sketch",
        brush=gr.Brush(colors=["#000000", "#e53935", "#43a047", "#1e88e5", "#fdd835", "#8e24aa"], color_mode="defaults"),
    )  # fmt: skip
    c["sketch_strength"] = gr.Slider(
        0.05, 1, value=SKETCH_STRENGTH, step=0.05, label="Strength (1: only the colours' layout survives)", visible=False, elem_id="sketch_strength"
    )
    with gr.Row():
        c["seed"] = gr.Number(-1, precision=0, minimum=-1, maximum=SEED_MAX, label="Seed (-1 or blank: random)", elem_id="seed")
        c["sampler"] = gr.Dropdown(_samplers(), value=d["sampler"], label="Sampler", elem_id="sampler")
    with gr.Row():
        c["steps"] = gr.Slider(1, steps_max, value=d["steps"], step=1, label="Steps", elem_id="steps")
        c["guidance"] = gr.Slider(0, 30, value=d["guidance"], step=0.1, label="Guidance", elem_id="guidance")
    with gr.Row():
        c["num_images"] = gr.Slider(1, engine.limits.images, value=1, step=1, label="Images", elem_id="num_images")
        c["threshold"] = gr.Radio(["none", "static", "dynamic"], value=d["threshold"], label="Threshold of x̂0", elem_id="threshold")
    with gr.Accordion("Super-resolution", open=False):
        c["use_sr"] = gr.Checkbox(True, label="Super-resolution stage", elem_id="use_sr")
        c["sr_steps"] = gr.Slider(1, steps_max, value=d["sr_steps"], step=1, label="SR steps", elem_id="sr_steps")
        c["sr_guidance"] = gr.Slider(0, 30, value=d["sr_guidance"], step=0.1, label="SR guidance", elem_id="sr_guidance")
        c["sr_strength"] = gr.Number(None, minimum=0.01, maximum=1, label="SR strength of edits (blank: the model's)", elem_id="sr_strength")
    with gr.Accordion("LoRA adapters", open=False):
        c["lora"] = gr.Textbox(label="Adapters and weights", placeholder="pixel-art.safetensors:0.8, outline.safetensors", elem_id="lora")
        c["adapters"] = gr.Markdown(adapter_note(engine, c["model"].value), elem_id="adapters")
    _control_form(c, engine)
    with gr.Accordion("Advanced", open=False):
        c["preview_every"] = gr.Number(1, precision=0, minimum=1, maximum=1000, label="Preview every N steps", elem_id="preview_every")
        c["mask_blur"] = gr.Slider(0, 64, value=0, step=1, label="Mask blur (inpaint, outpaint), pixels", elem_id="mask_blur")
        c["resample"] = gr.Number(None, precision=0, minimum=1, maximum=20, label="RePaint resampling (blank: the model's)", elem_id="resample")
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")


def _control_form(c: dict[str, Any], engine: Engine) -> None:
    """The sketch control: a canvas, the control to follow it with, its scale and window; hidden
    while the server offers no control (the page shows it once one is there)."""
    import gradio as gr

    choices, default = control_choices(engine, c["model"].value)
    with gr.Accordion("Sketch control (ControlNet)", open=False, visible=bool(choices), elem_id="control_section") as c["control_section"]:
        # No background image: the editor offers Upload only on an empty canvas; the strokes are
        # composited on white when sent.
        c["control"] = gr.Sketchpad(
            label="Sketch to follow: dark lines on white (drawn or uploaded; left empty: no control)", type="pil", image_mode="RGBA",
            sources=["upload", "clipboard"], canvas_size=(SKETCH_SIZE, SKETCH_SIZE), fixed_canvas=True, layers=False, format="png", elem_id="control",
            brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=CONTROL_BRUSH), eraser=gr.Eraser(default_size=CONTROL_BRUSH),
        )  # fmt: skip
        c["controlnet"] = gr.Dropdown(choices, value=default, label="Control", elem_id="controlnet")
        with gr.Row():
            c["control_scale"] = gr.Slider(0, 2, value=1, step=0.05, label="Control scale (0: off)", elem_id="control_scale")
            c["control_start"] = gr.Slider(0, 1, value=0, step=0.05, label="From (0: pure noise)", elem_id="control_start")
            c["control_end"] = gr.Slider(0, 1, value=1, step=0.05, label="To (1: the image)", elem_id="control_end")


def _history(c: dict[str, Any]) -> None:
    import gradio as gr

    gr.Markdown("## History")
    with gr.Row():
        with gr.Column(scale=3):
            c["history"] = gr.Gallery(label="Past images (select one)", format="png", columns=8, fit_columns=False, allow_preview=False, elem_id="history")
            c["history_refresh"] = gr.Button("↻ History", size="sm", elem_id="history_refresh")
        with gr.Column(scale=2):
            c["params"] = gr.JSON(label="Parameters", elem_id="params")
            c["use_params"] = gr.Button("Use these parameters", elem_id="use_params")
            c["drop"] = gr.File(label="Drop an Imager PNG to restore its parameters", file_types=["image"], type="filepath", elem_id="drop")
            c["note"] = gr.Markdown(elem_id="restore_note")


def _wire(page: gr.Blocks, c: dict[str, Any], engine: Engine) -> None:
    import gradio as gr

    private: dict[str, Any] = {"api_visibility": "private"}
    shown = ("image", "strength", "outpaint", "editor", "sketch", "sketch_strength")
    where = {
        "image": ("img2img", "outpaint"),
        "strength": ("img2img",),
        "outpaint": ("outpaint",),
        "editor": ("inpaint",),
        "sketch": ("sketch",),
        "sketch_strength": ("sketch",),
    }
    c["mode"].change(lambda mode: [gr.update(visible=mode in where[k]) for k in shown], c["mode"], [c[k] for k in shown], queue=False, **private)

    # The fields whose components start blank are named here with None defaults: gradio_client
    # makes every other parameter without an initial value a required one.
    def on_generate(*, prompt: Any = None, negative_prompt: Any = None, sr_strength: Any = None, resample: Any = None, lora: Any = None,
                    image: Any = None, editor: Any = None, sketch: Any = None, control: Any = None, controlnet: Any = None,
                    **fields: Any) -> Iterator[tuple]:  # fmt: skip
        blank = {"prompt": prompt, "negative_prompt": negative_prompt, "sr_strength": sr_strength, "resample": resample, "lora": lora}
        drawn = {"image": image, "editor": editor, "sketch": sketch, "control": control, "controlnet": controlnet}
        frames = generate(engine, fields | blank | drawn)
        with contextlib.closing(frames):  # Gradio closing this generator (the page went away) stops the job
            try:
                first = next(frames)
            except ConfigError as exc:
                raise gr.Error(html.escape(str(exc)), print_exception=False) from None
            for frame in itertools.chain([first], frames):
                preview = gr.skip() if frame.preview is None else Image.open(io.BytesIO(frame.preview))
                images = gr.skip() if frame.images is None else [(Image.open(e.path), f"seed {e.params.get('seed')}") for e in frame.images]
                yield frame.job, progress_html(frame), preview, images, "" if frame.seed is None else str(frame.seed)
        if frame.state == "failed":
            raise gr.Error(html.escape(f"the job failed: {frame.error}"), print_exception=False)

    outputs = [c["job"], c["progress"], c["preview"], c["gallery"], c["seed_used"]]
    run = c["generate"].click(
        on_generate, inputs_kwargs={k: c[k] for k in (*FORM, "image", "editor", "sketch", "control")}, outputs=outputs,
        api_name="generate", concurrency_limit=None, show_progress="minimal",
    )  # fmt: skip

    def on_stop(job_id: str | None) -> None:
        if not stop(engine, job_id):
            gr.Info("Nothing is running.")

    c["stop"].click(on_stop, c["job"], None, concurrency_limit=None, **private)
    c["reuse_seed"].click(lambda seed: int(seed) if (seed or "").isdigit() else gr.skip(), c["seed_used"], c["seed"], queue=False, **private)

    def on_models(current: str | None, refresh: bool = True) -> Any:
        choices = model_choices(engine, refresh=refresh)
        ids = [i for _, i in choices]
        return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))

    c["refresh_models"].click(on_models, c["model"], c["model"], **private)
    page.load(lambda current: on_models(current, refresh=False), c["model"], c["model"], **private)  # the registry's cached listing
    c["model"].change(lambda model: adapter_note(engine, model), c["model"], c["adapters"], **private)
    page.load(lambda model: adapter_note(engine, model), c["model"], c["adapters"], **private)  # files added since the page was built

    def on_controls(model: str | None, current: str | None) -> tuple[Any, Any]:
        choices, default = control_choices(engine, model)
        names = [n for _, n in choices]
        return gr.update(choices=choices, value=current if current in names else default), gr.update(visible=bool(choices))

    controls = [c["controlnet"], c["control_section"]]
    c["model"].change(on_controls, [c["model"], c["controlnet"]], controls, **private)
    page.load(on_controls, [c["model"], c["controlnet"]], controls, **private)

    history = [c["history"], c["names"]]
    c["history_refresh"].click(lambda: history_items(engine), None, history, **private)
    page.load(lambda: history_items(engine), None, history, **private)
    run.then(lambda: history_items(engine), None, history, **private)

    def on_select(names: list[str], evt: gr.SelectData) -> tuple[Any, Any]:
        index = evt.index if isinstance(evt.index, int) else -1
        try:
            params = engine.history.params(names[index]) if 0 <= index < len(names) else None
        except NotFoundError as exc:
            gr.Warning(html.escape(str(exc)))
            params = None
        return params, params

    # Gradio finds its event-data parameter by its type; this module's annotations are strings
    # that name a module it does not import at the top.
    on_select.__annotations__["evt"] = gr.SelectData
    c["history"].select(on_select, c["names"], [c["params"], c["selected"]], **private)

    restored = [c[k] for k in RESTORED] + [c["note"]]

    def restore(params: dict[str, Any] | None) -> list[Any]:
        if not params:
            return [gr.skip()] * len(RESTORED) + ["Select an image of the history first."]
        form, notes = form_from_params(params, [i for _, i in model_choices(engine)], [x.name for x in engine.controls.list()])
        note = "Parameters restored." + "".join(f"\n- {html.escape(n)}" for n in notes)
        return [form.get(k, gr.skip()) for k in RESTORED] + [note]

    c["use_params"].click(restore, c["selected"], restored, **private)

    def on_drop(path: str | None) -> list[Any]:
        """The dropped PNG's parameters into the form; the drop zone is emptied for the next one."""
        if path is None:
            return [gr.skip()] * (len(restored) + 3)
        try:
            params = params_from_png(Path(path).read_bytes(), Path(path).name, engine)
        except ConfigError as exc:
            gr.Warning(html.escape(str(exc)))
            return [gr.skip()] * len(RESTORED) + [html.escape(str(exc)), gr.skip(), gr.skip(), None]
        return [*restore(params), params, params, None]

    c["drop"].upload(on_drop, c["drop"], [*restored, c["params"], c["selected"], c["drop"]], **private)
