"""LoRA adapters in the app and the MLflow model, on the tiny cascade: the API lists the adapters of
the server's folders and whether each fits the model; a request uses them by name (weight 0 is the
model without them, bit for bit; another job's adapters never change an image); nothing outside the
folders is read; a foreign adapter is one line; the PNG records them and gives them back. The
pyfunc takes a ``lora`` param and carries adapters logged with it."""

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
from PIL import Image
from typer.testing import CliRunner

from imager.app import ui
from imager.app.adapters import AdapterLibrary
from imager.app.engine import Engine
from imager.app.history import History
from imager.app.models import LoadedModel, ModelRegistry, files_source
from imager.app.request import parse_request
from imager.app.server import create_app
from imager.errors import CheckpointError, ConfigError
from imager.inference import Cascade
from imager.inference.adapters import AdapterSpec
from imager.inference.metadata import file_sha256, read_params
from imager.serving import CascadeModel, log_cascade
from tests.app.conftest import SAMPLING, Server, tiny_loader, write_models
from tests.conftest import tiny_params
from tests.unit.test_adapters_cli import make_adapter
from tests.unit.test_inference import HashEncoder

REQUEST = {"prompt": "red apple", "seed": 5, "steps": 3}


@pytest.fixture(scope="module")
def loras(model_files, tmp_path_factory) -> dict:
    """An adapter folder (two base adapters, one SR, one of another model, a model file and a link
    out of the folder) and an adapter outside it."""
    root = tmp_path_factory.mktemp("loras")
    folder = root / "finetune"
    (folder / "run1").mkdir(parents=True)
    base, sr = model_files
    other, _ = write_models(root / "other", seed=3)
    make_adapter(base, folder / "a.safetensors", seed=1)
    make_adapter(base, folder / "run1" / "b.safetensors", seed=2)
    make_adapter(sr, folder / "up.safetensors", stage="sr", seed=4)
    make_adapter(other, folder / "foreign.safetensors", seed=1)
    shutil.copy(base, folder / "model.safetensors")  # a model, not an adapter: not listed
    outside = make_adapter(base, root / "outside.safetensors", seed=9)
    os.symlink(outside, folder / "escape.safetensors")
    return {"folder": folder, "outside": outside, "root": root}


def adapter_engine(model_files, loras, tmp_path) -> Engine:
    base, sr = model_files
    registry = ModelRegistry([files_source(base, sr, label="tiny")], loader=tiny_loader)
    return Engine(registry, History(tmp_path / "history"), adapters=AdapterLibrary([loras["folder"]]))


@pytest.fixture
def api(model_files, loras, tmp_path, one_thread):
    engine = adapter_engine(model_files, loras, tmp_path)
    with Server(create_app(engine, ui=False)) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.engine = engine  # type: ignore[attr-defined]
        yield client
    engine.close()


def make(api, **request) -> tuple[np.ndarray, dict, bytes]:
    """The pixels, parameters and PNG of one finished job."""
    answer = api.post("/api/v1/generate", params={"wait": "true"}, json=REQUEST | request)
    body = answer.json()
    assert answer.status_code == 200 and body["state"] == "done", body
    png = base64.b64decode(body["images"][0]["png_base64"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), read_params(png), png


def run(engine: Engine, request: dict):
    """Submit and wait for a job's end."""
    job = engine.submit(request)
    version = -1
    while not job.finished_state:
        version = engine.wait(job, version, 30)
    return job


def test_the_api_lists_the_adapters_of_the_folders_and_which_fit_the_model(api):
    listed = api.get("/api/v1/adapters").json()
    assert listed["model"] == "workspace" and listed["loaded"] is False
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert sorted(by_name) == ["a.safetensors", "foreign.safetensors", "run1/b.safetensors", "up.safetensors"]  # no model, no link out
    a = by_name["a.safetensors"]
    assert (a["stage"], a["rank"], a["scale"], a["fits"]) == ("base", 4, 1.0, None)  # the model is not loaded yet
    assert a["size"] == (api.engine.adapters.folders[0] / "a.safetensors").stat().st_size and len(a["base_sha256"]) == 12
    assert by_name["up.safetensors"]["stage"] == "sr"
    make(api)
    fits = {a["name"]: a["fits"] for a in api.get("/api/v1/adapters", params={"model": "workspace"}).json()["adapters"]}
    assert fits == {"a.safetensors": True, "foreign.safetensors": False, "run1/b.safetensors": True, "up.safetensors": True}
    assert api.get("/api/v1/adapters", params={"model": "nope"}).status_code == 404


def test_a_request_with_adapters_differs_and_weight_zero_is_the_model_itself(api, loras):
    plain, plain_params, _ = make(api)
    assert "adapters" not in plain_params
    zero, zero_params, _ = make(api, lora=["a.safetensors:0"])
    assert zero.tobytes() == plain.tobytes() and zero_params["adapters"][0]["scale"] == 0
    styled, _, _ = make(api, lora=["a.safetensors"])
    assert not np.array_equal(styled, plain)
    both, both_params, both_png = make(api, lora=["a.safetensors:0.8", "run1/b.safetensors:0.5", "up.safetensors:1.5"])
    assert not np.array_equal(both, styled)
    assert [(a["file"], a["scale"], a["stage"]) for a in both_params["adapters"]] == [
        ("a.safetensors", 0.8, "base"), ("run1/b.safetensors", 0.5, "base"), ("up.safetensors", 1.5, "sr"),
    ]  # fmt: skip
    assert both_params["adapters"][0]["sha256"] == file_sha256(loras["folder"] / "a.safetensors")
    # the next job without adapters is the model itself again; a full path inside the folder is the same adapter
    assert make(api)[0].tobytes() == plain.tobytes()
    assert np.array_equal(make(api, lora=[str(loras["folder"] / "a.safetensors")])[0], styled)
    # the PNG gives the adapters back as the request field
    recalled = api.post("/api/v1/params", content=both_png).json()["request"]
    assert recalled["lora"] == ["a.safetensors:0.8", "run1/b.safetensors:0.5", "up.safetensors:1.5"]
    assert np.array_equal(make(api, **{k: recalled[k] for k in ("seed", "steps", "lora")})[0], both)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (["../outside.safetensors"], "lora: no adapter '../outside.safetensors' in the server's adapter folders; GET /api/v1/adapters lists them"),
        (["{outside}"], "lora: no adapter '{outside}' in the server's adapter folders"),
        (["escape.safetensors"], "lora: no adapter 'escape.safetensors' in the server's adapter folders"),  # a link out of the folder
        (["/etc/passwd"], "lora: no adapter '/etc/passwd' in the server's adapter folders"),
        (["missing.safetensors"], "lora: no adapter 'missing.safetensors'"),
        (["model.safetensors"], "lora: model.safetensors: not an Imager LoRA adapter"),
        (["a.safetensors:500"], "lora: 'a.safetensors:500': the scale must be a number in [-100, 100]"),
        (["a.safetensors:nan"], "lora: 'a.safetensors:nan': the scale must be a number in [-100, 100]"),
        (["a.safetensors"] * 17, "lora: List should have at most 16 items"),
        ([""], "lora.0: String should have at least 1 character"),
    ],
)
def test_an_adapter_outside_the_folders_or_a_bad_entry_is_a_one_line_422(api, loras, lora, message):
    answer = api.post("/api/v1/generate", json=REQUEST | {"lora": [s.format(outside=loras["outside"]) for s in lora]})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error.startswith(message.format(outside=loras["outside"])) and "\n" not in error, error
    assert api.engine.status()["queued"] == 0 and api.engine.status()["running"] is None


def test_a_foreign_adapter_is_one_line_before_or_while_queued(api, model_files, loras, tmp_path):
    # the model not loaded yet: the job fails with the reason
    answer = api.post("/api/v1/generate", params={"wait": "true"}, json=REQUEST | {"lora": ["foreign.safetensors"]}).json()
    assert answer["state"] == "failed" and "\n" not in answer["error"], answer
    assert answer["error"].startswith("lora: ") and "this adapter was trained on another base model" in answer["error"]
    assert api.get("/api/v1/history").json()["images"] == []
    # loaded: refused before it is queued
    answer = api.post("/api/v1/generate", json=REQUEST | {"lora": ["foreign.safetensors"]})
    assert answer.status_code == 422
    assert answer.json()["error"].startswith("lora: foreign.safetensors: trained on another base model (weights ")
    # an SR adapter on a model without SR
    base, _ = model_files
    loader = lambda source: LoadedModel(source, Cascade.load(source.base), HashEncoder(), SAMPLING, {})  # noqa: E731
    lone = Engine(ModelRegistry([files_source(base, None)], loader=loader), History(tmp_path / "h2"), adapters=AdapterLibrary([loras["folder"]]))
    job = run(lone, REQUEST | {"lora": ["up.safetensors"]})
    assert job.state == "failed" and job.error == "lora: this adapter is for the super-resolution model, and the cascade has none"
    with pytest.raises(ConfigError, match=r"^lora: up.safetensors: adapts the super-resolution model, and the model 'workspace' has none$"):
        lone.submit(REQUEST | {"lora": ["up.safetensors"]})  # now that the model is loaded
    lone.close()


def test_a_server_without_adapter_folders_says_how_to_offer_them(model_files, tmp_path):
    base, sr = model_files
    engine = Engine(ModelRegistry([files_source(base, sr)], loader=tiny_loader), History(tmp_path / "h"))
    assert engine.available_adapters()["adapters"] == []
    with pytest.raises(ConfigError, match=r"^lora: this server offers no LoRA adapters \(start it with --lora-dir DIR\)$"):
        engine.submit(REQUEST | {"lora": ["a.safetensors"]})


def test_the_page_sends_the_adapters_and_restores_them(api, loras):
    form = {"prompt": "red apple", "seed": 5, "steps": 3, "mode": "text", "lora": " a.safetensors:0.8 , run1/b.safetensors,"}
    assert parse_request(ui.request_from_form(form)).lora == ["a.safetensors:0.8", "run1/b.safetensors"]
    assert "lora" not in ui.request_from_form(form | {"lora": " "})
    last = list(ui.generate(api.engine, form, poll_s=5.0, frame_s=0.0))[-1]
    assert last.state == "done", last.error
    params = ui.params_from_png(last.images[0].path.read_bytes(), "x.png", api.engine)
    restored, _ = ui.form_from_params(params, ["workspace"])
    assert restored["lora"] == "a.safetensors:0.8, run1/b.safetensors:1" and "lora" in ui.RESTORED
    assert ui.form_from_params({k: v for k, v in params.items() if k != "adapters"}, ["workspace"])[0]["lora"] == ""  # emptied
    note = ui.adapter_note(api.engine, "workspace")
    assert "`a.safetensors` (base, rank 4)" in note and "`foreign.safetensors` (base, rank 4, trained on another model)" in note
    page = ui.build_ui(api.engine)
    api_info = page.get_api_info()["named_endpoints"]["/generate"]
    assert "lora" in [p["parameter_name"] for p in api_info["parameters"]] and all(p["parameter_has_default"] for p in api_info["parameters"])


def test_imager_ui_takes_adapter_folders(tmp_path, write_params, model_files, loras, monkeypatch):
    from stages.app import app

    served = {}
    monkeypatch.setattr("imager.app.server.serve", lambda app, **kw: served.update(app=app))
    monkeypatch.setattr("imager.app.engine.Engine.start", lambda self, preload=False: None)
    monkeypatch.chdir(tmp_path)
    base, sr = model_files
    args = ["ui", "--params", write_params(tiny_params()), "--no-mlflow", "--api-only", "--base", base, "--sr", sr]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--lora-dir", "nowhere"]])
    assert result.exit_code == 1 and result.output.strip() == "error: --lora-dir: no folder nowhere"
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    assert served["app"].state.engine.adapters.folders == []  # no data/finetune here
    (tmp_path / "data" / "finetune").mkdir(parents=True)
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    assert served["app"].state.engine.adapters.folders == [Path("data/finetune")]
    assert CliRunner().invoke(app, [str(a) for a in [*args, "--lora-dir", loras["folder"]]]).exit_code == 0
    assert served["app"].state.engine.adapters.folders == [loras["folder"]]


# --- the MLflow model ------------------------------------------------------------------------------
def direct_model(model_files) -> CascadeModel:
    model = CascadeModel()
    model.cascade, model.encoder, model.sampling = Cascade.load(*model_files), HashEncoder(), SAMPLING
    return model


def test_the_pyfunc_takes_adapters_per_call(model_files, loras, one_thread):
    model = direct_model(model_files)
    a, up = loras["folder"] / "a.safetensors", loras["folder"] / "up.safetensors"
    plain = model.predict(None, ["red apple", "blue car"])
    assert np.array_equal(model.predict(None, ["red apple", "blue car"], params={"lora": f"{a}:0"}), plain)
    styled = model.predict(None, ["red apple", "blue car"], params={"lora": f"{a}:1, {up}:0.5"})
    assert not np.array_equal(styled[0], plain[0]) and not np.array_equal(styled[1], plain[1])
    assert np.array_equal(model.predict(None, ["red apple", "blue car"], params={"lora": ""}), plain)  # the next call without them
    with pytest.raises(CheckpointError, match=r"^params: lora: .*foreign.safetensors: this adapter was trained on another base model") as err:
        model.predict(None, ["red apple"], params={"lora": str(loras["folder"] / "foreign.safetensors")})
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"^params: lora: .*a.safetensors:x1: adapter not found$"):  # not a weight: part of the name
        model.predict(None, ["red apple"], params={"lora": f"{a}:x1"})
    with pytest.raises(ConfigError, match=r"^params: lora: '.*': the scale must be a number in \[-100, 100\]"):
        model.predict(None, ["red apple"], params={"lora": f"{a}:101"})


def test_a_cascade_logged_with_adapters_applies_them_when_loaded(model_files, loras, tmp_path, monkeypatch, mlflow_uri, one_thread):
    a, up = loras["folder"] / "a.safetensors", loras["folder"] / "up.safetensors"
    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code folder
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.create_experiment(f"lora-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    embed = {"encoder": "minilm", "max_length": 6}
    with mlflow.start_run(experiment_id=experiment):
        info = log_cascade(*model_files, embed=embed, sampling=SAMPLING, workdir=tmp_path / "work", adapters=[AdapterSpec(a, 0.8), AdapterSpec(up, 1.5)])
        with pytest.raises(CheckpointError, match=r"^adapters: .*foreign.safetensors: this adapter was trained on another base model"):
            log_cascade(*model_files, embed=embed, sampling=SAMPLING, workdir=tmp_path / "w2", adapters=[AdapterSpec(loras["folder"] / "foreign.safetensors")])
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    direct = direct_model(model_files)
    prompts = ["red apple", "blue car"]
    got = loaded.predict(prompts)
    assert np.array_equal(got, direct.predict(None, prompts, params={"lora": f"{a}:0.8, {up}:1.5"}))
    assert not np.array_equal(got, direct.predict(None, prompts))
    assert np.array_equal(loaded.predict(prompts, params={"lora": "lora0:0, lora1:0"}), direct.predict(None, prompts))  # the logged ones re-weighted
    assert np.array_equal(loaded.predict(prompts, params={"lora": "lora1:0"}), direct.predict(None, prompts, params={"lora": f"{a}:0.8"}))
    requirements = Path(mlflow.pyfunc.get_model_dependencies(info.model_uri)).read_text()
    assert "peft" in requirements
    # the app serves it with its adapters on: the files model with the same adapters asked for
    registry = ModelRegistry([], search_mlflow=True)
    source = next(s for s in registry.list() if s.uri == info.model_uri)
    served = Engine(registry, History(tmp_path / "history"), adapters=AdapterLibrary([loras["folder"]]))
    job = run(served, {"prompt": "red apple", "seed": 1, "model": source.id})
    assert job.state == "done", job.error
    assert "adapters" not in job.results[0].params  # the model's own, as its model_uri says
    files = adapter_engine(model_files, loras, tmp_path / "files")
    same = run(files, {"prompt": "red apple", "seed": 1, "lora": ["a.safetensors:0.8", "up.safetensors:1.5"]})
    plain = run(files, {"prompt": "red apple", "seed": 1})
    pixels = [np.asarray(Image.open(j.results[0].path).convert("RGB")) for j in (job, same, plain)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    served.close()
    files.close()
