"""Typed settings of the two training stages (params.yaml sections ``train_base`` and ``train_sr``).

No torch here: imager.config embeds these models. The model's text dimensions (``text_dim``,
``pooled_dim``, ``context_length``) are resolved from the embedding cache at training time, so a
params file never has to repeat them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from imager.diffusion.config import LossConfig, ScheduleConfig
from imager.inference.config import StageSampling
from imager.models.config import UNetConfig
from imager.schema import SamplerName, Section


class Optim(Section):
    """AdamW with linear warm-up then constant, cosine or linear decay to ``min_lr_ratio``·lr."""

    lr: float = Field(1e-3, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    decay: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)  # max global gradient norm; null: no clipping

    @model_validator(mode="after")
    def _betas_in_range(self) -> Optim:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        return self


class Grid(StageSampling):
    """Sample grids for the prompts of ``embed.prompts`` (encoded by the embed stage): a PNG logged
    to MLflow every ``every`` steps and at the end, drawn from the EMA model with these settings."""

    every: int = Field(500, ge=0)  # 0: only at the end
    per_prompt: int = Field(2, ge=1, le=16)
    sampler: SamplerName = "dpmpp_2m"
    seed: int = Field(0, ge=0)


class TrainCommon(Section):
    steps: int = Field(1000, gt=0)  # optimizer steps
    batch_size: int = Field(32, gt=0)  # per process and micro-step
    grad_accum: int = Field(1, ge=1)
    model: UNetConfig = UNetConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    optim: Optim = Optim()
    ema_decay: float = Field(0.999, ge=0, lt=1)
    cond_drop: float = Field(0.1, ge=0, le=1)  # caption dropout for classifier-free guidance
    shuffle_buffer: int = Field(1000, ge=1)
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(25, gt=0)
    checkpoint_every: int = Field(250, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    grid: Grid = Grid()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 adds loss scaling
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (pays off on GPUs)
    grad_checkpointing: bool = False  # recompute activations in backward (large models on GPUs)
    threads: int | None = Field(None, gt=0)  # torch CPU threads; null: torch's default


class TrainBase(TrainCommon):
    resolution: int = Field(32, gt=0)  # images are area-downsampled from the shards to this size


class TrainSR(TrainCommon):
    lowres: int = Field(32, gt=0)  # the base model's resolution: the input of the SR model
    resolution: int = Field(64, gt=0)  # SR output size; a multiple of lowres
    crop: int | None = Field(None, gt=0)  # train on random crops of this size (output pixels)
    max_aug_level: float = Field(0.5, ge=0, le=1)  # noise augmentation t_aug ~ U[0, max] on lowres
    sample_aug_level: float = Field(0.1, ge=0, le=1)  # the level used when sampling grids

    @model_validator(mode="after")
    def _sizes(self) -> TrainSR:
        if self.resolution % self.lowres or self.resolution == self.lowres:
            raise ValueError(
                f"resolution: the SR output must be a multiple (> 1) of the base resolution lowres ({self.lowres}), got {self.resolution}"
            )
        factor = self.resolution // self.lowres
        if self.crop is not None and (self.crop > self.resolution or self.crop % factor):
            raise ValueError(f"crop: must be <= resolution ({self.resolution}) and a multiple of {factor}, got {self.crop}")
        return self
