"""``python -m benchmarks``: the accounting, not the speed. FLOPs of known ops against their closed
forms, the baseline built as the network ``arch: diffusers`` trains, a peak-memory probe that sees
torch's allocations, the report's ratios and marks, where the results go (a git-ignored folder by
default, the committed report only with --publish), and a tiny end-to-end run through the command."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.__main__ import PUBLISHED as DEFAULT_PUBLISHED
from benchmarks.__main__ import RESULTS as DEFAULT_RESULTS
from benchmarks.__main__ import app
from benchmarks.measure import count_flops, measure_peak
from benchmarks.report import MET, NO_TARGET, NOT_MET, TARGETS, Comparison, Report
from imager import config as imager_config
from tests.conftest import REPO

runner = CliRunner()
ROWS = ("training_speed", "training_utilisation", "training_memory", "sampling_speed", "embedding_cache", "data_loading",
        "finetune_speed", "finetune_memory", "finetune_trainable", "finetune_file")
# diffusers' DPM scheduler calls np.array on a torch tensor (its code, numpy 2): harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ------------------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize(("input_grad", "factor"), [(False, 2), (True, 3)])
def test_linear_flops_are_2_b_in_out_forward_and_3x_with_backward(input_grad, factor):
    b, d_in, d_out = 5, 16, 8
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(b, d_in, requires_grad=input_grad)
    forward = 2 * b * d_in * d_out  # one multiply-add per weight per row
    assert count_flops(lambda: layer(x)) == forward
    # backward: the weight gradient (another 2·B·in·out), and the input gradient when x needs one
    assert count_flops(lambda: layer(x).sum().backward()) == factor * forward


def test_cpu_attention_flops_follow_the_sdpa_formula():
    b, h, s_q, s_k, d = 2, 3, 16, 8, 4
    q, k, v = (torch.randn(b, h, s, d) for s in (s_q, s_k, s_k))
    mask = torch.ones(b, 1, 1, s_k, dtype=torch.bool)
    # QKᵀ and (softmax)·V: 2·B·H·S_q·S_k·D each. torch's own registry counts 0 for the CPU kernel.
    expected = 2 * (2 * b * h * s_q * s_k * d)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == expected


# ----------------------------------------------------------------------------------------- memory


def test_peak_memory_sees_torch_allocations():
    size = 64 * 2**20
    with measure_peak(torch.device("cpu")) as peak:
        x = torch.ones(size // 4)  # 64 MiB of float32, written, so resident
        del x
    assert 0.9 * size <= peak.bytes <= 1.5 * size + 32 * 2**20, peak
    assert peak.method


# ----------------------------------------------------------------------------------------- models


def test_diffusers_model_matches_the_default_base_model_size():
    pytest.importorskip("diffusers")
    from benchmarks.models import PARAM_TOLERANCE, diffusers_unet, imager_unet, matched_sizes, param_count, resolve_config

    params = imager_config.load(REPO / "params.yaml")
    cfg = resolve_config(params.train_base.model, text_dim=384, pooled_dim=384, context_length=32)
    sizes = matched_sizes(cfg)
    assert sizes["imager_params"] == param_count(imager_unet(cfg, 0))
    assert sizes["diffusers_params"] == param_count(diffusers_unet(cfg, 0))
    assert abs(sizes["diffusers_params"] / sizes["imager_params"] - 1) <= PARAM_TOLERANCE
    assert sizes["within_tolerance"]


def test_the_baseline_is_the_network_arch_diffusers_trains():
    """The experiment of the README (`-S train_base.model.arch=diffusers -S train_base.model.patch_size=1`)
    builds, through the library's factory, a network with the benchmark baseline's exact weights layout
    and outputs."""
    pytest.importorskip("diffusers")
    from benchmarks.models import diffusers_unet, resolve_config
    from imager.models import build_denoiser
    from imager.models.config import UNetConfig
    from imager.models.diffusers_unet import DiffusersUNet

    params = imager_config.load(REPO / "params.yaml")
    dims = {"text_dim": 16, "pooled_dim": 8, "context_length": 4}
    ours = diffusers_unet(resolve_config(params.train_base.model, **dims), seed=0).eval()
    experiment = {**params.train_base.model.model_dump(), "arch": "diffusers", "patch_size": 1, **dims}
    trained = build_denoiser(UNetConfig.model_validate(experiment)).eval()
    assert type(ours) is DiffusersUNet and type(trained) is DiffusersUNet
    assert ours.config == trained.config
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in trained.state_dict().items()}
    trained.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([0.3, 0.9])
    tokens, pooled = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 8, generator=gen)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, tokens, mask, pooled), trained(x, t, tokens, mask, pooled), rtol=0, atol=0)


def test_missing_diffusers_is_one_line_with_the_install_hint(monkeypatch, outputs):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    result = runner.invoke(app, ["--quick"])
    assert result.exit_code == 1
    assert "error: model.arch: diffusers needs the diffusers package, which is not installed: pip install 'imager[bench]'" in result.output
    assert not outputs["results"].exists()


# ----------------------------------------------------------------------------------------- report


@pytest.mark.parametrize(("key", "ours", "theirs", "met"), [
    ("training_speed", 3.0, 2.0, True),  # 1.5× ≥ 1.5×
    ("training_speed", 2.9, 2.0, False),
    ("training_memory", 100.0, 100.0, True),  # ≤ 1
    ("training_memory", 101.0, 100.0, False),
    ("training_utilisation", 55.0, 100.0, True),
    ("sampling_fid", 10.6, 10.0, False),  # 6 % worse than the reference
    ("data_loading", 1.0, 2.0, None),  # no target
])
def test_met_follows_target_and_ratio(key, ours, theirs, met):
    c = Comparison(key, "row", "u", "a", ours, "b", theirs)
    assert c.ratio == ours / theirs
    assert c.met is met
    assert c.row()[-1] == {True: MET, False: NOT_MET, None: NO_TARGET}[met]


def test_other_cpu_share_is_the_busy_time_this_process_did_not_spend():
    from benchmarks.machine import CpuClock, other_cpu_share

    start = CpuClock(wall=100.0, machine_busy=50.0, own=10.0)
    # 10 s on 2 cores = 20 CPU-s of capacity; the machine was busy 12 CPU-s, 8 of them ours
    assert other_cpu_share(start, CpuClock(110.0, 62.0, 18.0), cores=2) == pytest.approx(4 / 20)
    assert other_cpu_share(start, CpuClock(110.0, 58.0, 18.0), cores=2) == 0.0  # only us (clock granularity)
    assert other_cpu_share(start, CpuClock(110.0, 90.0, 10.0), cores=2) == 1.0  # clipped
    assert other_cpu_share(start, start, cores=2) == 0.0


def test_cpu_clock_sees_this_process_spin():
    """Spinning until this process has used 0.3 CPU-s: the machine's busy time grows at least as much
    (less one clock tick of /proc/stat per field)."""
    from benchmarks.machine import read_cpu_clock

    start = read_cpu_clock()
    if start is None:
        pytest.skip("no /proc/stat")
    deadline = time.monotonic() + 10
    while read_cpu_clock().own < start.own + 0.3 and time.monotonic() < deadline:
        pass
    end = read_cpu_clock()
    assert end.own - start.own >= 0.29
    assert end.machine_busy - start.machine_busy >= 0.25


MACHINE = {"cpu": "cpu", "cpu_cores": 2, "cpu_cores_usable": 2, "torch_threads": 2, "torch": "2", "diffusers": "0", "platform": "linux"}


def test_report_markdown_has_every_row_and_says_how_to_reproduce():
    rows = [Comparison(key, f"Row {key}", "u", "ours", 2.0, "theirs", 1.0) for key in TARGETS]
    text = Report(MACHINE, {"repeats": 3, "warmup": 1}, rows, ["a note"]).markdown()
    for c in rows:
        assert f"| Row {c.key} | 2 u (ours) | 1 u (theirs) | " in text
    assert "- a note" in text
    assert "In parentheses" not in text  # no row has an interval
    assert "Measured by `python -m benchmarks` on" in text
    assert "benchmarks/results/latest.json" in text and "`--publish`" in text


def test_a_ratio_interval_is_shown_beside_the_ratio_and_leaves_met_alone():
    row = Comparison("sampling_fid", "FID row", "FID", "ours", 1.1, "theirs", 1.0, interval=(0.98, 1.21))
    plain = Comparison("sampling_fid", "FID row", "FID", "ours", 1.1, "theirs", 1.0)
    assert row.met is plain.met is False  # the point ratio 1.10 against ≤ 1.05, whatever the interval
    assert row.row()[3] == "1.10× (0.98×–1.21×)" and plain.row()[3] == "1.10×"
    assert row.to_json()["ratio_interval_95"] == [0.98, 1.21] and plain.to_json()["ratio_interval_95"] is None
    assert "In parentheses: the ratio's 95 % interval (jackknife over prompts and reference images)." in Report(
        MACHINE, {"repeats": 3, "warmup": 1}, [row]).markdown()


# -------------------------------------------------------------------------- quality at equal compute


def _exp(name: str, rev: str, arch: str, fid: float, r_prec: float, fid_base: float, r_base: float) -> dict:
    evaluate = {"fid_evaluator": fid, "r_precision_evaluator": r_prec, "fid_evaluator_base": fid_base,
                "r_precision_evaluator_base": r_base, "samples": 128, "r_precision_k": 32}
    return {"rev": rev, "name": name, "data": {
        "params": {"params.yaml": {"data": {"train_base": {"model": {"arch": arch}}}}},
        "metrics": {"reports/evaluate.json": {"data": evaluate},
                    "reports/train_base.json": {"data": {"steps": 700}}}}}


SHOW = [  # the shape of `dvc exp show --json -A`: commits, each with its experiments
    {**_exp(None, "workspace", "imager", 3.0, 0.30, 2.0, 0.40), "experiments": None},
    {**_exp("main", "a" * 40, "imager", 3.1, 0.29, 2.1, 0.39),
     "experiments": [{"revs": [_exp("diffusers-arch", "b" * 40, "diffusers", 4.0, 0.20, 3.0, 0.25)]}]},
]


WALL = {"workspace": 600.0, "main": 610.0, "diffusers-arch": 590.0}


def test_quality_rows_compare_two_dvc_experiments():
    from benchmarks.quality import experiments, quality_at_equal_compute

    runs = experiments(SHOW)
    assert {"workspace", "main", "diffusers-arch", "bbbbbbb"} <= set(runs)
    rows = {c.key: c for c in quality_at_equal_compute(runs, "diffusers-arch", training_seconds=WALL.__getitem__)}
    assert rows["quality_fid"].ratio == pytest.approx(3.0 / 4.0) and rows["quality_fid"].met  # 25 % lower ≤ 0.8
    assert rows["quality_r_precision"].ratio == pytest.approx(1.5) and rows["quality_r_precision"].met
    assert rows["quality_fid_base"].ratio == pytest.approx(2.0 / 3.0) and rows["quality_fid_base"].met
    assert rows["quality_r_precision_base"].ratio == pytest.approx(1.6)
    assert rows["quality_compute"].ratio == pytest.approx(600 / 590) and rows["quality_compute"].met is None
    assert "diffusers" in rows["quality_fid"].theirs_label and "imager" in rows["quality_fid"].ours_label
    close = {c.key: c for c in quality_at_equal_compute(runs, "diffusers-arch", ours="main", training_seconds=WALL.__getitem__)}
    assert close["quality_fid"].ratio == pytest.approx(3.1 / 4.0)
    worse = experiments([_exp(None, "workspace", "imager", 3.9, 0.22, 2.9, 0.26), SHOW[1]])
    w = {c.key: c for c in quality_at_equal_compute(worse, "diffusers-arch", training_seconds=WALL.__getitem__)}
    assert w["quality_fid"].met is False and w["quality_r_precision"].met is False  # 2.5 % and 10 %: not 20 %


def test_training_times_come_from_the_experiments_mlflow_runs(mlflow_uri):
    import mlflow

    from benchmarks import BenchError
    from benchmarks.quality import mlflow_training_seconds

    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("quality-times")
    for exp, wall in ((None, 500.0), ("diffusers-arch", 480.0), (None, 610.0)):  # the workspace's latest: 610
        tags = {"imager.stage": "train-base", **({"imager.dvc_exp_name": exp} if exp else {})}
        with mlflow.start_run(tags=tags):
            mlflow.log_metric("summary.wall_seconds", wall)
    assert mlflow_training_seconds("workspace", experiment="quality-times") == 610.0
    assert mlflow_training_seconds("diffusers-arch", experiment="quality-times") == 480.0
    with pytest.raises(BenchError, match="no finished train-base run of 'other'"):
        mlflow_training_seconds("other", experiment="quality-times")


@pytest.mark.parametrize(
    "model, label",
    [
        ({"arch": "imager", "patch_size": 2, "efficient": False}, "imager (2×2 patches)"),
        ({"arch": "imager", "efficient": True}, "imager (Efficient U-Net order)"),
        ({"patch_size": 4, "efficient": True}, "imager (4×4 patches, Efficient U-Net order)"),
        ({"arch": "diffusers", "patch_size": 1}, "diffusers"),
        ({}, "imager"),
    ],
)
def test_network_label_names_the_arch_and_layout(model, label):
    from benchmarks.quality import network_label

    assert network_label(model) == label


def test_quality_errors_name_the_experiment():
    from benchmarks import BenchError
    from benchmarks.quality import experiments, quality_at_equal_compute

    runs = experiments(SHOW)
    with pytest.raises(BenchError, match=r"no DVC experiment named 'nope' \(known: diffusers-arch, main, workspace"):
        quality_at_equal_compute(runs, "nope")
    partial = experiments([{"rev": "workspace", "name": None, "data": {"metrics": {}, "params": {}}}, SHOW[1]])
    with pytest.raises(BenchError, match=r"experiment 'workspace' has no reports/evaluate.json"):
        quality_at_equal_compute(partial, "diffusers-arch")


@pytest.fixture
def fake_dvc(monkeypatch):
    import benchmarks.quality as quality

    monkeypatch.setattr(quality, "dvc_experiments", lambda repo=None: quality.experiments(SHOW))
    monkeypatch.setattr(quality, "mlflow_training_seconds", lambda name, experiment="imager": WALL[name])


QUALITY_ROW = "| Cascade FID (evaluator), equal compute | 3 FID (workspace: imager) | 4 FID (diffusers-arch: diffusers) | 0.75× | ≤ 0.80× | ✅ met |"


def test_quality_through_the_command_without_diffusers_work(tmp_path, fake_dvc):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    args = ["--only", "quality", "--json", str(out_json), "--markdown", str(out_md), "--params", str(REPO / "params.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "--only quality needs --quality EXPERIMENT" in result.output
    result = runner.invoke(app, [*args, "--quality", "diffusers-arch", "--embeddings", str(tmp_path / "none")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert set(report["comparisons"]) == {"quality_fid_base", "quality_r_precision_base", "quality_fid", "quality_r_precision", "quality_compute"}
    assert QUALITY_ROW in out_md.read_text()


# ------------------------------------------------------------------------- where the results go


def test_results_go_to_a_git_ignored_folder_and_the_committed_report_is_docs():
    assert DEFAULT_RESULTS == REPO / "benchmarks" / "results"
    assert DEFAULT_PUBLISHED == REPO / "docs"
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_RESULTS / "latest.json")], cwd=REPO)
    assert out.returncode == 0, "benchmarks/results/ is not git-ignored"


def test_only_publish_writes_the_committed_report(tmp_path, fake_dvc, outputs):
    args = ["--only", "quality", "--quality", "diffusers-arch", "--params", str(REPO / "params.yaml"), "--embeddings", str(tmp_path / "none")]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    latest = outputs["results"] / "latest.md"
    assert sorted(p.name for p in outputs["results"].iterdir()) == ["latest.json", "latest.md"]
    assert QUALITY_ROW in latest.read_text()
    assert not outputs["published"].exists()

    result = runner.invoke(app, [*args, "--publish"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    published = outputs["published"]
    assert sorted(p.name for p in published.iterdir()) == ["benchmarks.json", "benchmarks.md"]
    assert (published / "benchmarks.md").read_text() == latest.read_text()  # the same run, written to both
    assert json.loads((published / "benchmarks.json").read_text()) == json.loads((outputs["results"] / "latest.json").read_text())
    assert f"wrote {published / 'benchmarks.json'} and {published / 'benchmarks.md'}" in result.output


def test_a_quick_run_cannot_be_published(outputs):
    result = runner.invoke(app, ["--quick", "--publish"])
    assert result.exit_code == 1
    assert "error: --publish: a --quick run is a smoke test, not a measurement; drop --quick to update docs/benchmarks.md" in result.output
    assert not outputs["results"].exists() and not outputs["published"].exists()


def test_unknown_comparison_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["--quick", "--only", "speed", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert "--only: unknown comparison 'speed'; valid: training, sampling, cache, data, ui, quality" in result.output
    assert not (tmp_path / "b.json").exists()


def test_the_documented_command_runs_from_the_repository_root():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--publish" in out.stdout and "--quick" in out.stdout


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # the whole benchmark command: the full suite only
def test_quick_run_through_the_command_writes_the_results_folder(tmp_path, outputs):
    pytest.importorskip("diffusers")
    result = runner.invoke(app, [
        "--quick", "--threads", "1", "--shards", str(tmp_path / "no-shards"), "--embeddings", str(tmp_path / "no-cache"),
        "--params", str(REPO / "params.yaml"), "--base-model", str(tmp_path / "no-base"), "--sr-model", str(tmp_path / "no-sr"),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not outputs["published"].exists()
    report = json.loads((outputs["results"] / "latest.json").read_text())
    markdown = (outputs["results"] / "latest.md").read_text()

    machine = report["machine"]
    for key in ("cpu", "cpu_cores", "torch_threads", "torch", "diffusers", "fp32_matmul_peak"):
        assert machine[key], key
    assert machine["torch_threads"] == 1
    assert set(report["comparisons"]) == set(ROWS)
    for key, c in report["comparisons"].items():
        ours, theirs = c["ours"]["value"], c["theirs"]["value"]
        assert math.isfinite(ours) and math.isfinite(theirs) and theirs > 0, key
        assert c["ratio"] == pytest.approx(ours / theirs, rel=1e-12), key
        target = TARGETS[key]
        if target is None:
            assert c["target"] is None and c["met"] is None
            mark = NO_TARGET
        else:
            op, bound = target
            assert c["target"] == {"op": op, "value": bound}
            assert c["met"] == (c["ratio"] >= bound if op == ">=" else c["ratio"] <= bound), key
            mark = MET if c["met"] else NOT_MET
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {c['title']} |"))
        assert row.rstrip().endswith(f"| {mark} |"), row
        assert c["title"] in result.output

    training = report["comparisons"]["training_speed"]["details"]
    assert training["within_tolerance"]
    assert training["diffusers_config"]["block_out_channels"] == [32, 64]  # QUICK_MODEL's levels, mirrored
    flops, seconds = training["flops_per_step"]["imager"], training["step_seconds"]["imager"]["median"]
    utilisation = report["comparisons"]["training_utilisation"]
    assert utilisation["ours"]["value"] == pytest.approx(flops / seconds / 1e9)
    peak = machine["fp32_matmul_peak"]  # timed in the same rounds as the steps: one matmul per round
    assert utilisation["theirs"]["value"] == pytest.approx(peak["gflops"])
    assert len(peak["seconds"]) == report["settings"]["repeats"] and peak["flops"] == 2 * report["settings"]["matmul_size"] ** 3
    assert peak["gflops"] == pytest.approx(peak["flops"] / min(peak["seconds"]) / 1e9)  # the fastest round
    assert peak["gflops_median"] == pytest.approx(peak["flops"] / statistics.median(peak["seconds"]) / 1e9)
    assert peak["gflops_median"] <= peak["gflops"]
    assert len(training["step_seconds"]["imager"]["all"]) == report["settings"]["repeats"]  # warm-up not recorded
    data = report["comparisons"]["data_loading"]["details"]
    assert data["shards"] >= 1 and data["shard_index_seconds"] >= 0
    assert report["settings"]["quick"] is True
    if "other_processes_cpu_share" in machine:  # Linux
        assert 0.0 <= machine["other_processes_cpu_share"] <= 1.0
    assert any(note.startswith("Web app: not measured; it serves the trained cascade") for note in report["notes"])
