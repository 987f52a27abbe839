"""The trained cascade as one object: text condition -> base image -> super-resolved image.

What the evaluate stage, ``imager generate``, the MLflow model and the benchmark share. A model file
written by the training stages carries everything sampling needs (config, schedule, prediction
target, resolution; for SR the input resolution and noise-aug level), so a cascade is rebuilt from
its two files alone::

    cascade = Cascade.load("data/models/base/model.safetensors", "data/models/sr/model.safetensors", device="auto")
    base, sr = cascade.generate(cond, CascadeSampling(sampler="dpmpp_2m", seed=0))   # (B, 3, 32, 32), (B, 3, 64, 64)

Conditions are ``(tokens (B, L, D), mask (B, L), pooled (B, P))`` from the embedding cache or from
the text encoder (:func:`encode_prompts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imager.errors import CheckpointError, ConfigError
from imager.inference.conditions import resize_condition
from imager.inference.config import CascadeSampling, SRSampling
from imager.inference.images import noise_augment, resize, resize_mask
from imager.inference.sampling import Cond, Stage, overlay_known

if TYPE_CHECKING:
    from imager.models.control import ControlInput

Tensor = torch.Tensor
SR_NOISE_OFFSET = 1_000_003  # the SR input's augmentation noise is seeded apart from the sampler's


class Cascade:
    """A base model and an optional super-resolution model that agree on text dims and sizes."""

    def __init__(self, base: Stage, sr: Stage | None = None):
        b = base.model.config
        if sr is not None:
            s = sr.model.config
            for key in ("text_dim", "pooled_dim", "context_length"):
                if getattr(b, key) != getattr(s, key):
                    raise CheckpointError(f"the base and SR models were trained on different text embeddings ({key}: {getattr(b, key)} vs {getattr(s, key)})")
            if sr.lowres != base.resolution:
                raise CheckpointError(f"the SR model takes {sr.lowres} px inputs but the base model makes {base.resolution} px images")
        self.base, self.sr = base, sr

    @classmethod
    def load(cls, base: str | Path, sr: str | Path | None = None, *, device: str | torch.device = "cpu") -> Cascade:
        """The models of two training-stage files on ``device`` (auto, cpu, cuda[:i])."""
        return cls(
            Stage.load(base, super_resolution=False, what="base", makes="dvc repro train_base", device=device),
            Stage.load(sr, super_resolution=True, what="super-resolution", makes="dvc repro train_sr", device=device) if sr is not None else None,
        )

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def resolution(self) -> int:
        return (self.sr or self.base).resolution

    @property
    def text_shape(self) -> dict[str, int]:
        c = self.base.model.config
        return {"context_length": c.context_length, "text_dim": c.text_dim, "pooled_dim": c.pooled_dim}

    def check_encoder(self, encoder: Any) -> None:
        """A :class:`ConfigError` unless ``encoder`` makes embeddings of the shape the models take."""
        c = self.base.model.config
        got = {"max_length": encoder.max_length, "token_dim": encoder.token_dim, "pooled_dim": encoder.pooled_dim}
        want = {"max_length": c.context_length, "token_dim": c.text_dim, "pooled_dim": c.pooled_dim}
        if got != want:
            key = next(k for k in got if got[k] != want[k])
            raise ConfigError(
                f"params.yaml: embed: the text encoder '{encoder.id}' gives {key} {got[key]} but the models were trained with "
                f"{want[key]}; use the embed params the models were trained with"
            )

    @torch.no_grad()
    def generate(
        self,
        cond: Cond,
        cfg: CascadeSampling,
        *,
        negative: Cond | None = None,
        use_sr: bool = True,
        on_batch: Callable[[int], None] | None = None,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        overlay: bool = True,
        on_denoise: Callable[[str, Tensor], None] | None = None,
        control: Sequence[ControlInput] = (),
    ) -> tuple[Tensor, Tensor | None]:
        """(base (B, 3, r, r), sr (B, 3, R, R) or None) in [-1, 1], on the CPU, for ``cond``.

        Batches of ``cfg.batch_size`` draw their noise from generators seeded ``cfg.seed + index of
        the batch's first image``, so a seed and batch size always give the same images. ``negative``
        (batch B or 1) replaces the null condition in both stages' guidance. ``on_batch(n)`` is
        called after each batch with its size (progress bars).

        From an image (:mod:`imager.inference.edit` reads and prepares them): ``image`` (B or 1, 3,
        S, S) in [-1, 1] and ``mask`` (B or 1, 1, S, S) in [0, 1], 1 = repaint. Each stage gets them
        resized to its resolution (:func:`resize`, :func:`resize_mask`) and uses them as ``cfg``
        says: img2img from the image when the stage's strength (``strength``, ``sr_strength``) is
        < 1 (the SR stage then refines the given image rather than upsampling from noise),
        inpainting of the mask (``resample``, ``sr_resample``: RePaint's resampling). The SR stage's input is the base result with the known pixels
        overlaid; ``overlay`` False returns both results without the overlay (to measure it).

        ``on_denoise(stage, x̂0)`` sees each stage's guided x̂0 (``"base"`` or ``"sr"``, the batch's
        (b, 3, r, r)) after every denoiser call: live previews and progress. An exception it raises
        stops sampling there (a Stop button), with nothing returned.

        ``control``: trained spatial controls of the base model (:class:`~imager.models.control.ControlInput`),
        each condition (B or 1, 1, S, S) in [0, 1] area-averaged to the base resolution here.
        """
        tokens, text_mask, pooled = cond
        n = tokens.shape[0]
        base_cfg, sr_cfg = cfg.stage("base"), cfg.stage("sr")
        if mask is not None and image is None:
            raise ConfigError("a mask needs an image: the pixels it keeps")
        if image is not None and (image.ndim != 4 or image.shape[1] != 3 or image.shape[-1] != image.shape[-2]):
            raise ConfigError(f"image: expected (B, 3, S, S), got {tuple(image.shape)}")
        if mask is not None and (mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]):  # type: ignore[union-attr]
            raise ConfigError(f"mask: expected (B, 1, {image.shape[-2]}, {image.shape[-1]}) like the image, got {tuple(mask.shape)}")  # type: ignore[union-attr]
        sr_used = self.sr is not None and use_sr
        if mask is not None and not bool(mask.any()):  # nothing to repaint: the input, at each stage's size
            image = image.float().cpu().expand(n, -1, -1, -1)  # type: ignore[union-attr]
            if on_batch is not None:
                on_batch(n)
            return resize(image, self.base.resolution), resize(image, self.sr.resolution) if sr_used else None  # type: ignore[union-attr]
        control = [replace(c, condition=resize_condition(c.condition.cpu(), self.base.resolution)) for c in control]
        base_in = self._inputs(self.base, cfg.strength, image, mask)
        sr_in = self._inputs(self.sr, cfg.sr_strength, image, mask) if sr_used else (None, None)  # type: ignore[arg-type]
        bases, srs = [], []
        for start in range(0, n, cfg.batch_size):
            c = tuple(t[start : start + cfg.batch_size] for t in (tokens, text_mask, pooled))
            neg = None if negative is None else _rows(negative, start, cfg.batch_size)
            init, known = (None if t is None else _batch_rows(t, start, cfg.batch_size) for t in base_in)
            raw = self.base.sample(
                c, base_cfg, seed=cfg.seed + start, negative=neg, init=init, mask=known, strength=cfg.strength, resample=cfg.resample, overlay=False,
                on_denoise=None if on_denoise is None else partial(on_denoise, "base"),
                control=[replace(k, condition=_batch_rows(k.condition, start, cfg.batch_size)) for k in control],
            )  # fmt: skip
            base = raw if known is None else overlay_known(raw, init, known)
            bases.append((base if overlay else raw).cpu())
            if sr_used:
                init, known = (None if t is None else _batch_rows(t, start, cfg.batch_size) for t in sr_in)
                high = self.super_resolve(
                    base, c, sr_cfg, seed=cfg.seed + start, negative=neg, init=init, mask=known, strength=cfg.sr_strength, resample=cfg.sr_resample, overlay=overlay,
                    on_denoise=None if on_denoise is None else partial(on_denoise, "sr"),
                )  # fmt: skip
                srs.append(high.cpu())
            if on_batch is not None:
                on_batch(c[0].shape[0])
        return torch.cat(bases), (torch.cat(srs) if srs else None)

    @staticmethod
    def _inputs(stage: Stage, strength: float, image: Tensor | None, mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(init, mask) at the stage's resolution, or None for what the stage does not use."""
        if image is None or (strength == 1 and mask is None):
            return None, None
        size = stage.resolution
        return resize(image.float(), size), None if mask is None else resize_mask(mask.float(), size)

    @torch.no_grad()
    def super_resolve(
        self,
        lowres: Tensor,
        cond: Cond,
        cfg: SRSampling,
        *,
        seed: int,
        negative: Cond | None = None,
        init: Tensor | None = None,
        mask: Tensor | None = None,
        strength: float = 1.0,
        resample: int = 1,
        overlay: bool = True,
        on_denoise: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """(B, 3, R, R) in [-1, 1] on the model's device from ``lowres`` (B, 3, r, r) in [-1, 1]: the
        input is noise-augmented to ``cfg.aug_level`` (the model's own level when None), then sampled
        (from ``init``/``mask`` at R px as :meth:`Stage.sample` takes them)."""
        if self.sr is None:
            raise CheckpointError("this cascade has no super-resolution model")
        level = self.sr.aug_level if cfg.aug_level is None else cfg.aug_level
        gen = torch.Generator().manual_seed(seed + SR_NOISE_OFFSET)
        aug = torch.full((lowres.shape[0],), float(level))
        low = noise_augment(lowres.float().cpu(), aug, self.sr.schedule, gen)
        return self.sr.sample(
            cond, cfg, seed=seed, negative=negative, lowres=low, aug_level=aug, init=init, mask=mask, strength=strength, resample=resample, overlay=overlay,
            on_denoise=on_denoise,
        )  # fmt: skip


def _rows(cond: Cond, start: int, size: int) -> Cond:
    """A batch's rows of a condition; a condition of batch 1 is shared by every batch."""
    if cond[0].shape[0] == 1:
        return cond
    return tuple(t[start : start + size] for t in cond)  # type: ignore[return-value]


def _batch_rows(t: Tensor, start: int, size: int) -> Tensor:
    """A batch's rows of an image or mask; one of batch 1 is shared by every batch."""
    return t if t.shape[0] == 1 else t[start : start + size]


def encode_prompts(encoder: Any, prompts: Sequence[str], *, allow_empty: bool = False) -> tuple[Cond, int]:
    """(condition, number of prompts cut to the encoder's max length) for user prompts; a
    :class:`ConfigError` for an empty prompt unless ``allow_empty`` (edits of an image need no
    text): an empty prompt's row then has an all-False mask, which :meth:`Stage.sample` replaces
    with the model's null condition."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ConfigError(f"prompt {i + 1} is not a text; give a text such as 'red apple'")
        if not allow_empty and not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty; give a text such as 'red apple'")
    if all(p.strip() for p in prompts):
        emb = encoder.encode(list(prompts))
        return (emb.tokens.float(), emb.mask, emb.pooled.float()), int(emb.truncated)
    return _encode_rows(encoder, list(prompts))


def _encode_rows(encoder: Any, texts: list[str]) -> tuple[Cond, int]:
    """The texts' condition with all-False-mask rows (zeros) for the empty ones, and how many were cut."""
    given = [i for i, t in enumerate(texts) if t.strip()]
    n = len(texts)
    if not given:
        zeros = torch.zeros(n, encoder.max_length, encoder.token_dim), torch.zeros(n, encoder.pooled_dim)
        return (zeros[0], torch.zeros(n, encoder.max_length, dtype=torch.bool), zeros[1]), 0
    emb = encoder.encode([texts[i] for i in given])
    tokens = emb.tokens.new_zeros((n, *emb.tokens.shape[1:])).float()
    mask = emb.mask.new_zeros((n, *emb.mask.shape[1:]))
    pooled = emb.pooled.new_zeros((n, *emb.pooled.shape[1:])).float()
    index = torch.tensor(given)
    tokens[index], mask[index], pooled[index] = emb.tokens.float(), emb.mask, emb.pooled.float()
    return (tokens, mask, pooled), int(emb.truncated)


def encode_negative(encoder: Any, texts: Sequence[str]) -> Cond | None:
    """The negative prompts' condition for guidance, one per prompt (or one for all); None when all
    are empty. An empty negative prompt is the model's own null condition: its row is given an
    all-False mask, which :meth:`Stage.sample` replaces with that null condition."""
    texts = ["" if t is None else str(t) for t in texts]
    if not any(t.strip() for t in texts):
        return None
    return _encode_rows(encoder, texts)[0]
