"""The control evaluation (stage ``evaluate_control``): trained sketch conditioning against the
training-free baseline, on the held-out sketches of the edit evaluation.

The same held-out images, captions, seeds and line drawings as the sketch rows of
:mod:`imager.evaluation.edits` (``edits.images`` images chosen with ``edits.seed``; the pixels darker
than ``edits.sketch.threshold``), through the whole cascade with the evaluation's sampling settings:

- ``text_only``: the captions alone (the sketch ignored);
- ``sdedit``: SDEdit on the sketch at ``edits.sketch.strength`` (the training-free baseline);
- one row per trained control (ControlNet, adapter) at scale 1, from pure noise;
- the default control at each of ``control.evaluate.scales`` (fidelity against conditioning scale).

Each row: sketch fidelity (the F-score of the sketch's lines against the result's dark pixels,
within ``edits.sketch.tolerance`` px), the in-domain evaluator's R-precision for the caption and FID
against the held-out set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from imager.evaluation.config import Backbones, Edits, Evaluate
from imager.evaluation.edits import dark_pixels, edge_fscore, sketch_of
from imager.evaluation.run import Scorer, figure_image, held_out
from imager.inference.cascade import Cascade
from imager.inference.images import grid_image
from imager.models.control import ControlBase, ControlInput

Tensor = torch.Tensor


@dataclass
class Trained:
    """A trained control to measure: its name (the params variant), network and trainable parameters."""

    name: str
    net: ControlBase
    parameters: int


def evaluate_control(
    cascade: Cascade, evaluator: torch.nn.Module, controls: list[Trained], *, default: str, scales: tuple[float, ...],
    shards_dir, cache, evaluate: Evaluate, edits: Edits, sampler: str,
) -> dict[str, Any]:  # fmt: skip
    """``metrics`` (DVC metrics), ``grid`` and ``plot`` (PIL images) and ``timings`` (MLflow only)."""
    ev = evaluate.model_copy(update={"prompts": edits.images, "seed": edits.seed, "grid_rows": 1})
    data = held_out(shards_dir, cache, ev)
    n = min(edits.images, len(data.captions))
    images, targets = data.real[:n], data.targets[:n]
    cond = tuple(t[:n] for t in data.cond)
    lines, sketch = sketch_of(images, edits.sketch.threshold)
    scorer = Scorer(evaluator, data, ev, cascade.resolution, Backbones())
    sampling = evaluate.sampling(sampler)
    by_name = {c.name: c for c in controls}
    runs: list[tuple[str, Any, dict[str, Any]]] = [
        ("text_only", sampling, {}),
        ("sdedit", sampling.model_copy(update={"strength": edits.sketch.strength}), {"image": sketch}),
    ]
    condition = lines.float()  # the control's input: the sketch's line map, area-averaged by the cascade
    for c in controls:
        runs.append((c.name, sampling, {"control": [ControlInput(c.net, condition, 1.0)]}))
    for scale in scales:
        if scale != 1.0:
            runs.append((f"{default}@{scale:g}", sampling, {"control": [ControlInput(by_name[default].net, condition, scale)]}))
    metrics: dict[str, Any] = {"images": n, "sampler": sampler, "sdedit_strength": edits.sketch.strength}
    results: dict[str, Tensor] = {}
    timings: dict[str, float] = {}
    with tqdm(total=len(runs) * n, desc="evaluate-control", unit="img") as bar:
        for name, run, kwargs in runs:
            started = time.perf_counter()
            _, out = cascade.generate(cond, run, on_batch=bar.update, **kwargs)
            assert out is not None
            timings[f"{name}_seconds"] = time.perf_counter() - started
            scores = scorer.score(out, targets, clip=False)
            fidelity = edge_fscore(lines, dark_pixels(out, edits.sketch.threshold), edits.sketch.tolerance)
            metrics[name] = {
                "sketch_fscore": float(fidelity.mean()),
                "fid_evaluator": scores["fid_evaluator"],
                "r_precision_evaluator": scores["r_precision_evaluator"],
            }
            results[name] = out
    for c in controls:
        metrics[c.name]["parameters"] = c.parameters
    curve = [{"scale": s, **metrics[default if s == 1.0 else f"{default}@{s:g}"]} for s in scales]
    metrics["scales"] = {f"{row['scale']:g}": {k: v for k, v in row.items() if k != "scale"} for row in curve}
    for s in scales:
        metrics.pop(f"{default}@{s:g}", None)
    ceiling = scorer.ceiling(n, clip=False)
    metrics["real"] = {"sketch_fscore": float(edge_fscore(lines, dark_pixels(images, edits.sketch.threshold), edits.sketch.tolerance).mean())}
    metrics["real"] |= {k: ceiling[k] for k in ("fid_evaluator", "r_precision_evaluator")}
    columns = ["sdedit", *[c.name for c in controls]]
    shown = range(min(edits.grid_images * 3, n))
    grid = grid_image(
        [[sketch[i], *[results[k][i] for k in columns], images[i]] for i in shown],
        [f"{data.captions[i][:14]}: sketch|{'|'.join(columns)}|real" for i in shown],
    )
    return {"metrics": metrics, "curve": curve, "grid": grid, "plot": scale_plot(curve, metrics, default), "timings": timings}


def scale_plot(curve: list[dict[str, Any]], metrics: dict[str, Any], default: str) -> Image.Image:
    """Sketch fidelity, R-precision and FID against the conditioning scale; SDEdit and text alone dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("sketch_fscore", "sketch fidelity (line F-score)"), ("r_precision_evaluator", "R-precision"), ("fid_evaluator", "FID (evaluator), lower is better"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot([r["scale"] for r in curve], [r[key] for r in curve], marker="o", label=default)
        ax.axhline(metrics["sdedit"][key], linestyle=":", color="tab:red", label=f"SDEdit (strength {metrics['sdedit_strength']:g})")
        ax.axhline(metrics["text_only"][key], linestyle=":", color="grey", label="text only")
        ax.set_xlabel("conditioning scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{default}: fidelity to the sketch against conditioning scale ({metrics['images']} held-out sketches)")
    return figure_image(fig)
