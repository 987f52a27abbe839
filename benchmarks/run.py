"""Run the comparisons and collect a :class:`Report`.

Everything runs in this process, one comparison after another: the machine is described first
(its fp32 matmul peak is timed inside the training comparison's rounds, :mod:`benchmarks.machine`),
then each comparison in ``settings.only`` runs in turn, and the CPU time other processes took
during the run is measured at the end, so that a busy machine is named in the notes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import BenchError
from benchmarks.cache import bench_cache
from benchmarks.data import bench_data, ensure_shards, first_samples
from benchmarks.finetune import REPORTED_RANK, bench_finetune, summary
from benchmarks.machine import describe_machine, other_cpu_share, read_cpu_clock
from benchmarks.models import resolve_config
from benchmarks.report import Comparison, Report
from benchmarks.sampling import bench_fid, bench_sampling
from benchmarks.training import bench_training
from imager.diffusion.config import ScheduleConfig
from imager.diffusion.schedule import NoiseSchedule
from imager.evaluation.config import Evaluate
from imager.models.config import UNetConfig
from imager.models.diffusers_unet import require_diffusers
from imager.text.config import Embed

log = logging.getLogger(__name__)
COMPARISONS = ("training", "sampling", "cache", "data", "ui", "quality", "finetune", "distributed")  # quality: with --quality EXPERIMENT; ui: with trained models
OPT_IN = ("distributed",)  # run only when named with --only: each starts a Ray cluster and runs the data stages three times
WITHOUT_DIFFUSERS = {"quality", "ui", "finetune", "distributed"}  # comparisons that build no diffusers model
BUSY_SHARE = 0.2  # share of the CPU used by other processes during the run above which the numbers get a warning


@dataclass(frozen=True)
class BenchSettings:
    """Sizes and repeats. The defaults are the full benchmark; :meth:`quick_run` is a seconds-long smoke run."""

    batch_size: int = 32  # training, cache and data batches
    resolution: int = 32  # train_base.resolution
    repeats: int = 5  # recorded rounds per comparison (medians over these)
    warmup: int = 2  # unrecorded rounds first
    sampling_batch: int = 32
    sampling_steps: int = 20
    guidance: float = 3.0  # evaluate.base.guidance
    matmul_size: int = 2048
    data_batches: int = 16  # loader batches per round (512 samples at batch 32: rounds of ~0.1 s, not ~0.02 s)
    shuffle_buffer: int = 1000  # train_base.shuffle_buffer
    synthetic_samples: int = 512  # when there are no shards
    synthetic_resolution: int = 64  # shard.resolution
    fid: bool = False
    fid_prompts: int = 64
    fid_steps: int = 20
    fid_reference_steps: int = 1000
    fid_seeds: int = 3  # noise seeds of the FID comparison (their images scored together)
    quality: str | None = None  # DVC experiment trained with arch: diffusers (quality at equal compute)
    quality_ours: str = "workspace"  # the experiment it is compared with
    tracking_experiment: str = "imager"  # the MLflow experiment holding the training runs (their wall times)
    ui_clients: int = 4  # concurrent clients of the web app's throughput
    ui_requests: int = 3  # requests each
    seed: int = 0
    only: tuple[str, ...] = tuple(c for c in COMPARISONS if c not in OPT_IN)
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> BenchSettings:
        tiny = dict(batch_size=4, resolution=16, repeats=2, warmup=1, sampling_batch=2, sampling_steps=3, matmul_size=128,
                    data_batches=1, shuffle_buffer=8, synthetic_samples=40, synthetic_resolution=16, fid_prompts=4,
                    fid_steps=3, fid_reference_steps=10, fid_seeds=2, ui_requests=1, quick=True)
        return cls(**{**tiny, **overrides})


QUICK_MODEL = UNetConfig(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), head_dim=32)


@dataclass(frozen=True)
class BenchPaths:
    shards: Path = Path("data/shards")
    embeddings: Path = Path("data/embeddings")
    base_model: Path = Path("data/models/base/model.safetensors")
    evaluator: Path = Path("data/models/evaluator/evaluator.safetensors")
    sr_model: Path = Path("data/models/sr/model.safetensors")
    params: Path = Path("params.yaml")


def _text_dims(embeddings: Path, encoder_loader) -> dict[str, int]:
    """Text dims as training resolves them: from the cache's meta, else from the encoder."""
    meta_path = Path(embeddings) / "meta.json"
    if meta_path.is_file():
        import json

        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return {"text_dim": meta["token_dim"], "pooled_dim": meta["pooled_dim"], "context_length": meta["max_length"]}
    enc = encoder_loader()
    return {"text_dim": enc.token_dim, "pooled_dim": enc.pooled_dim, "context_length": enc.max_length}


def run_bench(model: UNetConfig, schedule: ScheduleConfig, prediction: str, embed: Embed, evaluate: Evaluate, *,
              settings: BenchSettings, paths: BenchPaths, device: torch.device) -> Report:
    """Every comparison in ``settings.only`` (plus the FID one with ``settings.fid``) on ``device``."""
    s = settings
    if s.quality is None and s.only == ("quality",):
        raise BenchError("--only quality needs --quality EXPERIMENT (a `dvc exp run -S train_base.model.arch=diffusers` run)")
    if set(s.only) - WITHOUT_DIFFUSERS:
        require_diffusers()
    clock = read_cpu_clock()
    machine = describe_machine(device)
    encoder_box: list[Any] = []

    def encoder():
        if not encoder_box:
            from imager.text import load_text_encoder

            encoder_box.append(load_text_encoder(embed))
        return encoder_box[0]

    measured = set(s.only) - {"quality", "ui", "distributed"}  # quality only reads DVC experiments; ui serves the trained cascade
    config = resolve_config(model, **_text_dims(paths.embeddings, encoder)) if measured or s.fid else model
    comparisons: list[Comparison] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="imager-benchmarks-") as tmp:
        tmp_path = Path(tmp)
        if "training" in s.only:
            rows, details = bench_training(config, batch_size=s.batch_size, resolution=s.resolution, repeats=s.repeats,
                                           warmup=s.warmup, seed=s.seed, device=device, matmul_size=s.matmul_size)
            machine["fp32_matmul_peak"] = details["matmul_peak"]
            rows[0].details.update(details)  # the shared numbers (sizes, FLOPs, times) go with the speed row
            comparisons += rows
            notes.append(f"Peak memory: {details['memory_method']}; region: {rows[2].details['region']}.")
            notes.append("FLOPs: torch.utils.flop_counter.FlopCounterMode over forward + loss + backward (matmul, conv, "
                         "attention by shape; the CPU flash-attention kernel given torch's SDPA formulas). Utilisation = "
                         f"achieved GFLOP/s of the median training step / GFLOP/s of the fastest {s.matmul_size}² fp32 "
                         "torch.mm round, the matmul timed once in every round right after the two training steps, so the "
                         "peak comes from the same minutes as the steps (its median round is in the JSON).")
            if not details["within_tolerance"]:
                notes.append(f"The diffusers model is {100 * details['relative_difference']:+.1f} % off Imager's parameter count, "
                             f"outside ±{100 * details['tolerance']:.0f} %.")
        if "finetune" in s.only:
            rows = bench_finetune(config, batch_size=s.batch_size, resolution=s.resolution, repeats=s.repeats,
                                  warmup=s.warmup, seed=s.seed, device=device)
            comparisons += rows
            notes.append(f"Fine-tuning: one optimizer step of the base model as the training loop takes it (forward, MSE, "
                         "backward, AdamW on the trainable parameters, EMA update of every parameter), full fine-tuning vs "
                         f"LoRA on the {rows[0].details['targets']} layers; the rows compare rank {REPORTED_RANK}, every rank is in the "
                         f"JSON: {summary(rows)}. Saved: the adapter's tensors vs the model's state dict, safetensors bytes.")
        if "sampling" in s.only:
            comparisons.append(bench_sampling(config, NoiseSchedule.from_config(schedule), prediction, batch_size=s.sampling_batch,
                                              resolution=s.resolution, steps=s.sampling_steps, guidance=s.guidance,
                                              repeats=s.repeats, warmup=s.warmup, seed=s.seed, device=device))
        if s.fid:
            comparisons += bench_fid(paths.base_model, paths.evaluator, shards_dir=paths.shards, cache_dir=paths.embeddings,
                                     cfg=evaluate, prompts=s.fid_prompts, steps=s.fid_steps, reference_steps=s.fid_reference_steps,
                                     seeds=s.fid_seeds, device=device)
            fid = comparisons[-1].details
            notes.append(f"FID: the trained base model on {device.type.upper()} (imager.inference.Cascade), evaluator features; "
                         f"{fid['prompts']} held-out prompts × {s.fid_seeds} noise seeds = {fid['samples']} images per sampler, "
                         f"scored together against the {fid['reference_images']} held-out images (per-seed FIDs and their "
                         "median in the JSON).")
            notes.append("FID intervals: ratio ± 1.96 jackknife standard errors, each reference image and each prompt (with "
                         "its images from every seed) left out in turn, every sampler on the same leave-out (paired); the "
                         "bootstrap's resampled FIDs carry the small-sample bias twice (docs/training.md).")
            notes.append(f"Convergence: the RMS pixel difference between DPM-Solver++(2M)'s {s.fid_steps}- and "
                         f"{s.fid_reference_steps}-step images of the same noise is "
                         f"{fid['dpmpp_2m']['rms_to_converged']:.3f} (median over the seeds; images in [-1, 1]).")
        if {"cache", "data"} & set(s.only):
            shards, synthetic = ensure_shards(paths.shards, tmp_path, count=s.synthetic_samples,
                                              resolution=s.synthetic_resolution, seed=s.seed)
            if synthetic:
                notes.append(f"No shards at {paths.shards}: the cache and data comparisons used {s.synthetic_samples} "
                             f"synthetic {s.synthetic_resolution} px samples.")
            if "cache" in s.only:
                samples = first_samples(shards, (s.warmup + s.repeats) * s.batch_size)
                comparisons.append(bench_cache(config, encoder(), samples, cache_dir=paths.embeddings, tmp=tmp_path,
                                               batch_size=s.batch_size, resolution=s.resolution, repeats=s.repeats,
                                               warmup=s.warmup, seed=s.seed, device=device))
                sec = comparisons[-1].details["seconds_median"]
                notes.append(f"Embedding cache: the text part alone is {sec['encode'] / sec['lookup']:.0f}× faster (lookup "
                             f"{1e3 * sec['lookup']:.2f} ms vs encode {1e3 * sec['encode']:.1f} ms per batch); the training step, "
                             f"the same on both sides, bounds the steps/s ratio at (step + encode) / step.")
                if device.type == "cuda":
                    notes.append("The on-the-fly text encoder ran on the CPU (as imager's encoders do), the UNet on the GPU.")
            if "data" in s.only:
                comparisons.append(bench_data(shards, tmp_path, batch_size=s.batch_size, batches=s.data_batches,
                                              shuffle_buffer=s.shuffle_buffer, repeats=s.repeats, warmup=s.warmup, seed=s.seed))
                d = comparisons[-1].details
                notes.append("Data loading: both sides decode with imager.data.images.decode_png (Pillow), so the ratio is "
                             "the container's: a tar shard read through its index vs a file per sample. The index (one tarfile "
                             f"pass per shard, cached) took {d['shard_index_seconds']:.2f} s for {d['shards']} shards, once per "
                             "process, before timing, as the folder's file list.")
    if "distributed" in s.only:
        from benchmarks.distributed import bench_distributed
        from imager import config as imager_config

        with tempfile.TemporaryDirectory(prefix="imager-benchmarks-ray-") as tmp:
            rows, shared = bench_distributed(imager_config.load(paths.params), Path(tmp), quick=s.quick, seed=s.seed)
        rows[0].details.update(shared)
        comparisons += rows
        eff = ", ".join(f"{r.key.split('_')[-1]} {100 * r.details['scaling_efficiency']:.0f} %" for r in rows[::2])
        notes.append(f"Ray: the data stages of params.yaml, each run once in one process and on a local Ray of 2 CPUs with 1 and "
                     f"2 tasks at once (cluster start {shared['ray_start_seconds']:.1f} s, not timed; workers warm); the three "
                     f"outputs are the same bytes. Scaling efficiency (speed-up / 2): {eff}. Per-core rates for docs/cluster.md: "
                     f"photo-sized JPEGs through the shard step {shared['photo_jpegs_512x384_shard_per_core']:.0f}/s, twelve-word "
                     f"captions through the encoder {shared['twelve_word_captions_embed_per_core']:.0f}/s.")
    if "ui" in s.only:
        if paths.base_model.is_file() and paths.sr_model.is_file():
            from benchmarks.ui import bench_ui

            with tempfile.TemporaryDirectory(prefix="imager-benchmarks-ui-") as tmp:
                rows = bench_ui(paths.base_model, paths.sr_model, paths.params, repeats=s.repeats, warmup=s.warmup,
                                clients=s.ui_clients, per_client=s.ui_requests, tmp=Path(tmp))
            comparisons += rows
            notes.append(f"Web app: `imager ui` in its own process with the trained cascade ({rows[0].details['sampling']}), "
                         "driven over HTTP (POST /api/v1/generate, then the job's server-sent events) vs the same request through the "
                         "library in this process; latencies are medians of interleaved rounds, the same prompt and seed on both sides; "
                         f"throughput: {s.ui_clients} clients × {s.ui_requests} requests vs as many images one after another.")
        else:
            notes.append(f"Web app: not measured; it serves the trained cascade ({paths.base_model}, {paths.sr_model}): run `dvc repro` first.")
    if s.quality is not None and "quality" in s.only:
        from benchmarks import quality

        rows = quality.quality_at_equal_compute(
            quality.dvc_experiments(), s.quality, s.quality_ours,
            training_seconds=lambda name: quality.mlflow_training_seconds(name, experiment=s.tracking_experiment),
        )
        comparisons += rows
        steps = [f"{s:.0f}" if isinstance(s, (int, float)) else "?" for s in rows[-1].details["steps"]]
        notes.append(f"Quality at equal compute: DVC experiments '{s.quality_ours}' ({rows[0].ours_label}, {steps[0]} steps) and "
                     f"'{s.quality}' ({rows[0].theirs_label}, {steps[1]} steps), the same pipeline otherwise; evaluator metrics "
                     f"of reports/evaluate.json on {rows[0].details['samples']} held-out prompts, R-precision at "
                     f"k = {rows[0].details['r_precision_k']}; lower FID is better.")
    if set(s.only) - {"distributed"}:
        notes.append("Timing: the two sides alternate round by round; each number is the median of its recorded rounds.")
    if "distributed" not in s.only:  # the Ray workers are this benchmark's own processes
        notes += _busy_notes(machine, clock)
    settings_json = {**dataclasses.asdict(s), "only": list(s.only), "device": str(device), "model": config.model_dump(mode="json"),
                     "schedule": schedule.model_dump(mode="json"), "prediction": prediction, "timing": "interleaved rounds, medians"}
    return Report(machine=machine, settings=settings_json, comparisons=comparisons, notes=notes)


def _busy_notes(machine: dict[str, Any], start) -> list[str]:
    """Measure how much CPU other processes took during the run; a note when it was more than
    :data:`BUSY_SHARE` (CPU only: on a GPU the host's other load matters little)."""
    end = read_cpu_clock()
    if start is None or end is None:
        return []
    cores = os.cpu_count() or 1  # /proc/stat counts every CPU of the machine
    share = other_cpu_share(start, end, cores)
    machine["other_processes_cpu_share"] = round(share, 3)
    if share > BUSY_SHARE and machine["device"] == "cpu":
        return [f"Other processes used {100 * share:.0f} % of the machine's CPU time ({cores} cores) during the run, "
                "so absolute numbers are low and ratios noisy."]
    return []


__all__ = ["COMPARISONS", "OPT_IN", "BenchPaths", "BenchSettings", "QUICK_MODEL", "run_bench"]
