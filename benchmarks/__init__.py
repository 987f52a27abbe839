"""Imager against the usual alternatives, measured in one process on this machine: ``python -m benchmarks``.

Not part of the product: this package lives beside ``imager/``, outside the wheel, and uses the
installed library like any other caller, plus diffusers (the ``dev`` and ``bench`` extras). Each
comparison is a ratio of two throughputs (or memories, or FIDs) measured in the same run, medians
over repeats with warm-up rounds excluded, the two sides interleaved repeat by repeat so that a
change in machine load hits both:

    training    Imager's UNet vs diffusers' UNet2DConditionModel of matched size (the network
                ``arch: diffusers`` trains): images/s, peak memory, FLOPs per step and the share
                of this machine's fp32 matmul peak
    sampling    Imager's DPM-Solver++(2M) with CFG vs diffusers' DPMSolverMultistepScheduler, images/s;
                optionally (trained models) the FID of 20 DPM-Solver++ steps vs 1000 DDPM steps
    cache       training on cached text embeddings vs encoding the captions every step, steps/s
    data        the webdataset ShardLoader vs a folder of PNG files read with PIL, samples/s
    quality     (with ``--quality EXPERIMENT``) evaluator FID and R-precision of two DVC
                experiments trained at equal compute, Imager's network vs ``arch: diffusers``
    distributed (only with ``--only distributed``) the data stages on a local Ray with 2 workers
                vs 1, and with 1 vs one process, entries/s, the outputs checked byte for byte

:func:`benchmarks.run.run_bench` runs them and returns a :class:`benchmarks.report.Report`
(JSON-ready, with a markdown rendering); ``python -m benchmarks`` (:mod:`benchmarks.__main__`)
writes it to ``benchmarks/results/`` (git-ignored), and to the committed ``docs/benchmarks.md``
and ``docs/benchmarks.json`` only with ``--publish``.
"""

from imager.errors import ImagerError


class BenchError(ImagerError):
    """A benchmark cannot run: missing inputs or a failing external command (the fix is in the message)."""


__all__ = ["BenchError"]
