"""The training loop shared by the base and the super-resolution stage.

Each optimizer step: ``grad_accum`` micro-batches from the streaming loader, condition dropout,
a uniformly drawn timestep per image, the loss of imager.diffusion (prediction target and min-SNR
weighting from params), gradient clipping, AdamW with warm-up and decay, then the EMA update.
All randomness of the loop comes from one seeded generator per process plus torch's global RNG
(dropout), and both are saved in every checkpoint with the optimizer, the EMA and the loader
position, so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from imager.diffusion.process import diffusion_loss, q_sample
from imager.diffusion.schedule import NoiseSchedule
from imager.errors import ConfigError
from imager.models import lora
from imager.models.base import Denoiser
from imager.models.checkpoint import save_model
from imager.models.control import Controlled, build_control, save_control
from imager.models.factory import build_denoiser
from imager.text.cache import EmbeddingCache
from imager.training.config import TrainCommon
from imager.training.distributed import Dist, barrier, mean_across
from imager.training.ema import EMA
from imager.training.init import InitSource, load_into
from imager.training.init import resolve as resolve_init
from imager.training.loader import ShardLoader
from imager.training.optim import adamw
from imager.training.state import latest_checkpoint, load_training_state, save_training_state

log = logging.getLogger(__name__)
BUCKETS = 4  # the loss is also logged per quarter of the timestep range

Logger = Callable[[dict[str, float], int], None]


def lr_at(step: int, cfg: TrainCommon) -> float:
    """Linear warm-up over ``warmup_steps``, then constant, cosine or linear decay to min_lr_ratio·lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.decay == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


# The sources whose code decides the weights a run ends with: the networks, the diffusion loss and
# schedules, the loop with its loader, tasks, optimizer and EMA, the image conversions of the inputs,
# and the embedding lookup.
_PACKAGE = Path(__file__).resolve().parents[1]
TRAINING_CODE: tuple[Path, ...] = tuple(
    _PACKAGE / p for p in ("diffusion", "models", "training", "inference/images.py", "inference/conditions.py", "text/cache.py")
)


def code_digest(paths: Iterable[Path]) -> str:
    """A digest of the Python sources in ``paths`` (files or packages) that ignores comments, formatting
    and docstrings: it changes when the code does, not when its documentation does."""
    files = {}  # name within its package, as "models/unet.py" (a file given alone: its name) -> path
    for p in map(Path, paths):
        for f in [p] if p.is_file() else p.rglob("*.py"):
            files[f.relative_to(p.parent).as_posix()] = f
    h = hashlib.sha256()
    for name, file in sorted(files.items()):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainCommon, seed: int, world_size: int, shards_dir: Path, cache_dir: Path, init_sha256: str = "") -> str:
    """What a checkpoint must match to be resumed: the params, the data, the training code
    (``TRAINING_CODE``, see ``code_digest``), the process count and the weights a fine-tune started from."""
    parts = [cfg.model_dump_json(), str(seed), str(world_size), code_digest(TRAINING_CODE)]
    if init_sha256:
        parts.append(init_sha256)
    for path in (Path(shards_dir) / "index.json", Path(cache_dir) / "meta.json", Path(cache_dir) / "keys.txt"):
        parts.append(hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_model(cfg: TrainCommon, cache: EmbeddingCache, super_resolution: bool) -> Denoiser:
    """The network of ``cfg.model`` (``arch``) with its text dimensions resolved from the embedding cache."""
    meta = cache.meta
    config = cfg.model.model_copy(
        update={
            "text_dim": meta["token_dim"],
            "pooled_dim": meta["pooled_dim"],
            "context_length": meta["max_length"],
            "super_resolution": super_resolution,
        }
    )
    model = build_denoiser(type(cfg.model).model_validate(config.model_dump()))
    if model.config.null_embedding == "cached":
        model.set_null_condition(cache.null_tokens.float(), cache.null_mask, cache.null_pooled.float())
    return model


class Trainer:
    def __init__(self, cfg: TrainCommon, task, *, shards_dir: Path, cache_dir: Path, ckpt_dir: Path, seed: int, dist: Dist):
        self.cfg, self.task, self.dist = cfg, task, dist
        self.ckpt_dir, self.seed = Path(ckpt_dir), seed
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(seed * 1000 + dist.rank)
        self.gen = torch.Generator().manual_seed(seed * 1000 + 7 + dist.rank)
        self.cache = EmbeddingCache(cache_dir)
        self.schedule = NoiseSchedule.from_config(cfg.schedule)
        self.loader = ShardLoader(
            shards_dir, "train", batch_size=cfg.batch_size, seed=seed, shuffle_buffer=cfg.shuffle_buffer,
            num_workers=cfg.num_workers, rank=dist.rank, world_size=dist.world_size,
        )
        task.check(self.loader.resolution)
        model = build_model(cfg, self.cache, task.super_resolution)
        self.init = self._init_from(model)
        self.base_sha256 = None  # a LoRA or control run: the weights its adapter or control belongs to
        if cfg.lora is not None:
            self.base_sha256 = lora.weights_sha256(model)
            lora.inject(model, cfg.lora, lora.TRAINED)
        if cfg.control is not None:  # the base frozen, a fresh control on it
            self.base_sha256 = lora.weights_sha256(model)
            model = Controlled(model.requires_grad_(False), build_control(model, cfg.control))
        self.model = model.to(dist.device)
        self.model.gradient_checkpointing = cfg.grad_checkpointing
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, cfg.ema_decay)
        o = cfg.optim
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.fingerprint = fingerprint(cfg, seed, dist.world_size, shards_dir, cache_dir, self.init.sha256 if self.init else "")
        self.step = 0
        self.resumed_from: int | None = None
        self.last_loss = float("nan")  # the loss of the last logging window
        self.probes: list[dict[str, float]] = []  # measurements of the EMA model during the run (kept in checkpoints)
        self._scaler_state: dict[str, Any] | None = None
        self._resume()
        self.net = self.model
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        if self._scaler_state and self.scaler.is_enabled():  # fp16: the loss scale continues too
            self.scaler.load_state_dict(self._scaler_state)

    def _init_from(self, model: Denoiser) -> InitSource | None:
        cfg = self.cfg
        if cfg.control is not None:
            if cfg.lora is not None:
                raise ConfigError("control: trains on a frozen base model; it does not combine with lora")
            if self.task.super_resolution:
                raise ConfigError("control: conditions the base model, not the super-resolution model")
            if cfg.model.arch != "imager":
                raise ConfigError("control: is built for Imager's own UNet (model.arch: imager), not diffusers'")
        if cfg.init_from is None:
            if cfg.lora is not None:
                raise ConfigError("lora: needs init_from, the trained model the adapter is for")
            if cfg.control is not None:
                raise ConfigError("control: needs init_from, the trained base model the control is for")
            return None
        init = resolve_init(cfg.init_from, "sr" if self.task.super_resolution else "base")
        load_into(model, init)
        log.info("weights from %s (sha256 %s)", init.source, init.sha256[:12])
        return init

    # ------------------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("checkpoints in %s are from other params, data or code: starting afresh", self.ckpt_dir)
            barrier(self.dist)
            if self.dist.is_main:
                shutil.rmtree(self.ckpt_dir)
            barrier(self.dist)
            return
        meta, extra = load_training_state(path, model=self.model, ema_model=self.ema.model, optimizer=self.optimizer)
        rank = self.dist.rank
        self.gen.set_state(extra[f"generator.{rank}"])
        if f"torch_rng.{rank}" in extra:  # this rank's own global RNG (load_training_state set rank 0's)
            torch.set_rng_state(extra[f"torch_rng.{rank}"])
        if f"cuda_rng.{rank}" in extra and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(extra[f"cuda_rng.{rank}"], self.dist.device)
        self.step = int(meta["step"])
        self.loader.load_state_dict(meta["loader"])
        self._scaler_state = meta.get("grad_scaler")
        self.last_loss = float(meta.get("last_loss", float("nan")))
        self.probes = list(meta.get("probes", []))
        self.resumed_from = self.step
        log.info("resumed from %s (step %d)", path, self.step)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"generator": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.dist.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state(self.dist.device)
        return states

    def save_checkpoint(self) -> None:
        # Every rank's generator and global (dropout) RNG states go into the checkpoint that rank 0
        # writes: rank 0's global state alone would give every rank the same dropout after a resume.
        states = [self._rng_states()]
        if self.dist.enabled:
            states = [{} for _ in range(self.dist.world_size)]
            torch.distributed.all_gather_object(states, self._rng_states())
        if self.dist.is_main:
            save_training_state(
                self.ckpt_dir, self.step, model=self.model, ema_model=self.ema.model, optimizer=self.optimizer,
                extra={
                    "fingerprint": self.fingerprint,
                    "loader": self.loader.state_dict(),
                    "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "last_loss": self.last_loss,
                    **({"probes": self.probes} if self.probes else {}),
                },
                tensors={f"{name}.{r}": s for r, st in enumerate(states) for name, s in st.items()}, keep=self.cfg.keep_checkpoints,
            )
        barrier(self.dist)

    # ------------------------------------------------------------------------------------ steps

    def _micro_step(self, batch: dict[str, Any], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of one micro-batch; returns (per-sample loss, timestep indices)."""
        device, cfg = self.dist.device, self.cfg
        x0, extra = self.task.inputs(batch["images"], self.schedule, self.gen, keys=batch["keys"])
        tokens, mask, pooled = self.cache.lookup(batch["keys"])
        b = x0.shape[0]
        index = torch.randint(0, self.schedule.num_steps, (b,), generator=self.gen)
        eps = torch.randn(x0.shape, generator=self.gen)
        drop = torch.rand(b, generator=self.gen) < cfg.cond_drop
        alpha, sigma = self.schedule.alpha[index].float(), self.schedule.sigma[index].float()
        x_t = q_sample(x0, alpha, sigma, eps)
        t = self.schedule.t_of_index(index).float()
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        to = lambda v: v.to(device, non_blocking=True)  # noqa: E731
        kwargs = {k: to(v) for k, v in extra.items()}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.net(
                to(x_t).contiguous(memory_format=fmt), to(t), to(tokens).float(), to(mask), to(pooled).float(),
                drop=to(drop), **kwargs,
            )
        loss = diffusion_loss(out.float(), to(x0), to(eps), to(alpha), to(sigma), cfg.loss)  # (B,)
        self.scaler.scale(loss.mean() * scale).backward()
        return loss.detach().cpu(), index

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, indices = [], []
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.net.no_sync()
            with sync:
                loss, index = self._micro_step(next(batches), 1 / cfg.grad_accum)
            losses.append(loss)
            indices.append(index)
        self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.model, self.step)
        return torch.cat(losses), torch.cat(indices)

    def run(self, log_metrics: Logger, on_grid: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train to ``cfg.steps`` (from a checkpoint when one matches); returns the summary."""
        cfg, world = self.cfg, self.dist.world_size
        per_step = cfg.batch_size * cfg.grad_accum * world
        batches = iter(self.loader)
        window, window_idx, started, window_start = [], [], time.perf_counter(), time.perf_counter()
        first_step = self.step
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not self.dist.is_main)
        while self.step < cfg.steps:
            loss, index = self.train_step(batches)
            window.append(loss)
            window_idx.append(index)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                losses, idx = torch.cat(window), torch.cat(window_idx)
                bucket = idx * BUCKETS // self.schedule.num_steps
                stats = [losses.mean()] + [losses[bucket == k].mean() if (bucket == k).any() else losses.mean() for k in range(BUCKETS)]
                stats = mean_across(self.dist, torch.stack(stats).double()).tolist()
                now = time.perf_counter()
                ips = len(window) * per_step / (now - window_start)
                self.last_loss = stats[0]
                metrics = {"loss": stats[0], "lr": lr_at(self.step - 1, cfg), "images_per_second": ips}
                metrics.update({f"loss_t{k}": stats[1 + k] for k in range(BUCKETS)})
                metrics.update(self.control_norms())
                if self.dist.is_main:
                    log_metrics(metrics, self.step)
                bar.set_postfix(loss=f"{stats[0]:.4f}", img_s=f"{ips:.0f}")
                window, window_idx, window_start = [], [], now
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
            grid_due = cfg.grid.every and self.step % cfg.grid.every == 0 and self.step < cfg.steps
            if on_grid is not None and grid_due and self.dist.is_main:
                on_grid(self.step)
        bar.close()
        self.save_checkpoint()
        seconds = time.perf_counter() - started
        trained = self.step - first_step
        return {
            "steps": float(self.step),
            "final_loss": self.last_loss,
            "images_per_second": trained * per_step / seconds if trained else 0.0,
            "wall_seconds": seconds,
            "resumed_from_step": float(self.resumed_from or 0),
        }

    def control_norms(self) -> dict[str, float]:
        """A control run: the L2 norm of its zero convolutions' weights (all, and the middle block's),
        which leave zero as the control learns to act (ControlNet's "sudden convergence" shows here)."""
        if self.cfg.control is None:
            return {}
        convs = self.model.control.zero_convs
        norms = torch.stack([c.weight.detach().float().norm() for c in convs])
        return {"zero_conv_norm": float(norms.norm()), "zero_conv_norm_middle": float(norms[-1])}

    def save_final(self, out_dir: Path) -> None:
        """``model.safetensors`` (EMA weights, the model later stages use) and ``model_raw.safetensors``;
        for a LoRA run, ``adapter.safetensors`` (the EMA adapter) and ``adapter_raw.safetensors`` instead."""
        if not self.dist.is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        extra = {"step": self.step, **self.sampling_meta()}
        if self.init is not None:
            extra["init_from"] = self.init.record()
        if self.cfg.control is not None:
            for model, name, ema in ((self.ema.model, "control.safetensors", True), (self.model, "control_raw.safetensors", False)):
                save_control(out_dir / name, model.control, base_sha256=self.base_sha256, extra={**extra, "ema": ema})
            return
        if self.cfg.lora is not None:
            stage = "sr" if self.task.super_resolution else "base"
            for model, name, ema in ((self.ema.model, "adapter.safetensors", True), (self.model, "adapter_raw.safetensors", False)):
                lora.save_adapter(
                    out_dir / name, model, settings=self.cfg.lora, base_sha256=self.base_sha256, stage=stage,
                    name=lora.TRAINED, extra={**extra, "ema": ema},
                )
            return
        save_model(self.ema.model, out_dir / "model.safetensors", extra={**extra, "ema": True})
        save_model(self.model, out_dir / "model_raw.safetensors", extra=extra)

    def sampling_meta(self) -> dict[str, Any]:
        """What a sampler needs besides the weights: the schedule, the prediction target and the
        output resolution (an SR model adds its input resolution and sampling noise-aug level)."""
        cfg = self.cfg
        meta = {"schedule": cfg.schedule.model_dump(), "prediction": cfg.loss.prediction, "resolution": cfg.resolution}
        if self.task.super_resolution:
            meta |= {"lowres": cfg.lowres, "aug_level": cfg.sample_aug_level}
        return meta
