"""Comparison 1: a training step of Imager's UNet vs diffusers' UNet2DConditionModel of matched size
(:mod:`benchmarks.models`: the network ``arch: diffusers`` trains).

Three rows: images/s (interleaved, median step time), utilisation (:func:`utilisation_row`: FLOPs
of forward + backward (by shape) × steps/s over the fp32 matmul throughput, timed in the same
rounds as the steps), and peak memory of building the model and its optimizer and running warm-up
+ one step (each model alone, one after the other).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from benchmarks.machine import matmul_peak, matmul_round
from benchmarks.measure import count_flops, interleaved, measure_peak, median
from benchmarks.models import TrainStep, diffusers_unet, imager_unet, matched_sizes, random_batch
from benchmarks.quality import network_label
from benchmarks.report import Comparison
from imager.models.config import UNetConfig

log = logging.getLogger(__name__)
OURS, THEIRS = "Imager UNet", "diffusers UNet2DConditionModel"
MEMORY_STEPS = 2  # the first creates AdamW's state, the second runs with it
MEMORY_ROUNDS = 3
REGION = (f"building the model and AdamW, then {MEMORY_STEPS} training steps, each model alone; median of {MEMORY_ROUNDS} "
          "alternating measurements after one unmeasured run of each")


def _make(name: str, config: UNetConfig, seed: int, device: torch.device) -> TrainStep:
    build = imager_unet if name == "imager" else diffusers_unet
    return TrainStep(build(config, seed).to(device))


def _peak_memory(name: str, config: UNetConfig, batch, seed: int, device: torch.device):
    """Peak memory of building ``name`` with its optimizer and running :data:`MEMORY_STEPS` steps, alone."""
    with measure_peak(device) as peak:
        step = _make(name, config, seed, device)
        for _ in range(MEMORY_STEPS):
            step(batch)
    del step
    gc.collect()
    return peak


def _peak_memories(names, config: UNetConfig, batch, seed: int, device: torch.device) -> dict[str, Any]:
    """Median peak memory of each model over :data:`MEMORY_ROUNDS` alternating measurements, after
    one unmeasured run of each: the first run of a process pays one-time costs (thread pools,
    kernel caches: 100-300 MiB on CPU) that would otherwise be charged to whichever model came first."""
    for name in names:
        _peak_memory(name, config, batch, seed, device)
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(MEMORY_ROUNDS):
        for name in names:
            runs[name].append(_peak_memory(name, config, batch, seed, device))
    return {name: sorted(r, key=lambda p: p.bytes)[len(r) // 2] for name, r in runs.items()}


def bench_training(config: UNetConfig, *, batch_size: int, resolution: int, repeats: int, warmup: int, seed: int,
                   device: torch.device, matmul_size: int, timesteps: int = 1000) -> tuple[list[Comparison], dict[str, Any]]:
    """(the speed, utilisation and memory comparisons, the shared details: sizes, FLOPs, step times,
    achieved GFLOP/s, the matmul peak). Each round times Imager's step, diffusers' step and one
    ``matmul_size``² fp32 matmul, one after the other."""
    sizes = matched_sizes(config)
    if not sizes["within_tolerance"]:
        log.warning("the diffusers model has %+.1f %% parameters vs Imager's (tolerance ±%.0f %%)",
                    100 * sizes["relative_difference"], 100 * sizes["tolerance"])
    batch = random_batch(config, batch_size, resolution, device, seed, timesteps)
    names = ("imager", "diffusers")

    memory = _peak_memories(names, config, batch, seed, device)

    steps = {name: _make(name, config, seed, device) for name in names}
    flops = {}
    for name, step in steps.items():
        flops[name] = count_flops(lambda step=step: step.loss_backward(batch))
        step.optimizer.zero_grad(set_to_none=True)
    contenders = {n: (lambda s=s: s(batch)) for n, s in steps.items()}
    times = interleaved({**contenders, "matmul": matmul_round(device, matmul_size)}, repeats=repeats, warmup=warmup,
                        device=device, desc="bench: training step")
    peak = matmul_peak(times.pop("matmul"), matmul_size)
    seconds = {n: median(t) for n, t in times.items()}
    ips = {n: batch_size / seconds[n] for n in names}
    gflops = {n: flops[n] / seconds[n] / 1e9 for n in names}
    del steps
    gc.collect()

    details = {
        **sizes,
        "batch_size": batch_size,
        "resolution": resolution,
        "text": {"tokens": [batch_size, config.context_length, config.text_dim], "pooled": [batch_size, config.pooled_dim],
                 "diffusers": "tokens by cross-attention (encoder_hidden_states + encoder_attention_mask); no pooled input"},
        "step": "forward (Denoiser interface, as the training loop calls both) + MSE loss + backward + AdamW step (fp32), random inputs",
        "step_seconds": {n: {"median": seconds[n], "all": times[n]} for n in names},
        "flops_per_step": flops,
        "flops_definition": "forward + backward, by FlopCounterMode (matmul, conv, attention; elementwise ops count 0)",
        "achieved_gflops": gflops,
        "imager_label": None,  # set below
        "peak_memory_mib": {n: memory[n].mib for n in names},
        "memory_method": memory["imager"].method,
        "matmul_peak": peak,
    }
    layout = network_label(config.model_dump()).removeprefix("imager")
    ours = f"{OURS}{layout}"
    details["imager_label"] = ours
    params = f"{sizes['imager_params'] / 1e6:.2f} M params"
    theirs_params = f"{sizes['diffusers_params'] / 1e6:.2f} M params"
    comparisons = [
        Comparison("training_speed", "Training step", "images/s", f"{ours}, {params}", ips["imager"],
                   f"{THEIRS}, {theirs_params}", ips["diffusers"]),
        utilisation_row(details, peak["gflops"]),
        Comparison("training_memory", "Peak training memory", "MiB", ours, memory["imager"].mib, THEIRS, memory["diffusers"].mib,
                   details={"method": memory["imager"].method, "region": REGION}),
    ]
    return comparisons, details


def utilisation_row(details: dict[str, Any], peak_gflops: float) -> Comparison:
    """Achieved GFLOP/s of Imager's training step (from :func:`bench_training`'s details) over the peak."""
    gflops, flops = details["achieved_gflops"], details["flops_per_step"]
    details["utilisation"] = {n: g / peak_gflops for n, g in gflops.items()}
    return Comparison("training_utilisation", "Training utilisation of fp32 matmul peak", "GFLOP/s",
                      f"{details['imager_label']}, {flops['imager'] / 1e9:.2f} GFLOP/step", gflops["imager"], "torch.mm peak",
                      peak_gflops, percent=True,
                      details={"diffusers_utilisation": gflops["diffusers"] / peak_gflops, "diffusers_gflops": gflops["diffusers"]})
