"""The two networks of the comparisons, built to match, and what one training step of each is.

diffusers' ``UNet2DConditionModel`` is built as the mirror of Imager's UNet config by
:func:`imager.models.diffusers_unet.diffusers_unet_kwargs` (the same levels, channels, blocks,
attention levels, head width and GroupNorm groups; text tokens by cross-attention only, no pooled
vector: that is Imager's addition), the network ``arch: diffusers`` trains. The two parameter counts
are reported side by side and checked to be within :data:`PARAM_TOLERANCE` of each other.

A training step, the same for both: forward, MSE against a fixed random target, backward, AdamW
step (fused where torch supports it, as Imager's training loop builds it), gradients set to None.
Inputs are random tensors of the real shapes, so data loading and the diffusion process's own
arithmetic are not part of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imager.bench import BenchError
from imager.models.config import UNetConfig
from imager.models.diffusers_unet import diffusers_unet_kwargs
from imager.models.unet import UNet
from imager.training.optim import adamw

PARAM_TOLERANCE = 0.10  # |diffusers / Imager − 1| allowed for "matched parameter count"
LR = 1e-4


def require_diffusers() -> Any:
    """The diffusers module, or a one-line :class:`BenchError` saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise BenchError("diffusers is not installed: pip install 'imager[bench]'") from None
    return diffusers


def resolve_config(model: UNetConfig, *, text_dim: int, pooled_dim: int, context_length: int) -> UNetConfig:
    """``model`` with the text dimensions an embedding cache would give it (as training resolves them),
    as Imager's own network (a config of ``arch: diffusers`` is compared in its Imager form)."""
    update = {"text_dim": text_dim, "pooled_dim": pooled_dim, "context_length": context_length, "super_resolution": False,
              "arch": "imager"}
    return UNetConfig.model_validate({**model.model_dump(), **update})


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def imager_unet(config: UNetConfig, seed: int) -> UNet:
    """Imager's UNet with random weights and a random (set) null condition, ready for CFG."""
    torch.manual_seed(seed)
    model = UNet(config)
    if config.null_embedding == "cached":
        gen = torch.Generator().manual_seed(seed + 1)
        mask = torch.zeros(config.context_length, dtype=torch.bool)
        mask[:2] = True  # the empty caption: start and end tokens
        tokens = torch.randn(config.context_length, config.text_dim, generator=gen) * mask[:, None]  # (L, D)
        model.set_null_condition(tokens, mask, torch.randn(config.pooled_dim, generator=gen))
    return model


def diffusers_unet(config: UNetConfig, resolution: int, seed: int) -> nn.Module:
    diffusers = require_diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**diffusers_unet_kwargs(config, resolution))


def matched_sizes(config: UNetConfig, resolution: int) -> dict[str, Any]:
    """Both parameter counts, their relative difference and whether it is within the tolerance."""
    ours, theirs = param_count(UNet(config)), param_count(diffusers_unet(config, resolution, seed=0))
    diff = theirs / ours - 1
    return {
        "imager_params": ours,
        "diffusers_params": theirs,
        "relative_difference": diff,
        "tolerance": PARAM_TOLERANCE,
        "within_tolerance": abs(diff) <= PARAM_TOLERANCE,
        "diffusers_config": {k: list(v) if isinstance(v, tuple) else v for k, v in diffusers_unet_kwargs(config, resolution).items()},
    }


# ------------------------------------------------------------------------------------- a step


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch of random tensors in the real shapes."""

    x: Tensor  # (B, C, H, W) noisy images
    t: Tensor  # (B,) Imager's diffusion time in (0, 1]
    timesteps: Tensor  # (B,) diffusers' integer timesteps, the same instants
    tokens: Tensor  # (B, L, D), zero at padding
    mask: Tensor  # (B, L) bool, True = real token
    pooled: Tensor  # (B, P)
    target: Tensor  # (B, C, H, W) what the MSE compares the output with

    def with_text(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> Batch:
        device = self.x.device
        return dataclasses.replace(self, tokens=tokens.to(device).float(), mask=mask.to(device), pooled=pooled.to(device).float())


def random_batch(config: UNetConfig, batch: int, resolution: int, device: torch.device, seed: int, timesteps: int = 1000) -> Batch:
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
        "timesteps": index,
        "tokens": tokens,
        "mask": mask,
        "pooled": torch.randn(batch, config.pooled_dim, generator=gen),
        "target": torch.randn(shape, generator=gen),
    }
    return Batch(**{k: v.to(device) for k, v in tensors.items()})


def imager_forward(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda b: model(b.x, b.t, b.tokens, b.mask, b.pooled)


def diffusers_forward(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda b: model(b.x, b.timesteps, encoder_hidden_states=b.tokens, encoder_attention_mask=b.mask).sample


class TrainStep:
    """forward + MSE + backward + AdamW step on a model, the same for every network."""

    def __init__(self, model: nn.Module, forward: Callable[[Batch], Tensor]):
        self.model, self.forward = model.train(), forward
        self.optimizer = adamw(model.parameters(), lr=LR)

    def loss_backward(self, batch: Batch) -> None:
        """The part FLOPs are counted on: forward, loss, backward."""
        F.mse_loss(self.forward(batch), batch.target).backward()

    def __call__(self, batch: Batch) -> None:
        self.loss_backward(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
