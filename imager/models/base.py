"""What every denoising network of the cascade shares, whatever its architecture.

:class:`Denoiser` holds the config, the unconditional input of classifier-free guidance (the null
condition: cached from the embedding cache's empty caption, or learned), the input checks and the
low-resolution resize of the SR model. Subclasses (:class:`~imager.models.unet.UNet`, Imager's
own network, and :class:`~imager.models.diffusers_unet.DiffusersUNet`, the diffusers baseline)
implement ``forward`` with the signature documented here, so training, sampling and checkpoints
never need to know which one they hold; :func:`imager.models.factory.build_denoiser` picks it from
``config.arch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imager.models.config import UNetConfig

NULL_INIT_STD = 0.02  # scale of the learned null tokens / pooled vector at initialisation


class Denoiser(nn.Module):
    """Base class: (x_t, t, condition) -> a tensor shaped like x. See :meth:`forward`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # trade compute for memory in training (large models)
        self._init_null_condition()

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
        """Predict from a noisy image; returns (B, out_channels, H, W).

        x: (B, C, H, W) noisy image (data in [-1, 1] under the VP process), H and W multiples of
        ``config.resolution_multiple``. t: (B,) or a scalar, diffusion time in [0, 1] (1 = most noise).
        tokens: (B, L, D) per-token text embeddings; mask: (B, L) bool, True = real token (padding is
        ignored exactly); pooled: (B, P). SR only: lowres (B, C, h, w), resized to H×W here (a no-op
        when already that size), and aug_level (B,) in [0, 1], the noise-augmentation level applied to it.
        drop: (B,) bool, rows whose condition is replaced by :meth:`null_condition` (condition dropout).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------ null condition

    def _init_null_condition(self) -> None:
        cfg = self.config
        length, dim, pooled = cfg.context_length, cfg.text_dim, cfg.pooled_dim
        if cfg.null_embedding == "learned":
            self.null_tokens = nn.Parameter(NULL_INIT_STD * torch.randn(length, dim))
            self.null_pooled = nn.Parameter(NULL_INIT_STD * torch.randn(pooled))
            self.register_buffer("null_mask", torch.ones(length, dtype=torch.bool))
            self._null_ready = True
        else:  # filled from the embed stage's cache by set_null_condition; saved in checkpoints
            self.register_buffer("null_tokens", torch.zeros(length, dim))
            self.register_buffer("null_pooled", torch.zeros(pooled))
            self.register_buffer("null_mask", torch.zeros(length, dtype=torch.bool))
            self.register_buffer("null_is_set", torch.tensor(False))
            self._null_ready = False
            self.register_load_state_dict_post_hook(_refresh_null_ready)

    @torch.no_grad()
    def set_null_condition(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> None:
        """Store the empty caption's embedding as the unconditional input (``null_embedding="cached"``).

        tokens: (L, D) float, mask: (L,) bool, pooled: (P,) float — the ``null_tokens``,
        ``null_mask`` and ``null_pooled`` of the embedding cache.
        """
        cfg = self.config
        if cfg.null_embedding != "cached":
            raise ValueError("set_null_condition: null_embedding is 'learned', so the null condition is trained, not set")
        expected = {"tokens": (cfg.context_length, cfg.text_dim), "mask": (cfg.context_length,), "pooled": (cfg.pooled_dim,)}
        for name, value in (("tokens", tokens), ("mask", mask), ("pooled", pooled)):
            if tuple(value.shape) != expected[name]:
                raise ValueError(f"set_null_condition: {name} must have shape {expected[name]}, got {tuple(value.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"set_null_condition: mask must be bool (True = real token), got {mask.dtype}")
        self.null_tokens.copy_(tokens)
        self.null_mask.copy_(mask)
        self.null_pooled.copy_(pooled)
        self.null_is_set.fill_(True)
        self._null_ready = True

    def null_condition(self, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """The unconditional input of classifier-free guidance, repeated over the batch:
        tokens (B, L, D), mask (B, L) bool, pooled (B, P). Views of the stored tensors (learned: with grad)."""
        if not self._null_ready:
            raise RuntimeError(
                "null condition not set: call model.set_null_condition(null_tokens, null_mask, null_pooled) "
                "with the embedding cache's empty-caption rows, or load a checkpoint that has them"
            )
        cfg = self.config
        return (
            self.null_tokens.expand(batch_size, cfg.context_length, cfg.text_dim),
            self.null_mask.expand(batch_size, cfg.context_length),
            self.null_pooled.expand(batch_size, cfg.pooled_dim),
        )

    def _condition(self, tokens: Tensor, mask: Tensor, pooled: Tensor, drop: Tensor | None, dtype: torch.dtype):
        """(tokens, mask, pooled) in ``dtype``, with the rows of ``drop`` replaced by the null condition."""
        tokens, pooled = tokens.to(dtype), pooled.to(dtype)
        if drop is not None:
            null_tokens, null_mask, null_pooled = self.null_condition(tokens.shape[0])
            tokens = torch.where(drop[:, None, None], null_tokens.to(dtype), tokens)
            mask = torch.where(drop[:, None], null_mask, mask)
            pooled = torch.where(drop[:, None], null_pooled.to(dtype), pooled)
        return tokens, mask, pooled

    # ----------------------------------------------------------------------------------- inputs

    def _resize_lowres(self, lowres: Tensor, size: torch.Size) -> Tensor:
        """(B, C, h, w) -> (B, C, H, W), interpolated without antialiasing (upsampling)."""
        if lowres.shape[-2:] == size:
            return lowres
        return F.interpolate(lowres, size=tuple(size), mode=self.config.lowres_upsample, align_corners=False, antialias=False)

    def _check_inputs(
        self,
        x: Tensor,
        t: Tensor,
        tokens: Tensor,
        mask: Tensor,
        pooled: Tensor,
        lowres: Tensor | None,
        aug_level: Tensor | None,
        drop: Tensor | None,
    ) -> Tensor:
        """Raise ValueError naming the argument whose shape or dtype is wrong; return t as (B,)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, height, width = x.shape
        m = cfg.resolution_multiple
        if height % m or width % m:
            raise ValueError(f"x: H and W must be multiples of {m} (the model downsamples {m}×), got {height}×{width}")
        if t.ndim == 0:
            t = t.expand(b)
        _expect("t", t, (b,))
        _expect("tokens", tokens, (b, cfg.context_length, cfg.text_dim), "(B, L, D) with L = context_length, D = text_dim")
        _expect("mask", mask, (b, cfg.context_length), "(B, L)", torch.bool)
        _expect("pooled", pooled, (b, cfg.pooled_dim), "(B, P) with P = pooled_dim")
        if drop is not None:
            _expect("drop", drop, (b,), "(B,)", torch.bool)
        if cfg.super_resolution:
            if lowres is None or aug_level is None:
                raise ValueError("super-resolution model: lowres (B, C, h, w) and aug_level (B,) are required")
            if lowres.ndim != 4 or lowres.shape[:2] != (b, cfg.in_channels):
                raise ValueError(f"lowres: expected ({b}, {cfg.in_channels}, h, w), got {tuple(lowres.shape)}")
            _expect("aug_level", aug_level, (b,))
        elif lowres is not None or aug_level is not None:
            raise ValueError("lowres/aug_level given to a base model (config.super_resolution is false)")
        return t


def _expect(name: str, value: Tensor, shape: tuple[int, ...], meaning: str = "(B,)", dtype: torch.dtype | None = None) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected {meaning} = {shape}, got {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {value.dtype}")


def _refresh_null_ready(module: Denoiser, incompatible_keys) -> None:
    """After load_state_dict: a cached null condition is ready when the loaded flag says so."""
    module._null_ready = bool(module.null_is_set)
