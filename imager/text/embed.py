"""The embed step: captions of all shard splits -> the embedding cache.

With ``distributor: ray`` the distinct captions are encoded by Ray tasks, each a run of whole
batches cut exactly where the local run cuts them, so every batch is padded the same and the cache
is the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imager.data.shard import SPLITS, shard_paths
from imager.errors import DataError
from imager.text.base import TextEmbeddings, TextEncoder
from imager.text.cache import build_cache, read_captions
from imager.text.config import Embed
from imager.text.factory import load_text_encoder


def embed(shards_dir: Path, out: Path, cfg: Embed) -> dict[str, Any]:
    """Encode every caption of every split in ``shards_dir``; return the report."""
    paths = [p for split in SPLITS for p in shard_paths(shards_dir, split)]
    keys, captions = read_captions(paths)
    if not keys:
        raise DataError(f"{shards_dir}: the shards hold no samples")
    encoder = load_text_encoder(cfg)
    if cfg.distributor == "ray":
        encoder = Precomputed(encoder, encode_on_ray(sorted(set(captions)), cfg))
    return build_cache(keys, captions, encoder, Path(out), cfg.batch_size, cfg.prompts)


def encode_on_ray(unique: list[str], cfg: Embed) -> dict[tuple[str, ...], TextEmbeddings]:
    """The embeddings of ``unique`` (the sorted distinct captions) in the local run's batches,
    computed by Ray tasks; batch (as a tuple of captions) -> its embeddings."""
    from imager.distributed import map_units, units_of

    batches = [tuple(unique[i : i + cfg.batch_size]) for i in range(0, len(unique), cfg.batch_size)]
    units = units_of(batches, max(1, math.ceil(cfg.ray.unit / cfg.batch_size)))
    results: dict[tuple[str, ...], TextEmbeddings] = {}
    done = map_units(_encode_unit, units, "ray", cfg.ray, shared=cfg, desc="embed", weight=_captions, unit_name="caption")
    for unit, encoded in zip(units, done, strict=True):
        results.update(zip(unit, encoded, strict=True))
    return results


def _captions(unit: Sequence[tuple[str, ...]]) -> int:
    return sum(len(b) for b in unit)


_WORKER_ENCODER: dict[str, TextEncoder] = {}  # one encoder per Ray worker process, loaded by its first unit


def _encode_unit(unit: Sequence[tuple[str, ...]], cfg: Embed) -> list[TextEmbeddings]:
    key = cfg.model_dump_json()
    if key not in _WORKER_ENCODER:
        _WORKER_ENCODER.clear()
        _WORKER_ENCODER[key] = load_text_encoder(cfg)
    return [_WORKER_ENCODER[key].encode(list(batch)) for batch in unit]


@dataclass
class Precomputed:
    """An encoder that answers the batches encoded elsewhere, and asks ``encoder`` (the same model)
    for anything else (the empty caption, the prompts)."""

    encoder: TextEncoder
    batches: dict[tuple[str, ...], TextEmbeddings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id, self.token_dim, self.pooled_dim, self.max_length = self.encoder.id, self.encoder.token_dim, self.encoder.pooled_dim, self.encoder.max_length

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        found = self.batches.pop(tuple(captions), None)
        return found if found is not None else self.encoder.encode(captions)
