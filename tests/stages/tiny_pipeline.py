"""The project's real pipelines (dvc.yaml, finetune/dvc.yaml, control/dvc.yaml) in a git + DVC
project of its own on tiny params: what `make repro` runs, at a size that trains in seconds.
The DVC test and the tutorials that use DVC share one reproduced copy (see conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, tiny_params

BIN = Path(sys.executable).parent

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
EXPERIMENT = "dvc-e2e"


def params() -> dict:
    """params.yaml of the tiny project: every section the three pipelines read, sized for seconds."""
    return {
        "seed": 0,
        "sampler": "dpmpp_2m",
        **tiny_params(
            tracking={"enabled": True, "experiment": EXPERIMENT},
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
        ),
    }


def env(**extra: str) -> dict:
    """The test's environment without MLFLOW_TRACKING_URI: the project's runs go to its own
    mlflow.db, as on a user's machine."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**base, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def sh(cwd: Path, *cmd: str) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def create(project: Path) -> Path:
    """A git + DVC project holding the pipelines, the code they run and the tiny params, committed,
    nothing reproduced yet (what a fresh clone is, before `make repro`)."""
    project.mkdir(parents=True)
    for item in ("dvc.yaml", ".dvcignore", "imager", "stages", "finetune", "control"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, project / item)
    (project / "params.yaml").write_text(yaml.safe_dump(params()))
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", project / ".dvc" / "plots", dirs_exist_ok=True)  # the sweep template
    commit(project, "tiny")
    return project


def commit(project: Path, message: str) -> None:
    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


def copy(src: Path, dst: Path) -> Path:
    """A copy to change (git history, DVC cache and workspace outputs included)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
