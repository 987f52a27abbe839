"""The edit evaluation (stage ``evaluate_edits``): image-conditioned generation on held-out images,
scored with the in-domain evaluator beside the baselines each edit must be read against.

- Inpainting: masks of several kinds (``edits.inpaint.masks``) on held-out images with their own
  captions, through the whole cascade, with and without RePaint's resampling. Reported: the known
  region's largest error in 8-bit levels before the final overlay and after it (0 by construction),
  FID of the filled images against the held-out set, R-precision for the image's caption, and the
  base model's calls per batch (the price of resampling).
- img2img: held-out images redrawn with *another* image's caption at each strength, base model
  only, per sampler: PSNR and evaluator-feature cosine to the input (faithfulness) against
  R-precision for the new caption (adherence) and FID (realism).
- Sketch: line drawings made from held-out images (pixels darker than a threshold: OpenMoji draws
  its outlines in black) turned into images with the caption by SDEdit, beside the same prompts
  drawn from text alone: R-precision, FID and a sketch-fidelity F-score of line pixels.

The sets come from :func:`imager.evaluation.run.held_out`; the same images, captions and seeds
every run, so the numbers differ only when the models or the sampling settings do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from imager.evaluation.config import Backbones, Edits, Evaluate
from imager.evaluation.run import HeldOut, Scorer, figure_image, held_out
from imager.inference.cascade import Cascade
from imager.inference.config import CascadeSampling
from imager.inference.images import grid_image, resize, to_uint8
from imager.inference.sampling import overlay_known

log = logging.getLogger(__name__)
Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------ inputs


def make_masks(kind: str, n: int, size: int, *, border: int, generator: torch.Generator) -> Tensor:
    """(n, 1, size, size) float masks, 1 = repaint: ``centre`` (the middle half of each side),
    ``half`` (the right half), ``strokes`` (three thick random strokes each, from ``generator``) or
    ``border`` (a ring ``border`` px wide)."""
    mask = torch.zeros(n, 1, size, size)
    if kind == "centre":
        mask[..., size // 4 : size - size // 4, size // 4 : size - size // 4] = 1
    elif kind == "half":
        mask[..., size // 2 :] = 1
    elif kind == "border":
        mask[:] = 1
        mask[..., border : size - border, border : size - border] = 0
    elif kind == "strokes":
        width = max(2, size // 10)
        for i in range(n):
            canvas = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(canvas)
            for _ in range(3):
                points = (torch.rand(4, generator=generator) * size).tolist()
                draw.line(points, fill=255, width=width)
            mask[i, 0] = torch.from_numpy(np.array(canvas)).float() / 255
        mask = (mask > 0.5).float()
    else:
        raise ValueError(f"unknown mask kind '{kind}'")
    return mask


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) luminance in [0, 1] (ITU-R BT.601 weights)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return ((images.clamp(-1, 1) + 1) / 2 * weights).sum(dim=1, keepdim=True)


def dark_pixels(images: Tensor, threshold: float) -> Tensor:
    """(B, 1, H, W) bool: where the luminance is below ``threshold``."""
    return luminance(images) < threshold


def sketch_of(images: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(lines (B, 1, H, W) bool, sketch (B, 3, H, W) in [-1, 1]: the lines black on white)."""
    lines = dark_pixels(images, threshold)
    return lines, torch.where(lines, -1.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def edge_fscore(reference: Tensor, result: Tensor, tolerance: int) -> Tensor:
    """(B,) F-score of line pixels between two (B, 1, H, W) bool maps: precision is the share of
    ``result``'s pixels within ``tolerance`` px (a square neighbourhood) of a ``reference`` pixel,
    recall the share of ``reference``'s within ``tolerance`` of a ``result`` pixel. An image where
    both maps are empty scores 1; where only one is, 0."""

    def near(x: Tensor) -> Tensor:
        k = 2 * tolerance + 1
        return F.max_pool2d(x.float(), k, stride=1, padding=tolerance) > 0

    ref, res = reference.bool(), result.bool()
    hits_p = (res & near(ref)).sum(dim=(1, 2, 3)).float()
    hits_r = (ref & near(res)).sum(dim=(1, 2, 3)).float()
    n_res, n_ref = res.sum(dim=(1, 2, 3)).float(), ref.sum(dim=(1, 2, 3)).float()
    precision = torch.where(n_res > 0, hits_p / n_res.clamp(min=1), torch.zeros_like(n_res))
    recall = torch.where(n_ref > 0, hits_r / n_ref.clamp(min=1), torch.zeros_like(n_ref))
    score = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(n_ref))
    return torch.where((n_res == 0) & (n_ref == 0), torch.ones_like(score), score)


def psnr(images: Tensor, reference: Tensor) -> Tensor:
    """(B,) PSNR in dB of images against references, both (B, 3, H, W) in [-1, 1] (range 2), as
    torchmetrics computes it, per image."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(images.float(), reference.float(), data_range=2.0, reduction="none", dim=(1, 2, 3))


def max_error_levels(images: Tensor, reference: Tensor, where: Tensor) -> int:
    """The largest difference in 8-bit levels between two (B, 3, H, W) sets where ``where``
    (B, 1, H, W) is true, both rounded as a saved PNG would be."""
    diff = (to_uint8(images).int() - to_uint8(reference).int()).abs()
    selected = diff[where.expand_as(diff)]
    return int(selected.max()) if selected.numel() else 0


@contextmanager
def counting_calls(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts ``model``'s forward calls in ``count[0]`` while the block runs."""
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


# -------------------------------------------------------------------------------------- the stage


def _with(sampling: CascadeSampling, *, base: dict[str, Any] | None = None, sr: dict[str, Any] | None = None) -> CascadeSampling:
    """``sampling`` with its base and SR settings updated (the samplers resolved first)."""
    return sampling.model_copy(
        update={
            "base": sampling.stage("base").model_copy(update=base or {}),
            "sr": sampling.stage("sr").model_copy(update=sr or {}),
        }
    )


def _rows(cond: tuple[Tensor, ...], n: int, shift: int = 0) -> tuple[Tensor, ...]:
    return tuple(t[:n].roll(shift, dims=0) for t in cond)


def evaluate_edits(
    cascade: Cascade, evaluator: torch.nn.Module, *, shards_dir, cache, evaluate: Evaluate, cfg: Edits, sampler: str
) -> dict[str, Any]:
    """What the stage writes: ``metrics`` (DVC metrics), ``curve`` (the strength sweep's rows),
    ``grid`` and ``plot`` (PIL images) and ``timings`` (for MLflow only)."""
    n_sweep = cfg.img2img.images
    ev = evaluate.model_copy(update={"prompts": max(cfg.images, n_sweep), "seed": cfg.seed, "grid_rows": 1})
    data = held_out(shards_dir, cache, ev)
    n, m = min(cfg.images, len(data.captions)), min(n_sweep, len(data.captions))
    high = Scorer(evaluator, data, ev, cascade.resolution, Backbones())
    low = Scorer(evaluator, data, ev, cascade.base.resolution, Backbones())
    sampling = evaluate.sampling(sampler)
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {"images": n, "sweep_images": m, "sampler": sampler}
    examples: dict[str, Any] = {}

    started = time.perf_counter()
    metrics["inpaint"], examples["inpaint"] = _inpaint(cascade, data, high, sampling, cfg, n)
    timings["inpaint_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    metrics["img2img"], curve, examples["img2img"] = _img2img(cascade, evaluator, data, low, sampling, cfg, m)
    timings["img2img_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    metrics["sketch"], examples["sketch"] = _sketch(cascade, data, high, sampling, cfg, n)
    timings["sketch_seconds"] = time.perf_counter() - started

    ceiling = high.ceiling(n, clip=False)
    metrics["ceiling"] = {k: ceiling[k] for k in ("fid_evaluator", "r_precision_evaluator")}
    grid = _grid(data, cascade.resolution, cfg, examples)
    plot = strength_plot(curve, metrics["img2img"], m)
    return {"metrics": metrics, "curve": curve, "grid": grid, "plot": plot, "timings": timings}


def _inpaint(cascade: Cascade, data: HeldOut, scorer: Scorer, sampling: CascadeSampling, cfg: Edits, n: int):
    images, cond, targets = data.real[:n], _rows(data.cond, n), data.targets[:n]
    size = images.shape[-1]
    gen = torch.Generator().manual_seed(cfg.seed)
    table: dict[str, Any] = {}
    examples: dict[str, Any] = {}
    runs = [(kind, r) for kind in cfg.inpaint.masks for r in (1, cfg.inpaint.resample)]
    with tqdm(total=len(runs) * n, desc="evaluate-edits: inpainting", unit="img") as bar:
        masks = {kind: make_masks(kind, n, size, border=cfg.inpaint.border, generator=gen) for kind in cfg.inpaint.masks}
        for kind, r in runs:
            mask = masks[kind]
            run = sampling.model_copy(update={"resample": r})
            with counting_calls(cascade.base.model) as calls:
                _, raw = cascade.generate(cond, run, image=images, mask=mask, overlay=False, on_batch=bar.update)
            assert raw is not None
            filled = overlay_known(raw, images, mask)
            known = mask == 0
            scores = scorer.score(filled, targets, clip=False)
            batches = -(-n // run.batch_size)
            name = kind if r == 1 else f"{kind}_resample{r}"
            table[name] = {
                "known_max_error_before_overlay": max_error_levels(raw, images, known),
                "known_max_error": max_error_levels(filled, images, known),
                "fid_evaluator": scores["fid_evaluator"],
                "r_precision_evaluator": scores["r_precision_evaluator"],
                "base_calls_per_batch": calls[0] // batches,
            }
            examples[name] = (mask, filled)
    return table, examples


def _img2img(cascade: Cascade, evaluator: torch.nn.Module, data: HeldOut, scorer: Scorer, sampling: CascadeSampling, cfg: Edits, m: int):
    shift = max(1, m // 2)  # each image gets the caption of the image half the set away
    images = data.real[:m]
    source = resize(images, cascade.base.resolution)
    cond, targets = _rows(data.cond, m, shift), data.targets[:m].roll(shift)
    with torch.inference_mode():
        source_features = evaluator.features(source)
    table: dict[str, Any] = {}
    curve: list[dict[str, Any]] = []
    examples: dict[str, Any] = {"targets": targets}
    strengths = cfg.img2img.strengths
    with tqdm(total=len(cfg.img2img.samplers) * len(strengths) * m, desc="evaluate-edits: img2img sweep", unit="img") as bar:
        for name in cfg.img2img.samplers:
            for strength in strengths:
                run = _with(sampling, base={"sampler": name}).model_copy(update={"strength": strength})
                base, _ = cascade.generate(cond, run, image=images, use_sr=False, on_batch=bar.update)
                with torch.inference_mode():
                    cosine = F.cosine_similarity(evaluator.features(base), source_features, dim=-1)
                scores = scorer.score(base, targets, clip=False)
                row = {
                    "sampler": name,
                    "strength": strength,
                    "psnr": float(psnr(base, source).mean()),
                    "feature_cosine": float(cosine.mean()),
                    "r_precision_evaluator": scores["r_precision_evaluator"],
                    "fid_evaluator": scores["fid_evaluator"],
                }
                curve.append(row)
                table.setdefault(name, {})[str(strength)] = {k: v for k, v in row.items() if k not in ("sampler", "strength")}
                if name == cfg.img2img.samplers[0]:
                    examples[strength] = base
    unchanged = scorer.score(source, targets, clip=False)  # the inputs themselves, judged against the new captions
    table["input"] = {"r_precision_evaluator": unchanged["r_precision_evaluator"], "fid_evaluator": unchanged["fid_evaluator"]}
    return table, curve, examples


def _sketch(cascade: Cascade, data: HeldOut, scorer: Scorer, sampling: CascadeSampling, cfg: Edits, n: int):
    images, cond, targets = data.real[:n], _rows(data.cond, n), data.targets[:n]
    lines, sketch = sketch_of(images, cfg.sketch.threshold)
    table: dict[str, Any] = {}
    examples: dict[str, Any] = {"sketch": sketch}
    with tqdm(total=2 * n, desc="evaluate-edits: sketch", unit="img") as bar:
        for name, run, image in (
            ("sketch", sampling.model_copy(update={"strength": cfg.sketch.strength}), sketch),
            ("text_only", sampling, None),
        ):
            _, out = cascade.generate(cond, run, image=image, on_batch=bar.update)
            assert out is not None
            scores = scorer.score(out, targets, clip=False)
            fidelity = edge_fscore(lines, dark_pixels(out, cfg.sketch.threshold), cfg.sketch.tolerance)
            table[name] = {
                "sketch_fscore": float(fidelity.mean()),
                "fid_evaluator": scores["fid_evaluator"],
                "r_precision_evaluator": scores["r_precision_evaluator"],
            }
            examples["result" if name == "sketch" else name] = out
    table["strength"] = cfg.sketch.strength
    return table, examples


def _masked(image: Tensor, mask: Tensor) -> Tensor:
    """(3, H, W) image with the repainted region (mask (1, H, W) = 1) shown mid-grey."""
    return image * (1 - mask) + 0.0 * mask


def _grid(data: HeldOut, size: int, cfg: Edits, examples: dict[str, Any]) -> Image.Image:
    """Input | mask (the repainted region grey) | result for each edit, for the first
    ``cfg.grid_images`` held-out images (their captions are the inpainting and sketch prompts)."""
    rows, labels = [], []
    inpaint, img2img, sketch = examples["inpaint"], examples["img2img"], examples["sketch"]
    shown = [s for s in cfg.img2img.strengths if s in img2img][:: max(1, len(cfg.img2img.strengths) // 4)][:4]
    r = cfg.inpaint.resample
    for i in range(cfg.grid_images):
        real = data.real[i]
        for kind in cfg.inpaint.masks:
            mask, plain = inpaint[kind]
            resampled = inpaint[f"{kind}_resample{r}"][1]
            rows.append([real, _masked(real, mask[i]), plain[i], resampled[i]])
            labels.append(f"{data.captions[i][:22]}, {kind}: input | mask | result | resample {r}")
        target = data.pool[int(img2img["targets"][i])]
        rows.append([real] + [resize(img2img[s][i : i + 1], size)[0] for s in shown])
        labels.append(f"img2img '{target[:24]}': input | {' | '.join(str(s) for s in shown)}")
        rows.append([real, sketch["sketch"][i], sketch["result"][i], sketch["text_only"][i]])
        labels.append("sketch: image | sketch | result | text only")
    return grid_image(rows, labels)


def strength_plot(curve: list[dict[str, Any]], table: dict[str, Any], m: int) -> Image.Image:
    """Faithfulness (PSNR, feature cosine) and adherence/realism (R-precision, FID) against
    strength, one line per sampler; the unchanged inputs' R-precision and FID dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("psnr", "PSNR to the input (dB)"),
        ("feature_cosine", "evaluator-feature cosine to the input"),
        ("r_precision_evaluator", "R-precision, new caption"),
        ("fid_evaluator", "FID (evaluator), lower is better"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=100)
    samplers = list(dict.fromkeys(r["sampler"] for r in curve))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in samplers:
            pts = [(r["strength"], r[key]) for r in curve if r["sampler"] == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        if key in table.get("input", {}):
            ax.axhline(table["input"][key], linestyle=":", color="black", label="the input itself")
        ax.set_xlabel("strength")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"img2img: faithfulness vs prompt adherence ({m} held-out images, another image's caption, base model)")
    return figure_image(fig)
