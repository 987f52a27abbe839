"""The fine-tuning comparison: LoRA's step trains what the training loop's would, and a quick run of
``python -m benchmarks --only finetune`` reports the four rows with every rank's numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.__main__ import app
from benchmarks.finetune import FULL, RANKS, REPORTED_RANK, build, variant_name
from benchmarks.models import random_batch, resolve_config
from benchmarks.run import QUICK_MODEL
from imager.models import lora
from tests.conftest import REPO

runner = CliRunner()
ROWS = {"finetune_speed", "finetune_memory", "finetune_trainable", "finetune_file"}
TEXT = {"token_dim": 16, "pooled_dim": 16, "max_length": 8}  # a cache's meta.json: the text dims without an encoder
CPU = torch.device("cpu")


def _config():
    return resolve_config(QUICK_MODEL, text_dim=TEXT["token_dim"], pooled_dim=TEXT["pooled_dim"], context_length=TEXT["max_length"])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_a_lora_step_moves_only_the_adapter_and_averages_every_parameter():
    config = _config()
    step = build(config, REPORTED_RANK, seed=0, device=CPU)
    before, ema_before = _snapshot(step.model), _snapshot(step.ema.model)
    step(random_batch(config, 2, 16, CPU, seed=0))
    after, ema_after = _snapshot(step.model), _snapshot(step.ema.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)  # the base stays frozen
    assert any(".lora_B." in k for k in changed)  # B starts at zero: the adapter learned something
    assert {k for k in ema_before if not torch.equal(ema_before[k], ema_after[k])} == changed  # EMA over all, moved where the model did
    assert step.step == 1


def test_a_full_step_moves_every_weight():
    config = _config()
    step = build(config, None, seed=0, device=CPU)
    assert not lora.lora_layers(step.model) and len(step.trainable) == len(list(step.model.parameters()))
    before = _snapshot(step.model)
    step(random_batch(config, 2, 16, CPU, seed=0))
    assert all(not torch.equal(before[k], v) for k, v in step.model.named_parameters())


@pytest.mark.slow  # the benchmark command end to end
def test_quick_finetune_run_reports_lora_against_full_fine_tuning(tmp_path, outputs):
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    (embeddings / "meta.json").write_text(json.dumps(TEXT))
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    result = runner.invoke(app, [
        "--only", "finetune", "--quick", "--threads", "1", "--json", str(out_json), "--markdown", str(out_md),
        "--params", str(REPO / "params.yaml"), "--embeddings", str(embeddings),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report, markdown = json.loads(out_json.read_text()), out_md.read_text()
    rows = report["comparisons"]
    assert set(rows) == ROWS
    for key, c in rows.items():
        assert math.isfinite(c["ours"]["value"]) and c["theirs"]["value"] > 0, key
        assert c["ratio"] == pytest.approx(c["ours"]["value"] / c["theirs"]["value"]), key
        assert any(line.startswith(f"| {c['title']} |") for line in markdown.splitlines()), key
        assert c["title"] in result.output

    v = rows["finetune_speed"]["details"]["variants"]
    assert set(v) == {FULL, *(variant_name(r) for r in RANKS)}
    for numbers in v.values():
        assert len(numbers["seconds_all"]) == report["settings"]["repeats"] == 2
        assert numbers["images_per_s"] == pytest.approx(report["settings"]["batch_size"] / numbers["seconds_median"])
    full = v[FULL]
    assert full["trainable_parameters"] == full["parameters"]  # every weight trains
    trainable = [v[variant_name(r)]["trainable_parameters"] for r in RANKS]
    assert 0 < trainable[0] < trainable[1] < trainable[2] < full["trainable_parameters"]
    assert trainable == [trainable[0] // RANKS[0] * r for r in RANKS]  # r·(in + out) per adapted layer
    saved = [v[variant_name(r)]["saved_bytes"] for r in RANKS]
    assert saved == sorted(saved) and saved[-1] < full["saved_bytes"]

    r4 = v[variant_name(REPORTED_RANK)]
    assert rows["finetune_trainable"]["ours"]["value"] == r4["trainable_parameters"]
    assert rows["finetune_trainable"]["theirs"]["value"] == full["trainable_parameters"]
    assert rows["finetune_trainable"]["ratio"] < 1 and rows["finetune_file"]["ratio"] < 1
    assert rows["finetune_file"]["ours"]["value"] == r4["saved_bytes"]
    assert rows["finetune_speed"]["ours"]["value"] == r4["seconds_median"]
    assert rows["finetune_memory"]["details"]["per_variant"][FULL] == rows["finetune_memory"]["theirs"]["value"]
    assert any(note.startswith("Fine-tuning: one optimizer step") for note in report["notes"])
