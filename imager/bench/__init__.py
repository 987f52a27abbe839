"""``imager bench``: Imager against the usual alternatives, measured in one process on this machine.

Four comparisons, each a ratio of two throughputs (or memories, or FIDs) measured in the same run,
medians over repeats with warm-up iterations excluded, the two sides interleaved repeat by repeat so
that a change in machine load hits both:

    training    Imager's UNet vs diffusers' UNet2DConditionModel of matched size: images/s, peak
                memory, FLOPs per step and the share of this machine's fp32 matmul peak
    sampling    Imager's DPM-Solver++(2M) with CFG vs diffusers' DPMSolverMultistepScheduler, images/s;
                optionally (trained models) the FID of 20 DPM-Solver++ steps vs 1000 DDPM steps
    cache       training on cached text embeddings vs encoding the captions every step, steps/s
    data        the webdataset ShardLoader vs a folder of PNG files read with PIL, samples/s

:func:`imager.bench.run.run_bench` runs them and returns a :class:`imager.bench.report.Report`
(JSON-ready, with a markdown rendering). diffusers is an optional dependency (``imager[bench]``).
"""

from imager.errors import ImagerError


class BenchError(ImagerError):
    """A benchmark cannot run: a missing optional dependency or missing inputs (the fix is in the message)."""


__all__ = ["BenchError"]
