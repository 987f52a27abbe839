"""The tutorials of docs/tutorials/ run as written: every ```bash block through bash and every
```python block in one namespace per tutorial, in order, in a project folder. A tutorial that goes
stale (a renamed option, a file that is no longer written) fails here.

The folder is one of (WHERE): ``models``, whose pipeline outputs are a tiny random cascade of the
text encoder's dimensions (the real MiniLM of params.yaml), the default; ``fresh``, the project's
real pipelines in a git + DVC project on tiny params, nothing reproduced yet (a fresh clone);
``pipeline``, a copy of that project after `dvc repro` (tests/stages/tiny_pipeline.py).

A block right after an ``<!-- not tested -->`` line is shown only (a ``yaml`` or ``text`` block
always is)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from imager.diffusion.config import ScheduleConfig
from imager.models import save_model
from imager.models.unet import UNet
from tests.conftest import REPO, tiny_params
from tests.stages import tiny_pipeline
from tests.unit.test_unet import randomized, tiny

TUTORIALS = sorted((REPO / "docs" / "tutorials").glob("*.md"))
FENCE = re.compile(r"(<!-- not tested -->\s*\n)?```(\w+)\n(.*?)\n```", re.S)
RUN = ("bash", "python")
# What each tutorial must leave behind, beyond its blocks running without an error.
def drew_its_pictures(name: str):
    """The pictures the page shows (../images/tutorials/X.png, committed) are the ones its blocks draw."""
    shown = sorted(set(re.findall(r"\.\./images/tutorials/([\w-]+\.png)", (REPO / "docs" / "tutorials" / name).read_text())))
    return lambda root: shown == sorted(p.name for p in (root / "tutorial-images").glob("*.png")) and all(
        (REPO / "docs" / "images" / "tutorials" / png).is_file() for png in shown
    )


LEAVES = {
    "how-diffusion-works.md": drew_its_pictures("how-diffusion-works.md"),
    "image-editing.md": drew_its_pictures("image-editing.md"),
    "synthetic-data.md": lambda root: len((root / "data/synthetic/manifest.jsonl").read_text().splitlines()) == 12
    and json.loads((root / "synthetic-shard.json").read_text())["kept"] == 12,
}


# Where each tutorial runs (see the module's docstring); not listed: "models".
WHERE: dict[str, str] = {}


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of the blocks to run, in order."""
    return [(lang, code) for skip, lang, code in FENCE.findall(path.read_text(encoding="utf-8")) if lang in RUN and not skip]


@pytest.fixture
def models(tmp_path) -> Path:
    """params.yaml (tiny) and data/models/{base,sr}/model.safetensors, as `make repro` leaves them."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "sampler": "ddim", **tiny_params()}))
    text = {"text_dim": 384, "pooled_dim": 384, "context_length": tiny_params()["embed"]["max_length"]}  # MiniLM's
    schedule = ScheduleConfig(name="cosine", timesteps=100).model_dump()
    for name, sr, meta in (("base", False, {"resolution": 32}), ("sr", True, {"resolution": 64, "lowres": 32, "aug_level": 0.1})):
        torch.manual_seed(0)
        model = randomized(UNet(tiny(null_embedding="learned", super_resolution=sr, **text)), int(sr))
        path = tmp_path / "data" / "models" / name / "model.safetensors"
        path.parent.mkdir(parents=True)
        save_model(model, path, extra={"schedule": schedule, "prediction": "v", **meta})
    return tmp_path


@contextlib.contextmanager
def inside(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def test_every_tutorial_has_blocks_to_run():
    assert TUTORIALS
    for path in TUTORIALS:
        assert blocks(path), f"{path.name}: no bash or python block to run"
        assert path.name in LEAVES, f"{path.name}: say in LEAVES what it must leave behind"


@pytest.fixture
def project(request, tmp_path) -> Path:
    """The folder the test's tutorial (its `path` parameter) runs in."""
    name = request.node.callspec.params["path"].name
    where = WHERE.get(name, "models")
    if where == "fresh":
        return tiny_pipeline.create(tmp_path / "project")
    if where == "pipeline":
        return tiny_pipeline.copy(request.getfixturevalue("pipeline")["project"], tmp_path / "project")
    assert where == "models", f"{name}: unknown WHERE {where!r}"
    return request.getfixturevalue("models")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_the_tutorial_runs_as_written(path, project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # runs go to the project's own mlflow.db, as on a user's machine
    env = tiny_pipeline.env()
    namespace: dict = {"__name__": "__tutorial__"}
    for i, (lang, code) in enumerate(blocks(path), start=1):
        if lang == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{path.name}, block {i}:\n{code}\n--- stderr:\n{result.stderr[-3000:]}"
        else:
            with inside(project):
                exec(compile(code, f"{path.name}, block {i}", "exec"), namespace)  # noqa: S102 - the tutorial's own code
    assert LEAVES[path.name](project), f"{path.name}: did not leave what it says"
