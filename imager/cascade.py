"""The trained cascade as one object: text condition -> base image -> super-resolved image.

What the evaluate stage, ``imager generate`` and the MLflow model share. A model file written by the
training stages carries everything sampling needs (config, schedule, prediction target, resolution;
for SR the input resolution and noise-aug level), so a cascade is rebuilt from its two files alone::

    cascade = Cascade.load("data/models/base/model.safetensors", "data/models/sr/model.safetensors")
    base, sr = cascade.generate(cond, sampler="dpmpp_2m", seed=0)   # (B, 3, 32, 32), (B, 3, 64, 64)

Conditions are ``(tokens (B, L, D), mask (B, L), pooled (B, P))`` from the embedding cache or from
the text encoder (:meth:`Cascade.encode`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imager.diffusion.config import ScheduleConfig
from imager.diffusion.schedule import NoiseSchedule
from imager.errors import CheckpointError, ConfigError
from imager.models.checkpoint import load_model, read_checkpoint_meta
from imager.training.grid import sample_model
from imager.training.tasks import noise_augment

Tensor = torch.Tensor
Cond = tuple[Tensor, Tensor, Tensor]


@dataclass
class Stage:
    """One trained model with what sampling it needs."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction: str
    resolution: int
    lowres: int | None = None  # SR only: the input resolution
    aug_level: float = 0.0  # SR only: the noise-aug level it was sampled with in training

    @classmethod
    def load(cls, path: str | Path, *, super_resolution: bool, what: str, makes: str) -> Stage:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no {what} model; train it first with `{makes}`")
        config, extra = read_checkpoint_meta(path)
        if config.super_resolution != super_resolution:
            kind = "a super-resolution" if config.super_resolution else "a base"
            raise CheckpointError(f"{path}: holds {kind} model, expected the {what} model")
        missing = [k for k in ("schedule", "prediction", "resolution") if k not in extra]
        if super_resolution:
            missing += [k for k in ("lowres",) if k not in extra]
        if missing:
            raise CheckpointError(f"{path}: no sampling metadata ({', '.join(missing)}); retrain it with `{makes}`")
        return cls(
            model=load_model(path),
            schedule=NoiseSchedule.from_config(ScheduleConfig.model_validate(extra["schedule"])),
            prediction=extra["prediction"],
            resolution=int(extra["resolution"]),
            lowres=int(extra["lowres"]) if super_resolution else None,
            aug_level=float(extra.get("aug_level", 0.0)),
        )


class Cascade:
    """A base model and an optional super-resolution model that agree on text dims and sizes."""

    def __init__(self, base: Stage, sr: Stage | None = None):
        b = base.model.config
        if sr is not None:
            s = sr.model.config
            for key in ("text_dim", "pooled_dim", "context_length"):
                if getattr(b, key) != getattr(s, key):
                    raise CheckpointError(
                        f"the base and SR models were trained on different text embeddings ({key}: {getattr(b, key)} vs {getattr(s, key)})"
                    )
            if sr.lowres != base.resolution:
                raise CheckpointError(f"the SR model takes {sr.lowres} px inputs but the base model makes {base.resolution} px images")
        self.base, self.sr = base, sr

    @classmethod
    def load(cls, base: str | Path, sr: str | Path | None = None) -> Cascade:
        return cls(
            Stage.load(base, super_resolution=False, what="base", makes="dvc repro train_base"),
            Stage.load(sr, super_resolution=True, what="super-resolution", makes="dvc repro train_sr") if sr is not None else None,
        )

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
        *,
        sampler: str,
        base_steps: int = 20,
        base_guidance: float = 3.0,
        sr_steps: int = 10,
        sr_guidance: float = 1.0,
        sr_sampler: str | None = None,
        aug_level: float | None = None,
        seed: int = 0,
        batch_size: int = 64,
        use_sr: bool = True,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(base (B, 3, r, r), sr (B, 3, R, R) or None) in [-1, 1] for ``cond``.

        Batches of ``batch_size`` are drawn with generators seeded ``seed + index of the batch's
        first image``, so a given seed and batch size always give the same images. The SR model is
        conditioned on the base sample noised to ``aug_level`` (its training value when None).
        ``on_batch(n)`` is called after each batch with its size (progress bars).
        """
        tokens, mask, pooled = cond
        n = tokens.shape[0]
        bases, srs = [], []
        for start in range(0, n, batch_size):
            c = tuple(t[start : start + batch_size] for t in (tokens, mask, pooled))
            base = sample_model(
                self.base.model, self.base.schedule, self.base.prediction, c, resolution=self.base.resolution,
                sampler=sampler, steps=base_steps, guidance=base_guidance, seed=seed + start,
            )
            bases.append(base)
            if self.sr is not None and use_sr:
                srs.append(self.super_resolve(base, c, sampler=sr_sampler or sampler, steps=sr_steps, guidance=sr_guidance, aug_level=aug_level, seed=seed + start))
            if on_batch is not None:
                on_batch(c[0].shape[0])
        return torch.cat(bases), (torch.cat(srs) if srs else None)

    @torch.no_grad()
    def super_resolve(
        self, lowres: Tensor, cond: Cond, *, sampler: str, steps: int, guidance: float, aug_level: float | None, seed: int
    ) -> Tensor:
        """(B, 3, R, R) from ``lowres`` (B, 3, r, r) in [-1, 1] with the SR model."""
        if self.sr is None:
            raise CheckpointError("this cascade has no super-resolution model")
        level = self.sr.aug_level if aug_level is None else aug_level
        gen = torch.Generator().manual_seed(seed + 1_000_003)  # apart from the base model's noise
        aug = torch.full((lowres.shape[0],), float(level))
        low = noise_augment(lowres, aug, self.sr.schedule, gen)
        return sample_model(
            self.sr.model, self.sr.schedule, self.sr.prediction, cond, resolution=self.sr.resolution,
            sampler=sampler, steps=steps, guidance=guidance, seed=seed, lowres=low, aug_level=aug,
        )


def encode_prompts(encoder: Any, prompts: Sequence[str]) -> tuple[Cond, int]:
    """(condition, number of prompts cut to the encoder's max length) for user prompts; a
    :class:`ConfigError` for an empty prompt."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty; give a text such as 'red apple'")
    emb = encoder.encode(list(prompts))
    return (emb.tokens.float(), emb.mask, emb.pooled.float()), int(emb.truncated)


def upscale(images: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upscaling for side-by-side grids."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="nearest")
