"""The training stages end to end: train-base and train-sr through the `imager` Typer app on a tiny
OpenMoji data set, exact resume after kill -9, atomic checkpoints, two-process DDP on CPU (gloo),
a loss that falls on a tiny overfit set, and bad params that fail in one line."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from imager import config
from imager.data.shard import shard
from imager.models import load_model, read_checkpoint_meta
from imager.text.cache import EmbeddingCache
from imager.training import loop
from imager.training.distributed import Dist
from imager.training.loader import ShardLoader
from imager.training.loop import Trainer
from imager.training.state import latest_checkpoint
from imager.training.tasks import BaseTask
from stages.app import app
from tests.conftest import REPO

runner = CliRunner()

MODEL = {"base_channels": 8, "channel_mults": [1, 2], "attention_levels": [1], "head_dim": 8, "norm_groups": 4, "dropout": 0.1}
GRID = {"every": 3, "steps": 2, "per_prompt": 1}
COMMON = {"steps": 6, "batch_size": 4, "log_every": 2, "checkpoint_every": 3, "model": MODEL, "grid": GRID}
TINY = {
    "train_base": {**COMMON, "resolution": 8},
    "train_sr": {**COMMON, "lowres": 8, "resolution": 16, "crop": 8},
}
CHECKPOINT_FILES = {"state.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"}


# ------------------------------------------------------------------------------------- helpers


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(path: Path, **sections) -> Path:
    """TINY training params (tracking off) with ``sections`` merged in key by key."""
    data = merge({"tracking": {"enabled": False, "experiment": "tests"}, **TINY}, sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def train_args(command: str, data: dict, root: Path, params: Path, name: str = "run") -> list[str]:
    """Arguments of `imager train-base|train-sr` writing under ``root``: {name}_out, {name}_ckpt, {name}.json."""
    return [
        command, "--params", str(params), "--shards", str(data["shards"]), "--embeddings", str(data["emb"]),
        "--out", str(root / f"{name}_out"), "--checkpoints", str(root / f"{name}_ckpt"), "--report", str(root / f"{name}.json"),
    ]  # fmt: skip


def train(command: str, data: dict, root: Path, params: Path, name: str = "run"):
    result = runner.invoke(app, train_args(command, data, root, params, name))
    assert result.exit_code == 0, result.output
    return json.loads((root / f"{name}.json").read_text())


def weights(out: Path) -> dict[str, dict]:
    return {f: load_file(str(out / f)) for f in ("model.safetensors", "model_raw.safetensors")}


def assert_identical(a: dict[str, dict], b: dict[str, dict]) -> None:
    for file, tensors in a.items():
        assert tensors.keys() == b[file].keys(), file
        differ = [key for key, t in tensors.items() if t.dtype != b[file][key].dtype or not t.equal(b[file][key])]
        assert not differ, f"{file}: {len(differ)} of {len(tensors)} tensors differ, e.g. {differ[0]}"


def assert_report(report: dict, steps: int) -> None:
    assert report["steps"] == steps
    assert math.isfinite(report["final_loss"]) and report["final_loss"] > 0
    # What differs between runs (times, the step a resumed run started from) goes to MLflow only.
    assert not {"images_per_second", "wall_seconds", "resumed_from_step"} & set(report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ---------------------------------------------------------------------------- 1. end to end


@pytest.mark.parametrize("command, section", [("train-base", "train_base"), ("train-sr", "train_sr")])
def test_tiny_training_end_to_end_with_mlflow_run(data, tmp_path, monkeypatch, mlflow_uri, command, section):
    monkeypatch.chdir(tmp_path)  # the run's git tags look at the working directory: not this repository
    experiment = f"train-e2e-{command}"
    params = write_params(tmp_path / "params.yaml", tracking={"enabled": True, "experiment": experiment})
    cfg = getattr(config.load(params), section)
    report = train(command, data, tmp_path, params)

    assert_report(report, cfg.steps)
    assert report["parameters"] > 0
    out = tmp_path / "run_out"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "model.safetensors", "model_raw.safetensors"]
    with Image.open(out / "grid.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        im.verify()

    # The EMA model rebuilds itself from the file, with the cache's text dims and the sampling metadata.
    meta = EmbeddingCache(data["emb"]).meta
    model = load_model(out / "model.safetensors")
    assert model.config.super_resolution is (section == "train_sr")
    assert (model.config.text_dim, model.config.pooled_dim, model.config.context_length) == (
        meta["token_dim"], meta["pooled_dim"], meta["max_length"],
    )  # fmt: skip
    assert model.config.base_channels == MODEL["base_channels"] and not model.training
    _, extra = read_checkpoint_meta(out / "model.safetensors")
    assert extra["schedule"] == json.loads(cfg.schedule.model_dump_json())
    assert extra["prediction"] == cfg.loss.prediction and extra["step"] == cfg.steps and extra["ema"] is True
    _, raw_extra = read_checkpoint_meta(out / "model_raw.safetensors")
    assert "ema" not in raw_extra and raw_extra["step"] == cfg.steps
    ema, raw = weights(out).values()
    assert any(not ema[k].equal(raw[k]) for k in ema)  # two different models, not one file twice

    # Checkpoints: `latest` names the final, complete step; only keep_checkpoints are kept.
    ckpt = tmp_path / "run_ckpt"
    assert (ckpt / "latest").read_text().strip() == f"step-{cfg.steps:08d}"
    final = latest_checkpoint(ckpt)
    assert {p.name for p in final.iterdir()} == CHECKPOINT_FILES
    assert json.loads((final / "state.json").read_text())["step"] == cfg.steps
    assert len(list(ckpt.glob("step-*"))) == cfg.keep_checkpoints and not list(ckpt.glob(".*"))

    # MLflow: one finished run tagged with the stage; training curves logged at every log_every.
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["imager.stage"] == command
    assert run.data.params[f"{section}.steps"] == str(cfg.steps)
    client = MlflowClient()
    expected_steps = list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    for name in ("loss", "lr", "images_per_second", "loss_t0", "loss_t1", "loss_t2", "loss_t3"):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == expected_steps, name
        assert all(math.isfinite(m.value) and m.value >= 0 for m in history), name
    assert run.data.metrics["summary.final_loss"] == pytest.approx(report["final_loss"])  # the run's totals
    assert run.data.metrics["summary.images_per_second"] > 0 and run.data.metrics["summary.wall_seconds"] > 0  # not in the report
    assert run.data.metrics["summary.resumed_from_step"] == 0
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"shards", "embeddings"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.safetensors"}
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert grids == {f"grids/step-{s:07d}.png" for s in range(GRID["every"], cfg.steps, GRID["every"])} | {"grids/final.png"}
    assert "report.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


# ---------------------------------------------------------------------- 2. resume and determinism


RESUME = {"steps": 16, "checkpoint_every": 4, "log_every": 2, "grid": {"every": 4}, "model": {"dropout": 0.2}}


def test_resume_after_kill_9_is_bit_exact(data, tmp_path, caplog):
    # grid.every == checkpoint_every: a grid sampled right after a checkpoint must not shift any RNG.
    params = write_params(tmp_path / "params.yaml", train_base=RESUME)
    args = train_args("train-base", data, tmp_path, params, "killed")
    ckpt, latest = tmp_path / "killed_ckpt", tmp_path / "killed_ckpt" / "latest"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not latest.is_file() and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert 0 < killed_at < RESUME["steps"] and not (tmp_path / "killed_out").exists()

    caplog.set_level(logging.INFO, logger="imager")
    report = train("train-base", data, tmp_path, params, "killed")
    assert f"resumed from {ckpt / f'step-{killed_at:08d}'} (step {killed_at})" in caplog.text
    assert_report(report, RESUME["steps"])

    caplog.clear()
    clean = train("train-base", data, tmp_path, params, "clean")
    again = train("train-base", data, tmp_path, params, "again")
    assert "resumed from" not in caplog.text and clean == again == report  # the same report, resumed or not
    assert_identical(weights(tmp_path / "killed_out"), weights(tmp_path / "clean_out"))
    assert_identical(weights(tmp_path / "clean_out"), weights(tmp_path / "again_out"))  # determinism


def test_other_seed_gives_other_weights(data, tmp_path):
    # The determinism above means something only if the seed actually drives the run.
    a = write_params(tmp_path / "a.yaml")
    b = write_params(tmp_path / "b.yaml", seed=1)
    train("train-base", data, tmp_path, a, "a")
    train("train-base", data, tmp_path, b, "b")
    wa, wb = weights(tmp_path / "a_out"), weights(tmp_path / "b_out")
    assert any(not t.equal(wb["model_raw.safetensors"][k]) for k, t in wa["model_raw.safetensors"].items())


# -------------------------------------------------------------------------- 3. atomic checkpoints


def test_leftover_partial_checkpoint_is_ignored_and_resume_is_exact(data, tmp_path, caplog):
    params = write_params(tmp_path / "params.yaml")
    steps, every = TINY["train_base"]["steps"], TINY["train_base"]["checkpoint_every"]
    train("train-base", data, tmp_path, params)
    reference = weights(tmp_path / "run_out")

    # What kill -9 during the write of the final checkpoint leaves: a half-written .tmp directory
    # and `latest` still naming the previous, complete checkpoint.
    ckpt = tmp_path / "run_ckpt"
    partial = ckpt / f".step-{steps:08d}.tmp"
    (ckpt / f"step-{steps:08d}").rename(partial)
    (partial / "state.json").unlink()
    (partial / "ema.safetensors").write_bytes((partial / "ema.safetensors").read_bytes()[:100])
    (ckpt / "latest").write_text(f"step-{every:08d}\n")
    shutil.rmtree(tmp_path / "run_out")
    assert latest_checkpoint(ckpt) == ckpt / f"step-{every:08d}"

    caplog.set_level(logging.INFO, logger="imager")
    train("train-base", data, tmp_path, params)
    assert f"resumed from {ckpt / f'step-{every:08d}'} (step {every})" in caplog.text
    assert_identical(weights(tmp_path / "run_out"), reference)
    assert (ckpt / "latest").read_text().strip() == f"step-{steps:08d}" and not list(ckpt.glob(".*"))


@pytest.mark.parametrize("damage", ["missing", "no_state"])
def test_latest_naming_an_incomplete_checkpoint_is_a_one_line_error(data, tmp_path, damage):
    params = write_params(tmp_path / "params.yaml")
    ckpt = tmp_path / "run_ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step-00000003\n")
    if damage == "no_state":
        (ckpt / "step-00000003").mkdir()
        (ckpt / "step-00000003" / "model.safetensors").write_bytes(b"half a file")
    result = runner.invoke(app, train_args("train-base", data, tmp_path, params))
    assert result.exit_code == 1
    assert one_error_line(result) == (
        f"error: {ckpt / 'latest'}: names step-00000003, which is incomplete; delete {ckpt} to start over"
    )
    assert not (tmp_path / "run_out").exists() and not (tmp_path / "run.json").exists()


def test_checkpoints_from_other_params_are_not_resumed(data, tmp_path, caplog):
    old = write_params(tmp_path / "old.yaml", train_base={"optim": {"lr": 1e-3}})
    new = write_params(tmp_path / "new.yaml", train_base={"optim": {"lr": 2e-3}})
    train("train-base", data, tmp_path, old)
    ckpt = tmp_path / "run_ckpt"
    old_state = json.loads((latest_checkpoint(ckpt) / "state.json").read_text())

    caplog.set_level(logging.INFO, logger="imager")
    train("train-base", data, tmp_path, new)
    assert f"checkpoints in {ckpt} are from other params, data or code: starting afresh" in caplog.text
    assert "resumed from" not in caplog.text
    new_state = json.loads((latest_checkpoint(ckpt) / "state.json").read_text())
    assert new_state["fingerprint"] != old_state["fingerprint"]
    train("train-base", data, tmp_path, new, "fresh")  # the same params into empty directories
    assert_identical(weights(tmp_path / "run_out"), weights(tmp_path / "fresh_out"))


def test_checkpoints_from_other_training_code_are_not_resumed(data, tmp_path, caplog, monkeypatch):
    # The fingerprint reads the training sources through loop.TRAINING_CODE: point it at a copy and
    # edit the copy, as a developer edits the package between two `dvc repro` runs.
    copies = []
    for path in loop.TRAINING_CODE:
        copy = tmp_path / "code" / path.name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, copy)
        copies.append(copy)
    monkeypatch.setattr(loop, "TRAINING_CODE", tuple(copies))
    params = write_params(tmp_path / "params.yaml")
    steps, every = TINY["train_base"]["steps"], TINY["train_base"]["checkpoint_every"]
    train("train-base", data, tmp_path, params)
    reference = weights(tmp_path / "run_out")
    ckpt = tmp_path / "run_ckpt"

    def rewind() -> None:  # back to the mid-run checkpoint, as a kill after it leaves the directory
        shutil.rmtree(ckpt / f"step-{steps:08d}")
        (ckpt / "latest").write_text(f"step-{every:08d}\n")
        shutil.rmtree(tmp_path / "run_out")

    # Documentation only (a comment and a docstring): the run resumes, and exactly.
    unet = tmp_path / "code" / "models" / "unet.py"
    source = unet.read_text()
    docstring_end = source.index('"""', 3)
    unet.write_text("# edited\n" + source[:docstring_end] + " Edited." + source[docstring_end:])
    rewind()
    caplog.set_level(logging.INFO, logger="imager")
    train("train-base", data, tmp_path, params)
    assert f"(step {every})" in caplog.text and "starting afresh" not in caplog.text
    assert_identical(weights(tmp_path / "run_out"), reference)

    # A code change: the checkpoints are set aside and the run starts afresh.
    schedule = tmp_path / "code" / "diffusion" / "schedule.py"
    schedule.write_text(schedule.read_text() + "\nEDITED = True\n")
    rewind()
    caplog.clear()
    train("train-base", data, tmp_path, params)
    assert f"checkpoints in {ckpt} are from other params, data or code: starting afresh" in caplog.text
    assert "resumed from" not in caplog.text
    assert (ckpt / "latest").read_text().strip() == f"step-{steps:08d}"
    assert_identical(weights(tmp_path / "run_out"), reference)  # the real code is unchanged: same weights


# ------------------------------------------------------------------------------ 4. DDP on CPU


DDP = {"steps": 8, "checkpoint_every": 4, "grid": {"every": 4}}


def torchrun(data: dict, root: Path, params: Path, name: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "stages", *train_args("train-base", data, root, params, name),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # cwd: the run's git tags look at the working directory, and this repository must stay untouched.
    return subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def torchrun_nodes(data: dict, root: Path, params: Path, name: str) -> list[subprocess.CompletedProcess]:
    """The same run on two "nodes" of one process each (multi-node torchrun, c10d rendezvous on
    127.0.0.1), each started in a folder of its own; the outputs go to ``root``, the storage they
    share."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node in range(2):
        cwd = root / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", name,
            "-m", "stages", *train_args("train-base", data, root, params, name),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_ddp_on_one_and_on_two_nodes_writes_once_and_resumes_exactly(data, tmp_path, mlflow_uri):
    params = write_params(tmp_path / "params.yaml", train_base=DDP, tracking={"enabled": True, "experiment": "train-ddp"})
    proc = torchrun(data, tmp_path, params, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run.json").read_text())
    assert_report(report, DDP["steps"])
    out = tmp_path / "run_out"
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "model.safetensors", "model_raw.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlruns", "params.yaml", "run.json", "run_ckpt", "run_out"]  # mlruns: artifacts
    assert proc.stderr.count("report written to") == 1  # only rank 0 finishes the stage
    mlflow.set_tracking_uri(mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=["train-ddp"], output_format="list")  # one run: rank 0's
    assert run.info.status == "FINISHED" and run.data.tags["imager.stage"] == "train-base"
    reference = weights(out)

    # Two nodes of one process each: the same two ranks, the same weights; only the global rank 0
    # (node 0) writes and logs, node 1's folder stays empty.
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    node_params = write_params(nodes / "params.yaml", train_base=DDP, tracking={"enabled": True, "experiment": "train-nodes"})
    procs = torchrun_nodes(data, nodes, node_params, "run")
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert procs[0].stderr.count("report written to") == 1 and "report written to" not in procs[1].stderr
    assert list((nodes / "node1").iterdir()) == []
    [run] = mlflow.search_runs(experiment_names=["train-nodes"], output_format="list")
    assert run.info.status == "FINISHED"
    assert_identical(weights(nodes / "run_out"), reference)

    # Rewind to the mid-run checkpoint (what a kill after step 4 leaves) and rerun on the two nodes:
    # both ranks resume, each with its own RNG states, and land on the same weights. Tracking does
    # not enter the fingerprint.
    ckpt = nodes / "run_ckpt"
    shutil.rmtree(ckpt / f"step-{DDP['steps']:08d}")
    (ckpt / "latest").write_text(f"step-{DDP['checkpoint_every']:08d}\n")
    shutil.rmtree(nodes / "run_out")
    quiet = write_params(nodes / "quiet.yaml", train_base=DDP)
    procs = torchrun_nodes(data, nodes, quiet, "run")
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert all(p.stderr.count(f"(step {DDP['checkpoint_every']})") == 1 for p in procs), procs[1].stderr[-3000:]
    assert_identical(weights(nodes / "run_out"), reference)


def test_ranks_read_disjoint_samples(data):
    cfg = config.parse({"train_base": TINY["train_base"]}).train_base
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(data["shards"], "train", batch_size=cfg.batch_size, seed=0, rank=rank, world_size=2)
        batches = data["train"] // 2 // cfg.batch_size  # one epoch's worth for this rank
        it = iter(loader)
        per_rank.append([k for _ in range(batches) for k in next(it)["keys"]])
    train_keys = set(EmbeddingCache(data["emb"]).keys)
    for keys in per_rank:
        assert len(keys) == len(set(keys)) == data["train"] // 2 // cfg.batch_size * cfg.batch_size
        assert set(keys) <= train_keys
    assert not set(per_rank[0]) & set(per_rank[1])


# ---------------------------------------------------------------------------- 5. loss falls


def test_loss_falls_on_a_tiny_overfit_set(data, tmp_path):
    # 8 images, no validation split, no caption dropout, constant lr.
    raw = tmp_path / "raw8"
    (raw / "images").mkdir(parents=True)
    records = (data["raw"] / "manifest.jsonl").read_text().splitlines()[:8]
    for line in records:
        shutil.copy(data["raw"] / json.loads(line)["file"], raw / json.loads(line)["file"])
    (raw / "manifest.jsonl").write_text("\n".join(records) + "\n")
    shard(raw, tmp_path / "shards8", config.parse({"shard": {"resolution": 16, "val_fraction": 0.0}}).shard)

    steps, window = 40, 8
    cfg = config.parse({"train_base": {
        "steps": steps, "batch_size": 8, "resolution": 8, "log_every": 1, "checkpoint_every": steps, "cond_drop": 0.0,
        "shuffle_buffer": 1, "loss": {"prediction": "eps", "weighting": "uniform"},
        "optim": {"lr": 2e-3, "warmup_steps": 0, "decay": "constant"},
        "model": {**MODEL, "base_channels": 16, "dropout": 0.0},
    }}).train_base  # fmt: skip
    trainer = Trainer(cfg, BaseTask(cfg), shards_dir=tmp_path / "shards8", cache_dir=data["emb"], ckpt_dir=tmp_path / "ckpt", seed=0, dist=Dist())
    losses: list[float] = []
    trainer.run(lambda metrics, step: losses.append(metrics["loss"]))

    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    # A fresh UNet outputs exactly 0, so the first loss is the mean of eps² over 8·3·8·8 values: 1 ± ~0.04.
    assert losses[0] == pytest.approx(1.0, abs=0.2)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < 0.5 * first, losses


# ------------------------------------------------------------- 5b. the accelerator code paths on CPU


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16", "channels_last": True, "grad_checkpointing": True},
        {"precision": "fp16"},  # autocast fp16 with loss scaling (GradScaler on CPU)
        {"compile": True},
    ],
    ids=["bf16-channels_last-checkpointing", "fp16-scaler", "compile"],
)
def test_mixed_precision_channels_last_checkpointing_and_compile_train_on_cpu(data, tmp_path, options):
    """The GPU knobs run through the same loop on CPU: the loss stays finite and the EMA model saved
    at the end is a plain fp32 model that loads and samples."""
    if options.get("compile") and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    params = write_params(tmp_path / "params.yaml", train_base={**TINY["train_base"], "steps": 4, "checkpoint_every": 4, **options})
    report = train("train-base", data, tmp_path, params)
    assert_report(report, 4)
    model = load_model(tmp_path / "run_out" / "model.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with Image.open(tmp_path / "run_out" / "grid.png") as im:
        im.verify()


# ------------------------------------------- 5c. the diffusers baseline, Efficient U-Net, patches


@pytest.mark.parametrize(
    "command, section, model",
    [
        ("train-base", "train_base", {"arch": "diffusers"}),
        ("train-sr", "train_sr", {"arch": "diffusers"}),
        ("train-base", "train_base", {"efficient": True}),
        ("train-base", "train_base", {"patch_size": 2}),
    ],
    ids=["diffusers-base", "diffusers-sr", "efficient-base", "patched-base"],
)
def test_other_architectures_train_through_the_same_loop_deterministically(data, tmp_path, command, section, model):
    """``model.arch: diffusers`` (the benchmark baseline) and the Efficient U-Net order train through the
    stage, twice to identical weights, and save models that load as what the config names."""
    params = write_params(tmp_path / "params.yaml", **{section: {"steps": 4, "checkpoint_every": 2, "model": model}})
    report = train(command, data, tmp_path, params, "a")
    assert_report(report, 4)
    train(command, data, tmp_path, params, "b")
    assert_identical(weights(tmp_path / "a_out"), weights(tmp_path / "b_out"))
    loaded = load_model(tmp_path / "a_out" / "model.safetensors")
    expected = "DiffusersUNet" if model.get("arch") == "diffusers" else "UNet"
    assert type(loaded).__name__ == expected and loaded.config.efficient == bool(model.get("efficient"))
    assert loaded.config.patch_size == model.get("patch_size", 1)
    with Image.open(tmp_path / "a_out" / "grid.png") as im:
        im.verify()


# ---------------------------------------------------------------------------- 6. bad params


@pytest.mark.parametrize(
    "command, sections, message",
    [
        (
            "train-sr", {"train_sr": {"lowres": 8, "resolution": 12}},
            "error: params.yaml: train_sr.resolution: the SR output must be a multiple (> 1) of the base resolution lowres (8), got 12",
        ),
        ("train-base", {"train_base": {"model": {"colour": "red"}}}, "error: params.yaml: train_base.model.colour: unknown key"),
        (
            "train-base", {"train_base": {"model": {"arch": "diffusers", "efficient": True}}},
            "error: params.yaml: train_base.model.efficient: Imagen's Efficient U-Net order is Imager's own (arch: imager), not diffusers'",
        ),
        (
            "train-base", {"train_base": {"resolution": 32}},
            "error: params.yaml: train_base.resolution: must be <= the shard resolution (16), got 32",
        ),
    ],
)  # fmt: skip
def test_bad_training_params_fail_in_one_line_and_write_nothing(data, tmp_path, command, sections, message):
    params = write_params(tmp_path / "params.yaml", **sections)
    result = runner.invoke(app, train_args(command, data, tmp_path, params))
    assert result.exit_code == 1
    assert one_error_line(result) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_embedding_cache_points_to_imager_embed(data, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    args = train_args("train-base", data, tmp_path, params)
    args[args.index("--embeddings") + 1] = str(tmp_path / "no_embeddings")
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith("error: ") and str(tmp_path / "no_embeddings") in line and "run `imager embed` first" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
