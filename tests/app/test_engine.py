"""The app's engine with a tiny random-weight cascade: progress and previews, Stop, the queue,
history PNGs with their parameters, seeds, limits and bad input, the model registry."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time

import mlflow
import numpy as np
import pytest
from PIL import Image

from imager.app.engine import Engine
from imager.app.history import History, NotFoundError
from imager.app.models import ModelRegistry, files_source, logged_cascades, mlflow_source
from imager.app.request import Limits, recalled
from imager.errors import ConfigError
from imager.inference.metadata import read_params, save_png
from tests.app.conftest import SAMPLING, make_engine, picture
from tests.unit.test_inference import HashEncoder

b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731


def run_job(engine: Engine, request: dict, *, on_change=None):
    """Submit and follow a job to its end; returns (job, every state seen)."""
    job = engine.submit(request)
    seen, version = [], -1
    while True:
        version = engine.wait(job, version, 30)
        state = job.describe()
        seen.append(state)
        if on_change is not None:
            on_change(job, state)
        if job.finished_state:
            return job, seen


def pixels(entry) -> np.ndarray:
    return np.asarray(Image.open(entry.path).convert("RGB"))


def test_progress_previews_and_result_with_its_parameters(engine, one_thread):
    job, seen = run_job(engine, {"prompt": "red apple", "num_images": 2, "seed": 11, "steps": 4})
    assert job.state == "done" and job.error is None
    stages = [s["progress"]["stage"] for s in seen]
    assert stages.index("base") < stages.index("sr") < stages.index("done")
    fractions = [s["progress"]["fraction"] for s in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(s["progress"]["eta_s"] is not None for s in seen)
    # One preview per denoiser call: (4 base + 3 SR) calls per image, two images.
    assert job.preview_count == 2 * (4 + 3)
    preview = Image.open(io.BytesIO(job.preview))
    assert preview.size == (64, 64)  # the last preview is the SR stage's x̂0
    assert [e.params["seed"] for e in job.results] == [11, 12]
    for entry in job.results:
        params = read_params(entry.path.read_bytes())
        assert params == entry.params
        assert params["prompt"] == "red apple" and params["steps"] == 4 and params["sampler"] == "ddim" and params["sr_steps"] == 3
        assert len(params["base_sha256"]) == 64 and params["imager_version"] and params["mode"] == "text"
        assert Image.open(entry.path).text["prompt"] == "red apple"  # also one readable chunk per parameter
    assert not np.array_equal(pixels(job.results[0]), pixels(job.results[1]))


def test_an_image_is_made_again_from_its_own_parameters(engine, one_thread):
    job, _ = run_job(engine, {"prompt": "blue car", "num_images": 2, "seed": 5})
    second = job.results[1]
    again, _ = run_job(engine, recalled(second.params))  # "use these parameters": seed 6, one image
    assert again.results[0].params["seed"] == 6
    assert np.array_equal(pixels(again.results[0]), pixels(second))
    other, _ = run_job(engine, {**recalled(second.params), "prompt": "green car"})
    assert not np.array_equal(pixels(other.results[0]), pixels(second))


def test_a_random_seed_is_drawn_and_reported(engine):
    a, b = engine.submit({"prompt": "x"}), engine.submit({"prompt": "x"})
    assert isinstance(a.request.seed, int) and a.request.seed != b.request.seed
    assert a.describe()["seed"] == a.request.seed


def test_stop_interrupts_within_one_denoiser_call_and_keeps_finished_images(engine, one_thread):
    at_stop = {}

    def stop_in_second_image(job, state):
        if not at_stop and state["progress"]["image"] == 1 and state["progress"]["stage"] == "base" and state["progress"]["step"] >= 2:
            at_stop["previews"] = job.preview_count
            engine.cancel(job.id)

    job, seen = run_job(engine, {"prompt": "red apple", "num_images": 3, "steps": 40, "preview_every": 1}, on_change=stop_in_second_image)
    assert job.state == "cancelled" and seen[-1]["state"] == "cancelled"
    # The worker may have finished the call in flight when the flag was set, not another one.
    assert job.preview_count <= at_stop["previews"] + 1
    assert len(job.results) == 1  # the first image, whole; the second was dropped
    files = sorted(engine.history.folder.iterdir())
    assert [f.name for f in files] == [job.results[0].name]  # no temporary or partial file left
    Image.open(files[0]).load()


def test_the_queue_reports_positions_and_a_queued_job_can_be_cancelled(engine, one_thread):
    first = engine.submit({"prompt": "a", "steps": 30})
    second, third = engine.submit({"prompt": "b"}), engine.submit({"prompt": "c"})
    place = second.position
    assert place >= 1 and third.position == place + 1  # behind the first (queued or already running)
    engine.cancel(second.id)
    assert second.state == "cancelled" and second.position == 0
    assert third.position in (place, place - 1)  # moved up (and once more if the first has started meanwhile)
    for job in (first, third):
        version = -1
        while not job.finished_state:
            version = engine.wait(job, version, 30)
    assert first.state == third.state == "done" and second.results == []
    assert engine.status()["completed"] >= 2


def test_concurrent_submitters_each_get_their_own_images(engine, one_thread):
    results: dict[int, object] = {}

    def client(i: int) -> None:
        results[i] = run_job(engine, {"prompt": f"emoji {i}", "seed": i, "steps": 2})[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, job in results.items():
        assert job.state == "done" and job.results[0].params["prompt"] == f"emoji {i}" and job.results[0].params["seed"] == i
    assert len({e.name for job in results.values() for e in job.results}) == 4


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"prompt": ""}, "prompt: is empty"),
        ({"prompt": "x" * 501}, "prompt: 501 characters, more than the limit of 500"),
        ({"prompt": "x", "steps": 201}, "steps: 201 is more than the limit of 200"),
        ({"prompt": "x", "num_images": 9}, "num_images: 9 is more than the limit of 8"),
        ({"prompt": "x", "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"prompt": "x", "sampler": "warp"}, "sampler: input should be 'ddpm', 'ddim'"),
        ({"prompt": "x", "colour": "red"}, "colour: unknown field"),
        ({"prompt": "x", "mask": b64(b"x")}, "mask: needs an image to edit"),
        ({"prompt": "x", "mode": "inpaint", "image": "abc"}, "mask: mode 'inpaint' needs a mask"),
        ({"prompt": "x", "image": "not base64!"}, "image: not base64"),
        ({"prompt": "x", "image": b64(b"GIF89a not really")}, "image:"),
        ({"prompt": "x", "model": "nope"}, "model: no model 'nope'"),
    ],
)
def test_bad_requests_fail_with_one_line_naming_the_field(engine, request_, message):
    with pytest.raises(ConfigError) as err:
        engine.submit(request_)
    assert str(err.value).startswith(message) or message in str(err.value)
    assert "\n" not in str(err.value)
    assert engine.status()["queued"] == 0


def test_uploads_are_checked_as_images(model_files, tmp_path):
    engine = make_engine(model_files, tmp_path, Limits(upload_bytes=200_000))
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big, format="PNG")
    with pytest.raises(ConfigError, match=r"image: 0\.\d MB, more than the limit of 0\.2 MB"):
        engine.submit({"prompt": "x", "image": b64(big.getvalue())})
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")  # a small file, 900 Mpx decoded
    assert len(bomb.getvalue()) < 200_000
    with pytest.raises(ConfigError, match="image: .*(pixels|decompression)"):
        engine.submit({"prompt": "x", "image": b64(bomb.getvalue())})
    assert engine.submit({"prompt": "x", "image": "data:image/png;base64," + b64(picture())}).request.resolved_mode() == "img2img"
    engine.close()


def test_queue_limit(model_files, tmp_path):
    engine = make_engine(model_files, tmp_path, Limits(queue=2))
    engine._worker = threading.Thread()  # a worker that never takes a job: the queue fills
    engine._worker.is_alive = lambda: True
    engine.submit({"prompt": "a"})
    engine.submit({"prompt": "b"})
    with pytest.raises(ConfigError, match=r"the queue is full \(2 requests waiting\)"):
        engine.submit({"prompt": "c"})


def test_history_serves_only_its_own_files(tmp_path):
    history = History(tmp_path / "history")
    entry = history.save(np.zeros((4, 4, 3), np.uint8), {"prompt": "p"}, job="j", index=0)
    (tmp_path / "secret.png").write_bytes(b"x")
    assert history.path(entry.name) == entry.path
    for name in ("../secret.png", "..", "/etc/passwd", "a/b.png", ".hidden.png", "x.txt", "%2e%2e.png"):
        with pytest.raises(NotFoundError):
            history.path(name)
    (history.folder / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(NotFoundError):
        history.path("link.png")
    assert [e.name for e in history.entries()] == [entry.name]  # the link is not a history image


def test_png_parameters_round_trip_and_foreign_pngs_are_refused(tmp_path):
    params = {"prompt": "red apple, ünïcode", "seed": 3, "guidance": 4.5, "use_sr": False, "negative_prompt": ""}
    path = save_png(tmp_path / "a.png", np.full((8, 8, 3), 7, np.uint8), params)
    assert read_params(path) == params
    assert Image.open(path).text["seed"] == "3" and np.asarray(Image.open(path))[0, 0, 0] == 7
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(ConfigError, match="carries no Imager parameters"):
        read_params(plain.read_bytes(), "upload")
    with pytest.raises(ConfigError, match="not a readable PNG"):
        read_params(b"hello", "upload")
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    with pytest.raises(ConfigError, match="is a JPEG image"):
        read_params(jpeg.getvalue(), "upload")


def test_registry_loads_lazily_and_caches(model_files):
    loads = []

    def loader(source):
        loads.append(source.id)
        return source.id

    base, sr = model_files
    registry = ModelRegistry([files_source(base, sr), files_source(base, None, id="other")], loader=loader, cache_size=1)
    assert loads == [] and registry.default_id == "workspace"
    registry.load(None), registry.load("workspace")
    assert loads == ["workspace"]
    registry.load("other"), registry.load("workspace")  # a cache of one: the first was dropped
    assert loads == ["workspace", "other", "workspace"]
    with pytest.raises(NotFoundError, match="model: no model 'x'"):
        registry.load("x")
    assert mlflow_source("abc123").uri == "runs:/abc123/cascade"


def test_registry_lists_and_loads_the_cascades_logged_to_mlflow(model_files, tmp_path, monkeypatch, mlflow_uri):
    from imager.serving import log_cascade

    monkeypatch.setattr("imager.text.load_text_encoder", lambda embed: HashEncoder())
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading prepends the model's code folder
    mlflow.set_tracking_uri(mlflow_uri)
    experiment = mlflow.create_experiment(f"ui-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as logged:
        mlflow.log_metrics({"fid_evaluator": 2.5, "r_precision_evaluator": 0.5, "loss": 1.0})
        info = log_cascade(*model_files, embed={"encoder": "minilm", "max_length": 6}, sampling=SAMPLING, workdir=tmp_path / "work")
    listed = {s.uri: s for s in logged_cascades()}
    source = listed[info.model_uri]
    assert source.run_id == logged.info.run_id and source.metrics == {"fid_evaluator": 2.5, "r_precision_evaluator": 0.5}
    assert f"ui-{tmp_path.name}" in source.label and "fid 2.5" in source.label
    registry = ModelRegistry([], search_mlflow=True)
    assert source.id in [s.id for s in registry.list()]
    engine = Engine(registry, History(tmp_path / "history"))
    job, _ = run_job(engine, {"prompt": "red apple", "seed": 1, "model": source.id})
    assert job.state == "done", job.error
    assert job.results[0].params["mlflow_run_id"] == logged.info.run_id and job.results[0].params["model_uri"] == info.model_uri
    engine.close()


def test_preload_loads_the_default_model_before_any_request(model_files, tmp_path):
    engine = make_engine(model_files, tmp_path)
    assert engine.models.loaded() == []
    engine.start(preload=True)
    deadline = time.monotonic() + 60
    while not engine.models.loaded() and time.monotonic() < deadline:  # no request was made
        time.sleep(0.05)
    assert engine.models.loaded() == ["workspace"]
    engine.close()
