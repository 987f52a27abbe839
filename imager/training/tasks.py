"""What differs between the base and the super-resolution model: how a batch of shard images
becomes the model's target ``x0`` and its extra inputs.

Images come from the loader as uint8 (B, 3, S, S) at the shard resolution S and become values in
[-1, 1] (imager.inference.images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from imager.diffusion.schedule import NoiseSchedule
from imager.errors import ConfigError, DataError
from imager.inference.conditions import condition_of
from imager.inference.images import downsample, noise_augment, to_unit
from imager.training.config import TrainBase, TrainSR

Tensor = torch.Tensor


@dataclass(frozen=True)
class BaseTask:
    cfg: TrainBase
    super_resolution: bool = False

    def check(self, shard_resolution: int) -> None:
        if self.cfg.resolution > shard_resolution:
            raise ConfigError(
                f"params.yaml: train_base.resolution: must be <= the shard resolution ({shard_resolution}), got {self.cfg.resolution}"
            )

    def inputs(self, images: Tensor, schedule: NoiseSchedule, gen: torch.Generator, keys: list[str] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """(x0 (B, 3, R, R) in [-1, 1], extra model kwargs)."""
        return downsample(to_unit(images), self.cfg.resolution), {}


@dataclass(frozen=True)
class ControlTask(BaseTask):
    """The base model's target and, as the control's input, the line map of each image
    (``control.condition``: lines or edges computed from it, or the image of the same key in the
    paired dataset ``pairs``, key -> uint8 (3, S, S)), blanked for a ``control_drop`` share of rows."""

    pairs: dict[str, Tensor] | None = None

    def condition(self, images: Tensor, keys: list[str] | None) -> Tensor:
        """(B, 1, R, R) line maps in [0, 1] for uint8 (B, 3, S, S) images (or their pairs)."""
        settings = self.cfg.control
        if settings.condition == "lineart":
            if self.pairs is None or keys is None:
                raise ConfigError("control.condition: lineart needs the paired dataset's shards (--pairs)")
            missing = [k for k in keys if k not in self.pairs]
            if missing:
                raise DataError(f"sample '{missing[0]}' of the training data has no image of the same key in the paired dataset")
            images = torch.stack([self.pairs[k] for k in keys])
        return condition_of(to_unit(images), settings.condition, settings.threshold, self.cfg.resolution)

    def inputs(self, images: Tensor, schedule: NoiseSchedule, gen: torch.Generator, keys: list[str] | None = None) -> tuple[Tensor, dict[str, Any]]:
        x0, _ = super().inputs(images, schedule, gen)
        condition = self.condition(images, keys)
        drop = torch.rand(x0.shape[0], generator=gen) < self.cfg.control.control_drop
        return x0, {"condition": torch.where(drop[:, None, None, None], torch.zeros_like(condition), condition)}


@dataclass(frozen=True)
class SRTask:
    cfg: TrainSR
    super_resolution: bool = True

    def check(self, shard_resolution: int) -> None:
        if self.cfg.resolution > shard_resolution:
            raise ConfigError(
                f"params.yaml: train_sr.resolution: must be <= the shard resolution ({shard_resolution}), got {self.cfg.resolution}"
            )

    def lowres(self, x0: Tensor, aug_level: Tensor, schedule: NoiseSchedule, gen: torch.Generator) -> Tensor:
        """The conditioning image: x0 area-downsampled by resolution/lowres, then noised to
        ``aug_level`` with the forward process (Imagen's noise conditioning augmentation)."""
        factor = self.cfg.resolution // self.cfg.lowres
        return noise_augment(F.avg_pool2d(x0, factor), aug_level, schedule, gen)

    def inputs(self, images: Tensor, schedule: NoiseSchedule, gen: torch.Generator, keys: list[str] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """(x0 (B, 3, c, c) a random crop (or the whole image) at the output resolution, SR kwargs)."""
        cfg = self.cfg
        x0 = downsample(to_unit(images), cfg.resolution)
        if cfg.crop is not None and cfg.crop < cfg.resolution:
            factor = cfg.resolution // cfg.lowres
            cells = (cfg.resolution - cfg.crop) // factor + 1  # offsets aligned to the lowres grid
            offsets = torch.randint(0, cells, (x0.shape[0], 2), generator=gen) * factor
            x0 = torch.stack([img[:, y : y + cfg.crop, x : x + cfg.crop] for img, (y, x) in zip(x0, offsets.tolist(), strict=True)])
        aug = torch.rand(x0.shape[0], generator=gen) * cfg.max_aug_level
        return x0, {"lowres": self.lowres(x0, aug, schedule, gen), "aug_level": aug}
