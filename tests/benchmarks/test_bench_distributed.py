"""The Ray comparison: a quick run of ``python -m benchmarks --only distributed`` times each data
stage in one process and on a local Ray with one and two workers, finds the three outputs the same
bytes, and reports two rows per stage; the comparison never runs unless named; outputs that differ
stop it with one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from benchmarks.__main__ import app
from benchmarks.run import COMPARISONS, OPT_IN, BenchSettings
from tests.conftest import REPO

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
runner = CliRunner()
STAGES = ("download", "shard", "embed")


def test_the_ray_comparison_runs_only_when_named():
    assert "distributed" in COMPARISONS and "distributed" in OPT_IN
    assert "distributed" not in BenchSettings().only


def test_quick_run_times_every_data_stage_with_identical_outputs(tmp_path, outputs):
    result = runner.invoke(app, ["--quick", "--only", "distributed", "--params", str(REPO / "params.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((outputs["results"] / "latest.json").read_text())
    assert set(report["comparisons"]) == {f"ray_{row}_{s}" for row in ("scaling", "overhead") for s in STAGES}
    entries = {}
    for stage in STAGES:
        scaling, overhead = report["comparisons"][f"ray_scaling_{stage}"], report["comparisons"][f"ray_overhead_{stage}"]
        seconds = scaling["details"]["seconds"]
        assert scaling["details"]["identical_outputs"] is True and all(t > 0 for t in seconds.values())
        n = scaling["details"]["entries"]
        entries[stage] = n
        assert scaling["ours"]["value"] == pytest.approx(n / seconds["ray2"]) and scaling["theirs"]["value"] == pytest.approx(n / seconds["ray1"])
        assert overhead["theirs"]["value"] == pytest.approx(n / seconds["local"])
        assert scaling["details"]["scaling_efficiency"] == pytest.approx(scaling["ratio"] / 2)
    assert entries["download"] == 40 and 0 < entries["embed"] <= entries["shard"] <= 40  # quick: the first 40 emoji
    shared = report["comparisons"]["ray_scaling_download"]["details"]
    assert shared["photo_jpegs_512x384_shard_per_core"] > 0 and shared["twelve_word_captions_embed_per_core"] > 0
    assert "Each side run once" in (outputs["results"] / "latest.md").read_text()


def test_outputs_that_differ_stop_the_comparison(tmp_path, outputs, monkeypatch):
    import benchmarks.distributed as dist

    real, calls = dist._tree, []

    def drifting(root):
        calls.append(root)
        tree = real(root)
        return {**tree, "extra": str(len(calls))}  # every run "wrote" something else

    monkeypatch.setattr(dist, "_tree", drifting)
    result = runner.invoke(app, ["--quick", "--only", "distributed", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1 and "error: download: the outputs on Ray differ from the local run's" in result.output
    assert not outputs["results"].exists()
