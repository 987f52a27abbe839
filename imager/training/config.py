"""Typed settings of the two training stages (params.yaml sections ``train_base`` and ``train_sr``).

No torch here: imager.config embeds these models. The model's text dimensions (``text_dim``,
``pooled_dim``, ``context_length``) are resolved from the embedding cache at training time, so a
params file never has to repeat them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from imager.diffusion.config import LossConfig, ScheduleConfig
from imager.inference.config import StageSampling
from imager.models.config import ControlSettings, LoraSettings, UNetConfig
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
    # Fine-tuning: start from a trained model's weights (a model file or folder of a training stage,
    # or an MLflow URI; imager.training.init), with a fresh optimizer, LR schedule and step count.
    init_from: str | None = None
    lora: LoraSettings | None = None  # train only low-rank adapters on the init_from model (imager.models.lora)
    control: ControlSettings | None = None  # train a spatial control (ControlNet, adapter) on the frozen init_from model


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


class FinetuneEval(Section):
    """How the fine-tunes are measured on the held-out part of the fine-tuning dataset (the
    finetune evaluation stage; imager.evaluation.finetune)."""

    prompts: int = Field(64, gt=0)  # held-out samples of the fine-tuning dataset, one image each
    forgetting_prompts: int = Field(64, gt=0)  # held-out captions of the default data (colour), for forgetting
    probe_prompts: int = Field(8, gt=0)  # held-out samples whose style is measured with each training grid
    chroma: float = Field(0.12, gt=0, lt=1)  # a pixel with max(RGB) - min(RGB) below this is achromatic
    dark: float = Field(0.35, gt=0, lt=1)  # achromatic and luminance below this: ink
    light: float = Field(0.85, gt=0, lt=1)  # achromatic and luminance above this: paper
    reach: float = Field(0.9, gt=0, le=1)  # "steps to the style": the first probe at this share of the real data's score
    seed: int = Field(0, ge=0)
    grid_rows: int = Field(6, ge=1, le=32)


class Finetune(Section):
    """Fine-tuning the base model on one of ``datasets``: fully (``base``: keys of ``train_base``
    replaced) and with LoRA (``lora``: keys of ``train_base`` replaced, including its ``lora``
    settings); ``extra_ranks`` trains further adapters that differ only in rank, for the
    cost/quality table. Both start from the base model's EMA weights (``init_from``)."""

    dataset: str = Field("lineart", min_length=1)
    base: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    extra_ranks: tuple[int, ...] = ()
    evaluate: FinetuneEval = FinetuneEval()

    @model_validator(mode="after")
    def _ranks(self) -> Finetune:
        if any(r < 1 for r in self.extra_ranks) or len(set(self.extra_ranks)) != len(self.extra_ranks):
            raise ValueError(f"extra_ranks: must be distinct positive integers, got {list(self.extra_ranks)}")
        return self


class ControlEval(Section):
    """How the controls are measured (stage evaluate_control; imager.evaluation.control). The held-out
    sketches, their number and the SDEdit baseline's strength are the edit evaluation's (``edits``)."""

    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)  # the default control's conditioning scales (fidelity against scale)

    @model_validator(mode="after")
    def _scales(self) -> ControlEval:
        if not self.scales or any(s < 0 for s in self.scales) or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales: must be distinct numbers >= 0, got {list(self.scales)}")
        return self


class Control(Section):
    """Trained sketch conditioning of the base model (control/dvc.yaml): each entry of ``variants``
    holds keys of ``train_base`` that it replaces, its ``control`` settings (imager.models.config.
    ControlSettings) among them, and trains with the base frozen on ``data`` (``data``: the default
    data; ``data/datasets/NAME``: an entry of ``datasets``, e.g. a folder of your own). ``default``
    names the variant ``imager generate --control`` and the web app use; ``pairs`` the entry of
    ``datasets`` whose images pair with the default data by key (for ``condition: lineart``)."""

    data: str = Field("data", min_length=1)  # the training data: DIR/shards and DIR/embeddings
    default: str = Field("controlnet", min_length=1)
    pairs: str = Field("lineart", min_length=1)
    variants: dict[str, dict[str, Any]] = {}
    evaluate: ControlEval = ControlEval()
