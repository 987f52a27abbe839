"""The two networks of the comparisons, built to match, and what one training step of each is.

The baseline is the library's own :class:`imager.models.diffusers_unet.DiffusersUNet`, built from the
benchmark's config with ``arch: diffusers`` (:func:`baseline_config`): diffusers'
``UNet2DConditionModel`` with Imager's levels, channels, blocks, attention levels, head width and
GroupNorm groups, reading the text tokens by cross-attention only (the pooled vector is Imager's
addition). It is, by construction, the network ``train_base.model.arch: diffusers`` trains. The two
parameter counts are reported side by side and checked to be within :data:`PARAM_TOLERANCE` of
each other.

A training step, the same for both: the network's :class:`imager.models.base.Denoiser` forward
(x_t, t, tokens, mask, pooled), as Imager's training loop calls either network, MSE against a fixed
random target, backward, an AdamW step (:func:`imager.training.optim.adamw`, as the loop builds
it), gradients set to None. Inputs are random tensors of the real shapes, so data loading and the
diffusion process's own arithmetic are not part of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imager.models.base import Denoiser
from imager.models.config import UNetConfig
from imager.models.diffusers_unet import DiffusersUNet, diffusers_unet_kwargs
from imager.models.unet import UNet
from imager.training.optim import adamw

PARAM_TOLERANCE = 0.10  # |diffusers / Imager − 1| allowed for "matched parameter count"
LR = 1e-4


def resolve_config(model: UNetConfig, *, text_dim: int, pooled_dim: int, context_length: int) -> UNetConfig:
    """``model`` with the text dimensions an embedding cache would give it (as training resolves them),
    as Imager's own network (a config of ``arch: diffusers`` is compared in its Imager form)."""
    update = {"text_dim": text_dim, "pooled_dim": pooled_dim, "context_length": context_length, "super_resolution": False,
              "arch": "imager"}
    return UNetConfig.model_validate({**model.model_dump(), **update})


def baseline_config(config: UNetConfig) -> UNetConfig:
    """``config`` as the diffusers baseline: ``arch: diffusers``, without the layout options that
    only Imager's network has (2×2 patches, the Efficient U-Net order), as that arch requires."""
    return UNetConfig.model_validate({**config.model_dump(), "arch": "diffusers", "patch_size": 1, "efficient": False})


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _with_random_null(model: Denoiser, seed: int) -> Denoiser:
    """``model`` with a random (set) null condition when it takes a cached one: ready for CFG."""
    config = model.config
    if config.null_embedding == "cached":
        gen = torch.Generator().manual_seed(seed + 1)
        mask = torch.zeros(config.context_length, dtype=torch.bool)
        mask[:2] = True  # the empty caption: start and end tokens
        tokens = torch.randn(config.context_length, config.text_dim, generator=gen) * mask[:, None]  # (L, D)
        model.set_null_condition(tokens, mask, torch.randn(config.pooled_dim, generator=gen))
    return model


def imager_unet(config: UNetConfig, seed: int) -> UNet:
    """Imager's UNet with random weights and a random null condition."""
    torch.manual_seed(seed)
    return _with_random_null(UNet(config), seed)


def diffusers_unet(config: UNetConfig, seed: int) -> DiffusersUNet:
    """The baseline (:func:`baseline_config` of ``config``) with random weights and a random null
    condition. Its ``net`` is the bare ``UNet2DConditionModel``, for diffusers' own sampling loop."""
    torch.manual_seed(seed)
    return _with_random_null(DiffusersUNet(baseline_config(config)), seed)


def matched_sizes(config: UNetConfig) -> dict[str, Any]:
    """Both parameter counts, their relative difference and whether it is within the tolerance."""
    ours, theirs = param_count(UNet(config)), param_count(diffusers_unet(config, seed=0))
    diff = theirs / ours - 1
    built = diffusers_unet_kwargs(baseline_config(config))  # what DiffusersUNet passes to UNet2DConditionModel
    return {
        "imager_params": ours,
        "diffusers_params": theirs,
        "relative_difference": diff,
        "tolerance": PARAM_TOLERANCE,
        "within_tolerance": abs(diff) <= PARAM_TOLERANCE,
        "diffusers_config": {k: list(v) if isinstance(v, tuple) else v for k, v in built.items()},
    }


# ------------------------------------------------------------------------------------- a step


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch of random tensors in the real shapes."""

    x: Tensor  # (B, C, H, W) noisy images
    t: Tensor  # (B,) diffusion time in (0, 1]
    tokens: Tensor  # (B, L, D), zero at padding
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, P)
    target: Tensor  # (B, C, H, W) what the MSE compares the output with

    def with_text(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Batch:
        device = self.x.device
        return dataclasses.replace(self, tokens=tokens.to(device).float(), mask=mask.to(device), pooled=pooled.to(device).float())


def random_batch(config: UNetConfig, batch: int, resolution: int, device: torch.device, seed: int, timesteps: int = 1000) -> Batch:
    """Random inputs of ``config``'s shapes; t on the grid of ``timesteps`` discrete steps."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, resolution, resolution)
    index = torch.randint(0, timesteps, (batch,), generator=gen)
    length = config.context_length
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)  # real captions: 2..L tokens
    mask = torch.arange(length)[None] < lengths[:, None]  # (B, L)
    tokens = torch.randn(batch, length, config.text_dim, generator=gen) * mask[..., None]
    tensors = {
        "x": torch.randn(shape, generator=gen),
        "t": (index + 1).float() / timesteps,
        "tokens": tokens,
        "mask": mask,
        "pooled": torch.randn(batch, config.pooled_dim, generator=gen),
        "target": torch.randn(shape, generator=gen),
    }
    return Batch(**{k: v.to(device) for k, v in tensors.items()})


class TrainStep:
    """forward + MSE + backward + AdamW step on a :class:`Denoiser`, the same for every network."""

    def __init__(self, model: Denoiser):
        self.model = model.train()
        self.optimizer = adamw(model.parameters(), lr=LR)

    def loss_backward(self, batch: Batch) -> None:
        """The part FLOPs are counted on: forward, loss, backward."""
        out = self.model(batch.x, batch.t, batch.tokens, batch.mask, batch.pooled)
        F.mse_loss(out, batch.target).backward()

    def __call__(self, batch: Batch) -> None:
        self.loss_backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
