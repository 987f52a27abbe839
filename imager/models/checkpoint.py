"""Model checkpoints that rebuild themselves: one .safetensors file with the weights and, in its
metadata, the resolved :class:`UNetConfig` (nanoGPT's ``model_args`` idea). No pickle anywhere.

File layout (safetensors header metadata, all strings)::

    imager_model   "unet"
    config         UNetConfig as JSON
    extra          caller's JSON (step, EMA decay, objective, ...); "{}" when none

Tensors are the module's ``state_dict``: parameters and persistent buffers, including the null
condition of classifier-free guidance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from imager.errors import CheckpointError
from imager.io import atomic_write_bytes
from imager.models.base import Denoiser
from imager.models.config import UNetConfig
from imager.models.factory import build_denoiser

MODEL_KIND = "unet"
METADATA_KEY = "imager"


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DDP (``module``) wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a :class:`Denoiser`, possibly compiled or DDP-wrapped) to one .safetensors file.

    Written to a temporary file in the same directory and renamed into place, so ``path`` is either
    the old file or the complete new one. ``extra`` must be JSON-serialisable.
    """
    model = _unwrap(model)
    if not isinstance(model, Denoiser):
        raise TypeError(f"save_model: expected a Denoiser (UNet), got {type(model).__name__}")
    try:
        extra_json = json.dumps(extra or {}, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_model: extra must be JSON-serialisable ({exc})") from None
    # One metadata entry: safetensors writes its metadata map in an arbitrary order, so several
    # entries would make identical models give different bytes (and different DVC hashes).
    header = {"imager_model": MODEL_KIND, "config": model.config.model_dump(mode="json"), "extra": json.loads(extra_json)}
    metadata = {METADATA_KEY: json.dumps(header, sort_keys=True)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def read_checkpoint_meta(path: str | Path) -> tuple[UNetConfig, dict[str, Any]]:
    """(config, extra) of a checkpoint, without reading its tensors. Raises :class:`CheckpointError`."""
    path = Path(path)
    metadata, _ = _open(path)
    return _parse_metadata(path, metadata)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Denoiser:
    """Rebuild the network (:class:`UNet`, or the ``arch: diffusers`` baseline) saved at ``path`` from the file alone, in eval mode, on ``map_location``.

    The config comes from the file's metadata and the weights are loaded strictly; floating-point
    parameters keep the dtype they were saved in. Raises :class:`CheckpointError` (one line naming
    the file) for a missing file, a file that is not safetensors, missing or invalid imager
    metadata, and weights that do not match the stored config.
    """
    path = Path(path)
    metadata, tensors = _open(path, read_tensors=True)
    config, _ = _parse_metadata(path, metadata)
    model = build_denoiser(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "", f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""]
        raise CheckpointError(f"{path}: weights do not match the stored config: " + ", ".join(p for p in parts if p))
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: weights do not match the stored config: {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    float_dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model.to(float_dtypes.pop())
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval()


def _open(path: Path, read_tensors: bool = False) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if read_tensors else {}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # noqa: BLE001 (safetensors raises several types for a foreign file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    return metadata, tensors


def _parse_metadata(path: Path, raw: dict[str, str] | None) -> tuple[UNetConfig, dict[str, Any]]:
    try:
        metadata = json.loads((raw or {}).get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid imager metadata ({exc.msg})") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: invalid imager metadata (not a JSON object)")
    kind = metadata.get("imager_model")
    if kind is None:
        raise CheckpointError(f"{path}: no imager metadata; not a checkpoint written by imager.models.save_model")
    if kind != MODEL_KIND:
        raise CheckpointError(f"{path}: holds an imager model of kind '{kind}', expected '{MODEL_KIND}'")
    try:
        config = UNetConfig.model_validate(metadata.get("config"))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: invalid model config in metadata: {where + ': ' if where else ''}{first['msg']}") from None
    extra = metadata.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: invalid 'extra' metadata (not a JSON object)")
    return config, extra
