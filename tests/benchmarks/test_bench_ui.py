"""The web-app comparison end to end on tiny model files: a real `imager ui` process driven over
HTTP against the library call, every row measured (the full suite only: it starts processes)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from benchmarks.report import TARGETS
from benchmarks.ui import bench_ui
from imager.diffusion import ScheduleConfig
from imager.models import UNet, save_model
from tests.conftest import tiny_params
from tests.unit.test_unet import randomized, tiny

MINILM = {"text_dim": 384, "pooled_dim": 384, "context_length": 8}  # the default encoder at max_length 8


@pytest.mark.slow
def test_bench_ui_measures_every_row(tmp_path):
    schedule = ScheduleConfig(name="cosine", timesteps=100).model_dump()
    paths = {}
    for name, sr, meta in (("base", False, {"resolution": 16}), ("sr", True, {"resolution": 32, "lowres": 16, "aug_level": 0.1})):
        model = randomized(UNet(tiny(null_embedding="learned", super_resolution=sr, **MINILM)), int(sr))
        paths[name] = tmp_path / f"{name}.safetensors"
        save_model(model, paths[name], extra={"schedule": schedule, "prediction": "v", **meta})
    params = tiny_params(evaluate={"base": {"steps": 3}, "sr": {"steps": 2}, "prompts": 2, "batch_size": 2, "grid_rows": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "sampler": "ddim", **params}))
    torch.manual_seed(0)
    rows = bench_ui(paths["base"], paths["sr"], tmp_path / "params.yaml", repeats=2, warmup=0, clients=2, per_client=1, tmp=tmp_path / "work")
    assert [r.key for r in rows] == ["ui_first_preview", "ui_base_image", "ui_final_image", "ui_throughput", "ui_memory"]
    for row in rows:
        assert row.key in TARGETS and math.isfinite(row.ours) and math.isfinite(row.theirs) and row.theirs > 0, row
    latency = rows[0].details["median_seconds"]
    for side in ("server", "direct"):  # each mark after the one before
        assert 0 < latency[side]["first_preview"] <= latency[side]["base_image"] <= latency[side]["final_image"]
    assert len(rows[0].details["seconds"]["server"]["final_image"]) == 2
    assert rows[4].ours > 100 and rows[4].theirs > 100  # MiB: processes with torch loaded
