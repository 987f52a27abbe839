"""The text-conditional UNet of the cascade: ADM's network (Dhariwal & Nichol 2021) with Imagen's
text conditioning (Saharia et al. 2022) and, for super-resolution, Imagen's noise conditioning
augmentation.

Conditioning, per sample: the time t and the pooled text embedding each go through an MLP and are
summed into ``emb`` (B, E), which every ResBlock reads by scale-shift; the SR model adds a third MLP
of the augmentation level. Per token: the text tokens (B, L, D), layer-normalised, are the keys and
values of the cross-attention at ``config.attention_levels`` and in the middle block.

With ``config.efficient`` the blocks are ordered as in Imagen's Efficient U-Net (Saharia et al.
2022, appendix B.1): every level, the first included, downsamples *before* its blocks on the way
down and upsamples *after* them on the way up, so each level's blocks run at half the side (a
quarter of the FLOPs) of the standard order, for the same parameters; the stem's full-resolution
features are added back before the output layers.

With ``config.patch_size`` p > 1 the network runs on p×p patches (space-to-depth: pixel-unshuffle
into C·p² channels at H/p, as in Simple Diffusion's patching, Hoogeboom et al. 2023) and its output
is folded back (depth-to-space); no layer then runs at full resolution, where the CPU's convolutions
and normalisations are least efficient (docs/training.md).

The network knows nothing of the diffusion process or the sampler: it maps (x_t, t, condition) to
a tensor shaped like x; what that tensor means (eps, v, x0) is the training objective's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from imager.models.base import Denoiser
from imager.models.blocks import (
    CondSequential,
    Downsample,
    ResBlock,
    SpatialAttention,
    Upsample,
    mlp,
    timestep_embedding,
    zero_,
)
from imager.models.config import UNetConfig


class UNet(Denoiser):
    """Text-conditional UNet; base model or, with ``config.super_resolution``, the SR model.

    Fully convolutional (attention runs over however many positions there are), so one SR model
    serves random crops in training and full images at sampling time. ``forward``: see :class:`Denoiser`;
    ``control`` adds a trained condition's features (:mod:`imager.models.control`): one tensor per
    skip connection, added to it before the decoder reads it, and one added to the middle block's output.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        cfg = config
        emb, base, groups = cfg.emb_dim, cfg.base_channels, cfg.norm_groups

        self.time_mlp = mlp(base, emb)
        self.pooled_norm = nn.LayerNorm(cfg.pooled_dim)
        self.pooled_mlp = mlp(cfg.pooled_dim, emb)
        self.context_norm = nn.LayerNorm(cfg.text_dim)
        self.aug_mlp = mlp(base, emb) if cfg.super_resolution else None

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, ch_out, emb, dropout=cfg.dropout, groups=groups)

        def attn(ch: int) -> SpatialAttention:
            return SpatialAttention(ch, cfg.text_dim, head_dim=cfg.head_dim)

        in_ch = cfg.in_channels * (2 if cfg.super_resolution else 1)  # SR: x and upsampled lowres
        patch = cfg.patch_size * cfg.patch_size  # channels per input channel after space-to-depth
        self.conv_in = nn.Conv2d(in_ch * patch, base, 3, padding=1)
        last, efficient = len(cfg.channel_mults) - 1, cfg.efficient
        # standard: [blocks, downsample] per level; efficient: [downsample, blocks] per level
        ch, skips = base, [] if efficient else [base]
        self.down = nn.ModuleList()
        for level, out in enumerate(cfg.channels):
            if efficient:
                self.down.append(CondSequential([Downsample(ch)]))
                skips.append(ch)
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, out)]
                ch = out
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                self.down.append(CondSequential(layers))
                skips.append(ch)
            if level != last and not efficient:
                self.down.append(CondSequential([Downsample(ch)]))
                skips.append(ch)
        self.middle = CondSequential([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, out in reversed(list(enumerate(cfg.channels))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), out)]
                ch = out
                if level in cfg.attention_levels:
                    layers.append(attn(ch))
                if i == cfg.num_res_blocks and (level or efficient):
                    layers.append(Upsample(ch))
                self.up.append(CondSequential(layers))
        # efficient: the stem's full-resolution features join the output at ch channels
        self.stem_skip = (nn.Identity() if ch == base else nn.Conv2d(base, ch, 1)) if efficient else None
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = zero_(nn.Conv2d(ch, cfg.out_channels * patch, 3, padding=1))

    # ------------------------------------------------------------------------------------ forward

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
        control: Sequence[Tensor] | None = None,
    ) -> Tensor:
        t = self._check_inputs(x, t, tokens, mask, pooled, lowres, aug_level, drop)
        cfg, dtype = self.config, self.conv_in.weight.dtype
        tokens, mask, pooled = self._condition(tokens, mask, pooled, drop, dtype)

        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(dtype))  # (B, E)
        emb = emb + self.pooled_mlp(self.pooled_norm(pooled))
        context = self.context_norm(tokens)  # (B, L, D)
        h = x
        if self.aug_mlp is not None:  # Imagen's noise conditioning augmentation
            emb = emb + self.aug_mlp(timestep_embedding(aug_level, cfg.base_channels).to(dtype))
            h = torch.cat([x, self._resize_lowres(lowres.to(x.dtype), x.shape[-2:])], dim=1)  # (B, 2C, H, W)

        if cfg.patch_size > 1:  # (B, C, H, W) -> (B, C·p², H/p, W/p)
            h = F.pixel_unshuffle(h, cfg.patch_size)
        stem = h = self.conv_in(h)
        skips = [] if cfg.efficient else [h]
        for block in self.down:
            h = self._run(block, h, emb, context, mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, mask)
        if control is not None:  # a trained condition's features (imager.models.control)
            if len(control) != len(skips) + 1:
                raise ValueError(f"control: expected {len(skips) + 1} tensors (one per skip connection and the middle), got {len(control)}")
            skips = [s + c for s, c in zip(skips, control[:-1], strict=True)]
            h = h + control[-1]
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        if self.stem_skip is not None:
            h = h + self.stem_skip(stem)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, cfg.patch_size) if cfg.patch_size > 1 else out

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        """One block; with ``gradient_checkpointing`` its activations are recomputed in backward."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)
        return block(h, emb, context, mask)
