"""Comparison 2: sampling throughput, and (trained models only) DPM-Solver++ vs DDPM quality.

Speed: Imager's base-model sampling through the library's one inference path,
:meth:`imager.inference.Stage.sample` (DPM-Solver++(2M) with its trailing spacing, classifier-free
guidance on the doubled batch), vs the baseline's ``UNet2DConditionModel`` (the ``net`` of
:func:`benchmarks.models.diffusers_unet`) driven by diffusers' own loop: ``DPMSolverMultistepScheduler``
(dpmsolver++, order 2, trailing spacing, Imager's betas and prediction target), CFG by batch
doubling. Same batch, steps and guidance scale; random weights (throughput does not depend on them).

Quality (``--fid``): the trained base model, 20 DPM-Solver++ steps (the ODE solver and its SDE
variant) vs 1000 DDPM steps, and 20 vs 1000 DPM-Solver++(2M) steps (convergence), each drawn by
:meth:`imager.inference.Cascade.generate` and scored with the evaluator's FID against the held-out
reference (:func:`imager.evaluation.run.held_out`, :class:`~imager.evaluation.run.Scorer`) on the
images of several noise seeds pooled.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.measure import interleaved, median
from benchmarks.models import diffusers_unet, imager_unet, random_batch
from benchmarks.report import Comparison
from benchmarks.stats import jackknife_fids, ratio_interval
from imager.diffusion.schedule import NoiseSchedule
from imager.evaluation.config import Evaluate
from imager.inference.config import CascadeSampling, StageSampling
from imager.inference.sampling import Stage
from imager.models.config import UNetConfig
from imager.models.diffusers_unet import require_diffusers

if TYPE_CHECKING:
    from imager.evaluation.run import HeldOut
    from imager.inference.cascade import Cascade

log = logging.getLogger(__name__)
Tensor = torch.Tensor
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_scheduler(schedule: NoiseSchedule, prediction: str):
    """DPMSolverMultistepScheduler on Imager's betas: DPM-Solver++(2M), trailing spacing."""
    diffusers = require_diffusers()
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_steps,
        trained_betas=schedule.betas.float().numpy(),
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def diffusers_sample(unet, scheduler, cond: tuple[Tensor, Tensor], null: tuple[Tensor, Tensor], *,
                     resolution: int, steps: int, guidance: float, seed: int) -> Tensor:
    """The diffusers loop: CFG by batch doubling, ``scheduler.step`` after each UNet call."""
    unet.eval()
    device = next(unet.parameters()).device
    tokens, mask = cond
    b = tokens.shape[0]
    context = torch.cat([tokens, null[0].expand_as(tokens)])  # (2B, L, D)
    context_mask = torch.cat([mask, null[1].expand_as(mask)])  # (2B, L)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((b, unet.config.out_channels, resolution, resolution), generator=gen, device=device)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(inp, t, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample
        out_c, out_u = out.split(b)
        x = scheduler.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    return x.clamp(-1, 1)


def bench_sampling(config: UNetConfig, schedule: NoiseSchedule, prediction: str, *, batch_size: int, resolution: int,
                   steps: int, guidance: float, repeats: int, warmup: int, seed: int, device: torch.device) -> Comparison:
    ours = Stage(model=imager_unet(config, seed).to(device).eval(), schedule=schedule, prediction=prediction, resolution=resolution)
    theirs = diffusers_unet(config, seed).to(device).eval()
    scheduler = diffusers_scheduler(schedule, prediction)
    b = random_batch(config, batch_size, resolution, device, seed)
    sampling = StageSampling(sampler="dpmpp_2m", steps=steps, guidance=guidance)
    null_tokens, null_mask, _ = theirs.null_condition(1)
    contenders = {
        "imager": lambda: ours.sample((b.tokens, b.mask, b.pooled), sampling, seed=seed),
        "diffusers": lambda: diffusers_sample(theirs.net, scheduler, (b.tokens, b.mask), (null_tokens, null_mask),
                                              resolution=resolution, steps=steps, guidance=guidance, seed=seed),
    }
    times = interleaved(contenders, repeats=repeats, warmup=warmup, device=device, desc="bench: sampling")
    ips = {n: batch_size / median(t) for n, t in times.items()}
    details = {
        "batch_size": batch_size,
        "resolution": resolution,
        "steps": steps,
        "guidance": guidance,
        "network_evaluations_per_image": steps,
        "cfg": "one forward on the doubled batch (2B) per step, both",
        "seconds_per_batch": {n: {"median": median(t), "all": t} for n, t in times.items()},
        "imager": "imager.inference.Stage.sample with StageSampling(sampler='dpmpp_2m'): trailing spacing",
        "diffusers": "DPMSolverMultistepScheduler(dpmsolver++, solver_order=2, timestep_spacing='trailing', Imager's betas)",
    }
    return Comparison("sampling_speed", f"Sampling, {steps} steps, CFG", "images/s", "Imager DPM-Solver++(2M)", ips["imager"],
                      "diffusers DPMSolverMultistepScheduler", ips["diffusers"], details=details)


# sampler -> (comparison key, label): each against the many-step DDPM reference
FID_SAMPLERS = {"dpmpp_2m": ("sampling_fid", "DPM-Solver++(2M)"), "dpmpp_2m_sde": ("sampling_fid_sde", "SDE-DPM-Solver++(2M)")}
CONVERGED = "dpmpp_2m_converged"  # DPM-Solver++(2M) at the reference step count: the ODE's own solution


def bench_fid(base_model: Path, evaluator_path: Path, *, shards_dir: Path, cache_dir: Path, cfg: Evaluate, prompts: int,
              steps: int, reference_steps: int, seeds: int, device: torch.device) -> list[Comparison]:
    """:func:`fid_comparisons` of the trained base model at ``base_model`` (sampled on ``device``),
    scored by the evaluator at ``evaluator_path`` on ``prompts`` held-out prompts of the shards."""
    from imager.evaluation.evaluator import load_evaluator
    from imager.evaluation.run import held_out
    from imager.inference.cascade import Cascade
    from imager.text.cache import EmbeddingCache

    cascade = Cascade.load(base_model, device=device)
    cfg = cfg.model_copy(update={"prompts": prompts, "grid_rows": min(cfg.grid_rows, prompts)})
    data = held_out(shards_dir, EmbeddingCache(cache_dir), cfg)
    rows = fid_comparisons(cascade, load_evaluator(evaluator_path), data, cfg, steps=steps, reference_steps=reference_steps,
                           seeds=seeds)
    rows[0].details["model"] = str(base_model)  # the rows share one details dict
    return rows


def fid_comparisons(cascade: Cascade, evaluator: torch.nn.Module, data: HeldOut, cfg: Evaluate, *, steps: int, reference_steps: int,
                    seeds: int) -> list[Comparison]:
    """Evaluator FID of ``cascade``'s base model: each of :data:`FID_SAMPLERS` at ``steps`` vs DDPM at
    ``reference_steps``, and DPM-Solver++(2M) at ``steps`` vs itself at ``reference_steps`` (is it
    converged?), on the prompts of ``data``, repeated over ``seeds`` noise seeds.

    The rows compare the pooled FID: every seed's images together (prompts × seeds samples) against
    the held-out reference. FID is biased upwards at small sample counts, and its covariance estimate
    is rank-deficient below the feature dimension, so one FID over all the samples is a tighter
    statistic than the median of per-seed FIDs, each from ``prompts`` samples. The per-seed values
    and their median are in the details, with the RMS pixel difference between the ``steps`` and the
    ``reference_steps`` ODE images of the same noise. Each row's ratio gets its 95 % interval from a
    paired delete-one jackknife over prompts and reference images (:mod:`benchmarks.stats`)."""
    from imager.evaluation.config import Backbones
    from imager.evaluation.run import Scorer
    from imager.inference.images import downsample

    resolution = cascade.base.resolution
    scorer = Scorer(evaluator, data, cfg, resolution, Backbones())
    n = len(data.captions)
    seed_list = [cfg.seed + k * n for k in range(seeds)]  # generate() seeds a batch with seed + its first index (< n): no overlap
    runs = {**{name: (name, steps) for name in FID_SAMPLERS}, "ddpm": ("ddpm", reference_steps), CONVERGED: ("dpmpp_2m", reference_steps)}
    fids: dict[str, list[float]] = {name: [] for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    pooled: dict[str, list[Tensor]] = {name: [] for name in runs}
    rms: list[float] = []
    for seed in seed_list:
        for name, (sampler, count) in runs.items():
            sampling = CascadeSampling(sampler=sampler, base=StageSampling(steps=count, guidance=cfg.base.guidance), seed=seed,
                                       batch_size=cfg.batch_size)
            started = time.perf_counter()
            images, _ = cascade.generate(data.cond, sampling, use_sr=False)
            seconds[name].append(time.perf_counter() - started)
            pooled[name].append(images)
            fids[name].append(scorer.score(images, data.targets, clip=False)["fid_evaluator"])
            log.info("bench: %s at %d steps, seed %d: FID %.3f (%.0f s)", sampler, count, seed, fids[name][-1], seconds[name][-1])
        rms.append((pooled["dpmpp_2m"][-1] - pooled[CONVERGED][-1]).float().pow(2).mean().sqrt().item())
    targets = data.targets.repeat(seeds)
    results = {name: {"sampler": sampler, "steps": count,
                      "fid_evaluator": scorer.score(torch.cat(pooled[name]), targets, clip=False)["fid_evaluator"],
                      "fid_evaluator_median_over_seeds": median(fids[name]), "fid_evaluator_per_seed": fids[name],
                      "seconds": seconds[name]} for name, (sampler, count) in runs.items()}
    results["dpmpp_2m"].update(rms_to_converged=median(rms), rms_to_converged_per_seed=rms)  # images in [-1, 1]
    details = {"prompts": n, "samples": n * seeds, "reference_images": int(data.reference.shape[0]), "guidance": cfg.base.guidance,
               "seeds": seed_list, "statistic": "FID of the images of all seeds together (fid_evaluator); per seed and their median too",
               **results}

    def features(images: Tensor) -> Tensor:  # what the Scorer's FID sees: evaluator(area-downsampled images)
        with torch.inference_mode():
            return torch.cat([evaluator(b) for b in downsample(images, resolution).split(cfg.batch_size)])

    jack = jackknife_fids(features(data.reference), {name: features(torch.cat(pooled[name])) for name in runs}, clusters=n)
    pairs = [*((name, "ddpm") for name in FID_SAMPLERS), ("dpmpp_2m", CONVERGED)]
    intervals = {(a, b): ratio_interval(jack[a], jack[b]) for a, b in pairs}
    details["interval"] = {"level": 0.95, "method": "delete-one jackknife, paired: each reference image and each prompt "
                           "(with its images from every seed) left out in turn, every sampler on the same leave-out; "
                           "ratio ± 1.96 standard errors"}
    rows = [
        Comparison(key, f"Sampling quality, {label}, evaluator FID (lower is better)", "FID", f"{label}, {steps} steps",
                   results[name]["fid_evaluator"], f"DDPM, {reference_steps} steps", results["ddpm"]["fid_evaluator"],
                   interval=intervals[name, "ddpm"], details=details)
        for name, (key, label) in FID_SAMPLERS.items()
    ]
    rows.append(Comparison("sampling_convergence", "Sampling convergence, DPM-Solver++(2M) vs its own many-step solution, "
                           "evaluator FID (lower is better)", "FID", f"{steps} steps", results["dpmpp_2m"]["fid_evaluator"],
                           f"{reference_steps} steps", results[CONVERGED]["fid_evaluator"],
                           interval=intervals["dpmpp_2m", CONVERGED], details=details))
    return rows
