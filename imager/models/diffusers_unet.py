"""diffusers' ``UNet2DConditionModel`` behind Imager's network interface: the baseline architecture.

``train_base.model.arch: diffusers`` trains this network through Imager's own loop, data, loss,
EMA, checkpoints and samplers, so ``dvc exp run -S train_base.model.arch=diffusers`` compares the
two networks and nothing else. It is built as the mirror of the same :class:`UNetConfig`: the same
channels per level (``block_out_channels = base_channels·channel_mults``), ResBlocks per level
(``layers_per_block = num_res_blocks``; both add one going up), cross-attention blocks at the same
levels (plus the middle block in both), attention head width, GroupNorm groups and dropout, and a
time embedding of 4·base in both. It reads the text tokens by cross-attention with their padding
mask; the pooled embedding is not used (plain ``UNet2DConditionModel`` has no such input). The SR
variant takes the upsampled low-resolution image as extra input channels and the augmentation
level through diffusers' timestep class embedding.

diffusers is an optional dependency (``pip install 'imager[bench]'``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from imager.errors import ConfigError
from imager.models.base import Denoiser
from imager.models.config import UNetConfig

TIME_SCALE = 1000.0  # Imager's t in [0, 1] -> diffusers' timesteps in [0, 1000]


def require_diffusers() -> Any:
    """The diffusers module, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("model.arch: diffusers needs the diffusers package, which is not installed: pip install 'imager[bench]'") from None
    return diffusers


def diffusers_unet_kwargs(config: UNetConfig, resolution: int = 32) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments mirroring ``config`` (see the module docstring).

    diffusers' ``attention_head_dim`` is, despite its name, the number of heads per block (its
    ``num_attention_heads`` is refused), so it gets channels // head_dim per level. ``resolution``
    only fills diffusers' ``sample_size`` (metadata; the network is fully convolutional).
    """
    channels = config.channels
    levels = range(len(channels))
    attn = set(config.attention_levels)
    kwargs = {
        "sample_size": resolution,
        "in_channels": config.in_channels * (2 if config.super_resolution else 1),
        "out_channels": config.out_channels,
        "block_out_channels": tuple(channels),
        "layers_per_block": config.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        "up_block_types": tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": config.text_dim,
        "attention_head_dim": tuple(max(1, c // config.head_dim) for c in channels),
        "norm_num_groups": config.norm_groups,
        "dropout": config.dropout,
    }
    if config.super_resolution:
        kwargs["class_embed_type"] = "timestep"  # the noise-augmentation level, embedded like t
    return kwargs


class DiffusersUNet(Denoiser):
    """A ``UNet2DConditionModel`` (``self.net``) with :class:`Denoiser`'s inputs; see the module docstring."""

    def __init__(self, config: UNetConfig):
        if config.arch != "diffusers":
            raise ValueError(f"DiffusersUNet: config.arch must be 'diffusers', got {config.arch!r}")
        diffusers = require_diffusers()
        super().__init__(config)
        self.net = diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(config))
        self._apply_checkpointing()

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self._checkpointing = bool(value)
        self._apply_checkpointing()

    def _apply_checkpointing(self) -> None:
        net = self.__dict__.get("_modules", {}).get("net")
        if net is not None:
            (net.enable_gradient_checkpointing if self._checkpointing else net.disable_gradient_checkpointing)()

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        tokens: Tensor,
        mask: Tensor,
        pooled: Tensor,
        *,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
        drop: Tensor | None = None,
    ) -> Tensor:
        t = self._check_inputs(x, t, tokens, mask, pooled, lowres, aug_level, drop)
        dtype = self.net.conv_in.weight.dtype
        tokens, mask, _ = self._condition(tokens, mask, pooled, drop, dtype)
        h, class_labels = x, None
        if self.config.super_resolution:
            h = torch.cat([x, self._resize_lowres(lowres.to(x.dtype), x.shape[-2:])], dim=1)  # (B, 2C, H, W)
            class_labels = aug_level.float() * TIME_SCALE
        out = self.net(h, t.float() * TIME_SCALE, encoder_hidden_states=tokens, encoder_attention_mask=mask,
                       class_labels=class_labels)
        return out.sample
