"""One trained model sampled: network + text condition + settings -> images, on the model's device.

:class:`Stage` holds a network with what sampling it needs (schedule, prediction target, output
resolution; for super-resolution its input resolution and noise-augmentation level) and
:meth:`Stage.sample` draws images for a text condition with a :class:`StageSampling`. Everything
that samples a model goes through it: the training grids, the cascade (evaluate, ``imager
generate``, the MLflow model) and the benchmark.

Devices: the network runs where its weights are and in their dtype; the condition, the negative
prompt and the SR input follow it, and the sampler's state stays float32. Noise is drawn from a
CPU generator and moved to the model's device, so a seed gives the same noise on every device: CPU
and GPU images of one seed differ only by the floating-point differences of their kernels (small
for the deterministic samplers; a stochastic sampler adds them up over its steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from imager.diffusion.config import ScheduleConfig
from imager.diffusion.schedule import NoiseSchedule
from imager.errors import CheckpointError, ConfigError, SamplerError
from imager.inference.config import StageSampling
from imager.models.checkpoint import load_model, read_checkpoint_meta
from imager.samplers import cfg_net, get_sampler, model_denoiser, sample, thresholded

if TYPE_CHECKING:
    from imager.models.control import ControlInput

Tensor = torch.Tensor
Cond = tuple[Tensor, Tensor, Tensor]  # tokens (B, L, D), mask (B, L) bool, pooled (B, P)


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` or ``cuda[:i]`` as given. A ConfigError
    that starts with ``what`` (the option or key that gave it) for anything else, or for a CUDA
    device torch cannot see."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}: unknown device '{name}'; use auto, cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}: '{name}' is not supported; use auto, cpu or cuda[:i]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}: '{name}' asked for, but torch sees no CUDA device; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{what}: '{name}' asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_sampling(cfg: StageSampling) -> None:
    """A SamplerError now, before any model loads, for a sampler option the sampler does not take."""
    if cfg.sampler is None:
        raise SamplerError("no sampler given")
    spec = get_sampler(cfg.sampler)
    given = set(cfg.options) | ({"eta"} if cfg.eta is not None else set())
    unknown = sorted(given - set(spec.options))
    if unknown:
        raise SamplerError(f"sampler '{spec.name}' takes no option '{unknown[0]}'; it takes: {', '.join(spec.options) or 'none'}")


def _to(cond: Cond, device: torch.device, dtype: torch.dtype) -> Cond:
    """Floats to ``dtype`` and everything to ``device``."""
    return tuple(c.to(device, dtype) if c.is_floating_point() else c.to(device) for c in cond)  # type: ignore[return-value]


def _with_null_rows(negative: Cond, null: Cond) -> Cond:
    """``negative`` with its rows of all-False mask replaced by the null condition's rows."""
    tokens, mask, pooled = negative
    null_tokens, null_mask, null_pooled = (t[:1].expand(tokens.shape[0], *t.shape[1:]) for t in null)
    empty = ~mask.any(dim=1)  # (B,)
    if not bool(empty.any()):
        return negative
    return (
        torch.where(empty[:, None, None], null_tokens, tokens),
        torch.where(empty[:, None], null_mask, mask),
        torch.where(empty[:, None], null_pooled, pooled),
    )


@dataclass
class Stage:
    """One trained model with what sampling it needs."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    prediction: str
    resolution: int
    lowres: int | None = None  # SR only: the input resolution
    aug_level: float = 0.0  # SR only: the noise-aug level it was trained to sample with

    @classmethod
    def load(cls, path: str | Path, *, super_resolution: bool, what: str, makes: str, device: str | torch.device = "cpu") -> Stage:
        """A model file written by a training stage (it carries its sampling metadata), on ``device``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no {what} model; train it first with `{makes}`")
        config, extra = read_checkpoint_meta(path)
        if config.super_resolution != super_resolution:
            kind = "a super-resolution" if config.super_resolution else "a base"
            raise CheckpointError(f"{path}: holds {kind} model, expected the {what} model")
        missing = [k for k in ("schedule", "prediction", "resolution") if k not in extra]
        if super_resolution:
            missing += [k for k in ("lowres",) if k not in extra]
        if missing:
            raise CheckpointError(f"{path}: no sampling metadata ({', '.join(missing)}); retrain it with `{makes}`")
        return cls(
            model=load_model(path).to(resolve_device(device)).eval(),
            schedule=NoiseSchedule.from_config(ScheduleConfig.model_validate(extra["schedule"])),
            prediction=extra["prediction"],
            resolution=int(extra["resolution"]),
            lowres=int(extra["lowres"]) if super_resolution else None,
            aug_level=float(extra.get("aug_level", 0.0)),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        cfg: StageSampling,
        *,
        seed: int,
        negative: Cond | None = None,
        lowres: Tensor | None = None,
        aug_level: Tensor | None = None,
        on_denoise: Callable[[Tensor], None] | None = None,
        init: Tensor | None = None,
        mask: Tensor | None = None,
        strength: float = 1.0,
        resample: int = 1,
        overlay: bool = True,
        control: Sequence[ControlInput] = (),
    ) -> Tensor:
        """(B, 3, R, R) samples in [-1, 1] on the model's device for the text condition ``cond``.

        A row of ``cond`` with an all-False mask (an empty prompt, :func:`encode_prompts` with
        ``allow_empty``) takes the model's null condition: unconditional sampling, e.g. inpainting
        from the image alone. Classifier-free guidance (``cfg.guidance``) contrasts ``cond`` with ``negative`` (batch B or
        1; a negative prompt's embedding; rows with an all-False mask stand for no negative prompt)
        or, when None, the model's null condition; ``cfg.threshold`` acts on the guided x̂0. The SR model also takes ``lowres`` (B, 3, r, r) in [-1, 1], already
        noise-augmented to ``aug_level`` (B,). ``on_denoise(x̂0)`` sees the guided x̂0 (B, 3, R, R)
        after every denoiser call (live previews). Noise: a CPU generator seeded ``seed``.

        From an image: ``init`` (B or 1, 3, R, R) in [-1, 1] is the start of img2img when
        ``strength`` < 1, and the known image of inpainting when ``mask`` (B or 1, 1, R, R) in
        [0, 1], 1 = repaint, is given (``resample``: RePaint's resampling); the known pixels
        are then overlaid on the result (``overlay``), so they come back exactly where mask = 0.

        ``control``: trained spatial controls (:class:`~imager.models.control.ControlInput`: a
        ControlNet or adapter with its line map (B or 1, 1, R, R), weight and window), base model
        only; their residuals add up, and they act on the conditional and unconditional halves of
        guidance alike, so guidance contrasts the texts. Scale 0 or outside its window a control is not run.
        """
        if cfg.sampler is None:
            raise SamplerError("no sampler given; set the stage's or the cascade's sampler")
        model, device, dtype = self.model, self.device, self.dtype
        model.eval()
        tokens, text_mask, pooled = _to(cond, device, dtype)
        batch = tokens.shape[0]
        uncond = model.null_condition(batch)
        tokens, text_mask, pooled = _with_null_rows((tokens, text_mask, pooled), uncond)  # empty prompts
        if negative is not None:
            uncond = _with_null_rows(_to(negative, device, dtype), uncond)
        if control and lowres is not None:
            raise SamplerError("control: conditions the base model, not the super-resolution model")
        if control:
            from imager.models.control import control_residuals

            size = (batch, 1, self.resolution, self.resolution)
            extra = tuple(_image_input(c.condition, size, "control condition").to(device, dtype) for c in control)
            settings = [(c.net, c.scale, c.start, c.end) for c in control]

            def net(x: Tensor, t: Tensor, tk: Tensor, mk: Tensor, pl: Tensor, *conditions: Tensor) -> Tensor:
                t = t.expand(x.shape[0]) if t.ndim == 0 else t
                acting = [(n, c, scale, start, end) for (n, scale, start, end), c in zip(settings, conditions, strict=True)]
                residuals = control_residuals(acting, x.to(dtype), t, (tk, mk, pl))
                return model(x.to(dtype), t, tk, mk, pl, control=residuals).float()
        elif lowres is None:
            extra: tuple[Tensor, ...] = ()
            net = lambda x, t, tk, mk, pl: model(x.to(dtype), t, tk, mk, pl).float()  # noqa: E731
        else:
            extra = (lowres.to(device, dtype), aug_level.to(device))
            net = lambda x, t, tk, mk, pl, lo, aug: model(x.to(dtype), t, tk, mk, pl, lowres=lo, aug_level=aug).float()  # noqa: E731
        guided = cfg_net(net, (tokens, text_mask, pooled, *extra), (*uncond, *extra), cfg.guidance)
        denoise = thresholded(model_denoiser(guided, self.schedule, self.prediction), cfg.threshold, cfg.percentile)
        if on_denoise is not None:
            inner = denoise

            def denoise(x: Tensor, sigma: Tensor) -> Tensor:
                x0 = inner(x, sigma)
                on_denoise(x0)
                return x0

        shape = (batch, model.config.out_channels, self.resolution, self.resolution)
        if init is not None:
            init = _image_input(init, shape, "init image").float().to(device)
        if mask is not None:
            if init is None:
                raise SamplerError("a mask needs an init image (the known pixels)")
            mask = _image_input(mask, (batch, 1, *shape[2:]), "mask").float().to(device)
        if init is None and strength < 1:
            raise SamplerError(f"strength {strength} needs an input image; without one use strength 1")
        gen = torch.Generator().manual_seed(seed)
        x = sample(
            denoise,
            shape,
            self.schedule,
            sampler=cfg.sampler,
            steps=cfg.steps,
            spacing=cfg.spacing,
            generator=gen,
            eta=cfg.eta,
            device=device,
            init=init if (strength < 1 or mask is not None) else None,
            strength=strength,
            mask=mask,
            resample=resample if mask is not None else 1,
            **cfg.options,
        )
        x = x.clamp(-1, 1)
        if mask is not None and overlay:
            x = overlay_known(x, init, mask)
        return x


def denoiser_calls(stage: Stage, cfg: StageSampling, *, strength: float = 1.0, resample: int = 1, masked: bool = False) -> int:
    """How many denoiser calls :meth:`Stage.sample` makes with these settings (a progress bar's
    total): the sampler run on a 1-pixel image with a free denoiser, so it counts every solver's
    order, the strength's skipped steps and RePaint's resampling exactly as sampling would."""
    calls = 0

    def free(x: Tensor, sigma: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    shape = (1, 1, 1, 1)
    sample(
        free, shape, stage.schedule, sampler=cfg.sampler, steps=cfg.steps, spacing=cfg.spacing, generator=torch.Generator().manual_seed(0),
        eta=cfg.eta, device="cpu", init=torch.zeros(shape) if (strength < 1 or masked) else None, strength=strength,
        mask=torch.ones(shape) if masked else None, resample=resample if masked else 1, **cfg.options,
    )  # fmt: skip
    return calls


def overlay_known(x: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """m·x + (1 − m)·known: the known pixels (mask 0) back exactly, a feathered edge blended; on
    x's device and dtype (the cascade's known image and mask are on the CPU)."""
    known, mask = known.to(x), mask.to(x)
    return torch.where(mask == 0, known, mask * x + (1 - mask) * known)


def _image_input(t: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    """``t`` of batch 1 expanded to ``shape``'s batch; a SamplerError for any other shape."""
    if t.ndim != 4 or tuple(t.shape[1:]) != tuple(shape[1:]) or t.shape[0] not in (1, shape[0]):
        batch = "1" if shape[0] == 1 else f"{shape[0]} or 1"
        raise SamplerError(f"{what}: expected shape ({batch}, {', '.join(map(str, shape[1:]))}), got {tuple(t.shape)}")
    return t.expand(shape)
