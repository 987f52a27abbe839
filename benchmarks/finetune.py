"""Comparison: a fine-tuning step with LoRA adapters vs full fine-tuning of the same base model.

The step is the training loop's (:class:`imager.training.loop.Trainer`): forward, MSE, backward, an
AdamW step on the trainable parameters, then the EMA update, which the loop runs over every
parameter of the model, frozen or not (so a LoRA step still pays for averaging the whole network).
Full fine-tuning trains every weight; LoRA injects adapters of rank 1, 4 and 16 on the ``attention``
targets (:func:`imager.models.lora.inject`, which freezes the base) and optimizes
:func:`imager.models.lora.trainable_parameters`. Inputs are random tensors of the real shapes
(:func:`benchmarks.models.random_batch`), the same for every variant.

Four rows, LoRA at :data:`REPORTED_RANK` against full fine-tuning: seconds per step (interleaved
rounds, medians), peak memory (each variant alone, as the training comparison measures it),
trainable parameters and the size of what a run saves (the adapter's tensors vs the whole model,
as safetensors bytes). Every rank's numbers are in the details.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from benchmarks.measure import PeakMemory, interleaved, measure_peak, median
from benchmarks.models import LR, Batch, imager_unet, random_batch
from benchmarks.report import Comparison
from benchmarks.training import MEMORY_ROUNDS, MEMORY_STEPS
from imager.models import lora
from imager.models.config import LoraSettings, UNetConfig
from imager.training.ema import EMA
from imager.training.optim import adamw

RANKS = (1, 4, 16)
REPORTED_RANK = 4  # the rank of the rows; the others are in the details
LORA_TARGETS = "attention"
ADAPTER = "default"
FULL = "full"
EMA_DECAY = 0.995  # train_base's cap; the decay does not change the update's cost
REGION = (f"building the model, its adapters, AdamW and the EMA copy, then {MEMORY_STEPS} steps, each variant alone; "
          f"median of {MEMORY_ROUNDS} alternating measurements after one unmeasured run of each")


def variant_name(rank: int | None) -> str:
    return FULL if rank is None else f"lora_r{rank}"


def variants() -> dict[str, int | None]:
    """Variant name -> LoRA rank (None: full fine-tuning), full first."""
    return {variant_name(r): r for r in (None, *RANKS)}


class FinetuneStep:
    """One optimizer step as the training loop takes it, on a model that may carry LoRA adapters."""

    def __init__(self, model: nn.Module):
        self.model = model.train()
        self.trainable = lora.trainable_parameters(model)
        self.optimizer = adamw(self.trainable, lr=LR)
        self.ema = EMA(model, EMA_DECAY)
        self.step = 0

    def __call__(self, batch: Batch) -> None:
        out = self.model(batch.x, batch.t, batch.tokens, batch.mask, batch.pooled)
        F.mse_loss(out, batch.target).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.model, self.step)


TRAINED_SCALE = 0.02  # std of the values given to a fresh network's zero weights


@torch.no_grad()
def _like_trained(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with small random values where a fresh network starts at zero (its output
    projections): fine-tuning starts from a trained model, and behind a zero layer every adapter
    and most weights would get a zero gradient."""
    gen = torch.Generator().manual_seed(seed + 2)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=gen) * TRAINED_SCALE)
    return model


def build(config: UNetConfig, rank: int | None, seed: int, device: torch.device) -> FinetuneStep:
    """The base model (random weights, none at zero), with a rank-``rank`` adapter unless ``rank`` is None."""
    model = _like_trained(imager_unet(config, seed), seed)
    if rank is not None:
        lora.inject(model, LoraSettings(rank=rank, targets=LORA_TARGETS), ADAPTER)
    return FinetuneStep(model.to(device))


def saved_bytes(step: FinetuneStep, rank: int | None) -> int:
    """Bytes of what a run of this variant saves as safetensors: the adapter's tensors, or the whole model."""
    if rank is not None:
        return len(save(lora.adapter_state(step.model, ADAPTER)))
    return len(save({k: v.detach().to("cpu").contiguous() for k, v in step.model.state_dict().items()}))


def _peak_memory(config: UNetConfig, rank: int | None, batch: Batch, seed: int, device: torch.device) -> PeakMemory:
    with measure_peak(device) as peak:
        step = build(config, rank, seed, device)
        for _ in range(MEMORY_STEPS):
            step(batch)
    del step
    gc.collect()
    return peak


def peak_memories(config: UNetConfig, batch: Batch, seed: int, device: torch.device) -> dict[str, PeakMemory]:
    """Median peak memory of each variant over alternating rounds, after one unmeasured run of each,
    so that the process's one-time costs are not charged to whichever variant came first."""
    ranks = variants()
    for rank in ranks.values():
        _peak_memory(config, rank, batch, seed, device)
    runs: dict[str, list[PeakMemory]] = {name: [] for name in ranks}
    for _ in range(MEMORY_ROUNDS):
        for name, rank in ranks.items():
            runs[name].append(_peak_memory(config, rank, batch, seed, device))
    return {name: sorted(r, key=lambda p: p.bytes)[len(r) // 2] for name, r in runs.items()}


def _sizes(steps: dict[str, FinetuneStep]) -> dict[str, dict[str, int]]:
    ranks = variants()
    out = {}
    for name, step in steps.items():
        out[name] = {"trainable_parameters": sum(p.numel() for p in step.trainable),
                     "parameters": sum(p.numel() for p in step.model.parameters()),
                     "saved_bytes": saved_bytes(step, ranks[name]),
                     "adapted_layers": len(lora.lora_layers(step.model))}
    return out


def bench_finetune(config: UNetConfig, *, batch_size: int, resolution: int, repeats: int, warmup: int, seed: int,
                   device: torch.device, timesteps: int = 1000) -> list[Comparison]:
    """The four rows (LoRA r:data:`REPORTED_RANK` vs full fine-tuning); every variant's numbers in
    the first row's details under ``variants``."""
    batch = random_batch(config, batch_size, resolution, device, seed, timesteps)
    memory = peak_memories(config, batch, seed, device)
    steps = {name: build(config, rank, seed, device) for name, rank in variants().items()}
    sizes = _sizes(steps)
    times = interleaved({n: (lambda s=s: s(batch)) for n, s in steps.items()}, repeats=repeats, warmup=warmup,
                        device=device, desc="bench: fine-tuning step")
    del steps
    gc.collect()
    per_variant = {n: {"seconds_median": median(times[n]), "seconds_all": times[n], "images_per_s": batch_size / median(times[n]),
                       "peak_memory_mib": memory[n].mib, **sizes[n]} for n in times}
    details = {"batch_size": batch_size, "resolution": resolution, "ranks": list(RANKS), "targets": LORA_TARGETS,
               "step": "forward + MSE + backward + AdamW step on the trainable parameters + EMA update of every parameter "
                       "(fp32), random inputs", "variants": per_variant}
    return _rows(per_variant, details, memory[FULL].method)


def _rows(v: dict[str, dict[str, Any]], details: dict[str, Any], memory_method: str) -> list[Comparison]:
    lo, full = v[variant_name(REPORTED_RANK)], v[FULL]
    ours = f"LoRA r{REPORTED_RANK}, {LORA_TARGETS}"
    theirs = "full fine-tuning"

    def per(key: str) -> dict[str, Any]:
        return {n: numbers[key] for n, numbers in v.items()}

    return [
        Comparison("finetune_speed", "Fine-tuning step time", "s/step", f"{ours}, {lo['images_per_s']:.1f} images/s",
                   lo["seconds_median"], f"{theirs}, {full['images_per_s']:.1f} images/s", full["seconds_median"], details=details),
        Comparison("finetune_memory", "Peak fine-tuning memory", "MiB", ours, lo["peak_memory_mib"], theirs,
                   full["peak_memory_mib"], details={"per_variant": per("peak_memory_mib"), "method": memory_method, "region": REGION}),
        Comparison("finetune_trainable", "Fine-tuning trainable parameters", "params", ours, lo["trainable_parameters"], theirs,
                   full["trainable_parameters"], details={"per_variant": per("trainable_parameters")}),
        Comparison("finetune_file", "Fine-tuned weights saved (safetensors)", "bytes", f"LoRA r{REPORTED_RANK} adapter",
                   lo["saved_bytes"], "full model", full["saved_bytes"], details={"per_variant": per("saved_bytes")}),
    ]


def summary(rows: list[Comparison]) -> str:
    """One line per variant, for the report's notes: what the details hold, readable in the table's file."""
    v = rows[0].details["variants"]
    parts = [f"{n}: {x['seconds_median'] * 1e3:.1f} ms/step, {x['peak_memory_mib']:.0f} MiB, "
             f"{x['trainable_parameters']:,} trainable, {x['saved_bytes']:,} bytes saved" for n, x in v.items()]
    return "; ".join(parts)
