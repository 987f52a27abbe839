"""The measuring instruments: interleaved timing, FLOP counting and peak memory.

Timing: every repeat runs each contender once, in turn (A, B, A, B, ...), the first ``warmup``
rounds unrecorded; a contender's number is the median of its recorded rounds. On CUDA each call is
bracketed by synchronisations, so the time is the device's.

FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and attention
by their shapes (2 FLOPs per multiply-add; elementwise ops, norms and the optimizer count zero). Its
registry has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
runs on CPU, so that kernel gets the same formulas as the CUDA ones (``sdpa_flop_count`` forward,
``sdpa_backward_flop_count`` backward).

Peak memory, CPU: the process's resident-set high-water mark (``VmHWM``), reset through
``/proc/self/clear_refs`` before the measured region, minus the resident set at its start; freed heap
is returned to the OS (``malloc_trim``) first so that an earlier model's memory is not reused for
free. Where the reset is not allowed, a thread samples the resident set every millisecond (it may
miss a peak shorter than that). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at
the start (tensors only, not the caching allocator's reserve).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from tqdm.auto import tqdm

MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(
    contenders: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device, desc: str
) -> dict[str, list[float]]:
    """Seconds per call of each contender over ``repeats`` recorded rounds (after ``warmup``)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in tqdm(range(warmup + repeats), desc=desc, unit="round", leave=False):
        for name, fn in contenders.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ FLOPs


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_attention_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward),
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = formula
    return formulas


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (e.g. forward + loss + backward), by operator shapes."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # macOS and others without /proc

    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's resident-set high-water mark to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PeakMemory:
    """Peak memory of the region in a ``with measure_peak(device) as peak:`` block: ``peak.bytes``."""

    method: str = ""
    bytes: int = 0

    @property
    def mib(self) -> float:
        return self.bytes / MIB


@contextlib.contextmanager
def measure_peak(device: torch.device) -> Iterator[PeakMemory]:
    result = PeakMemory()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        result.method = "CUDA max_memory_allocated minus the allocation at the start (tensors only)"
        return
    start = _rss_bytes()
    if _reset_hwm():
        yield result
        result.bytes = _status_kib("VmHWM") * 1024 - start
        result.method = "CPU resident set: VmHWM (reset via /proc/self/clear_refs) minus the RSS at the start"
        return
    peak, stop = [start], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
    result.bytes = max(peak[0], _rss_bytes()) - start
    result.method = "CPU resident set sampled every 1 ms minus the RSS at the start (may miss sub-ms peaks)"

