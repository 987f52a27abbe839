"""Fine-tuning end to end: `imager finetune` and `imager train-lora` from a trained base model on the
tiny OpenMoji data set: weights and EMA start from the model given, exact resume after kill -9,
the base weights untouched by LoRA, and the one-line errors of a bad init_from."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imager import config
from imager.inference.metadata import file_sha256
from imager.models import load_model
from imager.models import lora as L
from imager.text.cache import EmbeddingCache
from imager.training.distributed import Dist
from imager.training.loop import Trainer
from imager.training.tasks import BaseTask
from tests.conftest import REPO
from tests.stages.test_train import assert_identical, runner, train, weights, write_params

FINETUNE = {
    "base": {"steps": 12, "checkpoint_every": 4, "log_every": 2, "grid": {"every": 4}, "optim": {"lr": 0.002, "warmup_steps": 2}},
    "lora": {"steps": 12, "checkpoint_every": 4, "log_every": 2, "grid": {"every": 4}, "optim": {"lr": 0.01, "warmup_steps": 2},
             "lora": {"rank": 2, "dropout": 0.1}},
    "evaluate": {"probe_prompts": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def base_model(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    train("train-base", data, root, write_params(root / "params.yaml"), "base")
    return root / "base_out"


def ft_args(command: str, data: dict, root: Path, params: Path, init: Path | str, name: str) -> list[str]:
    return [
        command, "--params", str(params), "--shards", str(data["shards"]), "--embeddings", str(data["emb"]),
        "--init-from", str(init), "--out", str(root / f"{name}_out"), "--checkpoints", str(root / f"{name}_ckpt"),
        "--report", str(root / f"{name}.json"),
    ]  # fmt: skip


def run(args: list[str]) -> dict:
    result = runner.invoke(__import__("stages.app", fromlist=["app"]).app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(Path(args[args.index("--report") + 1]).read_text())


def kill_at_first_checkpoint(args: list[str], ckpt: Path, log: Path) -> int:
    latest = next(iter(sorted(ckpt.glob("**/latest"))), None)
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            latest = next(iter(sorted(ckpt.glob("**/latest"))), None)
            if latest is not None:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    return int(latest.read_text().strip().removeprefix("step-"))


def test_weights_and_ema_start_from_the_model_and_the_rest_afresh(data, base_model, tmp_path):
    params = config.load(write_params(tmp_path / "p.yaml", finetune=FINETUNE))
    cfg = params.finetune_base().model_copy(update={"init_from": str(base_model)})
    trainer = Trainer(cfg, BaseTask(cfg), shards_dir=data["shards"], cache_dir=data["emb"], ckpt_dir=tmp_path / "ck", seed=0, dist=Dist())
    source = load_model(base_model / "model.safetensors").state_dict()
    for model in (trainer.model, trainer.ema.model):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in source.items())
    assert trainer.step == 0 and not trainer.optimizer.state
    assert trainer.init.sha256 == file_sha256(base_model / "model.safetensors")


def test_finetune_resumes_bit_exactly_after_kill_9_and_records_its_origin(data, base_model, tmp_path):
    params = write_params(tmp_path / "params.yaml", finetune=FINETUNE)
    killed_at = kill_at_first_checkpoint(ft_args("finetune", data, tmp_path, params, base_model, "killed"), tmp_path / "killed_ckpt", tmp_path / "k.log")
    assert 0 < killed_at < 12 and not (tmp_path / "killed_out").exists()
    report = run(ft_args("finetune", data, tmp_path, params, base_model, "killed"))
    clean = run(ft_args("finetune", data, tmp_path, params, base_model, "clean"))
    assert report == clean and report["steps"] == 12
    assert set(report["style_by_step"]) == {"0", "4", "8", "12"} and 0 <= report["style_final"] <= 1
    assert_identical(weights(tmp_path / "killed_out"), weights(tmp_path / "clean_out"))
    meta = json.loads(load_meta(tmp_path / "clean_out" / "model.safetensors"))["extra"]["init_from"]
    assert meta == {"source": str(base_model), "sha256": file_sha256(base_model / "model.safetensors")}
    # the fine-tune moved the weights
    tuned, source = load_file(str(tmp_path / "clean_out" / "model_raw.safetensors")), load_file(str(base_model / "model.safetensors"))
    assert any(not torch.equal(tuned[k], source[k]) for k in source)


def load_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()["imager"]


def test_lora_resumes_bit_exactly_and_leaves_the_base_weights_alone(data, base_model, tmp_path):
    finetune = {**FINETUNE, "extra_ranks": [1]}
    params = write_params(tmp_path / "params.yaml", finetune=finetune)
    killed_at = kill_at_first_checkpoint(ft_args("train-lora", data, tmp_path, params, base_model, "killed"), tmp_path / "killed_ckpt", tmp_path / "k.log")
    assert 0 < killed_at < 12
    report = run(ft_args("train-lora", data, tmp_path, params, base_model, "killed"))
    clean = run(ft_args("train-lora", data, tmp_path, params, base_model, "clean"))
    assert report == clean and report["rank"] == 2 and set(report) == {"rank", "r2", "r1"}
    assert report["r1"]["trainable_parameters"] < report["r2"]["trainable_parameters"] < report["r2"]["parameters"]
    for rank in (2, 1):
        a, b = (L.read_adapter(tmp_path / f"{n}_out" / f"rank-{rank}" / "adapter.safetensors") for n in ("killed", "clean"))
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        assert a.settings.rank == rank and a.stage == "base"
    base = load_model(base_model / "model.safetensors")
    adapter = L.read_adapter(tmp_path / "clean_out" / "rank-2" / "adapter.safetensors")
    assert adapter.base_sha256 == L.weights_sha256(base)
    assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if "lora_B" in k)  # it learned something
    # The last checkpoint holds the whole adapted model: its base weights are the base model's, bit for bit.
    ckpt = tmp_path / "clean_ckpt" / "rank-2"
    trained = load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "model.safetensors"))
    plain = {L._plain_name(k): v for k, v in trained.items() if ".lora_" not in k}
    source = base.state_dict()
    assert plain.keys() == source.keys() and all(torch.equal(plain[k], source[k]) for k in source)


def test_init_from_errors_are_one_line(data, base_model, tmp_path):
    other = write_params(tmp_path / "wide.yaml", finetune={"base": {"model": {"base_channels": 16, "norm_groups": 8}}})
    for params, init, expected in (
        (write_params(tmp_path / "p.yaml"), tmp_path / "missing", "model file not found"),
        (other, base_model, "the model does not match the params: base_channels is 8 there, 16 here"),
    ):
        result = runner.invoke(__import__("stages.app", fromlist=["app"]).app, ft_args("finetune", data, tmp_path, params, init, "bad"))
        assert result.exit_code == 1
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("error: init_from: ") and expected in line
        assert not (tmp_path / "bad_out").exists()
    # a LoRA run needs the model it adapts
    params = config.load(write_params(tmp_path / "q.yaml"))
    cfg = params.finetune_lora()
    with pytest.raises(Exception, match="lora: needs init_from"):
        Trainer(cfg, BaseTask(cfg), shards_dir=data["shards"], cache_dir=data["emb"], ckpt_dir=tmp_path / "ck", seed=0, dist=Dist())
    assert EmbeddingCache(data["emb"]).meta  # the fixture's cache is intact


def test_train_sr_fine_tunes_from_init_from_and_takes_a_lora_adapter(data, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    train("train-sr", data, tmp_path, params, "sr")
    source = tmp_path / "sr_out"
    tuned = write_params(tmp_path / "tuned.yaml", train_sr={"steps": 4, "checkpoint_every": 2, "grid": {"every": 2}})
    args = ["train-sr", "--params", str(tuned), "--shards", str(data["shards"]), "--embeddings", str(data["emb"]), "--init-from", str(source)]
    run([*args, "--out", str(tmp_path / "full_out"), "--checkpoints", str(tmp_path / "full_ck"), "--report", str(tmp_path / "full.json")])
    meta = json.loads(load_meta(tmp_path / "full_out" / "model.safetensors"))
    assert meta["extra"]["init_from"]["sha256"] == file_sha256(source / "model.safetensors") and meta["config"]["super_resolution"]
    adapter_params = write_params(tmp_path / "lora.yaml", train_sr={"steps": 4, "checkpoint_every": 2, "grid": {"every": 2}, "lora": {"rank": 2}})
    args[2] = str(adapter_params)
    report = run([*args, "--out", str(tmp_path / "lora_out"), "--checkpoints", str(tmp_path / "lora_ck"), "--report", str(tmp_path / "lora.json")])
    adapter = L.read_adapter(tmp_path / "lora_out" / "adapter.safetensors")
    assert adapter.stage == "sr" and adapter.base_sha256 == L.weights_sha256(load_model(source / "model.safetensors"))
    assert report["trainable_parameters"] == adapter.parameters < report["parameters"]
