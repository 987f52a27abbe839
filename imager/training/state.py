"""Full training state on disk, without pickles: safetensors for tensors, JSON for the rest.

A checkpoint is a directory ``step-00001234/`` holding

    model.safetensors       raw weights + model config (imager.models.checkpoint format)
    ema.safetensors         EMA weights in the same format: a standalone model for sampling
    optimizer.safetensors   every tensor of the optimizer state; its other values are in state.json
    rng.safetensors         torch CPU (and CUDA) generator states
    state.json              step, optimizer param groups, loader position, Python and NumPy RNG
                            states, anything else the loop adds (the LR is a function of the step)

It is written as ``.step-00001234.tmp`` and renamed when complete, then the ``latest`` file is
replaced atomically: a write killed at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imager.errors import CheckpointError
from imager.io import atomic_write_json, atomic_write_text

LATEST = "latest"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "values": values}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["values"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _save_weights(model: torch.nn.Module, path: Path, extra: dict[str, Any]) -> None:
    """A network as a model file (:func:`save_model`); a base model with a control (a module that
    is not itself a network) as its plain state dict."""
    from safetensors.torch import save_file

    from imager.models.base import Denoiser
    from imager.models.checkpoint import _unwrap, save_model

    if isinstance(_unwrap(model), Denoiser):
        save_model(model, path, extra=extra)
    else:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}, str(path))


def save_training_state(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, keep the last ``keep``."""
    from safetensors.torch import save_file

    root = Path(root)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_weights(model, tmp / "model.safetensors", extra={"step": step})
    _save_weights(ema_model, tmp / "ema.safetensors", extra={"step": step, "ema": True})
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = rng_state()
    save_file({**rng_tensors, **{f"extra.{k}": v.contiguous() for k, v in (tensors or {}).items()}}, str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_meta, **extra})
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text(encoding="utf-8").strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which is incomplete; delete {root} to start over")
    return path


def load_training_state(path: Path, *, model, ema_model, optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights, optimizer and RNG states from ``path``; return (state.json, extra tensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        # The files' tensors go straight into the modules (strictly): their names are the live
        # model's, adapter layers included.
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        ema_model.load_state_dict(load_file(str(path / "ema.safetensors")))
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({exc})") from None
    set_rng_state({k: v for k, v in rng.items() if not k.startswith("extra.")}, meta["rng"])
    extra = {k.removeprefix("extra."): v for k, v in rng.items() if k.startswith("extra.")}
    return meta, extra
