"""The real dvc.yaml on a tiny params file: `dvc repro` runs the stages, a second repro is a no-op,
a forced clean rerun gives the same dvc.lock (byte-identical outputs, reports included: run times go
to MLflow only), and an unknown key anywhere in params.yaml fails the next repro.

finetune/dvc.yaml and control/dvc.yaml run on the same tiny project in the tutorials that use them
(docs/tutorials/fine-tuning.md and sketch-control.md, checked in test_tutorials.py: every stage ran
once on these models without retraining them, the reports' keys and orderings, up to date after)."""

from __future__ import annotations

import subprocess

import mlflow
import yaml

from tests.stages.tiny_pipeline import EXPERIMENT, copy, env, sh

STAGES = ["download", "shard", "embed", "train-base", "train-sr", "train-evaluator", "evaluate", "evaluate-edits"]
DVC_STAGES = ["params"] + [s.replace("-", "_") for s in STAGES]


def lock_hashes(project) -> dict:
    """md5 of every output in dvc.lock, reports and plots included."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {name: [(o["path"], o["md5"]) for o in stage.get("outs", [])] for name, stage in lock["stages"].items()}


def pipeline_ids(experiment: str) -> list[tuple[str, str, str]]:
    """(pipeline id, stage, dvc experiment name) of every MLflow run, oldest first."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["attributes.start_time ASC"])
    return [(r.data.tags["imager.pipeline_run"], r.data.tags["imager.stage"], r.data.tags.get("imager.dvc_exp_name", "")) for r in runs]


def test_dvc_repro_is_complete_idempotent_and_reproducible(tmp_path, pipeline):
    project = copy(pipeline["project"], tmp_path / "project")
    first = pipeline["output"]
    for stage in DVC_STAGES:
        assert f"Running stage '{stage}'" in first
    for out in ("data/raw/manifest.jsonl", "data/shards/index.json", "data/embeddings/embeddings.safetensors",
                "data/models/base/model.safetensors", "data/models/sr/model.safetensors"):
        assert (project / out).is_file()
    for report in ("download", "shard", "embed", "train_base", "train_sr", "evaluator", "evaluate", "sweep", "sweep_curve", "edits", "edits_strength"):
        assert (project / "reports" / f"{report}.json").is_file()
    hashes = lock_hashes(project)
    assert set(hashes) == set(DVC_STAGES)
    shown = sh(project, "dvc", "metrics", "show", "--md")
    assert "fid_evaluator" in shown and "fid_evaluator_ceiling" in shown
    sh(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))  # the custom sweep template renders
    assert (tmp_path / "plots" / "index.html").is_file()

    again = sh(project, "dvc", "repro")
    assert "Running stage" not in again
    assert "Data and pipelines are up to date" in sh(project, "dvc", "status", "dvc.yaml")  # finetune/dvc.yaml has not run yet

    lock = (project / "dvc.lock").read_text()
    sh(project, "dvc", "repro", "--force")  # every stage from scratch: outputs deleted and rebuilt
    assert lock_hashes(project) == hashes
    assert (project / "dvc.lock").read_text() == lock  # nothing in a hashed output depends on run time

    # An unknown key no stage reads still fails the next repro (the `params` stage reads the whole file).
    good = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(good + "foo: 1\n")
    out = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, env=env())
    assert out.returncode != 0 and "error: params.yaml: foo: unknown key" in out.stdout + out.stderr
    assert "Running stage 'download'" not in out.stdout  # it runs first
    (project / "params.yaml").write_text(good)
    sh(project, "dvc", "repro")

    # `dvc exp run -S sampler=...` sets the top-level key, which only the evaluation stages read.
    exp = sh(project, "dvc", "exp", "run", "-S", "sampler=ddim", "-n", "try-ddim")
    ran = [line for line in exp.splitlines() if "Running stage" in line]
    assert ran == ["Running stage 'params':", "Running stage 'evaluate':", "Running stage 'evaluate_edits':"]
    shown = sh(project, "dvc", "exp", "show", "--md", "--no-pager")
    assert "try-ddim" in shown and "ddim" in shown and "fid_evaluator" in shown
    assert yaml.safe_load((project / "params.yaml").read_text())["sampler"] == "ddim"
    # A params change reruns exactly the stages that depend on it: new embeddings, new models.
    changed = sh(project, "dvc", "exp", "run", "-S", "embed.max_length=7", "-n", "short-captions")
    assert "Running stage 'embed'" in changed and "Running stage 'train_base'" in changed
    assert "Running stage 'shard'" not in changed and "Running stage 'download'" not in changed

    # MLflow: one pipeline id per dvc invocation, shared by the stages it ran; exp runs are tagged.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")  # the project's own store
    runs = pipeline_ids(EXPERIMENT)
    rerun = ["embed", "train-base", "train-sr", "train-evaluator", "evaluate", "evaluate-edits"]
    assert [stage for _, stage, _ in runs] == STAGES + STAGES + ["evaluate", "evaluate-edits"] + rerun
    ids = [pid for pid, _, _ in runs]
    n = len(STAGES)
    groups = [ids[:n], ids[n : 2 * n], ids[2 * n : 2 * n + 2], ids[2 * n + 2 :]]
    assert all(len(set(g)) == 1 for g in groups) and len(set(ids)) == 4
    assert [exp for _, _, exp in runs] == [""] * (2 * n) + ["try-ddim"] * 2 + ["short-captions"] * len(rerun)
