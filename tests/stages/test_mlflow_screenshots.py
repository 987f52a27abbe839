"""docs/mlflow_screenshots.py draws the MLflow screenshots of the experiments tutorial from a
project's store: here the tiny pipeline's, after its `dvc repro`, without touching it."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Chromium at /usr/bin/chromium: run `make browser`")


def screenshots():
    spec = importlib.util.spec_from_file_location("mlflow_screenshots", REPO / "docs" / "mlflow_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screenshots_of_the_evaluate_runs(pipeline, tmp_path):
    store = pipeline["project"] / "mlflow.db"
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    shots = screenshots().main(["--store", str(store), "--out", str(tmp_path / "shots")])
    assert [shot.name for shot in shots] == ["runs.png", "compare.png"]
    for shot in shots:
        image = Image.open(shot).convert("L")
        assert image.width >= 1000 and image.height >= 300, shot.name
        assert max(ImageStat.Stat(image).stddev) > 10, f"{shot.name}: blank"
        assert len(image.getcolors(1 << 16) or range(1 << 16)) > 20, f"{shot.name}: blank"
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before  # the project's store is only copied


def test_a_store_without_evaluate_runs_is_one_line(tmp_path):
    import mlflow

    store = tmp_path / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}").create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    with pytest.raises(SystemExit, match="no evaluate runs"):
        screenshots().main(["--store", str(store), "--out", str(tmp_path / "shots")])
