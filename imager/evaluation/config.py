"""Typed settings of the evaluation half of the pipeline (params.yaml sections ``evaluator`` and
``evaluate``). No torch here: imager.config embeds these models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from imager.inference.config import CascadeSampling, DeviceName, SRSampling, StageSampling
from imager.schema import SamplerName, Section


class Evaluator(Section):
    """The in-domain evaluator: a small CNN image encoder trained contrastively against the frozen
    text encoder's pooled caption embeddings (locked-text tuning) on the training images. Its
    penultimate features give FID; image-text cosine gives CLIP score and R-precision."""

    resolution: int = Field(64, ge=8)  # every input is resized (area or bilinear) to this side
    channels: tuple[int, ...] = (32, 64, 128)  # one stride-2 stage per entry
    feature_dim: int = Field(128, gt=0)  # the FID features (before the projection to text space)
    epochs: int = Field(12, gt=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.07, gt=0, le=1)  # initial InfoNCE temperature (learned)
    lowres_augment: float = Field(0.5, ge=0, le=1)  # share of batches seen down-up sampled 2x
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, gt=0)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("must be a non-empty list of positive channel counts")
        return v


class Sweep(Section):
    """The sampler-vs-steps curve: FID and R-precision of each sampler at each step count, plus a
    many-step reference, on ``prompts`` held-out prompts (fewer than the main evaluation)."""

    samplers: tuple[SamplerName, ...] = ("ddim", "dpmpp_2m", "euler_ancestral")
    steps: tuple[int, ...] = (5, 10, 20)
    reference_sampler: SamplerName = "ddpm"
    reference_steps: int = Field(100, ge=1, le=1000)
    prompts: int = Field(64, ge=0)  # 0: no sweep
    stage: Literal["base", "cascade"] = "base"  # base: the base model alone (the SR stage fixed)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 or s > 1000 for s in v):
            raise ValueError(f"each step count must be in 1..1000, got {list(v)}")
        return v


class Backbones(Section):
    """Standard metric backbones, used only when their weights are on disk (never downloaded)."""

    inception: str | None = None  # torch-fidelity's Inception weights file (pt_inception-2015-12-05-*.pth)
    clip: str | None = None  # a local Hugging Face CLIP model folder (CLIPModel + CLIPProcessor)


InpaintMask = Literal["centre", "half", "strokes", "border"]


class Inpaint(Section):
    """Inpainting of held-out images with their own captions, one row per mask kind: ``centre``
    (the middle quarter of the area), ``half`` (the right half), ``strokes`` (random thick strokes)
    and ``border`` (a ring of ``border`` px: outpainting); each again with RePaint's resampling."""

    masks: tuple[InpaintMask, ...] = ("centre", "half", "strokes", "border")
    border: int = Field(8, ge=1)  # px of the ring at the shard resolution
    resample: int = Field(3, ge=2, le=50)  # the resampling rows' count (1 is the plain rows)


class Img2Img(Section):
    """The strength sweep: held-out images redrawn with another image's caption at each strength
    (base model only), per sampler: faithfulness to the input against adherence to the caption."""

    strengths: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    samplers: tuple[SamplerName, ...] = ("ddim", "dpmpp_2m_sde")
    images: int = Field(32, ge=2)

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < s <= 1 for s in v):
            raise ValueError(f"each strength must be in (0, 1], got {list(v)}")
        return v


class Sketch(Section):
    """Sketch to image (SDEdit on line drawings made from held-out images): the training-free
    baseline that trained conditioning is measured against. A pixel is a line when its luminance
    (in [0, 1]) is below ``threshold``; fidelity is the F-score of line pixels within ``tolerance``
    px between the sketch and the result's own dark pixels."""

    strength: float = Field(0.8, gt=0, le=1)
    threshold: float = Field(0.25, gt=0, lt=1)
    tolerance: int = Field(1, ge=0, le=8)


class Edits(Section):
    """The edit evaluation (stage evaluate_edits): inpainting, img2img and sketch on held-out images,
    sampled with the evaluation's settings (``evaluate.base``/``sr``, the top-level ``sampler``)."""

    images: int = Field(32, ge=2)  # held-out images of the inpainting and sketch rows (seeded choice)
    seed: int = Field(0, ge=0)
    inpaint: Inpaint = Inpaint()
    img2img: Img2Img = Img2Img()
    sketch: Sketch = Sketch()
    grid_images: int = Field(2, ge=1, le=8)  # examples per edit in the picture grid

    @model_validator(mode="after")
    def _grid(self) -> Edits:
        if self.grid_images > self.images:
            raise ValueError(f"grid_images: must not exceed images ({self.images}), got {self.grid_images}")
        return self


class Evaluate(Section):
    """The evaluation's sampling (each stage takes the top-level ``sampler`` unless it names its
    own), its sets and its scores. The cascade samples on ``device``; scoring runs on the CPU."""

    prompts: int = Field(128, gt=0)  # held-out (val) captions, one image each; capped at the val size
    seed: int = Field(0, ge=0)
    batch_size: int = Field(64, gt=0)
    device: DeviceName = "auto"
    base: StageSampling = StageSampling()
    sr: SRSampling = SRSampling()
    r_precision_k: int = Field(32, ge=2)  # candidates per image: its caption + k-1 random others
    grid_rows: int = Field(8, ge=1, le=64)  # prompts in the grid: base sample | SR sample | real image
    sweep: Sweep = Sweep()
    backbones: Backbones = Backbones()

    def sampling(self, sampler: SamplerName) -> CascadeSampling:
        """The cascade's sampling settings with ``sampler`` (params.yaml's top-level one)."""
        return CascadeSampling(sampler=sampler, base=self.base, sr=self.sr, seed=self.seed, batch_size=self.batch_size)

    @model_validator(mode="after")
    def _grid(self) -> Evaluate:
        if self.grid_rows > self.prompts:
            raise ValueError(f"grid_rows: must not exceed prompts ({self.prompts}), got {self.grid_rows}")
        return self
