"""What machine the numbers come from, and what its fp32 matmul peak is.

The peak is measured, not taken from a datasheet: GFLOP/s of the fastest of several rounds of a
large square fp32 ``torch.mm`` (2·N³ FLOPs). The training comparison times one matmul in every
round, right after the two training steps (:func:`matmul_round`), so that the peak comes from the
same minutes as the steps: a shared machine's speed drifts from minute to minute, and a peak taken
at another time would move the utilisation with it. Training utilisation is the achieved GFLOP/s of
the median step over that peak.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch

from benchmarks.measure import median


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(device: torch.device) -> dict[str, Any]:
    """CPU model, cores (all and usable by this process), torch threads and versions; the GPU on CUDA."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32  # off: the peak and the models' matmuls are fp32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # on by default: convolutions may use TF32
    return info


@dataclass(frozen=True)
class CpuClock:
    """A reading of the CPU time spent so far: by the whole machine (busy, not idle) and by this process."""

    wall: float  # monotonic seconds
    machine_busy: float  # CPU-seconds of all processes, from /proc/stat
    own: float  # CPU-seconds of this process and its waited-for children


def read_cpu_clock() -> CpuClock | None:
    """The current :class:`CpuClock`, or None where /proc/stat is not available (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    busy = (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return CpuClock(time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system)


def other_cpu_share(start: CpuClock, end: CpuClock, cores: int) -> float:
    """The share of the machine's CPU capacity that *other* processes used between two readings:
    (machine busy time − this process's CPU time) / (wall time × cores), clipped to [0, 1]."""
    wall = end.wall - start.wall
    if wall <= 0 or cores <= 0:
        return 0.0
    other = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return min(1.0, max(0.0, other / (wall * cores)))


def matmul_round(device: torch.device, size: int) -> Callable[[], Any]:
    """One round of the fp32 matmul peak: ``size``² @ ``size``² on ``device`` (random operands)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=device)
    b = torch.randn(size, size, generator=gen, device=device)
    out = torch.empty(size, size, device=device)
    return lambda: torch.mm(a, b, out=out)


def matmul_peak(seconds: list[float], size: int) -> dict[str, Any]:
    """This machine's fp32 matmul peak from the times of :func:`matmul_round` calls: GFLOP/s of the
    fastest round (``gflops``; a peak is the best the machine does), the median round's beside it."""
    flops = 2 * size**3
    mid, best = median(seconds), min(seconds)
    return {"size": size, "flops": flops, "seconds_median": mid, "seconds_best": best, "gflops": flops / best / 1e9,
            "gflops_median": flops / mid / 1e9, "seconds": seconds}
