"""The real dvc.yaml on a tiny params file: `dvc repro` runs the stages, a second repro is a no-op,
a forced clean rerun gives the same dvc.lock (byte-identical outputs, reports included: run times go
to MLflow only), and an unknown key anywhere in params.yaml fails the next repro."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml

from tests.conftest import REPO, tiny_params

BIN = Path(sys.executable).parent


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def lock_hashes(project: Path) -> dict:
    """md5 of every output in dvc.lock, reports and plots included."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {name: [(o["path"], o["md5"]) for o in stage.get("outs", [])] for name, stage in lock["stages"].items()}


TINY_MODEL = {"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [1], "head_dim": 8, "norm_groups": 4, "num_res_blocks": 1}
TINY_TRAIN = {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "model": TINY_MODEL, "grid": {"every": 0, "steps": 2, "per_prompt": 1}}
TINY_EVALUATOR = {"resolution": 16, "channels": [8, 16], "feature_dim": 8, "epochs": 1, "batch_size": 4}
TINY_EVALUATE = {
    "prompts": 3, "batch_size": 4, "base": {"steps": 2}, "sr": {"steps": 2}, "r_precision_k": 2, "grid_rows": 2,
    "sweep": {"samplers": ["ddim"], "steps": [2], "reference_steps": 3, "prompts": 2},
}  # fmt: skip
TINY_EDITS = {
    "images": 2, "grid_images": 1, "inpaint": {"masks": ["centre"], "border": 2, "resample": 2},
    "img2img": {"strengths": [0.5, 1.0], "samplers": ["ddim"], "images": 2},
}  # fmt: skip
TINY_DATASETS = {"lineart": {"download": {"openmoji": {"style": "line"}, "caption_format": "{caption}, line art"}, "embed": {"prompts": ["red heart, line art"]}}}
TINY_FINETUNE = {
    "dataset": "lineart", "base": {"steps": 2, "grid": {"every": 1}}, "lora": {"steps": 2, "grid": {"every": 1}, "lora": {"rank": 2}}, "extra_ranks": [1],
    "evaluate": {"prompts": 3, "forgetting_prompts": 3, "probe_prompts": 2, "grid_rows": 2},
}  # fmt: skip
TINY_CONTROL = {
    "data": "data", "default": "controlnet", "pairs": "lineart",
    "variants": {
        "controlnet": {"steps": 2, "grid": {"every": 1}, "control": {"arch": "controlnet", "hint_channels": [4]}},
        "adapter": {"steps": 2, "grid": {"every": 1}, "control": {"arch": "adapter", "hint_channels": [4]}},
    },
    "evaluate": {"scales": [0.0, 1.0]},
}  # fmt: skip
STAGES = ["download", "shard", "embed", "train-base", "train-sr", "train-evaluator", "evaluate", "evaluate-edits"]
DVC_STAGES = ["params"] + [s.replace("-", "_") for s in STAGES]


def pipeline_ids(experiment: str) -> list[tuple[str, str, str]]:
    """(pipeline id, stage, dvc experiment name) of every MLflow run, oldest first."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list", order_by=["attributes.start_time ASC"])
    return [(r.data.tags["imager.pipeline_run"], r.data.tags["imager.stage"], r.data.tags.get("imager.dvc_exp_name", "")) for r in runs]


def test_dvc_repro_is_complete_idempotent_and_reproducible(tmp_path, mlflow_uri):
    project = tmp_path / "project"
    project.mkdir()
    for item in ("dvc.yaml", ".dvcignore", "imager", "stages", "finetune", "control"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, project / item)
    params = tiny_params(
        tracking={"enabled": True, "experiment": "dvc-e2e"},
        download={"limit": 20, "resolution": 16},
        shard={"resolution": 16, "val_fraction": 0.3, "samples_per_shard": 4},
        embed={"encoder": "minilm", "max_length": 8, "batch_size": 16, "prompts": ["red heart"]},
        train_base={**TINY_TRAIN, "resolution": 8},
        train_sr={**TINY_TRAIN, "lowres": 8, "resolution": 16, "crop": None},
        evaluator=TINY_EVALUATOR,
        evaluate=TINY_EVALUATE,
        edits=TINY_EDITS,
        datasets=TINY_DATASETS,
        finetune=TINY_FINETUNE,
        control=TINY_CONTROL,
    )
    (project / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "sampler": "dpmpp_2m", **params}))
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)  # the sweep template
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny")

    first = sh(project, "dvc", "repro")
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
    out = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
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
    mlflow.set_tracking_uri(mlflow_uri)
    runs = pipeline_ids("dvc-e2e")
    rerun = ["embed", "train-base", "train-sr", "train-evaluator", "evaluate", "evaluate-edits"]
    assert [stage for _, stage, _ in runs] == STAGES + STAGES + ["evaluate", "evaluate-edits"] + rerun
    ids = [pid for pid, _, _ in runs]
    n = len(STAGES)
    groups = [ids[:n], ids[n : 2 * n], ids[2 * n : 2 * n + 2], ids[2 * n + 2 :]]
    assert all(len(set(g)) == 1 for g in groups) and len(set(ids)) == 4
    assert [exp for _, _, exp in runs] == [""] * (2 * n) + ["try-ddim"] * 2 + ["short-captions"] * len(rerun)

    # The fine-tuning pipeline (finetune/dvc.yaml): the same data stages once per entry of `datasets`,
    # then the full fine-tune, the LoRA adapters and their evaluation, on the models above.
    tuned = sh(project, "dvc", "repro", "finetune/dvc.yaml")
    for stage in ("download@lineart", "shard@lineart", "embed@lineart", "finetune", "train_lora", "evaluate_finetune"):
        assert f"Running stage 'finetune/dvc.yaml:{stage}'" in tuned
    assert "Running stage 'train_base'" not in tuned  # upstream is up to date
    for out in ("data/datasets/lineart/shards/index.json", "data/finetune/base/model.safetensors",
                "data/finetune/lora/rank-2/adapter.safetensors", "data/finetune/lora/rank-1/adapter.safetensors"):
        assert (project / out).is_file(), out
    result = yaml.safe_load((project / "reports" / "finetune.json").read_text())
    assert result["lora_r2.scale0_equals_base"] is True
    assert result["lora_r1.trainable_parameters"] < result["lora_r2.trainable_parameters"] < result["full.trainable_parameters"]
    assert "Data and pipelines are up to date" in sh(project, "dvc", "status", "finetune/dvc.yaml")

    # The trained sketch control (control/dvc.yaml): one run per variant on the frozen base, then the
    # comparison with SDEdit on the edit evaluation's sketches.
    controlled = sh(project, "dvc", "repro", "control/dvc.yaml")
    for stage in ("train_control@controlnet", "train_control@adapter", "evaluate_control"):
        assert f"Running stage 'control/dvc.yaml:{stage}'" in controlled
    assert "Running stage 'train_base'" not in controlled
    report = yaml.safe_load((project / "reports" / "control.json").read_text())
    assert {"text_only", "sdedit", "controlnet", "adapter", "scales", "real"} <= set(report)
    assert report["adapter"]["parameters"] < report["controlnet"]["parameters"]
    assert set(report["scales"]) == {"0", "1"}
    assert "Data and pipelines are up to date" in sh(project, "dvc", "status", "control/dvc.yaml")
