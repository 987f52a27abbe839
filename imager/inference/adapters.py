"""LoRA adapters on a loaded cascade: ``FILE[:SCALE]`` specs, loaded once, weighted per call.

Each adapter file says which model of the cascade it adapts (base or SR) and the weights it was
trained on; it is loaded the first time it is asked for, under a name of its own, and stays
loaded, so a server can change adapters and weights between requests without reloading anything.
:func:`use_adapters` makes exactly the adapters it is given active at their scales (every other
one is not run, as is an adapter at scale 0: the output is then the base model's exactly), and can
merge them into the weights for speed; the next call unmerges first, giving back the base weights
bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imager.errors import ConfigError
from imager.models import lora

if TYPE_CHECKING:
    from imager.inference.cascade import Cascade

MAX_ADAPTERS = 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSpec:
    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_spec(text: str, option: str = "--lora") -> AdapterSpec:
    """``FILE`` or ``FILE:SCALE`` (a scale is a number; a path may itself hold colons); errors name ``option``."""
    text = text.strip()
    head, sep, tail = text.rpartition(":")
    scale = 1.0
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            head = text  # a colon inside the path, no scale
    else:
        head = text
    if not head:
        raise ConfigError(f"{option}: '{text}': expected FILE or FILE:SCALE")
    if scale != scale or abs(scale) > 100:  # NaN or absurd
        raise ConfigError(f"{option}: '{text}': the scale must be a number in [-100, 100]")
    return AdapterSpec(Path(head).expanduser(), scale)


@dataclass
class _StageAdapters:
    base_sha256: str
    names: dict[tuple[str, str], str] = field(default_factory=dict)  # (resolved path, file sha) -> adapter name
    files: dict[str, lora.AdapterFile] = field(default_factory=dict)  # adapter name -> its file


def _state(cascade: Cascade, stage: str) -> _StageAdapters:
    registry = cascade.__dict__.setdefault("_adapters", {})
    if stage not in registry:
        model = _model(cascade, stage)
        registry[stage] = _StageAdapters(lora.weights_sha256(model))
    return registry[stage]


def _model(cascade: Cascade, stage: str):
    target = cascade.base if stage == "base" else cascade.sr
    if target is None:
        raise ConfigError("this adapter is for the super-resolution model, and the cascade has none")
    return target.model


def use_adapters(cascade: Cascade, specs: list[AdapterSpec], *, merge: bool = False) -> list[lora.AdapterFile]:
    """Make ``specs`` (and nothing else) the active adapters of ``cascade``; returns their files."""
    from imager.inference.metadata import file_sha256

    if len(specs) > MAX_ADAPTERS:
        raise ConfigError(f"--lora: at most {MAX_ADAPTERS} adapters at once, got {len(specs)}")
    for stage in ("base", "sr"):
        if stage in cascade.__dict__.get("_adapters", {}):
            lora.unmerge(_model(cascade, stage))
    scales: dict[str, dict[str, float]] = {}
    files = []
    for spec in specs:
        adapter = lora.read_adapter(spec.path)
        state = _state(cascade, adapter.stage)
        key = (str(spec.path.resolve()), file_sha256(spec.path))
        name = state.names.get(key)
        if name is None:
            name = f"adapter{len(state.names)}"
            device = next(_model(cascade, adapter.stage).parameters()).device
            lora.load_adapter(_model(cascade, adapter.stage), adapter, name, base_sha256=state.base_sha256)
            _model(cascade, adapter.stage).to(device)
            state.names[key], state.files[name] = name, adapter
        if spec.scale == 0 or not adapter.has_effect:
            log.warning("adapter %s has no effect: %s", spec.path, "its scale is 0" if spec.scale == 0 else "its B weights are all zero (untrained)")
        stage_scales = scales.setdefault(adapter.stage, {})
        stage_scales[name] = stage_scales.get(name, 0.0) + spec.scale
        files.append(adapter)
    for stage, state in cascade.__dict__.get("_adapters", {}).items():
        wanted = {name: scales.get(stage, {}).get(name, 0.0) for name in state.files}
        model = _model(cascade, stage)
        lora.set_scales(model, wanted)
        if merge:
            lora.merge(model)
    return files


def adapter_record(specs: list[AdapterSpec], files: list[lora.AdapterFile]) -> list[dict[str, object]]:
    """What an image's metadata says about the adapters that made it."""
    from imager.inference.metadata import file_sha256

    return [
        {"file": str(s.path), "scale": s.scale, "sha256": file_sha256(s.path), "stage": f.stage, "rank": f.settings.rank}
        for s, f in zip(specs, files, strict=True)
    ]
