"""Sketch controls in the app and the MLflow model, on the tiny cascade: the API lists the control
files of the server's folders and whether each fits the model; a request's sketch changes the image
(scale 0 is the model without it, bit for bit); nothing outside the folders is read; a foreign
control or a bad sketch is one line; the PNG records the control and gives its settings back. The
pyfunc takes a ``control`` param and column with a control logged with it."""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imager.app import ui
from imager.app.controls import ControlLibrary
from imager.app.engine import Engine
from imager.app.history import History
from imager.app.models import ModelRegistry, files_source
from imager.app.request import Limits, check_request, parse_request
from imager.app.server import create_app
from imager.errors import CheckpointError, ConfigError
from imager.inference.metadata import file_sha256
from imager.models import load_model
from imager.models.config import ControlSettings
from imager.models.control import build_control, load_control, read_control, save_control
from imager.models.lora import weights_sha256
from imager.serving import log_cascade, logged_controls
from imager.tracking import StageRun
from tests.app.conftest import SAMPLING, Server, tiny_loader, write_models
from tests.app.test_adapters_app import direct_model, make
from tests.conftest import tiny_params
from tests.unit.test_inference import HashEncoder

REQUEST = {"prompt": "red apple", "seed": 5, "steps": 3}
NET, ADAPTER = "controlnet/control.safetensors", "adapter/control.safetensors"


def make_control(base_file: Path, out: Path, arch: str = "controlnet", seed: int = 2) -> Path:
    """A control for the base model of ``base_file`` whose zero layers are moved off zero, as
    training does: an untrained control changes nothing."""
    base = load_model(base_file)
    net = build_control(base, ControlSettings(arch=arch))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_control(out, net, base_sha256=weights_sha256(base))
    return out


def sketch(rows: slice = slice(20, 28), size: int = 64, width: int | None = None) -> bytes:
    """A black bar on white, as PNG bytes."""
    canvas = np.full((size, width or size), 255, np.uint8)
    canvas[rows, 8:56] = 0
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


SKETCH = base64.b64encode(sketch()).decode()


@pytest.fixture(scope="module")
def controls(model_files, tmp_path_factory) -> dict:
    """A control folder (the two variants as `imager train-control` writes them, one of another
    model, a model file and a link out of the folder) and a control outside it."""
    root = tmp_path_factory.mktemp("controls")
    folder = root / "control"
    base, _ = model_files
    other, _ = write_models(root / "other", seed=3)
    make_control(base, folder / NET)
    make_control(base, folder / ADAPTER, "adapter", seed=5)
    make_control(other, folder / "foreign.safetensors")
    shutil.copy(base, folder / "model.safetensors")  # a model, not a control: not listed
    outside = make_control(base, root / "outside.safetensors", seed=9)
    os.symlink(outside, folder / "escape.safetensors")
    return {"folder": folder, "outside": outside}


def control_engine(model_files, controls, tmp_path) -> Engine:
    base, sr = model_files
    registry = ModelRegistry([files_source(base, sr, label="tiny")], loader=tiny_loader)
    return Engine(registry, History(tmp_path / "history"), controls=ControlLibrary([controls["folder"]], default="controlnet"))


@pytest.fixture
def api(model_files, controls, tmp_path, one_thread):
    engine = control_engine(model_files, controls, tmp_path)
    with Server(create_app(engine, ui=False)) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.engine = engine  # type: ignore[attr-defined]
        yield client
    engine.close()


def test_the_api_lists_the_controls_of_the_folders_and_which_fit_the_model(api, controls):
    listed = api.get("/api/v1/controls").json()
    assert (listed["model"], listed["loaded"], listed["default"]) == ("workspace", False, NET)
    by_name = {c["name"]: c for c in listed["controls"]}
    assert sorted(by_name) == [ADAPTER, NET, "foreign.safetensors"]  # no model, no link out
    net = by_name[NET]
    assert (net["arch"], net["condition"], net["fits"], net["default"]) == ("controlnet", "lines", None, True)  # the model is not loaded yet
    assert net["parameters"] == read_control(controls["folder"] / NET).parameters and net["size"] == (controls["folder"] / NET).stat().st_size
    assert by_name[ADAPTER]["arch"] == "adapter" and by_name[ADAPTER]["parameters"] < net["parameters"] and not by_name[ADAPTER]["default"]
    make(api)
    fits = {c["name"]: c["fits"] for c in api.get("/api/v1/controls", params={"model": "workspace"}).json()["controls"]}
    assert fits == {ADAPTER: True, NET: True, "foreign.safetensors": False}
    assert api.get("/api/v1/controls", params={"model": "nope"}).status_code == 404


def test_a_sketch_changes_the_image_and_scale_zero_is_the_model_itself(api, controls):
    plain, _, _ = make(api)
    drawn, params, png = make(api, control=SKETCH)
    assert not np.array_equal(drawn, plain)
    assert params["controls"] == [
        {"control": NET, "control_sha256": file_sha256(controls["folder"] / NET), "arch": "controlnet", "scale": 1.0, "start": 0.0, "end": 1.0}
    ]
    zero, zero_params, _ = make(api, control=SKETCH, control_scale=0)
    assert zero.tobytes() == plain.tobytes() and zero_params["controls"][0]["scale"] == 0
    other = make(api, control=base64.b64encode(sketch(slice(40, 48))).decode())[0]
    assert not np.array_equal(other, drawn)  # the sketch steers, not the control's mere presence
    assert np.array_equal(make(api, control=f"data:image/png;base64,{SKETCH}", controlnet="controlnet")[0], drawn)  # the variant's folder names it
    adapted, adapter_params, _ = make(api, control=SKETCH, controlnet=ADAPTER, control_scale=1.5, control_start=0.2, control_end=0.9)
    assert not np.array_equal(adapted, drawn)
    assert {k: adapter_params["controls"][0][k] for k in ("control", "arch", "scale", "start", "end")} == {
        "control": ADAPTER, "arch": "adapter", "scale": 1.5, "start": 0.2, "end": 0.9,
    }  # fmt: skip
    assert make(api)[0].tobytes() == plain.tobytes()  # nothing of a job's control stays on the model
    # the PNG gives the control's settings back (not the sketch)
    recalled = api.post("/api/v1/params", content=png).json()["request"]
    assert {k: recalled[k] for k in ("controlnet", "control_scale", "control_start", "control_end")} == {
        "controlnet": NET, "control_scale": 1.0, "control_start": 0.0, "control_end": 1.0,
    }  # fmt: skip
    assert np.array_equal(make(api, **recalled, control=SKETCH)[0], drawn)
    # a sketch alone may guide
    assert make(api, prompt="", control=SKETCH)[1]["prompt"] == ""


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"controlnet": "../outside.safetensors"}, "controlnet: no control '../outside.safetensors' in the server's control folders; GET /api/v1/controls lists them"),
        ({"controlnet": "{outside}"}, "controlnet: no control '{outside}' in the server's control folders"),
        ({"controlnet": "escape.safetensors"}, "controlnet: no control 'escape.safetensors' in the server's control folders"),  # a link out of the folder
        ({"controlnet": "/etc/passwd"}, "controlnet: no control '/etc/passwd' in the server's control folders"),
        ({"controlnet": "missing"}, "controlnet: no control 'missing'"),
        ({"controlnet": "model.safetensors"}, "controlnet: model.safetensors: not an Imager control file"),
        ({"controlnet": ""}, "controlnet: String should have at least 1 character"),
        ({"control": "not base64!"}, "control: not base64; send the PNG/JPEG bytes base64-encoded"),
        ({"control": base64.b64encode(b"hello").decode()}, "control: "),
        ({"control": base64.b64encode(sketch(width=48)).decode()}, "control: the sketch must be square (the model draws square images), got 48x64"),
        ({"control_scale": 3}, "control_scale: Input should be less than or equal to 2"),
        ({"control_scale": -1}, "control_scale: Input should be greater than or equal to 0"),
        ({"control_start": 0.8, "control_end": 0.2}, "control_start: 0.8 is after control_end 0.2; the control acts from start to end"),
    ],
)
def test_a_control_outside_the_folders_or_a_bad_sketch_is_a_one_line_422(api, controls, request_, message):
    body = REQUEST | {"control": SKETCH} | {k: v.format(outside=controls["outside"]) if isinstance(v, str) else v for k, v in request_.items()}
    answer = api.post("/api/v1/generate", json=body)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error.startswith(message.format(outside=controls["outside"])) and "\n" not in error, error
    assert api.engine.status()["queued"] == 0 and api.engine.status()["running"] is None


@pytest.mark.parametrize("field", ["controlnet", "control_scale", "control_start", "control_end"])
def test_control_settings_without_a_sketch_are_refused(field):
    value = {"controlnet": NET, "control_scale": 0.5, "control_start": 0.5, "control_end": 0.5}[field]
    with pytest.raises(ConfigError, match=rf"^{field}: needs a sketch to follow; give one as control, or leave out {field}$"):
        check_request(parse_request(REQUEST | {field: value}), Limits())
    check_request(parse_request(REQUEST | {"control_scale": 1.0, "control_end": 1}), Limits())  # the defaults say nothing


def test_a_foreign_control_is_one_line_before_or_while_queued(api):
    # the model not loaded yet: the job fails with the reason, without the server's paths
    answer = api.post("/api/v1/generate", params={"wait": "true"}, json=REQUEST | {"control": SKETCH, "controlnet": "foreign.safetensors"}).json()
    assert answer["state"] == "failed" and "\n" not in answer["error"], answer
    assert answer["error"].startswith("controlnet: foreign.safetensors: this controlnet was trained on other base weights (sha256 ")
    assert str(api.engine.controls.folders[0]) not in answer["error"]
    assert api.get("/api/v1/history").json()["images"] == []
    # loaded: refused before it is queued
    answer = api.post("/api/v1/generate", json=REQUEST | {"control": SKETCH, "controlnet": "foreign.safetensors"})
    assert answer.status_code == 422
    assert answer.json()["error"].startswith("controlnet: foreign.safetensors: trained on another base model (weights ")


def test_a_server_without_control_folders_says_how_to_offer_them(engine, model_files, controls, tmp_path):
    assert engine.available_controls() == {"model": "workspace", "loaded": False, "default": None, "controls": []}
    with pytest.raises(ConfigError, match=r"^controlnet: this server offers no sketch controls \(start it with --control-dir DIR\)$"):
        engine.submit(REQUEST | {"control": SKETCH})
    empty = tmp_path / "empty"
    empty.mkdir()
    lone = Engine(engine.models, History(tmp_path / "h"), controls=ControlLibrary([empty]))
    with pytest.raises(ConfigError, match=r"^controlnet: the server's control folders hold no control file; train one with `imager train-control`$"):
        lone.submit(REQUEST | {"control": SKETCH})
    assert ControlLibrary([controls["folder"]], default="nope").default_name() == ADAPTER  # no such variant: the first


# --- the page ---------------------------------------------------------------------------------------
def canvas(png: bytes | None = None) -> dict:
    """The Sketchpad's value: a drawing over the white background (RGBA, as the page's canvas)."""
    image = Image.new("RGBA", (256, 256), "white") if png is None else Image.open(io.BytesIO(png)).convert("RGBA").resize((256, 256))
    return {"background": None, "layers": [], "composite": image}


def test_the_page_sends_the_sketch_and_restores_the_control_settings(api, controls):
    form = {"prompt": "red apple", "seed": 5, "steps": 3, "mode": "text", "control": canvas(sketch()), "controlnet": ADAPTER,
            "control_scale": 0.8, "control_start": 0.1, "control_end": 0.9}  # fmt: skip
    req = parse_request(ui.request_from_form(form))
    assert (req.controlnet, req.control_scale, req.control_start, req.control_end) == (ADAPTER, 0.8, 0.1, 0.9) and req.control
    assert "control" not in ui.request_from_form(form | {"control": canvas()}) and "controlnet" not in ui.request_from_form(form | {"control": None})
    last = list(ui.generate(api.engine, form, poll_s=5.0, frame_s=0.0))[-1]
    assert last.state == "done", last.error
    assert last.images[0].params["controls"][0]["control"] == ADAPTER
    params = ui.params_from_png(last.images[0].path.read_bytes(), "x.png", api.engine)
    restored, notes = ui.form_from_params(params, ["workspace"], [NET, ADAPTER])
    assert {k: restored[k] for k in ("controlnet", "control_scale", "control_start", "control_end")} == {
        "controlnet": ADAPTER, "control_scale": 0.8, "control_start": 0.1, "control_end": 0.9,
    }  # fmt: skip
    assert notes == ["sketch control: draw the sketch again (a PNG keeps its parameters, not the sketch)"] and set(restored) <= set(ui.RESTORED)
    restored, notes = ui.form_from_params(params, ["workspace"], [NET])
    assert "controlnet" not in restored and notes[0] == f"the control '{ADAPTER}' is not offered here; the selected control is kept"
    plain, _ = ui.form_from_params({k: v for k, v in params.items() if k != "controls"}, ["workspace"])
    assert {k: plain[k] for k in ui.CONTROL_DEFAULTS} == ui.CONTROL_DEFAULTS  # the last image's settings do not stay
    choices, default = ui.control_choices(api.engine, "workspace")
    assert default == NET and (f"{ADAPTER} (adapter, lines)", ADAPTER) in choices
    assert ("foreign.safetensors (controlnet, lines, trained on another model)", "foreign.safetensors") in choices
    page = ui.build_ui(api.engine)
    by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["control_section"].visible and by_id["controlnet"].value == NET
    api_info = page.get_api_info()["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in api_info["parameters"]]
    assert {"control", "controlnet", "control_scale", "control_start", "control_end"} <= set(names)
    assert all(p["parameter_has_default"] for p in api_info["parameters"])


def test_the_page_hides_the_control_without_control_folders(engine):
    page = ui.build_ui(engine)
    by_id = {b.elem_id: b for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert not by_id["control_section"].visible and by_id["controlnet"].value is None
    assert ui.control_choices(engine, None) == ([], None)


def test_imager_ui_takes_control_folders(tmp_path, write_params, model_files, controls, monkeypatch):
    from stages.app import app

    served = {}
    monkeypatch.setattr("imager.app.server.serve", lambda app, **kw: served.update(app=app))
    monkeypatch.setattr("imager.app.engine.Engine.start", lambda self, preload=False: None)
    monkeypatch.chdir(tmp_path)
    base, sr = model_files
    args = ["ui", "--params", write_params(tiny_params()), "--no-mlflow", "--api-only", "--base", base, "--sr", sr]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--control-dir", "nowhere"]])
    assert result.exit_code == 1 and result.output.strip() == "error: --control-dir: no folder nowhere"
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    assert served["app"].state.engine.controls.folders == []  # no data/control here
    (tmp_path / "data" / "control").mkdir(parents=True)
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    library = served["app"].state.engine.controls
    assert library.folders == [Path("data/control")] and library.default == "controlnet"  # params' control.default
    assert CliRunner().invoke(app, [str(a) for a in [*args, "--control-dir", controls["folder"]]]).exit_code == 0
    assert served["app"].state.engine.controls.folders == [controls["folder"]]


# --- the MLflow model ------------------------------------------------------------------------------
def test_the_pyfunc_takes_a_sketch_per_call_or_per_row(model_files, controls, one_thread):
    import pandas as pd

    model = direct_model(model_files)
    prompts = ["red apple", "blue car"]
    with pytest.raises(ConfigError, match=r"^params: control: this model was logged without a control; log one with log_cascade\(\.\.\., controls=\[FILE\]\)$"):
        model.predict(None, prompts, params={"control": SKETCH})
    plain = model.predict(None, prompts)
    model.controls = (("control0", load_control(controls["folder"] / NET, model.cascade.base.model)),)
    assert np.array_equal(model.predict(None, prompts, params={"control": SKETCH, "control_scale": 0.0}), plain)
    drawn = model.predict(None, prompts, params={"control": SKETCH})
    assert not np.array_equal(drawn[0], plain[0]) and not np.array_equal(drawn[1], plain[1])
    # a row's own sketch (bytes): that row alone, seeded seed + its index; the other rows as without it
    rows = model.predict(None, pd.DataFrame({"prompt": prompts, "control": [None, sketch()]}))
    assert np.array_equal(rows[0], plain[0])
    assert np.array_equal(rows[1], model.predict(None, ["blue car"], params={"control": SKETCH, "seed": SAMPLING.seed + 1})[0])
    assert model.predict(None, [""], params={"control": SKETCH}).shape == (1, 64, 64, 3)  # a sketch alone may guide
    with pytest.raises(ConfigError, match=r"^params: controlnet: no logged control 'control7'; this model has control0$"):
        model.predict(None, prompts, params={"control": SKETCH, "controlnet": "control7"})
    with pytest.raises(ConfigError, match=r"^params: control: a string must be base64-encoded PNG/JPEG bytes \(paths are not read\)$"):
        model.predict(None, prompts, params={"control": "/etc/passwd"})
    with pytest.raises(ConfigError, match=r"^params: control_start/control_end: the window must satisfy 0 <= start <= end <= 1"):
        model.predict(None, prompts, params={"control": SKETCH, "control_start": 0.9, "control_end": 0.1})
    with pytest.raises(ConfigError, match=r"^control \(row 2\): the sketch must be square"):
        model.predict(None, pd.DataFrame({"prompt": prompts, "control": [None, sketch(width=48)]}))


def test_a_cascade_logged_with_a_control_takes_sketches_when_loaded(model_files, controls, tmp_path, monkeypatch, mlflow_uri, one_thread):
    net = controls["folder"] / NET
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code folder
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.create_experiment(f"control-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    embed = {"encoder": "minilm", "max_length": 6}
    with mlflow.start_run(experiment_id=experiment):
        uri = StageRun(mlflow).log_cascade(*model_files, embed=embed, sampling=SAMPLING, controls=[net])
        with pytest.raises(CheckpointError, match=r"^controls: .*foreign.safetensors: this controlnet was trained on other base weights") as err:
            log_cascade(*model_files, embed=embed, sampling=SAMPLING, workdir=tmp_path / "w2", controls=[controls["folder"] / "foreign.safetensors"])
        assert "\n" not in str(err.value)
    loaded = mlflow.pyfunc.load_model(uri)
    direct = direct_model(model_files)
    direct.controls = (("control0", load_control(net, direct.cascade.base.model)),)
    prompts = ["red apple", "blue car"]
    got = loaded.predict(prompts, params={"control": SKETCH, "control_scale": 0.7})
    assert np.array_equal(got, direct.predict(None, prompts, params={"control": SKETCH, "control_scale": 0.7}))
    assert np.array_equal(loaded.predict(prompts), direct.predict(None, prompts))  # no sketch: the model as trained
    params = {p.name: p.default for p in loaded.metadata.get_params_schema().params}
    assert {k: params[k] for k in ("control", "controlnet", "control_scale", "control_start", "control_end")} == {
        "control": "", "controlnet": "", "control_scale": 1.0, "control_start": 0.0, "control_end": 1.0,
    }  # fmt: skip
    # a logged control that does not fit the base fails the load, not a call
    with pytest.raises(CheckpointError, match=r"^controls: control0: .*foreign.safetensors: this controlnet was trained on other base weights"):
        logged_controls({"controls": [{"artifact": "control0"}]}, {"control0": str(controls["folder"] / "foreign.safetensors")}, direct.cascade.base.model)

