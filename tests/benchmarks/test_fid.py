"""The benchmark's FID comparison (``--fid``): the jackknife interval of a FID ratio, the rows'
behaviour on images whose quality is known (identical samplers tie exactly; a perturbed sampler
scores worse), and a whole run on tiny untrained model files."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from benchmarks.stats import frechet_distance_features, jackknife_fids, ratio_interval, ratio_standard_error
from imager.evaluation.config import Evaluate, Evaluator
from imager.evaluation.evaluator import ImageEvaluator
from imager.evaluation.run import HeldOut
from imager.inference.config import StageSampling

# ----------------------------------------------------------------------------------------- FID


# The closed-form checks of the Fréchet distance are the library's (tests/unit/test_metrics.py): the
# benchmark computes it with the library's FID.


def test_frechet_distance_features_rejects_mismatched_widths():
    with pytest.raises(ValueError, match=r"expected \(N, F\) and \(M, F\) features, got \(4, 3\) and \(4, 5\)"):
        frechet_distance_features(torch.zeros(4, 3), torch.zeros(4, 5))


# ----------------------------------------------------------------------------- FID intervals


def _gaussian(n: int, dim: int, shift: float, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_jackknife_leaves_out_one_reference_row_and_one_whole_prompt():
    fid = frechet_distance_features
    ref, a = _gaussian(12, 4, 0.0, 1), _gaussian(3 * 5, 4, 0.5, 2)  # 5 prompts × 3 seeds, seed-major rows
    jack = jackknife_fids(ref, {"a": a}, clusters=5)["a"]
    assert jack.fid == pytest.approx(fid(ref, a), rel=1e-9)
    assert jack.without_reference.shape == (12,) and jack.without_cluster.shape == (5,)
    assert jack.without_reference[3].item() == pytest.approx(fid(torch.cat([ref[:3], ref[4:]]), a), rel=1e-6)
    assert jack.without_cluster[1].item() == pytest.approx(fid(ref, a[[0, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14]]), rel=1e-6)


def test_identical_samplers_tie_on_every_leave_out():
    ref, a = _gaussian(20, 4, 0.0, 1), _gaussian(20, 4, 0.3, 2)
    jack = jackknife_fids(ref, {"a": a, "same": a.clone()}, clusters=10)
    assert torch.equal(jack["a"].without_cluster, jack["same"].without_cluster)
    assert ratio_interval(jack["a"], jack["same"]) == pytest.approx((1.0, 1.0))


def test_jackknife_error_matches_the_spread_of_independent_replications():
    # Each replication draws new prompts (a shared offset per prompt: its seeds' images are correlated),
    # new noise and a new reference. The ratio's spread over replications is the truth the standard error
    # estimates. Here it comes out at 1.00× that spread; the reference term alone gives 0.59× and a
    # missing (m − 1)/m factor far less, so the bounds catch a dropped term or a wrong scale.
    ratios, errors = [], []
    for rep in range(20):
        g = torch.Generator().manual_seed(rep)
        prompts = torch.randn(8, 4, generator=g).repeat(3, 1)  # 8 prompts × 3 seeds, seed-major
        ref = torch.randn(24, 4, generator=g) * 1.1
        a = prompts + 0.5 * torch.randn(24, 4, generator=g) + 0.6
        b = prompts + 0.5 * torch.randn(24, 4, generator=g) + 0.3
        jack = jackknife_fids(ref, {"a": a, "b": b}, clusters=8)
        ratios.append(jack["a"].fid / jack["b"].fid)
        errors.append(ratio_standard_error(jack["a"], jack["b"]))
    spread = statistics.stdev(ratios)
    assert 0.7 < statistics.median(errors) / spread < 1.45, (statistics.median(errors), spread)


def test_interval_arguments_are_checked():
    with pytest.raises(ValueError, match=r"a: expected \(10 × repeats, 4\) features, got \(25, 4\)"):
        jackknife_fids(_gaussian(30, 4, 0.0, 1), {"a": _gaussian(25, 4, 0.0, 2)}, clusters=10)
    jack = jackknife_fids(_gaussian(10, 2, 0.0, 1), {"a": _gaussian(10, 2, 0.5, 2)}, clusters=5)["a"]
    with pytest.raises(ValueError, match="level must be in"):
        ratio_interval(jack, jack, level=1.0)


# ------------------------------------------------------------------- the rows, on known images

PROMPTS, SEEDS, RES, P = 6, 2, 8, 4
ROW_KEYS = ["sampling_fid", "sampling_fid_sde", "sampling_convergence"]


class StandIn:
    """In place of a cascade: each seed draws its own images, whatever the sampler or the step count,
    and ``perturb[sampler]`` (when given) is applied to that sampler's. Records what it was asked to draw."""

    def __init__(self, perturb=None):
        self.base = SimpleNamespace(resolution=RES)
        self.perturb = perturb or {}
        self.calls: list[tuple] = []

    def generate(self, cond, cfg, *, use_sr):
        stage = cfg.stage("base")
        self.calls.append((stage.sampler, stage.steps, stage.guidance, cfg.seed, use_sr))
        gen = torch.Generator().manual_seed(cfg.seed)
        images = torch.rand(cond[0].shape[0], 3, RES, RES, generator=gen) * 2 - 1  # (B, 3, R, R) in [-1, 1]
        return self.perturb.get(stage.sampler, lambda x: x)(images), None


@pytest.fixture(scope="module")
def held() -> tuple[ImageEvaluator, HeldOut, Evaluate]:
    """A random evaluator, and held-out sets of uniform-noise images (the stand-in's distribution)."""
    torch.manual_seed(0)
    evaluator = ImageEvaluator(Evaluator(resolution=RES, channels=(8,), feature_dim=4), text_dim=P).eval()
    gen = torch.Generator().manual_seed(123)
    image = lambda n: torch.rand(n, 3, RES, RES, generator=gen) * 2 - 1  # noqa: E731
    data = HeldOut(
        captions=[f"prompt {i}" for i in range(PROMPTS)],
        cond=(torch.randn(PROMPTS, 4, 8, generator=gen), torch.ones(PROMPTS, 4, dtype=torch.bool), torch.randn(PROMPTS, P, generator=gen)),
        real=image(PROMPTS), reference=image(16), ceiling=image(PROMPTS),
        pool=[f"prompt {i}" for i in range(PROMPTS)], pool_emb=torch.randn(PROMPTS, P, generator=gen), targets=torch.arange(PROMPTS),
    )
    cfg = Evaluate(prompts=PROMPTS, batch_size=4, seed=7, r_precision_k=2, grid_rows=2, base=StageSampling(guidance=2.5))
    return evaluator, data, cfg


def _rows(held, cascade: StandIn) -> dict:
    from benchmarks.sampling import fid_comparisons

    evaluator, data, cfg = held
    rows = fid_comparisons(cascade, evaluator, data, cfg, steps=3, reference_steps=9, seeds=SEEDS)
    assert [r.key for r in rows] == ROW_KEYS
    return {r.key: r for r in rows}


def test_identical_samplers_give_a_ratio_of_exactly_one_with_a_zero_width_interval(held):
    rows = _rows(held, StandIn())
    for row in rows.values():
        assert row.ours == row.theirs > 0
        assert row.ratio == 1.0 and row.interval == (1.0, 1.0) and row.met
    details = rows["sampling_fid"].details
    assert details["dpmpp_2m"]["rms_to_converged"] == 0.0  # the same images at 3 and 9 steps


def test_a_perturbed_sampler_scores_worse(held):
    squashed = lambda x: 0.3 * x + 0.5  # noqa: E731  (a known loss of contrast and a shift)
    rows = _rows(held, StandIn({"dpmpp_2m_sde": squashed}))
    sde, ode = rows["sampling_fid_sde"], rows["sampling_fid"]
    assert ode.ratio == 1.0
    assert sde.ratio > 2 and not sde.met
    assert sde.interval[0] < sde.ratio < sde.interval[1]  # a real spread now: the leave-outs differ
    assert sde.theirs == ode.theirs  # both against the same DDPM images
    assert rows["sampling_convergence"].ratio == 1.0  # the ODE rows do not see the SDE sampler's images


def test_each_sampler_is_drawn_once_per_seed_with_disjoint_seeds_and_the_guidance(held):
    cascade = StandIn()
    rows = _rows(held, cascade)
    _, _, cfg = held
    seeds = [cfg.seed, cfg.seed + PROMPTS]  # a batch is seeded with seed + its first image's index (< PROMPTS)
    drawn = sorted(cascade.calls)
    assert drawn == sorted((sampler, steps, 2.5, seed, False) for seed in seeds
                           for sampler, steps in (("dpmpp_2m", 3), ("dpmpp_2m_sde", 3), ("ddpm", 9), ("dpmpp_2m", 9)))
    details = rows["sampling_fid"].details
    assert details["seeds"] == seeds and details["samples"] == PROMPTS * SEEDS and details["reference_images"] == 16
    for name in ("dpmpp_2m", "dpmpp_2m_sde", "ddpm", "dpmpp_2m_converged"):
        per_seed = details[name]["fid_evaluator_per_seed"]
        assert len(per_seed) == SEEDS and all(math.isfinite(v) for v in per_seed)
        assert details[name]["fid_evaluator_median_over_seeds"] == statistics.median(per_seed)


# -------------------------------------------------------------------------- a whole --fid run


class TinyEncoder:
    """A text encoder of 4 tokens × 8 dims whose embeddings are a fixed function of the caption."""

    id, token_dim, pooled_dim, max_length = "tiny-test-encoder", 8, P, 4

    def encode(self, captions):
        from imager.text.base import TextEmbeddings

        gens = [torch.Generator().manual_seed(sum(map(ord, c))) for c in captions]
        tokens = torch.stack([torch.randn(4, 8, generator=g) for g in gens])
        return TextEmbeddings(tokens, torch.ones(len(captions), 4, dtype=torch.bool), tokens.mean(1)[:, :P])


def test_fid_run_on_untrained_models_reports_three_finite_rows_with_intervals(tmp_path):
    from benchmarks.data import synthetic_shards
    from benchmarks.models import imager_unet, resolve_config
    from benchmarks.run import QUICK_MODEL, BenchPaths, BenchSettings, run_bench
    from imager.data.shard import shard_paths
    from imager.diffusion.config import ScheduleConfig
    from imager.evaluation.evaluator import save_evaluator
    from imager.models import save_model
    from imager.text.cache import build_cache, read_captions
    from imager.text.config import Embed

    shards = synthetic_shards(tmp_path / "shards", count=60, resolution=16, seed=0)
    keys, captions = read_captions([*shard_paths(shards, "train"), *shard_paths(shards, "val")])
    build_cache(keys, captions, TinyEncoder(), tmp_path / "emb", batch_size=32)
    schedule = ScheduleConfig()
    model = imager_unet(resolve_config(QUICK_MODEL, text_dim=8, pooled_dim=P, context_length=4), seed=0)
    save_model(model, tmp_path / "base.safetensors", extra={"schedule": schedule.model_dump(mode="json"), "prediction": "v", "resolution": 16})
    torch.manual_seed(0)
    save_evaluator(ImageEvaluator(Evaluator(resolution=16, channels=(8, 16), feature_dim=8), text_dim=P).eval(), tmp_path / "ev.safetensors")

    settings = BenchSettings.quick_run(only=(), fid=True, fid_prompts=4, fid_steps=2, fid_reference_steps=5, fid_seeds=2)
    paths = BenchPaths(shards=shards, embeddings=tmp_path / "emb", base_model=tmp_path / "base.safetensors", evaluator=tmp_path / "ev.safetensors")
    report = run_bench(QUICK_MODEL, schedule, "v", Embed(), Evaluate(prompts=4, batch_size=4, grid_rows=2), settings=settings,
                       paths=paths, device=torch.device("cpu"))
    assert [c.key for c in report.comparisons] == ROW_KEYS
    for c in report.comparisons:
        assert math.isfinite(c.ours) and math.isfinite(c.theirs) and c.theirs > 0, c.key
        low, high = c.interval
        assert math.isfinite(low) and low <= c.ratio <= high, c.key
        assert set(c.to_json()) >= {"ours", "theirs", "ratio", "ratio_interval_95", "target", "met"}
    details = report.comparisons[0].details
    assert details["model"] == str(tmp_path / "base.safetensors") and details["prompts"] == 4 and details["samples"] == 8
    rms = details["dpmpp_2m"]["rms_to_converged"]
    assert rms > 0  # 2 and 5 ODE steps of a random network land apart
    notes = "\n".join(report.notes)
    assert f"Convergence: the RMS pixel difference between DPM-Solver++(2M)'s 2- and 5-step images of the same noise is {rms:.3f}" in notes
    assert "FID: the trained base model on CPU (imager.inference.Cascade)" in notes
    assert "| Sampling convergence, DPM-Solver++(2M) vs its own many-step solution" in report.markdown()
