"""The in-domain evaluator: a small CNN image encoder tuned contrastively against frozen caption
embeddings (locked-text tuning, LiT: Zhai et al. 2022), and its self-describing checkpoint.

Glossary: ``features`` f(x) (B, F) are the pooled CNN features used for FID; ``embed`` e(x) (B, D)
is their L2-normalised projection into the text space; τ is the learned temperature; t (B, D)
are the batch's L2-normalised text embeddings. Loss: symmetric InfoNCE (CLIP, Radford et al. 2021,
Fig. 3) over logits e(x) tᵀ / τ, with every sample sharing an identical caption counted as a
positive.

Checkpoint layout (one .safetensors file; header metadata, one key)::

    imager   JSON {"imager_model": "evaluator", "config": Evaluator, "text_dim": D}
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from tqdm.auto import tqdm

from imager.errors import CheckpointError
from imager.evaluation.config import Evaluator
from imager.io import atomic_write_bytes
from imager.training.optim import adamw

logger = logging.getLogger(__name__)

MODEL_KIND = "evaluator"
METADATA_KEY = "imager"
MIN_TEMPERATURE = 0.01  # CLIP's cap on the logit scale (100)


def resize(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): area averaging when shrinking, bilinear when enlarging."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if h >= size and w >= size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _norm(channels: int) -> nn.BatchNorm2d:
    # BatchNorm, not GroupNorm: on small objects over a plain background (emoji) GroupNorm and
    # no-norm variants learned colour at once but shape not at all in 100 steps; BatchNorm did.
    return nn.BatchNorm2d(channels)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), _norm(c_out), nn.SiLU())


class _Stage(nn.Module):
    """Halve the resolution (stride-2 conv), then one residual conv: (B, C_in, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.down, self.res = _conv(c_in, c_out, stride=2), _conv(c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.res(x)


class ImageEvaluator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1], any size (resized to ``cfg.resolution``) -> features / embeddings.

    A stride-2 stem conv to ``channels[0]``, then one stride-2 stage per ``channels`` entry (64 px
    -> 32 -> 16 -> 8 -> 4 with the defaults; the strided stem makes training ~4x faster on CPU
    than a full-resolution one), global average pooling and a linear map to ``feature_dim``.
    Convs are followed by BatchNorm + SiLU; in eval mode (as loaded and as returned by training)
    BatchNorm uses its running statistics, so an image's features do not depend on its batch.
    ``forward`` is ``features``, and ``num_features`` is set, so the model plugs into
    :class:`imager.evaluation.metrics.FID` as is.
    """

    def __init__(self, cfg: Evaluator, text_dim: int):
        super().__init__()
        if text_dim < 1:
            raise ValueError(f"ImageEvaluator: text_dim must be >= 1, got {text_dim}")
        self.cfg, self.text_dim = cfg, text_dim
        self.num_features = cfg.feature_dim
        self.stem = _conv(3, cfg.channels[0], stride=2)
        self.stages = nn.Sequential(*(_Stage(c_in, c_out) for c_in, c_out in zip((cfg.channels[0], *cfg.channels), cfg.channels, strict=False)))
        self.head = nn.Linear(cfg.channels[-1], cfg.feature_dim)
        self.proj = nn.Linear(cfg.feature_dim, text_dim, bias=False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature)))  # log τ

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp().clamp(min=MIN_TEMPERATURE)

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim): the FID features."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ImageEvaluator: expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = resize(images.to(self.head.weight.dtype), self.cfg.resolution)
        x = self.stages(self.stem(x))  # (B, C, r, r)
        return self.head(x.mean(dim=(2, 3)))  # (B, F)

    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, text_dim), L2-normalised: comparable with caption embeddings."""
        return F.normalize(self.proj(self.features(images)), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


# ------------------------------------------------------------------------------------------ training


def _augment(images: Tensor, cfg: Evaluator, generator: torch.Generator) -> Tensor:
    """uint8 (B, 3, S, S) -> float (B, 3, r, r) in [-1, 1], r = cfg.resolution: a random translation
    of up to r/16 px per image (edge-replicating pad + crop) and, with probability
    ``cfg.lowres_augment`` per batch, a 2x area-down / bilinear-up resize. No flips: emoji such as
    "left arrow" are not mirror-symmetric."""
    x = resize(images.float() / 127.5 - 1, cfg.resolution)
    b, _, r, _ = x.shape
    s = max(1, r // 16)
    padded = F.pad(x, (s, s, s, s), mode="replicate")  # (B, 3, r+2s, r+2s)
    dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = dy[:, None] + torch.arange(r)  # (B, r)
    cols = dx[:, None] + torch.arange(r)  # (B, r)
    x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, r, r, 3)
    x = x.permute(0, 3, 1, 2).contiguous()
    if float(torch.rand((), generator=generator)) < cfg.lowres_augment:
        x = resize(resize(x, max(1, r // 2)), r)
    return x


def _contrastive_loss(emb: Tensor, text: Tensor, same: Tensor, temperature: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over (B, D) image and text embeddings; ``same`` (B, B) bool marks pairs
    with an identical caption (positives, weighted equally). Returns (loss, image->text accuracy).

    Identical captions give identical logit columns (image->text) and rows (text->image), so this
    loss equals one-hot InfoNCE's in value and gradient; ``same`` matters for the accuracy, where
    an image that picks its caption's twin is right."""
    logits = emb @ text.T / temperature  # (B, B)
    targets = same.float() / same.sum(dim=1, keepdim=True)  # rows sum to 1; `same` is symmetric
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    accuracy = same.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    return loss, accuracy


def train_evaluator(
    cfg: Evaluator,
    images: Tensor,
    text_emb: Tensor,
    *,
    progress: bool = True,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> tuple[ImageEvaluator, dict[str, Any]]:
    """Train an :class:`ImageEvaluator` on uint8 images (N, 3, S, S) paired with frozen caption
    embeddings (N, D) (normalised here). AdamW with cosine decay to 0 over all steps; each epoch
    sees a fresh shuffle and ``N // batch_size`` full batches (all N in one batch when N is smaller).

    Deterministic on CPU for a given ``cfg.seed`` (and thread count): the init is seeded inside a
    forked global RNG, shuffling and augmentation use their own generator. ``log(metrics, epoch)``
    gets the epoch's mean loss and train accuracy. Returns the model (eval mode) and a summary:
    loss, accuracy, epochs, steps, images_per_s, seconds, parameters.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"train_evaluator: expected uint8 images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if text_emb.ndim != 2 or len(text_emb) != len(images):
        raise ValueError(f"train_evaluator: expected text_emb (N={len(images)}, D), got {tuple(text_emb.shape)}")
    n = len(images)
    if n < 2:
        raise ValueError("train_evaluator: needs at least 2 images")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, images, text_emb, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: Evaluator, images: Tensor, text_emb: Tensor, *, progress: bool, log: Callable[[dict[str, float], int], None] | None
) -> tuple[ImageEvaluator, dict[str, Any]]:
    n = len(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ImageEvaluator(cfg, text_emb.shape[1])
    generator = torch.Generator().manual_seed(cfg.seed)
    text = F.normalize(text_emb.float(), dim=-1)  # (N, D), frozen targets
    caption = torch.unique(text, dim=0, return_inverse=True)[1]  # (N,) one id per distinct caption

    batch = min(cfg.batch_size, n)
    per_epoch = n // batch
    total = per_epoch * cfg.epochs
    decay = [p for p in model.parameters() if p.ndim >= 2]  # conv and linear weights; not norms, biases, τ
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = adamw([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))

    model.train()
    bar = tqdm(total=total, desc="evaluator", unit="batch", disable=not progress, leave=False)
    start = time.perf_counter()
    loss_sum = acc_sum = 0.0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum = acc_sum = 0.0
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            x = _augment(images[idx], cfg, generator)
            same = caption[idx][:, None] == caption[idx][None, :]  # (B, B)
            loss, accuracy = _contrastive_loss(model.embed(x), text[idx], same, model.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, acc_sum = loss_sum + loss.item(), acc_sum + accuracy.item()
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        metrics = {"loss": loss_sum / per_epoch, "accuracy": acc_sum / per_epoch, "temperature": model.temperature.detach().item()}
        if log is not None:
            log(metrics, epoch + 1)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    summary = {
        "loss": loss_sum / per_epoch,
        "accuracy": acc_sum / per_epoch,
        "epochs": cfg.epochs,
        "steps": total,
        "images_per_s": total * batch / seconds,
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    logger.info("evaluator: %d steps in %.1f s (%.0f images/s), final loss %.3f", total, seconds, summary["images_per_s"], summary["loss"])
    return model, summary


# ---------------------------------------------------------------------------------------- checkpoint


def save_evaluator(model: ImageEvaluator, path: str | Path) -> None:
    """Write ``model`` to one .safetensors file (weights + config and text_dim in the metadata),
    through a temporary file renamed into place."""
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, ImageEvaluator):
        raise TypeError(f"save_evaluator: expected an ImageEvaluator, got {type(model).__name__}")
    header = {"imager_model": MODEL_KIND, "config": model.cfg.model_dump(mode="json"), "text_dim": model.text_dim}
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}  # one entry: byte-identical files
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_evaluator(path: str | Path, map_location: str | torch.device = "cpu") -> ImageEvaluator:
    """Rebuild the evaluator saved at ``path`` from the file alone, in eval mode. Raises
    :class:`CheckpointError` (one line naming the file) when it is missing or not an evaluator."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no evaluator; run `imager train-evaluator` (or `dvc repro train_evaluator`)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    try:
        header = json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid imager metadata ({exc.msg})") from None
    if not isinstance(header, dict) or header.get("imager_model") != MODEL_KIND:
        kind = header.get("imager_model") if isinstance(header, dict) else None
        what = f"holds an imager model of kind '{kind}'" if kind else "has no imager metadata"
        raise CheckpointError(f"{path}: {what}, not an evaluator; run `imager train-evaluator` (or `dvc repro train_evaluator`)")
    try:
        cfg = Evaluator.model_validate(header.get("config"))
        model = ImageEvaluator(cfg, int(header["text_dim"]))
        model.load_state_dict(tensors, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: invalid evaluator config in metadata: {where + ': ' if where else ''}{first['msg']}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise CheckpointError(f"{path}: weights do not match the stored evaluator config ({detail[-1][:160]})") from None
    return model.to(map_location).eval()
