"""`imager train-control` end to end on the tiny OpenMoji data set: a ControlNet and an adapter
trained on a frozen tiny base through the CLI lower the loss below the base model's, the base stays
bit-identical, two runs give identical files, a kill -9 resumes exactly, the paired (lineart)
condition reads its pairs, and bad params fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imager import config
from imager.diffusion.process import diffusion_loss, q_sample
from imager.diffusion.schedule import NoiseSchedule
from imager.models import load_model
from imager.models.control import Controlled, load_control, read_control
from imager.text.cache import EmbeddingCache
from imager.training.loader import ShardLoader
from imager.training.tasks import ControlTask
from tests.stages.test_finetune import kill_at_first_checkpoint
from tests.stages.test_train import one_error_line, runner, train, write_params

VARIANT = {
    "steps": 30, "batch_size": 8, "log_every": 5, "checkpoint_every": 10, "cond_drop": 0.5, "ema_decay": 0.0,
    "grid": {"every": 10}, "optim": {"lr": 0.01, "warmup_steps": 2, "decay": "constant"},
}  # fmt: skip
CONTROL = {
    "default": "controlnet",
    "variants": {
        "controlnet": {**VARIANT, "control": {"arch": "controlnet", "hint_channels": [4]}},
        "adapter": {**VARIANT, "steps": 60, "control": {"arch": "adapter", "hint_channels": [4]}},  # it learns slower at this size
        "paired": {**VARIANT, "steps": 4, "control": {"arch": "adapter", "condition": "lineart", "hint_channels": [4]}},
    },
}


@pytest.fixture(scope="module")
def base_model(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("control_base")
    train("train-base", data, root, write_params(root / "params.yaml", train_base={"steps": 40, "optim": {"lr": 0.01, "warmup_steps": 2, "decay": "constant"}}), "base")
    return root / "base_out"


def args(data: dict, root: Path, params: Path, base: Path, variant: str, name: str | None = None, pairs: Path | None = None) -> list[str]:
    name = name or variant
    out = [
        "train-control", "--params", str(params), "--variant", variant, "--shards", str(data["shards"]), "--embeddings", str(data["emb"]),
        "--base", str(base), "--out", str(root / f"{name}_out"), "--checkpoints", str(root / f"{name}_ckpt"), "--report", str(root / f"{name}.json"),
    ]  # fmt: skip
    return out + (["--pairs", str(pairs)] if pairs else [])


def run(argv: list[str]) -> dict:
    from stages.app import app

    result = runner.invoke(app, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(Path(argv[argv.index("--report") + 1]).read_text())


def fixed_batch_loss(data: dict, base_file: Path, control_file: Path | None, cfg, draws: int = 8) -> float:
    """The diffusion loss of the base (with the control) on one fixed batch of training images,
    averaged over `draws` fixed draws of noise and timesteps, the captions kept."""
    cache = EmbeddingCache(data["emb"])
    base = load_model(base_file)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    loader = ShardLoader(data["shards"], "train", batch_size=16, seed=123, shuffle_buffer=1)
    batch = next(iter(loader))
    gen = torch.Generator().manual_seed(0)
    task = ControlTask(cfg.model_copy(update={"control": cfg.control.model_copy(update={"control_drop": 0.0})}))
    x0, extra = task.inputs(batch["images"], schedule, gen, keys=batch["keys"])
    x0, condition = x0.repeat(draws, 1, 1, 1), extra["condition"].repeat(draws, 1, 1, 1)
    index = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    alpha, sigma = schedule.alpha[index].float(), schedule.sigma[index].float()
    x_t, t = q_sample(x0, alpha, sigma, eps), schedule.t_of_index(index).float()
    tokens, mask, pooled = (v.repeat(draws, *[1] * (v.dim() - 1)) for v in cache.lookup(batch["keys"]))
    with torch.no_grad():
        if control_file is None:
            out = base(x_t, t, tokens.float(), mask, pooled.float())
        else:
            out = Controlled(base, load_control(control_file, base))(x_t, t, tokens.float(), mask, pooled.float(), condition=condition)
    return float(diffusion_loss(out, x0, eps, alpha, sigma, cfg.loss).mean())


@pytest.mark.parametrize("variant", ["controlnet", "adapter"])
def test_training_through_the_cli_lowers_the_loss_and_leaves_the_base_alone(data, base_model, tmp_path, variant):
    params = write_params(tmp_path / "p.yaml", control=CONTROL)
    report = run(args(data, tmp_path, params, base_model, variant))
    out = tmp_path / f"{variant}_out"
    steps = CONTROL["variants"][variant]["steps"]
    assert report["steps"] == steps and report["variant"] == variant and report["arch"] == variant
    assert report["zero_conv_norm"] > 0  # the zero convolutions left zero: the control acts
    assert (out / "grid.png").is_file() and report["file_bytes"] == (out / "control.safetensors").stat().st_size
    info = read_control(out / "control.safetensors")
    assert info.parameters == report["parameters"] and info.extra["step"] == steps
    cfg = config.load(params).control_train(variant)
    base_file = base_model / "model.safetensors"
    before = fixed_batch_loss(data, base_file, None, cfg)
    after = fixed_batch_loss(data, base_file, out / "control_raw.safetensors", cfg)
    # the zero-initialised outputs give exactly the base's loss before training
    assert after < 0.985 * before, (before, after)
    # the base in the training state is the base given, bit for bit
    state = load_file(str(next((tmp_path / f"{variant}_ckpt").glob("step-*")) / "model.safetensors"))
    source = load_file(str(base_file))
    assert all(torch.equal(state[f"base.{k}"], v) for k, v in source.items())


def test_two_runs_are_identical_and_a_kill_9_resumes_exactly(data, base_model, tmp_path):
    params = write_params(tmp_path / "p.yaml", control=CONTROL)
    run(args(data, tmp_path, params, base_model, "adapter", "a"))
    run(args(data, tmp_path, params, base_model, "adapter", "b"))
    killed = args(data, tmp_path, params, base_model, "adapter", "k")
    step = kill_at_first_checkpoint(killed, tmp_path / "k_ckpt", tmp_path / "k.log")
    assert 0 < step < 60
    assert run(killed)["steps"] == 60
    for name in ("control.safetensors", "control_raw.safetensors"):
        files = [(tmp_path / f"{run_}_out" / name).read_bytes() for run_ in ("a", "b", "k")]
        assert files[0] == files[1] == files[2], name


def test_the_paired_condition_reads_the_pairs_by_key(data, base_model, tmp_path):
    params = write_params(tmp_path / "p.yaml", control=CONTROL)
    # the data paired with itself: every key has its pair
    report = run(args(data, tmp_path, params, base_model, "paired", pairs=data["shards"]))
    assert report["condition"] == "lineart" and report["steps"] == 4
    from stages.app import app

    result = runner.invoke(app, args(data, tmp_path, params, base_model, "paired", "nopairs"))
    assert result.exit_code != 0
    assert one_error_line(result).endswith("control.condition: lineart needs the paired dataset's shards (--pairs)")


@pytest.mark.parametrize(
    "variant, sections, message",
    [
        ("nope", {}, "--variant: control.variants: no variant named 'nope' (known: controlnet, adapter, paired)"),
        ("controlnet", {"control": {**CONTROL, "variants": {"controlnet": {"control": {"arch": "gan"}}}}}, "control.variants.controlnet.control.arch"),
        ("controlnet", {"control": {**CONTROL, "variants": {"controlnet": {"lora": {}, "control": {}}}}}, "control: trains on a frozen base model; it does not combine with lora"),
        ("controlnet", {"control": {**CONTROL, "variants": {"controlnet": {"model": {"arch": "diffusers"}, "control": {}}}}}, "control: is built for Imager's own UNet (model.arch: imager), not diffusers'"),
    ],
    ids=["unknown-variant", "bad-arch", "with-lora", "diffusers-base"],
)
def test_bad_params_fail_in_one_line_and_write_nothing(data, base_model, tmp_path, variant, sections, message):
    from stages.app import app

    params = write_params(tmp_path / "p.yaml", **({"control": CONTROL} | sections))
    result = runner.invoke(app, args(data, tmp_path, params, base_model, variant))
    assert result.exit_code != 0
    assert message in one_error_line(result)
    assert not (tmp_path / f"{variant}_out").exists() and not (tmp_path / f"{variant}.json").exists()
