"""The web page's handlers as plain functions over the tiny engine (no browser): a form becomes the
engine's request, a run yields previews then its images and seed, Stop ends it, a PNG gives its
form back, and bad input gives its one-line message. The last tests build the Gradio page itself."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imager.app import ui
from imager.app.request import parse_request
from imager.errors import ConfigError
from tests.app.conftest import Server, job_ending_at_first_snapshot, picture

TEXT = {"prompt": "red apple", "negative_prompt": "blurry", "mode": "text", "seed": 7.0, "sampler": "ddim", "steps": 3.0, "guidance": 2.5,
        "num_images": 1.0, "threshold": "static", "use_sr": True, "sr_steps": 2.0, "sr_guidance": 1.5, "model": "workspace", "preview_every": 1}  # fmt: skip


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def run(engine, form, **kw) -> list[ui.Frame]:
    return list(ui.generate(engine, form, poll_s=5.0, frame_s=0.0, **kw))


# --- form -> request -----------------------------------------------------------------------------
def test_text_form_becomes_the_request_the_engine_reads():
    req = parse_request(ui.request_from_form(TEXT))
    assert (req.prompt, req.negative_prompt, req.seed, req.sampler, req.steps, req.guidance) == ("red apple", "blurry", 7, "ddim", 3, 2.5)
    assert (req.threshold, req.num_images, req.use_sr, req.sr_steps, req.sr_guidance, req.model) == ("static", 1, True, 2, 1.5, "workspace")
    assert req.resolved_mode() == "text" and req.image is None and req.strength is None
    assert isinstance(req.steps, int) and isinstance(req.seed, int)  # Gradio's floats made whole
    # -1 and blank are a random seed; without SR its settings are not sent; no model is the default one
    for blank in (-1, -1.0, None, ""):
        assert ui.request_from_form(TEXT | {"seed": blank}).get("seed") is None
    data = ui.request_from_form(TEXT | {"use_sr": False, "model": None})
    assert "sr_steps" not in data and "sr_guidance" not in data and "model" not in data


def test_img2img_and_outpaint_send_the_upload_as_base64_png():
    image = Image.open(io.BytesIO(picture(3, 40)))
    data = ui.request_from_form(TEXT | {"mode": "img2img", "image": image, "strength": 0.6, "sketch_strength": 0.9, "outpaint": "16"})
    assert (data["mode"], data["strength"]) == ("img2img", 0.6)
    assert "outpaint" not in data and "mask" not in data
    assert np.array_equal(np.asarray(decoded(data["image"])), np.asarray(image))
    out = ui.request_from_form(TEXT | {"mode": "outpaint", "image": np.asarray(image), "outpaint": "left=16,top=8", "strength": 0.6, "mask_blur": 2.0})
    assert (out["mode"], out["outpaint"], out["mask_blur"]) == ("outpaint", "left=16,top=8", 2.0)
    assert "strength" not in out  # outpainting repaints the new border whole
    assert np.array_equal(np.asarray(decoded(out["image"])), np.asarray(image))


def test_inpaint_mask_is_the_drawn_layers_opaque_pixels():
    background = np.dstack([np.asarray(Image.open(io.BytesIO(picture(1, 48)))), np.full((48, 48), 255, np.uint8)])  # the editor's RGBA
    stroke = np.zeros((48, 48, 4), np.uint8)
    stroke[10:20, 5:30] = (255, 0, 128, 150)  # a half-transparent pink brush: its colour and opacity do not matter
    faint = np.zeros((24, 24, 4), np.uint8)  # a second layer at half the size (scaled to the image)
    faint[20:, 20:, 3] = 1
    data = ui.request_from_form(TEXT | {"mode": "inpaint", "editor": {"background": background, "layers": [stroke, faint], "composite": None}})
    assert data["mode"] == "inpaint"
    mask = np.asarray(decoded(data["mask"]))
    expected = np.zeros((48, 48), bool)
    expected[10:20, 5:30] = True
    expected[40:, 40:] = True
    assert mask.shape == (48, 48) and set(np.unique(mask)) == {0, 255}
    assert np.array_equal(mask == 255, expected)
    image = decoded(data["image"])
    assert image.mode == "RGB"  # an opaque upload is not sent as RGBA (no "transparency composited" note)
    assert np.array_equal(np.asarray(image), background[..., :3])
    with pytest.raises(ConfigError, match=r"^mask: nothing is painted"):
        ui.request_from_form(TEXT | {"mode": "inpaint", "editor": {"background": background, "layers": [np.zeros((48, 48, 4), np.uint8)]}})
    assert "image" not in ui.request_from_form(TEXT | {"mode": "inpaint", "editor": None})  # the engine names the missing image


def test_sketch_is_the_canvas_on_white_with_its_own_strength():
    canvas = np.zeros((64, 64, 4), np.uint8)  # transparent but for a black stroke
    canvas[30:34, 8:56] = (0, 0, 0, 255)
    data = ui.request_from_form(
        TEXT | {"mode": "sketch", "sketch": {"background": None, "layers": [], "composite": canvas}, "sketch_strength": 0.8, "strength": 0.3}
    )
    assert (data["mode"], data["strength"]) == ("sketch", 0.8)
    pixels = np.asarray(decoded(data["image"]).convert("RGB"))
    assert (pixels[30:34, 8:56] == 0).all() and (pixels[:30] == 255).all() and (pixels[34:] == 255).all()
    with pytest.raises(ConfigError, match=r"^sketch: the canvas is empty"):
        ui.request_from_form(TEXT | {"mode": "sketch", "sketch": {"background": None, "layers": [], "composite": np.full((64, 64, 3), 255, np.uint8)}})


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "  "}, "prompt: is empty; give a text such as 'red apple', or an image to edit"),
        ({"steps": 500}, "steps: 500 is more than the limit of 200"),
        ({"mode": "img2img"}, "image: mode 'img2img' needs an image"),
        ({"model": "nope"}, "model: no model 'nope'; GET /api/v1/models lists them"),
    ],
)
def test_bad_input_gives_the_engines_one_line_message_before_queueing(engine, change, message):
    with pytest.raises(ConfigError) as err:
        next(ui.generate(engine, TEXT | change))
    assert str(err.value) == message
    assert engine.status()["queued"] == 0 and engine.history.entries() == []


# --- a run ----------------------------------------------------------------------------------------
def test_generate_yields_previews_then_the_images_and_the_seed(engine):
    frames = run(engine, TEXT | {"seed": -1, "steps": 8, "num_images": 2})
    previews = [f.preview for f in frames if f.preview is not None]
    assert len(set(previews)) >= 2  # the live x̂0 changes during the run
    assert all(Image.open(io.BytesIO(p)).format == "PNG" for p in previews)
    running = [f.text for f in frames if f.state == "running" and "step" in f.text]
    assert any(t.startswith("base: step ") and "image 1/2" in t for t in running), running
    assert any(t.startswith("super-resolution: step ") and "image 2/2" in t for t in running), running
    last = frames[-1]
    assert last.state == "done" and last.fraction == 1.0 and last.text.startswith("done: 2 images in ")
    assert isinstance(last.seed, int) and f"seed {last.seed}" in last.text
    assert [e.params["seed"] for e in last.images] == [last.seed, last.seed + 1]  # image i: seed + i
    assert [e.name for e in last.images] == sorted(e.name for e in engine.history.entries())
    assert all(e.path.is_file() for e in last.images) and last.preview is not None
    assert all(f.state != "done" for f in frames[:-1])


def test_stop_ends_the_job_and_keeps_the_images_finished_before(engine):
    assert ui.stop(engine, None) is False and ui.stop(engine, "no-such-job") is False
    frames, stopped = [], False
    for frame in ui.generate(engine, TEXT | {"steps": 60, "num_images": 2, "use_sr": False}, poll_s=5.0, frame_s=0.0):
        frames.append(frame)
        if frame.images and not stopped:  # the first image is saved: stop during the second
            stopped = ui.stop(engine, frame.job)
    last = frames[-1]
    assert stopped and last.state == "cancelled" and last.text == "stopped: 1 of 2 images kept"
    kept = [e.name for e in engine.history.entries()]
    assert kept == [e.name for e in last.images] and len(kept) == 1 and kept[0].endswith(f"{last.job}-0.png")
    assert sorted(p.name for p in engine.history.folder.iterdir()) == kept  # no half-written file
    assert engine.job(last.job).state == "cancelled"


def test_a_queued_job_shows_its_position_and_leaves_the_queue_when_stopped(engine):
    first = ui.generate(engine, TEXT | {"steps": 100, "use_sr": False}, poll_s=5.0, frame_s=0.0)
    while next(first).state != "running":
        pass
    second = ui.generate(engine, TEXT, poll_s=5.0, frame_s=0.0)
    frame = next(second)
    assert (frame.state, frame.text) == ("queued", "queued: position 1 (next)")
    assert ui.stop(engine, frame.job)
    assert [f.state for f in second] == ["cancelled"]
    first.close()


def test_a_follower_that_goes_away_stops_its_job(engine):
    frames = ui.generate(engine, TEXT | {"steps": 100, "use_sr": False}, poll_s=5.0, frame_s=0.0)
    frame = next(frames)
    frames.close()
    job = engine.job(frame.job)
    while not job.finished_state:
        engine.wait(job, job.version, 5.0)
    assert job.state == "cancelled" and engine.history.entries() == []


# --- parameters back into the form -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "strength_field"),
    [
        ({}, None),
        ({"mode": "img2img", "image": Image.open(io.BytesIO(picture(2, 32))), "strength": 0.6}, "strength"),
        (
            {
                "mode": "sketch",
                "sketch": {"composite": np.pad(np.zeros((8, 8, 3), np.uint8), ((12, 12), (12, 12), (0, 0)), constant_values=255)},
                "sketch_strength": 0.7,
            },
            "sketch_strength",
        ),
    ],
)
def test_a_generated_png_restores_the_form_that_made_it(engine, extra, strength_field):
    form = TEXT | {"seed": -1} | extra
    last = run(engine, form)[-1]
    assert last.state == "done", last.error
    params = ui.params_from_png(last.images[0].path.read_bytes(), "apple.png", engine)
    restored, notes = ui.form_from_params(params, [s.id for s in engine.models.list()])
    same = ("prompt", "negative_prompt", "sampler", "steps", "guidance", "threshold", "use_sr", "sr_steps", "sr_guidance", "model", "mode")
    assert {k: restored[k] for k in same} == {k: parse_request(ui.request_from_form(form)).model_dump().get(k, form.get(k)) for k in same}
    assert restored["seed"] == last.seed and restored["num_images"] == 1
    assert set(restored) <= set(ui.RESTORED)
    if strength_field:
        assert restored[strength_field] == form[strength_field]
        assert notes == [f"mode {form['mode']}: add the input image again (a PNG keeps its parameters, not the image it was made from)"]
    else:
        assert "strength" not in restored and notes == []
    # a model this server does not offer is named, and the form keeps its own
    restored, notes = ui.form_from_params(params | {"model": "mlflow:runs:/x/cascade", "model_label": "exp / run 7"}, ["workspace"])
    assert "model" not in restored and notes[0] == "the model 'exp / run 7' is not offered here; the selected model is kept"
    restored, notes = ui.form_from_params(params | {"sampler": "plms"}, ["workspace"])
    assert "sampler" not in restored and notes[0] == "the sampler 'plms' is not known here; the selected sampler is kept"


def test_an_image_without_imager_parameters_gives_a_clear_message(engine):
    with pytest.raises(ConfigError) as err:
        ui.params_from_png(picture(), "holiday.png", engine)
    assert str(err.value) == "holiday.png: carries no Imager parameters (no 'imager' text chunk); only images made by Imager can be restored"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with pytest.raises(ConfigError, match=r"^cat.jpg: is a JPEG image; parameters are read from Imager's PNGs$"):
        ui.params_from_png(buf.getvalue(), "cat.jpg", engine)


def test_defaults_fill_the_form_over_the_librarys_own():
    d = ui.form_defaults({"sampler": "ddim", "steps": 12, "sr_steps": None})
    assert (d["sampler"], d["steps"]) == ("ddim", 12)
    assert d["sr_steps"] == ui.form_defaults(None)["sr_steps"] and set(d) == {"sampler", "steps", "guidance", "threshold", "sr_steps", "sr_guidance"}


# --- the Gradio page -------------------------------------------------------------------------------
def test_history_items_keep_the_parameters_through_gradios_png_cache(engine, tmp_path):
    from gradio.processing_utils import save_pil_to_cache

    from imager.inference.metadata import read_params

    last = run(engine, TEXT | {"num_images": 2})[-1]
    items, names = ui.history_items(engine)
    assert sorted(names) == sorted(e.name for e in last.images) and [c for _, c in items] == ["red apple"] * 2
    cached = save_pil_to_cache(items[0][0], str(tmp_path), format="png")  # what gr.Gallery(format="png") serves
    assert read_params(Path(cached).read_bytes()) == engine.history.params(names[0])


def test_the_page_builds_with_the_defaults_and_a_public_generate_endpoint(engine):
    page = ui.build_ui(engine, defaults={"sampler": "ddim", "steps": 17, "guidance": 4.5, "threshold": "dynamic", "sr_steps": 5, "sr_guidance": 1.0})
    by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert (by_id["sampler"].value, by_id["steps"].value, by_id["guidance"].value, by_id["threshold"].value, by_id["sr_steps"].value) == (
        "ddim",
        17,
        4.5,
        "dynamic",
        5,
    )
    assert by_id["model"].value == "workspace" and by_id["steps"].maximum == engine.limits.steps
    (fn,) = [f for f in page.fns.values() if f.api_name == "generate"]
    assert fn.concurrency_limit is None and fn.api_visibility == "public"
    api = page.get_api_info()["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in api["parameters"]]
    assert names[:3] == ["prompt", "negative_prompt", "mode"] and {"image", "editor", "sketch"} <= set(names)
    assert all(p["parameter_has_default"] for p in api["parameters"])  # a client may send the prompt alone


@pytest.mark.slow  # a real server and Gradio's own client
@pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:DeprecationWarning", "ignore:The copy keyword is deprecated:DeprecationWarning")
def test_gradio_client_generates_through_the_page(engine):
    from gradio_client import Client

    from imager.app.server import create_app

    server = Server(create_app(engine))
    with server as url:
        client = Client(f"{url}/ui/", verbose=False)
        progress, preview, images, seed = client.predict(prompt="red apple", steps=4, seed=11, sampler="ddim", api_name="/generate")
        client.close()
        server.server.force_exit = True  # the client's heartbeat stream would hold a graceful shutdown for seconds
    (entry,) = engine.history.entries()
    assert seed == "11" and entry.params["seed"] == 11 and entry.params["steps"] == 4
    assert 'data-state="done"' in progress and len(images) == 1 and preview is not None


def test_the_last_frame_is_the_final_state_when_the_job_ends_during_a_snapshot(engine):
    job = job_ending_at_first_snapshot(engine)
    frames = list(ui.follow(engine, job, poll_s=1.0, frame_s=0.0))
    engine._worker = None  # nothing to join when the fixture closes the engine
    assert [f.state for f in frames] == ["queued", "done"]
