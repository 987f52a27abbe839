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
import sqlite3
import subprocess
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


def served_its_requests(root: Path) -> bool:
    """web-app.md: the server made the images of each request in its history (none of the stopped
    job), the files fetched through the API are those PNGs, and it drew its pictures."""
    from imager.inference.metadata import read_params

    made = sorted((read_params(png)["prompt"], read_params(png)["mode"]) for png in (root / "outputs/history").glob("*.png"))
    asked = sorted([("red apple", "text"), ("green apple", "inpaint"), ("blue car", "text"), ("blue car", "text"), ("red car", "img2img")])
    fetched = read_params(root / "car.png")["seed"] == 5 and read_params(root / "red-car.png")["strength"] == 0.6
    return made == asked and fetched and drew_its_pictures("web-app.md")(root)


def made_its_first_images(root: Path) -> bool:
    """quickstart.md: `dvc repro` locked every stage of dvc.yaml, and `imager generate` wrote
    heart.png and heart-0.png ... heart-3.png at the SR model's resolution."""
    from PIL import Image

    stages, locked = (yaml.safe_load((root / name).read_text())["stages"] for name in ("dvc.yaml", "dvc.lock"))
    side = yaml.safe_load((root / "params.yaml").read_text())["train_sr"]["resolution"]
    pngs = ["heart.png", *(f"heart-{i}.png" for i in range(4))]
    return set(stages) == set(locked) and all((root / png).is_file() and Image.open(root / png).size == (side, side) for png in pngs)


def compared_two_experiments(root: Path) -> bool:
    """experiments.md: the evaluate runs of both experiments in the project's MLflow store, the
    sweep plots of both, an image from the ddim run's MLflow model, each experiment a branch."""
    from PIL import Image

    query = (
        "SELECT e.value FROM tags e JOIN tags s ON e.run_uuid = s.run_uuid"
        " WHERE e.key = 'imager.dvc_exp_name' AND s.key = 'imager.stage' AND s.value = 'evaluate'"
    )
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db:
        evaluated = {name for (name,) in db.execute(query)}
    branch = subprocess.run(["git", "show", "sampler-ddim:params.yaml"], cwd=root, capture_output=True, text=True).stdout
    side = yaml.safe_load((root / "params.yaml").read_text())["train_sr"]["resolution"]
    plots, png = root / "sweep-plots" / "index.html", root / "heart-from-mlflow.png"
    return (
        evaluated == {"ddim", "slow-lr"}
        and yaml.safe_load(branch or "{}").get("sampler") == "ddim"
        and plots.is_file()
        and all(f'"rev": "{rev}"' in plots.read_text() for rev in ("HEAD", "ddim", "slow-lr"))
        and png.is_file()
        and Image.open(png).size == (side, side)
    )


def stages_tracked(root: Path) -> list[str]:
    """The stage of every MLflow run in the project's own store: one run per stage that ran."""
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db:
        return [stage for (stage,) in db.execute("SELECT value FROM tags WHERE key = 'imager.stage'")]


def up_to_date(root: Path, dvcfile: str) -> bool:
    return "Data and pipelines are up to date" in tiny_pipeline.sh(root, "dvc", "status", dvcfile)


def same_pixels(root: Path, a: str, b: str) -> bool:
    from PIL import Image

    return Image.open(root / a).tobytes() == Image.open(root / b).tobytes()


def fine_tuned(root: Path) -> bool:
    """fine-tuning.md: finetune/dvc.yaml ran its data stages, the full fine-tune, an adapter per rank
    and their evaluation on the default pipeline's models (train_base not rerun), and is up to date;
    the adapters are smaller than the full fine-tune in rank order and the main one at scale 0 is the
    base model; the hearts drawn record their adapters, and weight 0 gave the base model's."""
    from imager.inference.metadata import read_params

    cfg = yaml.safe_load((root / "params.yaml").read_text())["finetune"]
    main, ranks = cfg["lora"]["lora"]["rank"], sorted([cfg["lora"]["lora"]["rank"], *cfg["extra_ranks"]])
    report = json.loads((root / "reports" / "finetune.json").read_text())
    sizes = [report[f"lora_r{r}.trainable_parameters"] for r in ranks] + [report["full.trainable_parameters"]]
    locked = yaml.safe_load((root / "finetune" / "dvc.lock").read_text())["stages"]
    data = {f"{stage}@{cfg['dataset']}" for stage in ("download", "shard", "embed")}
    tracked = stages_tracked(root)
    outs = [f"data/datasets/{cfg['dataset']}/shards/index.json", "data/finetune/base/model.safetensors", "heart.png", "heart-full.png"]
    outs += [f"data/finetune/lora/rank-{r}/adapter.safetensors" for r in ranks] + [f"heart-rank-{r}.png" for r in ranks]
    return (
        set(locked) == data | {"finetune", "train_lora", "evaluate_finetune"}
        and data | {"finetune-base", "evaluate-finetune"} | {f"train-lora@r{r}" for r in ranks} <= set(tracked)
        and tracked.count("train-base") == 1  # the default pipeline's models, not trained again
        and up_to_date(root, "finetune/dvc.yaml")
        and all((root / out).is_file() for out in outs)
        and report[f"lora_r{main}.scale0_equals_base"] is True
        and sizes == sorted(set(sizes))  # rank 1 < rank 2 < every weight
        and same_pixels(root, "heart.png", "heart-off.png")
        and [adapter["scale"] for adapter in read_params(root / "heart-two.png")["adapters"]] == [0.5, 0.5]
    )


def controlled(root: Path) -> bool:
    """sketch-control.md: control/dvc.yaml trained each variant (after the paired line art's data
    stages) and evaluated them on the default pipeline's models (train_base not rerun), and is up to
    date; the report holds every row, the adapter smaller than the ControlNet, and each evaluated
    scale; the images drawn record their controls, and scale 0 gave the base model's."""
    from imager.inference.metadata import read_params

    cfg = yaml.safe_load((root / "params.yaml").read_text())["control"]
    report = json.loads((root / "reports" / "control.json").read_text())
    locked = yaml.safe_load((root / "control" / "dvc.lock").read_text())["stages"]
    tracked = stages_tracked(root)
    ran = {f"train-control@{v}" for v in cfg["variants"]} | {"evaluate-control"} | {f"{s}@{cfg['pairs']}" for s in ("download", "shard")}
    outs = [f"data/control/{v}/control.safetensors" for v in cfg["variants"]] + ["sketch.png", "apple-lines.png", "ball.png", "ball-controlnet.png"]
    return (
        set(locked) == {f"train_control@{v}" for v in cfg["variants"]} | {"evaluate_control"}
        and ran <= set(tracked)
        and tracked.count("train-base") == 1  # the default pipeline's models, not trained again
        and up_to_date(root, "control/dvc.yaml")
        and all((root / out).is_file() for out in outs)
        and {"text_only", "sdedit", "real", "scales", *cfg["variants"]} <= set(report)
        and report["adapter"]["parameters"] < report["controlnet"]["parameters"]
        and set(report["scales"]) == {f"{scale:g}" for scale in cfg["evaluate"]["scales"]}  # "0", "1"
        and same_pixels(root, "ball-text.png", "ball-off.png")
        and read_params(root / "ball-controlnet.png")["controls"][0]["arch"] == "controlnet"
        and [(c["sketch"], c["scale"]) for c in read_params(root / "apple-two.png")["controls"]] == [("apple-lines.png", 1.0), ("stalk.png", 0.5)]
    )


def experiment_reports(root: Path, report: str) -> list[dict]:
    """reports/REPORT of each `dvc exp run` of the project (its experiment commits), oldest first."""
    git = ["git", "for-each-ref", "--sort=committerdate", "--format=%(refname)", "refs/exps/"]
    refs = [ref for ref in tiny_pipeline.sh(root, *git).split() if not ref.startswith("refs/exps/exec/")]
    return [json.loads(tiny_pipeline.sh(root, "git", "show", f"{ref}:reports/{report}")) for ref in refs]


def trained_on_its_own_data(root: Path) -> bool:
    """your-own-data.md: three experiments, on the folder (trained), the URL list and the HF dataset,
    each report counting the flawed entries it was given by reason; the fetch cache filled; the
    images drawn by the models trained on the folder."""
    from imager.inference.metadata import read_params
    from imager.io import sha256_bytes

    download, shard = experiment_reports(root, "download.json"), experiment_reports(root, "shard.json")
    base = sha256_bytes((root / "data/models/base/model.safetensors").read_bytes())
    bad_urls = {"checksum_mismatch": 1, "duplicate_url": 1, "http_404": 1, "not_an_image": 1}
    return (
        [d["source"] for d in download] == ["folder", "urls", "hf"]
        and download[0]["skipped_by_reason"] == {"no_caption": 1} and shard[0]["skipped_by_reason"] == {"truncated": 1}
        and download[1]["skipped_by_reason"] == bad_urls and len(list((root / "data/cache/fetch").glob("*.data"))) == download[1]["kept"]
        and download[2]["skipped"] == 0 and json.loads((root / "reports/embed.json").read_text())["count"] == download[2]["kept"] > 0
        and all(read_params(root / f"red-circle-{i}.png")["base_sha256"] == base for i in range(4))
    )


def same_bytes(*files: Path) -> bool:
    return len({f.read_bytes() for f in files}) == 1


def trained_and_sharded_in_parallel(root: Path) -> bool:
    """gpus-and-clusters.md: two processes, two "nodes" and an interrupted-then-resumed run trained
    the same weights, one node alone wrote, the resumed run did resume; shard and embed on Ray (a
    local one, and a `ray start` cluster) wrote the local run's bytes."""
    ddp = root / "ddp"
    runs = [ddp / run / "model.safetensors" for run in ("two-processes", "two-nodes", "resumed")]
    params = yaml.safe_load((root / "params.yaml").read_text())
    shards = sorted(p.name for p in (root / "data/shards").iterdir())
    return (
        same_bytes(*runs)
        and sum("report written to" in (ddp / f"node{node}.log").read_text() for node in (0, 1)) == 1  # global rank 0's
        and "resumed from" in (ddp / "resumed.log").read_text()
        and params["shard"]["distributor"] == params["embed"]["distributor"] == "ray"
        and shards == sorted(p.name for p in (root / "ray-cluster/shards").iterdir())
        and all(same_bytes(root / "data/shards" / name, root / "ray-cluster/shards" / name) for name in shards)
    )


LEAVES = {
    "how-diffusion-works.md": drew_its_pictures("how-diffusion-works.md"),
    "image-editing.md": drew_its_pictures("image-editing.md"),
    "synthetic-data.md": lambda root: len((root / "data/synthetic/manifest.jsonl").read_text().splitlines()) == 12
    and json.loads((root / "synthetic-shard.json").read_text())["kept"] == 12,
    "web-app.md": served_its_requests,
    "quickstart.md": made_its_first_images,
    "experiments.md": compared_two_experiments,
    "fine-tuning.md": fine_tuned,
    "sketch-control.md": controlled,
    "your-own-data.md": trained_on_its_own_data,
    "gpus-and-clusters.md": trained_and_sharded_in_parallel,
}


# Where each tutorial runs (see the module's docstring); not listed: "models".
WHERE: dict[str, str] = {"quickstart.md": "fresh", "experiments.md": "pipeline", "fine-tuning.md": "pipeline", "sketch-control.md": "pipeline",
         "your-own-data.md": "fresh", "gpus-and-clusters.md": "pipeline"}


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
