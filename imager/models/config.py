"""The UNet's frozen config: everything needed to rebuild the network, and nothing else.

This module must not import torch: it is embedded in params.yaml sections (``train_base.model``,
``train_sr.model``) and read by stages that never build a network. A checkpoint stores this config
as JSON beside the weights, so ``load_model`` rebuilds the exact network from the file alone.

Every check raises a ``ValueError`` whose message starts with the field it is about, e.g.
``attention_levels: level 3 is out of range for 2 levels in channel_mults (valid: 0..1)``, which
:func:`imager.config.format_validation_error` turns into one line naming the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from imager.schema import Section


class UNetConfig(Section):
    """An Imagen/ADM-family text-conditional UNet (base or super-resolution).

    Level ``i`` of the UNet runs at resolution ``H / 2**i`` (``H / 2**(i+1)`` with ``efficient``:
    Imagen's Efficient U-Net order; both divided by ``patch_size``) with
    ``base_channels * channel_mults[i]`` channels; ``attention_levels`` lists the levels (0 = the
    highest resolution) whose blocks get self-attention, cross-attention to the text tokens and a
    feed-forward. The middle block always has them. Input H and W must be multiples of
    :attr:`resolution_multiple`.

    ``arch: diffusers`` builds diffusers' ``UNet2DConditionModel`` with the same levels, channels,
    blocks, attention levels and head width instead (the benchmark's baseline network; it reads
    the text tokens by cross-attention only, not the pooled embedding), through the same training
    loop, checkpoints and samplers.
    """

    arch: Literal["imager", "diffusers"] = "imager"  # which network the config builds
    efficient: bool = False  # Imagen's Efficient U-Net order: downsample before each level's blocks
    patch_size: int = Field(1, ge=1)  # the network runs on p×p patches: space-to-depth in, depth-to-space out

    in_channels: int = Field(3, gt=0)  # C of the image (the SR model also takes C lowres channels)
    out_channels: int = Field(3, gt=0)  # channels of the prediction (eps, v or x0; same C as x)
    base_channels: int = Field(64, gt=0)  # channels at level 0; a multiple of norm_groups
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one positive multiplier per resolution level
    num_res_blocks: int = Field(2, ge=1)  # ResBlocks per level on the way down (one more going up)
    attention_levels: tuple[int, ...] = (1, 2)  # levels with self- + cross-attention
    head_dim: int = Field(32, gt=0)  # channels per attention head
    dropout: float = Field(0.0, ge=0, lt=1)  # inside ResBlocks, before the last conv
    text_dim: int = Field(384, gt=0)  # D of the per-token text embeddings (B, L, D)
    pooled_dim: int = Field(384, gt=0)  # P of the pooled text embedding (B, P)
    context_length: int = Field(32, gt=0)  # L, tokens per caption (= embed.max_length)
    null_embedding: Literal["cached", "learned"] = "cached"  # unconditional input of CFG
    super_resolution: bool = False  # take a low-resolution image and its noise-aug level too
    lowres_upsample: Literal["bilinear", "bicubic"] = "bilinear"  # how lowres is resized to x's size
    norm_groups: int = Field(32, gt=0)  # GroupNorm groups in ResBlocks

    @field_validator("channel_mults")
    @classmethod
    def _positive_mults(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("must list at least one level")
        if any(m <= 0 for m in v):
            raise ValueError("every multiplier must be a positive integer")
        return v

    @field_validator("attention_levels")
    @classmethod
    def _unique_levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError("levels must not repeat")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _consistent(self) -> UNetConfig:
        if self.base_channels % self.norm_groups:
            raise ValueError(
                f"base_channels: must be a multiple of norm_groups ({self.norm_groups}), got {self.base_channels}"
            )
        levels = len(self.channel_mults)
        if self.arch == "diffusers" and self.efficient:
            raise ValueError("efficient: Imagen's Efficient U-Net order is Imager's own (arch: imager), not diffusers'")
        if self.arch == "diffusers" and self.patch_size != 1:
            raise ValueError("patch_size: patches are Imager's own network's (arch: imager); diffusers' takes 1")
        for level in self.attention_levels:
            if not 0 <= level < levels:
                raise ValueError(
                    f"attention_levels: level {level} is out of range for {levels} levels in channel_mults "
                    f"(valid: 0..{levels - 1})"
                )
        for level in (*self.attention_levels, levels - 1):  # the middle block runs at the last level
            channels = self.base_channels * self.channel_mults[level]
            if channels % self.head_dim:
                raise ValueError(
                    f"head_dim: must divide the {channels} channels of attention level {level}, got {self.head_dim}"
                )
        return self

    @property
    def resolution_multiple(self) -> int:
        """Input H and W must be multiples of this: the patch side times one factor 2 per downsampling."""
        return self.patch_size * 2 ** (len(self.channel_mults) - (0 if self.efficient else 1))

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of each level: ``base_channels * channel_mults[i]``."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def emb_dim(self) -> int:
        """Width of the time/condition embedding fed to every ResBlock (4 × base, as in ADM)."""
        return 4 * self.base_channels


# The layers each ``targets`` preset adapts, per architecture (peft matches a name to the end of a
# module path). Imager's SpatialAttention: qkv/out1 self-attention, q/kv/out2 cross-attention to the
# text, ff.0/ff.2 the feed-forward; ResBlock: conv1/conv2. diffusers: its attention processors' names.
LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {"imager": ("qkv", "out1", "q", "kv", "out2"), "diffusers": ("to_q", "to_k", "to_v", "to_out.0")},
    "attention_ff": {
        "imager": ("qkv", "out1", "q", "kv", "out2", "ff.0", "ff.2"),
        "diffusers": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    },
    "attention_conv": {
        "imager": ("qkv", "out1", "q", "kv", "out2", "conv1", "conv2"),
        "diffusers": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
    },
}


class LoraSettings(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on a trained network, through peft: each targeted
    layer W gets W + (alpha / rank)·B·A with B zero at the start, so training starts at the base model.

    ``targets`` is a preset (``attention``: the self- and cross-attention projections, as diffusers'
    LoRA training; ``attention_ff`` adds the feed-forward; ``attention_conv`` the ResBlock
    convolutions) or a list of layer names matched against the end of each module's path.
    """

    rank: int = Field(4, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0)  # null: = rank (the adapter's scale alpha / rank is 1)
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input, in training
    targets: Literal["attention", "attention_ff", "attention_conv"] | tuple[str, ...] = "attention"

    @field_validator("targets")
    @classmethod
    def _names(cls, v):
        if isinstance(v, tuple) and (not v or any(not name.strip() for name in v)):
            raise ValueError("must be a preset (attention, attention_ff, attention_conv) or a non-empty list of layer names")
        return v

    def target_names(self, arch: str) -> tuple[str, ...]:
        return LORA_TARGETS[self.targets][arch] if isinstance(self.targets, str) else self.targets

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class ControlSettings(Section):
    """A trained spatial condition on a frozen base model (imager.models.control).

    ``arch: controlnet`` (Zhang et al. 2023): a trainable copy of the base UNet's stem, encoder and
    middle block, started from the base's weights, reads the noisy image, the time, the text and the
    condition (through a small condition encoder added after the stem); its features join the base's
    skip connections and middle block through zero-initialised 1×1 convolutions, so the untrained
    control changes nothing. ``arch: adapter``: the lighter alternative in the manner of T2I-Adapter
    (Mou et al. 2023): a small convolutional pyramid over the condition alone (no copy of the
    encoder, no time or text), its features joining the same skip connections through zero 1×1 convs.

    The condition is a line map (1 = line, 0 = paper): ``lines`` are the dark pixels of each image
    (luminance below ``threshold``; OpenMoji draws its outlines in black), ``edges`` its Sobel
    gradient magnitude above ``threshold`` (any image), ``lineart`` the image of the same key in a
    paired dataset (the OpenMoji line art). A user's sketch, dark lines on a light ground, becomes
    the same map.
    """

    arch: Literal["controlnet", "adapter"] = "controlnet"
    condition: Literal["lines", "edges", "lineart"] = "lines"
    threshold: float = Field(0.25, gt=0, lt=1)  # lines: luminance below it; edges: gradient magnitude above it
    hint_channels: tuple[int, ...] = (16, 32)  # widths of the condition encoder's convolutions (at the UNet's stem resolution)
    control_drop: float = Field(0.0, ge=0, le=1)  # training: share of samples whose condition is blanked (no lines)

    @field_validator("hint_channels")
    @classmethod
    def _widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("must list at least one positive width")
        return v
