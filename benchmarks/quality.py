"""Quality at equal compute: Imager's network against the ``arch: diffusers`` baseline, from DVC experiments.

The two sides are runs of the whole pipeline that differ in the base model only, e.g.::

    dvc exp run -n diffusers-arch -S train_base.model.arch=diffusers -S train_base.model.patch_size=1 \
        -S train_base.steps=700                                # about the default's training time
    python -m benchmarks --only quality --quality diffusers-arch   # vs the workspace (the default)

Their metrics come from ``dvc exp show --json`` (reports/evaluate.json and reports/train_base.json),
the base model's training wall time from the experiment's MLflow run (the train-base run tagged
with its name; the workspace's is the latest one outside any experiment): the reports hold no run
times, so that they are reproducible. Rows: the evaluator FID and R-precision of the base model's
samples and of the whole cascade (the SR model is the same in both, so the cascade rows dilute the
difference), each with its target (Imager ≥ 20 % better), and the training wall time, which shows
whether the compute was equal.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import BenchError
from benchmarks.report import Comparison

WORKSPACE = "workspace"
EVALUATE, TRAIN = "reports/evaluate.json", "reports/train_base.json"


def experiments(show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Experiment name (or short rev; ``workspace``; branch names) -> {"metrics": {file: {...}}, "params": {...}},
    from the JSON of ``dvc exp show --json``."""
    found: dict[str, dict[str, Any]] = {}

    def record(entry: dict[str, Any], name: str | None) -> None:
        data = entry.get("data") or {}
        metrics = {f: (m or {}).get("data", {}) for f, m in (data.get("metrics") or {}).items()}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data", {})
        rev = entry.get("rev") or ""
        is_sha = len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)
        primary = name or (rev[:7] if is_sha else rev)
        for alias in (primary, rev, rev[:7] if is_sha else None):
            if alias and alias not in found:
                found[alias] = {"name": primary, "metrics": metrics, "params": params, "rev": rev}

    for commit in show:
        record(commit, commit.get("name"))
        for group in commit.get("experiments") or []:
            for rev in group.get("revs") or []:
                record(rev, rev.get("name"))
    return found


def dvc_experiments(repo: Path = Path()) -> dict[str, dict[str, Any]]:
    """:func:`experiments` of this repository's DVC experiments on every commit (``dvc exp show -A``)."""
    try:
        out = subprocess.run(["dvc", "exp", "show", "--json", "-A"], cwd=repo, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise BenchError("--quality: the dvc command is not on PATH") from None
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"--quality: `dvc exp show --json` failed: {last[0]}") from None
    return experiments(json.loads(out.stdout))


def mlflow_training_seconds(name: str, *, experiment: str = "imager") -> float:
    """``summary.wall_seconds`` of the latest finished train-base MLflow run of DVC experiment ``name``
    (``workspace``: the latest one that no experiment tagged)."""
    import mlflow

    from imager.tracking import TAG_EXP, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.search_runs(
        experiment_names=[experiment], filter_string="tags.`imager.stage` = 'train-base' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], output_format="list",
    )
    for run in found:
        tag = run.data.tags.get(TAG_EXP)
        if (tag == name or (name == WORKSPACE and not tag)) and "summary.wall_seconds" in run.data.metrics:
            return float(run.data.metrics["summary.wall_seconds"])
    raise BenchError(
        f"--quality: no finished train-base run of '{name}' in the MLflow experiment '{experiment}' ({tracking_uri()}); "
        "its training time is recorded there (tracking.enabled: true)"
    )


def _metrics(runs: dict[str, dict[str, Any]], name: str) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    if name not in runs:
        known = ", ".join(sorted({run["name"] for run in runs.values()})) or "none"
        raise BenchError(f"--quality: no DVC experiment named '{name}' (known: {known})")
    run = runs[name]
    evaluate, train = run["metrics"].get(EVALUATE), run["metrics"].get(TRAIN)
    if not evaluate or not train:
        missing = EVALUATE if not evaluate else TRAIN
        raise BenchError(f"--quality: experiment '{name}' has no {missing}; run the whole pipeline in it (`dvc exp run`)")
    return evaluate, train, run["params"]


def network_label(model: dict[str, Any]) -> str:
    """A network config (a ``train_*.model`` mapping) in a few words: its arch and layout."""
    layout = [f"{model['patch_size']}×{model['patch_size']} patches"] if model.get("patch_size", 1) > 1 else []
    layout += ["Efficient U-Net order"] if model.get("efficient") else []
    arch = model.get("arch", "imager")
    return f"{arch} ({', '.join(layout)})" if layout else arch


def _arch(params: dict[str, Any]) -> str:
    return network_label((params.get("train_base") or {}).get("model") or {})


def quality_at_equal_compute(
    runs: dict[str, dict[str, Any]], baseline: str, ours: str = WORKSPACE, training_seconds: Callable[[str], float] = mlflow_training_seconds
) -> list[Comparison]:
    """The comparison rows of ``ours`` (Imager's default) against ``baseline`` (the diffusers network);
    ``training_seconds(experiment name)`` gives each side's base-model training time."""
    ev_ours, tr_ours, p_ours = _metrics(runs, ours)
    ev_base, tr_base, p_base = _metrics(runs, baseline)
    label_ours, label_base = f"{ours}: {_arch(p_ours)}", f"{baseline}: {_arch(p_base)}"
    details = {
        "ours": {"experiment": ours, "train_base": p_ours.get("train_base", {}).get("model"), "steps": tr_ours.get("steps")},
        "theirs": {"experiment": baseline, "train_base": p_base.get("train_base", {}).get("model"), "steps": tr_base.get("steps")},
        "samples": ev_ours.get("samples"),
        "r_precision_k": ev_ours.get("r_precision_k"),
    }
    rows = []
    for key, metric, title in (
        ("quality_fid_base", "fid_evaluator_base", "Base model FID (evaluator), equal compute"),
        ("quality_r_precision_base", "r_precision_evaluator_base", "Base model R-precision, equal compute"),
        ("quality_fid", "fid_evaluator", "Cascade FID (evaluator), equal compute"),
        ("quality_r_precision", "r_precision_evaluator", "Cascade R-precision, equal compute"),
    ):
        if metric not in ev_ours or metric not in ev_base:
            raise BenchError(f"--quality: {metric} missing from {EVALUATE} of '{ours if metric not in ev_ours else baseline}'")
        unit = "FID" if "fid" in metric else "R-prec"
        rows.append(Comparison(key, title, unit, label_ours, float(ev_ours[metric]), label_base, float(ev_base[metric]),
                               details={"metric": metric, **details}))
    rows.append(Comparison("quality_compute", "Base model training wall time", "s", label_ours, training_seconds(ours),
                           label_base, training_seconds(baseline), details={"steps": [tr_ours.get("steps"), tr_base.get("steps")]}))
    return rows


__all__ = ["dvc_experiments", "experiments", "mlflow_training_seconds", "network_label", "quality_at_equal_compute"]
