"""The data stages end to end through the `imager` Typer app, with MLflow runs and their tags."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from imager.text.cache import EmbeddingCache
from stages.app import app
from tests.conftest import tiny_params

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def run_data_stages(tmp: Path, params: Path):
    d = invoke("download", "--params", str(params), "--out", str(tmp / "raw"), "--report", str(tmp / "reports/download.json"))
    assert d.exit_code == 0, d.output
    s = invoke("shard", "--params", str(params), "--data", str(tmp / "raw"), "--out", str(tmp / "shards"), "--report", str(tmp / "reports/shard.json"))
    assert s.exit_code == 0, s.output
    e = invoke("embed", "--params", str(params), "--shards", str(tmp / "shards"), "--out", str(tmp / "emb"), "--report", str(tmp / "reports/embed.json"))
    assert e.exit_code == 0, e.output


def git_repo(path: Path) -> str:
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty"]):
        subprocess.run(["git", *cmd], cwd=path, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, check=True).stdout.strip()


def runs_of(experiment: str):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_help_is_useful():
    top = invoke("--help")
    assert top.exit_code == 0
    for command in ("download", "shard", "embed"):
        assert command in top.output
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "--params" in sub.output and "--out" in sub.output


def test_three_stages_end_to_end_with_mlflow_runs(tmp_path, write_params, monkeypatch, mlflow_uri):
    commit = git_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    monkeypatch.setenv("IMAGER_PIPELINE_RUN", "pipeline-42")
    params = write_params(tiny_params(tracking={"enabled": True, "experiment": "cli-e2e"}))
    run_data_stages(tmp_path, params)

    download = json.loads((tmp_path / "reports/download.json").read_text())
    shard = json.loads((tmp_path / "reports/shard.json").read_text())
    embed = json.loads((tmp_path / "reports/embed.json").read_text())
    assert download["seen"] == 24 and download["kept"] + download["skipped"] == 24
    assert shard["kept"] == download["kept"] == shard["train"] + shard["val"] and shard["val"] > 0
    assert embed["count"] == shard["kept"] and embed["max_length"] == 8 and embed["token_dim"] == 384
    cache = EmbeddingCache(tmp_path / "emb")
    manifest = [json.loads(line) for line in (tmp_path / "raw/manifest.jsonl").read_text().splitlines()]
    assert sorted(cache.keys) == sorted(r["key"] for r in manifest)

    mlflow.set_tracking_uri(mlflow_uri)
    runs = {r.data.tags["imager.stage"]: r for r in runs_of("cli-e2e")}
    assert set(runs) == {"download", "shard", "embed"}
    for stage, run in runs.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and run.info.run_name == f"{stage} · tiny-exp"  # the DVC experiment shows in the UI
        assert tags["imager.git_commit"] == commit
        assert tags["imager.dvc_exp_name"] == "tiny-exp"
        assert tags["imager.pipeline_run"] == "pipeline-42"
        assert tags["imager.version.torch"] == version("torch") and tags["imager.version.transformers"] == version("transformers")
        assert run.data.metrics["seconds"] > 0
    assert runs["download"].data.params["download.limit"] == "24"
    assert runs["download"].data.metrics["kept"] == download["kept"]
    assert runs["shard"].data.params["shard.resolution"] == "16" and "download.limit" not in runs["shard"].data.params
    assert runs["embed"].data.metrics["count"] == embed["count"]
    client = mlflow.tracking.MlflowClient()
    for stage, artifact in (("download", "manifest.jsonl"), ("shard", "index.json"), ("embed", "meta.json")):
        names = {a.path for a in client.list_artifacts(runs[stage].info.run_id)}
        assert {"report.json", artifact} <= names


def test_without_a_pipeline_id_each_run_gets_its_own(tmp_path, write_params, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    params = write_params(tiny_params(tracking={"enabled": True, "experiment": "cli-ids"}, download={"limit": 3, "resolution": 16}))
    for i in range(2):
        assert invoke("download", "--params", str(params), "--out", str(tmp_path / f"raw{i}"), "--report", str(tmp_path / f"r{i}.json")).exit_code == 0
    mlflow.set_tracking_uri(mlflow_uri)
    ids = {r.data.tags["imager.pipeline_run"] for r in runs_of("cli-ids")}
    assert len(ids) == 2


def test_failed_stage_marks_its_run_failed(tmp_path, write_params, monkeypatch, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    params = write_params(tiny_params(tracking={"enabled": True, "experiment": "cli-fail"}))
    result = runner.invoke(app, ["shard", "--params", str(params), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "shards"), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert "no manifest; run `imager download` first" in result.output
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = runs_of("cli-fail")
    assert run.info.status == "FAILED"
    assert not (tmp_path / "shards").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"shard": {"resolution": 30}}, "error: params.yaml: shard.resolution: must be a positive multiple of 8, got 30"),
        ({"download": {"limit": 3, "colour": "red"}}, "error: params.yaml: download.colour: unknown key"),
    ],
)
def test_bad_params_print_one_line_and_write_nothing(tmp_path, write_params, monkeypatch, params, message):
    monkeypatch.chdir(tmp_path)
    path = write_params(params)
    result = runner.invoke(app, ["download", "--params", str(path), "--out", str(tmp_path / "raw"), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert result.output.strip() == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_encoder_that_would_download_is_a_clear_error(tmp_path, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tiny_params(embed={"encoder": "clip", "clip": {"model": "ViT-B-32", "pretrained": "openai"}}))
    assert invoke("download", "--params", str(params), "--out", str(tmp_path / "raw"), "--report", str(tmp_path / "r1.json")).exit_code == 0
    assert invoke("shard", "--params", str(params), "--data", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"), "--report", str(tmp_path / "r2.json")).exit_code == 0
    result = runner.invoke(app, ["embed", "--params", str(params), "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "emb"), "--report", str(tmp_path / "r3.json")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: embed.clip.pretrained: 'openai' needs a download; give a local weights file or set embed.allow_download: true"
    )
    assert not (tmp_path / "emb").exists() and not (tmp_path / "r3.json").exists()


def test_a_rerun_replaces_the_output_atomically(tmp_path, write_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tiny_params(download={"limit": 4, "resolution": 16}))
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "stale.txt").write_text("old")
    assert invoke("download", "--params", str(params), "--out", str(tmp_path / "raw"), "--report", str(tmp_path / "r.json")).exit_code == 0
    assert not (tmp_path / "raw" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
