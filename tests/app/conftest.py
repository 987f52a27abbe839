"""A tiny random-weight cascade (32 px base, 64 px SR, 3 steps) behind the app's engine.

The models are written as real model files (with their sampling metadata) and loaded through the
registry's own file loader; only the text encoder is the tests' stand-in (HashEncoder), so nothing
is downloaded and every image depends on the prompt.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imager.app.engine import Engine
from imager.app.history import History
from imager.app.models import LoadedModel, ModelRegistry, ModelSource, files_source
from imager.app.request import Limits
from imager.diffusion import ScheduleConfig
from imager.inference import Cascade, CascadeSampling, SRSampling, StageSampling
from imager.inference.metadata import file_sha256
from imager.models import UNet, save_model
from tests.unit.test_inference import HashEncoder
from tests.unit.test_unet import randomized, tiny

BASE, SR = 32, 64
SAMPLING = CascadeSampling(sampler="ddim", base=StageSampling(steps=3, guidance=3.0), sr=SRSampling(steps=3, guidance=1.0), seed=0, batch_size=4)


def write_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    schedule = ScheduleConfig(name="cosine", timesteps=100).model_dump()
    paths = []
    for name, sr, meta in (("base", False, {"resolution": BASE}), ("sr", True, {"resolution": SR, "lowres": BASE, "aug_level": 0.1})):
        torch.manual_seed(seed)
        model = randomized(UNet(tiny(null_embedding="learned", super_resolution=sr)), seed + sr)
        path = folder / f"{name}.safetensors"
        save_model(model, path, extra={"schedule": schedule, "prediction": "v", **meta})
        paths.append(path)
    return paths[0], paths[1]


def tiny_loader(source: ModelSource) -> LoadedModel:
    cascade = Cascade.load(source.base, source.sr)
    identity = {"base_sha256": file_sha256(source.base), "sr_sha256": file_sha256(source.sr)}
    return LoadedModel(source, cascade, HashEncoder(), SAMPLING, identity)


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


def make_engine(model_files, folder: Path, limits: Limits | None = None, **registry) -> Engine:
    base, sr = model_files
    sources = [files_source(base, sr, label="tiny")]
    return Engine(ModelRegistry(sources, loader=tiny_loader, **registry), History(folder / "history"), limits or Limits())


@pytest.fixture
def engine(model_files, tmp_path):
    eng = make_engine(model_files, tmp_path)
    yield eng
    eng.close()


def picture(seed: int = 0, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def hole(size: int = 48) -> bytes:
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def job_ending_at_first_snapshot(engine: Engine):
    """A queued job that the engine finishes right after its first snapshot is taken (as the worker
    may at any moment); the engine has no worker, so nothing else changes the job."""
    import threading

    engine._worker = threading.Thread()  # no worker: the job is finished by its snapshot
    engine._worker.is_alive = lambda: True
    job = engine.submit({"prompt": "red apple"})
    snapshot = job.describe

    def finishing_describe():
        state = snapshot()
        if job.state == "queued":
            engine._finish(job, "done")
        return state

    job.describe = finishing_describe
    return job
