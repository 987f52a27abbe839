"""Shared fixtures: an offline environment, one MLflow store per session, tiny params files."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Everything under tests/stages/ runs the CLI end to end (training, dvc repro): the slow tier.
    `make test-fast` (-m "not slow") leaves it out; `make test` runs all."""
    for item in items:
        if item.path.is_relative_to(REPO / "tests" / "stages"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_thread():
    """One torch thread for the test: small tensors gain nothing from intra-op threads, and on a busy
    2-core machine two OpenMP threads spin-wait for each other (10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    # One sqlite store for the whole session: creating its tables takes seconds.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, mlflow_uri):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    for var in ("DVC_EXP_NAME", "DVC_ROOT", "IMAGER_PIPELINE_RUN"):
        monkeypatch.delenv(var, raising=False)


def tiny_params(**sections) -> dict:
    """Tiny, fast params for stage tests; keyword args replace whole sections."""
    params = {
        "tracking": {"enabled": False, "experiment": "tests"},
        "download": {"source": "openmoji", "resolution": 32, "limit": 24},
        "shard": {"resolution": 16, "val_fraction": 0.25, "samples_per_shard": 8},
        "embed": {"encoder": "minilm", "max_length": 8, "batch_size": 16},
    }
    params.update(sections)
    return params


@pytest.fixture
def write_params(tmp_path):
    def write(data: dict, name: str = "params.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


def png_bytes(color=(255, 0, 0), size=(16, 16), mode="RGB", fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def make_download(root: Path, files: dict[str, bytes], captions: dict[str, str] | None = None) -> Path:
    """A download-step output: images/{key}.bin + a manifest, as the download step writes it."""
    (root / "images").mkdir(parents=True)
    records = []
    for key, data in files.items():
        (root / "images" / f"{key}.bin").write_bytes(data)
        caption = (captions or {}).get(key, f"caption of {key}")
        records.append({"key": key, "caption": caption, "file": f"images/{key}.bin", "source": "folder", "licence": "CC0", "sha256": hashlib.sha256(data).hexdigest()})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root
