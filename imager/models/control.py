"""Trained spatial conditions on a frozen base UNet: ControlNet and a lighter adapter.

Both map a condition image (B, 1, H, W), a line map with 1 = line and 0 = paper, to one tensor per
skip connection of the base :class:`~imager.models.unet.UNet` plus one for its middle block, which the
UNet adds before its decoder reads them (``UNet.forward(..., control=...)``). Every output goes
through a zero-initialised 1×1 convolution, so an untrained control adds exact zeros: the controlled
model is the base model, bit for bit.

- :class:`ControlNet` (Zhang et al. 2023; diffusers' ``ControlNetModel.from_unet``): a copy of the
  base's time/text embeddings, stem, encoder and middle block, started from the base's weights. The
  condition goes through a small convolutional encoder whose last layer is zero-initialised too and
  is added to the stem's features, so the copy first sees exactly what the base sees.
- :class:`ControlAdapter` (in the manner of T2I-Adapter, Mou et al. 2023): a small residual
  convolution pyramid over the condition alone, one feature map per resolution of the base encoder;
  no time, no text, no copy of the encoder: far fewer parameters and FLOPs.

:class:`Controlled` is the base model with its controls: what training trains (the base frozen) and
what sampling calls. A control file (``save_control``) holds the control's weights and, in its
metadata, its settings, the base model's config and the sha256 of the base weights it was trained on;
``load_control`` refuses it for any other base, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from imager.errors import CheckpointError
from imager.io import atomic_write_bytes
from imager.models.base import Denoiser
from imager.models.blocks import Downsample, ResBlock, timestep_embedding, zero_
from imager.models.config import ControlSettings, UNetConfig
from imager.models.lora import weights_sha256
from imager.models.unet import UNet

MODEL_KIND = "control"
METADATA_KEY = "imager"
CONDITION_CHANNELS = 1  # a line map


def skip_layout(unet: UNet) -> list[tuple[int, int]]:
    """(channels, downsampling factor below the stem) of each skip connection of ``unet``, in the
    order ``UNet.forward`` stores them, then the middle block's."""
    factor, ch = 1, unet.config.base_channels
    layout = [] if unet.config.efficient else [(ch, factor)]
    for block in unet.down:
        for layer in block:
            if isinstance(layer, Downsample):
                factor, ch = factor * 2, layer.conv.out_channels
            elif isinstance(layer, ResBlock):
                ch = layer.conv2.out_channels
        layout.append((ch, factor))
    return [*layout, (ch, factor)]


def _hint_encoder(in_ch: int, widths: tuple[int, ...], out_ch: int, *, zero_last: bool) -> nn.Sequential:
    """3×3 convolutions with SiLU between them, ``in_ch`` -> widths... -> ``out_ch``, same resolution."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.SiLU()]
        in_ch = width
    last = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    return nn.Sequential(*layers, zero_(last) if zero_last else last)


def _check_base(config: UNetConfig) -> None:
    if config.arch != "imager":
        raise ValueError("control: is built for Imager's own UNet (model.arch: imager), not diffusers'")
    if config.super_resolution:
        raise ValueError("control: conditions the base model; this is a super-resolution model")


class ControlBase(nn.Module):
    """What both kinds of control share: settings, the base config, the condition check."""

    def __init__(self, base: UNetConfig, settings: ControlSettings):
        super().__init__()
        _check_base(base)
        self.base_config, self.settings = base, settings

    def check_condition(self, x: Tensor, condition: Tensor) -> None:
        """A one-line ValueError unless ``condition`` is (B, 1, H, W) like ``x`` (B, C, H, W)."""
        b, _, height, width = x.shape
        if condition.ndim != 4 or condition.shape[1] != CONDITION_CHANNELS:
            raise ValueError(f"condition: expected ({b}, {CONDITION_CHANNELS}, {height}, {width}) (a line map), got {tuple(condition.shape)}")
        if tuple(condition.shape[-2:]) != (height, width) or condition.shape[0] != b:
            raise ValueError(f"condition: expected ({b}, {CONDITION_CHANNELS}, {height}, {width}) like the image, got {tuple(condition.shape)}")

    def _patches(self, t: Tensor) -> Tensor:
        p = self.base_config.patch_size
        return F.pixel_unshuffle(t, p) if p > 1 else t


class ControlNet(ControlBase):
    """A trainable copy of the base's encoder half; see the module docstring. Build it from a trained
    base with :meth:`from_unet`; ``forward`` returns the residuals for ``UNet.forward(control=...)``."""

    def __init__(self, base: UNetConfig, settings: ControlSettings):
        super().__init__(base, settings)
        template = UNet(base)
        self.time_mlp, self.pooled_norm, self.pooled_mlp = template.time_mlp, template.pooled_norm, template.pooled_mlp
        self.context_norm, self.conv_in = template.context_norm, template.conv_in
        self.down, self.middle = template.down, template.middle
        p2 = base.patch_size**2
        self.hint = _hint_encoder(CONDITION_CHANNELS * p2, settings.hint_channels, base.base_channels, zero_last=True)
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(ch, ch, 1)) for ch, _ in skip_layout(template))

    @classmethod
    def from_unet(cls, unet: UNet, settings: ControlSettings) -> ControlNet:
        """The control for ``unet``, its copied layers holding ``unet``'s weights (diffusers' ``from_unet``)."""
        net = cls(unet.config, settings)
        for name in ("time_mlp", "pooled_norm", "pooled_mlp", "context_norm", "conv_in", "down", "middle"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net.to(next(unet.parameters()))

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor, condition: Tensor) -> list[Tensor]:
        """x (B, C, H, W), t (B,), the text condition as the base takes it (dropout already applied),
        condition (B, 1, H, W) -> one tensor per skip connection and the middle block (zeros untrained)."""
        self.check_condition(x, condition)
        cfg, dtype = self.base_config, self.conv_in.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, cfg.base_channels).to(dtype)) + self.pooled_mlp(self.pooled_norm(pooled.to(dtype)))
        context = self.context_norm(tokens.to(dtype))
        h = self.conv_in(self._patches(x.to(dtype))) + self.hint(self._patches(condition.to(dtype)))
        skips = [] if cfg.efficient else [h]
        for block in self.down:
            h = block(h, emb, context, mask)
            skips.append(h)
        skips.append(self.middle(h, emb, context, mask))
        return [conv(s) for conv, s in zip(self.zero_convs, skips, strict=True)]


class _Residual(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))): T2I-Adapter's normalisation-free residual block."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ControlAdapter(ControlBase):
    """The lighter control: a residual conv pyramid over the condition alone (module docstring)."""

    def __init__(self, base: UNetConfig, settings: ControlSettings):
        super().__init__(base, settings)
        layout = skip_layout(UNet(base))  # the base's skip connections: where the features go
        factors = sorted({f for _, f in layout})
        widths = {f: max(ch for ch, g in layout if g == f) for f in factors}
        p2 = base.patch_size**2
        first = widths[factors[0]]
        self.hint = _hint_encoder(CONDITION_CHANNELS * p2, settings.hint_channels, first, zero_last=False)
        self.factors = factors
        self.levels = nn.ModuleList()
        ch, factor = first, 1
        for f in factors:
            layers: list[nn.Module] = []
            while factor < f:
                layers += [nn.Conv2d(ch, widths[f], 3, stride=2, padding=1)]
                ch, factor = widths[f], factor * 2
            if ch != widths[f]:
                layers.append(nn.Conv2d(ch, widths[f], 1))
                ch = widths[f]
            layers.append(_Residual(ch))
            self.levels.append(nn.Sequential(*layers))
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(widths[f], ch_out, 1)) for ch_out, f in layout)
        self._level_of = [factors.index(f) for _, f in layout]

    @classmethod
    def from_unet(cls, unet: UNet, settings: ControlSettings) -> ControlAdapter:
        return cls(unet.config, settings).to(next(unet.parameters()))

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor, condition: Tensor) -> list[Tensor]:
        """As :meth:`ControlNet.forward`; reads only ``condition`` (x gives the expected shape)."""
        self.check_condition(x, condition)
        h = self.hint(self._patches(condition.to(self.hint[0].weight.dtype)))
        features = []
        for level in self.levels:
            h = level(h)
            features.append(h)
        return [conv(features[i]) for conv, i in zip(self.zero_convs, self._level_of, strict=True)]


ARCHS: dict[str, type[ControlBase]] = {"controlnet": ControlNet, "adapter": ControlAdapter}


def build_control(unet: UNet, settings: ControlSettings) -> ControlBase:
    """A fresh control of ``settings.arch`` for the trained base ``unet`` (ControlNet: its weights copied)."""
    _check_base(unet.config)
    return ARCHS[settings.arch].from_unet(unet, settings)


# ------------------------------------------------------------------------------ the controlled model


@dataclass
class ControlInput:
    """One control at sampling time: the network, its condition (B or 1, 1, H, W) in [0, 1] at the
    base resolution, its weight ``scale`` and the part of the sampling it acts on: from ``start`` to
    ``end``, as fractions of the way from pure noise (t = 1, fraction 0) to the image (t = 0, fraction 1)."""

    net: ControlBase
    condition: Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


def control_residuals(controls: list[tuple[ControlBase, Tensor, float, float, float]], x: Tensor, t: Tensor, text: tuple[Tensor, Tensor, Tensor]) -> list[Tensor] | None:
    """The weighted sum of the controls' residuals for one denoiser call, or None when no control acts
    (scale 0, or t outside every control's window): the base model then runs exactly as without them.
    ``controls``: (net, condition (B, 1, H, W), scale, start, end)."""
    total: list[Tensor] | None = None
    progress = 1 - t.float()  # (B,): 0 at pure noise, 1 at the image
    for net, condition, scale, start, end in controls:
        weight = ((progress >= start) & (progress <= end)).float() * scale  # (B,)
        if not bool(weight.any()):
            continue
        out = net(x, t, *text, condition)
        w = weight.to(out[0].dtype)[:, None, None, None]
        out = [r * w for r in out] if scale != 1 or not bool(weight.all()) else out
        total = out if total is None else [a + b for a, b in zip(total, out, strict=True)]
    return total


class Controlled(nn.Module):
    """The base model with one control, as training trains it (the base frozen by the caller).

    ``forward(x, t, tokens, mask, pooled, *, drop=None, condition)``: the text dropout (``drop``)
    applies to the base and the control alike; ``condition`` (B, 1, H, W) is the line map. The null
    condition and config are the base's, so sampling code that reads them sees the base."""

    def __init__(self, base: Denoiser, control: ControlBase):
        super().__init__()
        self.base, self.control = base, control
        self.config = base.config

    def null_condition(self, batch_size: int):
        return self.base.null_condition(batch_size)

    @property
    def gradient_checkpointing(self) -> bool:
        """The base model's activation checkpointing (the frozen base still runs backward to the control)."""
        return self.base.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.base.gradient_checkpointing = value

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, pooled: Tensor, *, drop: Tensor | None = None, condition: Tensor) -> Tensor:
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        tokens, mask, pooled = self.base._condition(tokens, mask, pooled, drop, self.base.conv_in.weight.dtype)
        residuals = self.control(x, t, tokens, mask, pooled, condition)
        return self.base(x, t, tokens, mask, pooled, control=residuals)


# ----------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ControlFile:
    """What a control file says about itself (its metadata), without its tensors."""

    path: Path
    settings: ControlSettings
    base: UNetConfig
    base_sha256: str
    extra: dict[str, Any]
    parameters: int


def save_control(path: str | Path, control: ControlBase, *, base_sha256: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``control`` to one .safetensors file (atomically) with its settings, the base config and
    the sha256 of the base weights it belongs to."""
    control = getattr(control, "module", control)
    header = {
        "imager_model": MODEL_KIND,
        "settings": control.settings.model_dump(mode="json"),
        "base": control.base_config.model_dump(mode="json"),
        "base_sha256": base_sha256,
        "extra": json.loads(json.dumps(extra or {}, sort_keys=True)),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in control.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)}))


def _open(path: Path, read_tensors: bool) -> tuple[ControlFile, dict[str, Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: control file not found; train one with `dvc repro control/dvc.yaml` or `imager train-control`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = fh.metadata() or {}
            keys = list(fh.keys())  # noqa: SIM118 (not a dict)
            tensors = {k: fh.get_tensor(k) for k in keys} if read_tensors else {}
            count = sum(_numel(fh.get_slice(k).get_shape()) for k in keys)
    except Exception as exc:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    try:
        meta = json.loads(raw.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid imager metadata ({exc.msg})") from None
    kind = meta.get("imager_model") if isinstance(meta, dict) else None
    if kind != MODEL_KIND:
        what = f"an imager model of kind '{kind}'" if kind else "no imager control metadata"
        raise CheckpointError(f"{path}: holds {what}, not a control (ControlNet or adapter) file")
    try:
        settings = ControlSettings.model_validate(meta.get("settings"))
        base = UNetConfig.model_validate(meta.get("base"))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise CheckpointError(f"{path}: invalid control metadata: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    info = ControlFile(path, settings, base, str(meta.get("base_sha256", "")), dict(meta.get("extra") or {}), int(count))
    return info, tensors


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def read_control(path: str | Path) -> ControlFile:
    """A control file's metadata (settings, base config and sha256, extra, parameter count)."""
    return _open(Path(path), read_tensors=False)[0]


def load_control(path: str | Path, base: Denoiser | None = None) -> ControlBase:
    """The control saved at ``path``, in eval mode, on ``base``'s device and dtype. With ``base``, a
    one-line :class:`CheckpointError` unless it is the model the control was trained on (same config
    and weights sha256)."""
    path = Path(path)
    info, tensors = _open(path, read_tensors=True)
    if base is not None:
        check_base(info, base)
    net = ARCHS[info.settings.arch](info.base, info.settings)
    expected = net.state_dict()
    if set(expected) != set(tensors) or any(tensors[k].shape != expected[k].shape for k in expected):
        wrong = sorted(set(expected) ^ set(tensors)) or [k for k in expected if tensors[k].shape != expected[k].shape]
        raise CheckpointError(f"{path}: weights do not match the stored settings (e.g. {wrong[0]})")
    net.load_state_dict(tensors, strict=True)
    if base is not None:
        net = net.to(next(base.parameters()))
    return net.eval()


def check_base(info: ControlFile, base: Denoiser) -> None:
    """A one-line CheckpointError unless ``base`` is the model the control file was trained on."""
    if base.config.model_dump() != info.base.model_dump():
        field = next(k for k, v in info.base.model_dump().items() if base.config.model_dump().get(k) != v)
        raise CheckpointError(
            f"{info.path}: this {info.settings.arch} was built for another base model ({field}: {getattr(info.base, field)!r}, "
            f"the base model has {getattr(base.config, field)!r})"
        )
    sha = weights_sha256(base)
    if info.base_sha256 and sha != info.base_sha256:
        raise CheckpointError(
            f"{info.path}: this {info.settings.arch} was trained on other base weights (sha256 {info.base_sha256[:12]}, "
            f"the base model's is {sha[:12]}); use it with the base model it was trained on"
        )
