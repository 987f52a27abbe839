"""LoRA adapters on Imager's networks, through peft: inject, save, load, weight, merge.

peft's ``inject_adapter_in_model`` wraps each targeted ``nn.Linear``/``nn.Conv2d`` in a LoRA layer
(``W x + scale · B A x``, B zero at the start, so a fresh adapter changes nothing) and freezes
every other parameter. Several adapters live side by side under their own names; each is active
with its own scale (``alpha / rank`` times the user's weight), and an adapter at scale 0 is not
run at all, so the output is the base model's exactly.

An adapter file is one safetensors file: the tensors ``<module path>.lora_A.weight`` and
``<module path>.lora_B.weight`` for each adapted layer (the names peft's own state dict gives with
the adapter name removed), and in the ``imager`` metadata entry a JSON object::

    imager_adapter  "lora"
    stage           "base" | "sr": the cascade model it adapts
    base_sha256     weights_sha256 of the model it was trained on: loading it on another is refused
    rank, alpha, dropout, targets    the LoraSettings it was trained with
    extra           the trainer's JSON (step, dataset, ...)

Merging adds the active adapters into the base weights (one matmul less per layer when sampling);
the original weight tensors are kept, so unmerging gives back the base model bit for bit (peft's own
unmerge subtracts the delta, which is not exact in floating point).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imager.errors import CheckpointError, ConfigError
from imager.io import atomic_write_bytes
from imager.models.config import LoraSettings

ADAPTER_KIND = "lora"
TRAINED = "default"  # the name of the adapter a training run adds
METADATA_KEY = "imager"
_ORIGINAL = "_imager_unmerged_weight"  # attribute on a merged layer: its base weight before merging


def require_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs the package peft: pip install peft") from None
    return peft


def _plain_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def weights_sha256(model: nn.Module) -> str:
    """A digest of the base weights (names, dtypes, shapes, values), whatever adapters are injected.

    Computed from the tensors, not a file, so a model saved twice or loaded on another device has one
    identity. Call it before merging: merged weights are other weights.
    """
    h = hashlib.sha256()
    state = {_plain_name(k): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """Module path -> peft LoRA layer, for every adapted layer of ``model``."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model: nn.Module) -> set[str]:
    return {a for layer in lora_layers(model).values() for a in layer.lora_A}


def inject(model: nn.Module, settings: LoraSettings, name: str = "default", *, targets: list[str] | None = None) -> int:
    """Add adapter ``name`` to the layers ``settings.targets`` names (or the exact module paths
    ``targets``); returns how many layers it adapts. Every non-adapter parameter is frozen."""
    peft = require_peft()
    if name in adapter_names(model):
        raise ConfigError(f"an adapter named '{name}' is already on this model")
    arch = getattr(getattr(model, "config", None), "arch", "imager")
    wanted = list(targets) if targets is not None else list(settings.target_names(arch))
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.scale_alpha, lora_dropout=settings.dropout, target_modules=wanted,
        init_lora_weights=True, bias="none",
    )
    try:
        with warnings.catch_warnings():  # several adapters side by side are what this module is for
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            peft.inject_adapter_in_model(config, model, adapter_name=name)
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"lora.targets: no layer of the {arch} network matches {wanted} ({first[:160]})") from None
    count = sum(name in layer.lora_A for layer in lora_layers(model).values())
    if count == 0:
        raise ConfigError(f"lora.targets: no layer of the {arch} network matches {wanted}")
    return count


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name``: ``<path>.lora_A.weight`` and ``<path>.lora_B.weight``."""
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            out[f"{path}.lora_A.weight"] = layer.lora_A[name].weight.detach().to("cpu").contiguous()
            out[f"{path}.lora_B.weight"] = layer.lora_B[name].weight.detach().to("cpu").contiguous()
    if not out:
        raise ConfigError(f"no adapter named '{name}' on this model")
    return out


def save_adapter(
    path: str | Path, model: nn.Module, *, settings: LoraSettings, base_sha256: str, stage: str,
    name: str = "default", extra: dict[str, Any] | None = None,
) -> int:
    """Write adapter ``name`` of ``model`` to ``path`` atomically; returns the file size in bytes."""
    from safetensors.torch import save

    header = {
        "imager_adapter": ADAPTER_KIND, "stage": stage, "base_sha256": base_sha256, "rank": settings.rank,
        "alpha": settings.scale_alpha, "dropout": settings.dropout,
        "targets": settings.targets if isinstance(settings.targets, str) else list(settings.targets),
        "extra": extra or {},
    }
    data = save(adapter_state(model, name), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return len(data)


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    stage: str
    base_sha256: str
    settings: LoraSettings
    tensors: dict[str, torch.Tensor]
    extra: dict[str, Any]

    @property
    def layers(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})

    @property
    def has_effect(self) -> bool:
        """False when every B matrix is zero: such an adapter (a fresh one) changes nothing."""
        return any(bool(t.any()) for k, t in self.tensors.items() if k.endswith(".lora_B.weight"))

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def read_adapter(path: str | Path) -> AdapterFile:
    """An adapter file, checked; every problem is a one-line :class:`CheckpointError` naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    try:
        meta = json.loads(raw.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid imager metadata ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("imager_adapter") != ADAPTER_KIND:
        raise CheckpointError(f"{path}: not an Imager LoRA adapter (no imager_adapter metadata); a model file goes to --base/--sr, not --lora")
    try:
        settings = LoraSettings(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"], targets=meta["targets"])
        stage, base = str(meta["stage"]), str(meta["base_sha256"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid adapter metadata ({str(exc).splitlines()[0]})") from None
    if stage not in ("base", "sr"):
        raise CheckpointError(f"{path}: invalid adapter metadata (stage '{stage}', expected base or sr)")
    bad = [k for k in tensors if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if bad or not tensors:
        raise CheckpointError(f"{path}: invalid adapter tensors ({'unexpected ' + bad[0] if bad else 'none'})")
    return AdapterFile(path, stage, base, settings, tensors, meta.get("extra") or {})


def load_adapter(model: nn.Module, adapter: AdapterFile, name: str, *, base_sha256: str) -> None:
    """Inject ``adapter`` into ``model`` as ``name``, after checking it was trained on these weights."""
    if adapter.base_sha256 != base_sha256:
        raise CheckpointError(
            f"{adapter.path}: this adapter was trained on another {adapter.stage} model "
            f"(weights {adapter.base_sha256[:12]}, this one is {base_sha256[:12]}); use it with the model it was trained on"
        )
    modules = dict(model.named_modules())
    missing = [p for p in adapter.layers if p not in modules and p not in lora_layers(model)]
    if missing:
        raise CheckpointError(f"{adapter.path}: the model has no layer {missing[0]}")
    inject(model, adapter.settings, name, targets=adapter.layers)
    layers = lora_layers(model)
    try:
        with torch.no_grad():
            for path in adapter.layers:
                layer = layers[path]
                for part, weights in (("lora_A", layer.lora_A[name].weight), ("lora_B", layer.lora_B[name].weight)):
                    value = adapter.tensors.get(f"{path}.{part}.weight")
                    if value is None or value.shape != weights.shape:
                        got = "missing" if value is None else f"shape {tuple(value.shape)}"
                        raise CheckpointError(f"{adapter.path}: {path}.{part}.weight is {got}, the model's is {tuple(weights.shape)}")
                    weights.copy_(value.to(weights.dtype))
    except CheckpointError:
        for layer in layers.values():  # leave the model as it was
            if name in layer.lora_A:
                layer.delete_adapter(name)
        raise
    model.requires_grad_(False)


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Make exactly the adapters of ``scales`` with a non-zero weight active, each at
    ``weight · alpha / rank``; the others (and those at 0) are not run."""
    if is_merged(model):
        raise ConfigError("unmerge the adapters before changing their weights")
    known = adapter_names(model)
    unknown = sorted(set(scales) - known)
    if unknown:
        raise ConfigError(f"no adapter named '{unknown[0]}' on this model")
    active = [n for n, s in scales.items() if s != 0]
    for layer in lora_layers(model).values():
        here = [n for n in active if n in layer.lora_A]
        layer.set_adapter(here, inference_mode=True) if _takes_inference_mode(layer) else layer.set_adapter(here)
        for n in here:
            layer.set_scale(n, float(scales[n]))


def _takes_inference_mode(layer) -> bool:
    import inspect

    return "inference_mode" in inspect.signature(layer.set_adapter).parameters


def is_merged(model: nn.Module) -> bool:
    return any(_ORIGINAL in vars(layer) for layer in lora_layers(model).values())


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold the active adapters (at their scales) into the base weights."""
    if is_merged(model):
        return
    for layer in lora_layers(model).values():
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if not active:
            continue
        weight = layer.get_base_layer().weight
        vars(layer)[_ORIGINAL] = weight.data
        layer.merge(safe_merge=True, adapter_names=active)  # writes a new tensor; the original is kept


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Give back the weights :func:`merge` replaced, bit for bit."""
    for layer in lora_layers(model).values():
        original = vars(layer).pop(_ORIGINAL, None)
        if original is not None:
            layer.get_base_layer().weight.data = original
            layer.merged_adapters.clear()
