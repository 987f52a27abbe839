"""Fixtures of the stage tests: one tiny OpenMoji data set (download -> shard -> embed) and one
tiny DVC project reproduced by `dvc repro`, each shared by every module of the package."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from stages.app import app
from tests.stages import tiny_pipeline

runner = CliRunner()

DATA_PARAMS = {
    "tracking": {"enabled": False, "experiment": "tests"},
    "download": {"source": "openmoji", "resolution": 16, "limit": 40},
    "shard": {"resolution": 16, "val_fraction": 0.2, "samples_per_shard": 16},
    "embed": {"encoder": "minilm", "max_length": 8, "batch_size": 16, "prompts": ["red heart", "green apple"]},
}


@pytest.fixture(scope="package")
def data(tmp_path_factory) -> dict:
    """download (openmoji, 40 emoji at 16 px) -> shard (16 px, 20 % val) -> embed (minilm, 2 prompts)."""
    root = tmp_path_factory.mktemp("train_data")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(DATA_PARAMS), encoding="utf-8")
    p = ["--params", str(params)]
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        for args in (
            ["download", *p, "--out", str(root / "raw"), "--report", str(root / "download.json")],
            ["shard", *p, "--data", str(root / "raw"), "--out", str(root / "shards"), "--report", str(root / "shard.json")],
            ["embed", *p, "--shards", str(root / "shards"), "--out", str(root / "emb"), "--report", str(root / "embed.json")],
        ):
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
    counts = json.loads((root / "shard.json").read_text())
    assert counts["train"] >= 16 and counts["val"] > 0  # enough for batch 4 on each of 2 ranks
    return {"root": root, "raw": root / "raw", "shards": root / "shards", "emb": root / "emb", "train": counts["train"]}




@pytest.fixture(scope="package")
def pipeline(tmp_path_factory) -> dict:
    """The tiny DVC project (tiny_pipeline.py) after one `dvc repro` of dvc.yaml: its folder and what
    the repro printed. Tests that change it work on a copy (tiny_pipeline.copy)."""
    project = tiny_pipeline.create(tmp_path_factory.mktemp("pipeline") / "project")
    output = tiny_pipeline.sh(project, "dvc", "repro")
    return {"project": project, "output": output}
